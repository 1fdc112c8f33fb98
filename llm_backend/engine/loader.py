"""Load a GGUF file into a ready-to-run ``Transformer`` + ``EngineTokenizer``.

The one entry point the scheduler uses:

Example:
    >>> loaded = load_model("SmolLM2-135M-Instruct.Q4_1.gguf", quant="int8", max_batch=8)
    >>> ids = loaded.tokenizer.encode("Hello")
    >>> logits = loaded.model(torch.tensor([ids]), torch.arange(len(ids))[None],
    ...                       torch.tensor([0]), kv_len=len(ids))
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch
from gguf import GGMLQuantizationType
from torch import nn

from llm_backend.engine import aot
from llm_backend.engine.errors import EngineError, ModelFileError
from llm_backend.engine.gguf_reader import GGUFFile
from llm_backend.engine.memory import trim_heap
from llm_backend.engine.model import ModelArgs, Transformer, unpermute_llama_qk
from llm_backend.engine.quantize import (
    Fp16Linear,
    Int8Embedding,
    Int8Linear,
    cpu_has_native_bf16,
    quantize_int8_rows,
    quantize_linears,
)
from llm_backend.engine.tokenizer import EngineTokenizer
from llm_backend.threads import run_on_fresh_thread

logger = logging.getLogger(__name__)

QuantMode = Literal["auto", "fp32", "bf16", "fp16", "int8", "int4"]
QUANT_MODES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8", "int4")
# Q4_1 blocks are 32 weights along the input dimension, w = d * q + m with codes 0..15,
# and llama.cpp's quantizer always uses codes 0 and 15 in each block: our int4 (group
# 32, min/max affine) recovers d and m, so the file's weights are held again with no
# further rounding (SmolLM2 ppl +0.04% vs fp32 on real text, as int8) at half int8's
# bytes. Q4_0 / Q4_K blocks need not span their full code range, so they are not here.
_FOUR_BIT_EXACT = {GGMLQuantizationType.Q4_1}


def auto_quant(gguf_file: GGUFFile) -> str:
    """``int4`` when every block matmul weight in the file is Q4_1 (int4 holds it
    exactly), else ``int8``: the cheapest format that adds no visible error."""
    names = [
        name
        for name in gguf_file.tensor_names
        if name.startswith("blk.") and name.endswith(".weight") and "norm" not in name
    ]
    if names and all(gguf_file.tensor_type(name) in _FOUR_BIT_EXACT for name in names):
        return "int4"
    return "int8"


@dataclass
class LoadedModel:
    """A model ready for ``prefill`` / ``decode_one_token``, with its tokenizer."""

    model: Transformer
    tokenizer: EngineTokenizer
    args: ModelArgs
    path: Path
    quant: str
    device: str
    # compile_decode="background": the thread building the compiled decode step (it
    # attaches it to the model when done; join it to wait), else None
    decode_build: threading.Thread | None = None

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype (see ``activation_dtype``)."""
        return self.model.dtype


def _load_float_top(
    gguf_file: GGUFFile, model: Transformer, args: ModelArgs, dtype: torch.dtype
) -> None:
    """Embedding, final norm and output projection in ``dtype`` (fp32 / bf16 models); a
    tied output projection is the embedding's Parameter, as in the file."""
    embedding = gguf_file.tensor("token_embd.weight")  # (V, D)
    _assign(gguf_file, model.tok_embeddings, {"weight": embedding}, "tok_embeddings.")
    if not args.tied_embeddings:
        output = {"weight": gguf_file.tensor("output.weight")}  # (V, D)
        _assign(gguf_file, model.output, output, "output.")
    norm = gguf_file.tensor("output_norm.weight")
    _assign(gguf_file, model.norm, {"weight": norm}, "norm.")
    _cast_floats(model, dtype)
    if args.tied_embeddings:  # tied after the cast, which would copy each side apart
        model.output.weight = model.tok_embeddings.weight
    model.norm.weight = nn.Parameter(norm)
    model.keep_norms_float32()


def _load_quantized_top(
    gguf_file: GGUFFile,
    model: Transformer,
    args: ModelArgs,
    dtype: torch.dtype,
    *,
    fp16_output: bool = False,
) -> None:
    """Embedding and output projection as int8 rows, streamed from the file a chunk at a
    time (the float32 vocab matrix is never whole in memory). The output projection
    stays int8 under int4: it is usually stored finer than the blocks (Q8_0 / Q6_K /
    F16 beside Q4 blocks), and 4 bits there costs more quality than its bandwidth saves.
    With tied embeddings one int8 matrix serves both the lookups and the projection.
    ``fp16_output`` (fp16 models): the projection is an ``Fp16Linear`` instead."""
    embedding = _int8_rows(gguf_file, "token_embd.weight", (args.vocab_size, args.dim))
    output_name = "token_embd.weight" if args.tied_embeddings else "output.weight"
    if fp16_output:
        # the projection in fp16 too (its batched GEMM is 2.5x int8's at 32 rows);
        # lookups stay int8 rows (a second vocab matrix in fp16 would be 54 MiB)
        shape = (args.vocab_size, args.dim)
        _check_shape(gguf_file, output_name, shape)
        chunks = _trimming(gguf_file.tensor_row_chunks(output_name))
        model.output = Fp16Linear.from_row_chunks(chunks, shape)
    else:
        output = embedding
        if not args.tied_embeddings:
            output = _int8_rows(gguf_file, output_name, (args.vocab_size, args.dim))
        model.output = Int8Linear(cast(nn.Linear, model.output), quantized=output)
    model.tok_embeddings = Int8Embedding(*embedding, compute_dtype=dtype)
    norm = gguf_file.tensor("output_norm.weight")
    _assign(gguf_file, model.norm, {"weight": norm}, "norm.")
    model.keep_norms_float32()


def _int8_rows(
    gguf_file: GGUFFile, name: str, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrix ``name`` quantized to int8 per row (``quantize_int8_rows``) from float32
    chunks of the file; ``ModelFileError`` when its shape is not ``shape``."""
    _check_shape(gguf_file, name, shape)
    return quantize_int8_rows(gguf_file.tensor_row_chunks(name), shape)


def _check_shape(gguf_file: GGUFFile, name: str, shape: tuple[int, int]) -> None:
    """``ModelFileError`` unless tensor ``name`` has shape ``shape``."""
    found = gguf_file.tensor_shape(name)
    if found != shape:
        raise ModelFileError(gguf_file.path, f"{name} has shape {found}, metadata implies {shape}")


def _layer_state(gguf_file: GGUFFile, args: ModelArgs, i: int) -> dict[str, torch.Tensor]:
    """Block ``i``'s float32 tensors under our names: Q/K/V and gate/up fused, llama Q/K
    un-permuted (llama.cpp stores their rows interleaved for its RoPE)."""

    def get(name: str) -> torch.Tensor:
        return gguf_file.tensor(f"blk.{i}.{name}")

    llama_layout = args.architecture == "llama"
    q = get("attn_q.weight")  # (H*hd, D)
    k = get("attn_k.weight")  # (Hkv*hd, D)
    v = get("attn_v.weight")  # (Hkv*hd, D)
    if llama_layout:
        q = unpermute_llama_qk(q, args.n_heads)
        k = unpermute_llama_qk(k, args.n_kv_heads)
    state = {
        "attention.wqkv.weight": torch.cat((q, k, v), dim=0),  # (q + 2 kv, D)
        "attention.wo.weight": get("attn_output.weight"),
        # (2F, D): gate rows first, then up rows
        "feed_forward.w13.weight": torch.cat((get("ffn_gate.weight"), get("ffn_up.weight"))),
        "feed_forward.w2.weight": get("ffn_down.weight"),
        "attention_norm.weight": get("attn_norm.weight"),
        "ffn_norm.weight": get("ffn_norm.weight"),
    }
    if args.qkv_bias:
        qb, kb, vb = get("attn_q.bias"), get("attn_k.bias"), get("attn_v.bias")
        if llama_layout:
            qb = unpermute_llama_qk(qb, args.n_heads)
            kb = unpermute_llama_qk(kb, args.n_kv_heads)
        state["attention.wqkv.bias"] = torch.cat((qb, kb, vb))
    return state


def _assign(
    gguf_file: GGUFFile, module: nn.Module, state: dict[str, torch.Tensor], where: str
) -> None:
    """Load ``state`` into a meta-device ``module`` by assignment, checking every shape."""
    expected = {name: t.shape for name, t in module.state_dict().items()}
    for name, tensor in state.items():
        if name not in expected:
            raise ModelFileError(gguf_file.path, f"unexpected tensor {where}{name}")
        if tensor.shape != expected[name]:
            raise ModelFileError(
                gguf_file.path,
                f"tensor {where}{name} has shape {tuple(tensor.shape)}, "
                f"metadata implies {tuple(expected[name])}",
            )
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ModelFileError(gguf_file.path, f"missing tensors for {where}{missing[0]}")
    module.load_state_dict(state, assign=True, strict=True)


def activation_dtype(quant: str, device: str = "cpu") -> torch.dtype:
    """The dtype a model loaded as ``quant`` computes in on ``device``.

    ``fp32`` -> float32 and ``bf16`` -> bfloat16, as asked. ``int8`` / ``int4`` ->
    bfloat16 where bf16 matmuls are native (a GPU; a CPU with AVX512-BF16 or AMX),
    else float32: on an AVX2-only CPU a bf16 prefill matmul runs 6x slower than
    float32, while the int kernels still take bf16 (``quantize`` casts for them).
    """
    if quant in ("fp32", "fp16"):  # fp16: weights only, fbgemm multiplies in float32
        return torch.float32
    if quant == "bf16" or not device.startswith("cpu") or cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def kv_cache_dtype(quant: str, compute_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's dtype: bf16 for every model but ``fp32`` (which stays exact for
    comparisons). Half of float32's bytes (SmolLM2: 23 KB a position instead of 46, so
    32 users with 96 positions each hold 68 MiB instead of 135); on a CPU without native
    bf16 the decode attention reads it back into float32, a copy of the positions it
    attends to."""
    if quant == "fp32":
        return compute_dtype
    return torch.bfloat16


def build_model(
    gguf_file: GGUFFile, quant: str = "fp32", dtype: torch.dtype | None = None
) -> Transformer:
    """A ``Transformer`` holding the file's weights in precision ``quant`` (no caches yet).

    Works block by block: each block's tensors are dequantized to float32, quantized
    from float32 (int8 / int4) and cast (bf16) before the next block is read, so peak
    memory stays near the final model size.

    Args:
        gguf_file: The open file.
        quant: ``fp32`` | ``bf16`` | ``fp16`` | ``int8`` | ``int4``.
        dtype: Activation dtype (embedding, norms' output, KV cache); None picks
            ``activation_dtype(quant)`` for this CPU.
    """
    meta = gguf_file.metadata
    tied = not gguf_file.has_tensor("output.weight")
    qkv_bias = gguf_file.has_tensor("blk.0.attn_q.bias")
    try:
        args = ModelArgs.from_gguf_metadata(meta, tied_embeddings=tied, qkv_bias=qkv_bias)
    except EngineError as exc:
        raise ModelFileError(gguf_file.path, str(exc)) from exc
    if dtype is None:
        dtype = activation_dtype(quant)
    quantized = ("int8", "int4", "fp16")
    mode = cast(Literal["int8", "int4", "fp16"], quant) if quant in quantized else None
    with torch.device("meta"):
        model = Transformer(args)
    for i, block in enumerate(model.blocks()):
        layer_state = _layer_state(gguf_file, args, i)
        _assign(gguf_file, block, layer_state, f"layers.{i}.")
        if mode is not None:
            quantize_linears(block, mode)  # from the float32 weights
        _cast_floats(block, dtype)
        for norm in ("attention_norm", "ffn_norm"):  # norms stay float32 (not bf16-rounded)
            getattr(block, norm).weight = nn.Parameter(layer_state[f"{norm}.weight"])
        del layer_state
        gguf_file.release_pages()
        trim_heap()
    if mode is None:
        _load_float_top(gguf_file, model, args, dtype)
    else:
        _load_quantized_top(gguf_file, model, args, dtype, fp16_output=mode == "fp16")
    # Non-persistent buffers were created on "meta"; setup_caches fills them later.
    model.rope_cos = torch.empty(0)
    model.rope_sin = torch.empty(0)
    model.key_positions = torch.empty(0, dtype=torch.long)
    if gguf_file.has_tensor("rope_freqs.weight"):
        model.rope_freq_factors = gguf_file.tensor("rope_freqs.weight")
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def _cast_floats(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast ``module``'s float tensors to ``dtype``; a float32 target changes nothing (the
    file's tensors arrive as float32, and the quantized linears' bf16 scales must stay
    bf16 for the int kernels)."""
    if dtype != torch.float32:
        module.to(dtype)


def _trimming(chunks: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """``chunks``, trimming the heap before each next one (the float32 chunk just used
    and its packing scratch would otherwise stay resident)."""
    for chunk in chunks:
        yield chunk
        del chunk
        trim_heap()


def _release_freed_memory() -> None:
    """Collect garbage, then ``trim_heap``."""
    gc.collect()
    trim_heap()


def load_model(
    path: str | Path,
    *,
    quant: str = "auto",
    device: str = "cpu",
    max_batch: int = 8,
    max_seq_len: int = 4096,
    compile_decode: bool | Literal["background"] = False,
    aot_dir: Path | None = None,
) -> LoadedModel:
    """Read a GGUF file and return the model (quantized, caches allocated) and tokenizer.

    Args:
        path: A local ``.gguf`` file.
        quant: ``fp32`` | ``bf16`` | ``fp16`` (weight-only half precision through
            fbgemm, float32 activations: CPU only, the fastest for decode batches on a
            CPU without native bf16) | ``int8`` (weight-only per channel) | ``int4``
            (weight-only group-wise) | ``auto`` (``int4``
            for a file whose blocks are Q4_1, else ``int8``; see ``auto_quant``).
            ``LoadedModel.quant`` names the one used.
        device: Torch device for weights and cache (``cpu``).
        max_batch: KV-cache slots (concurrent sequences).
        max_seq_len: Positions per slot; capped at the model's trained context length.
        compile_decode: Run decode steps compiled (about 1.5-2x faster on CPU). On a
            CPU, except ``fp16``: ahead of time, in a child process, into a cache
            folder (``llm_backend.engine.aot``; a minute or two per batch range the
            first time, a second later), so the serving process holds no compiler.
            Otherwise through ``torch.compile`` in this process, its graphs built now
            (a few minutes on 2 cores; inductor's disk cache shortens later starts).
            ``"background"``: where the step is built ahead of time, return at once with
            eager decode and build it in a low-priority child process meanwhile; the
            model switches to it between two steps when it is ready
            (``LoadedModel.decode_build``; a failed build leaves decode eager, logged).
            A cached build is loaded now. Elsewhere like True.
        aot_dir: The cache folder of ahead-of-time compiled steps
            (default ``aot.default_aot_dir()``).

    Raises:
        ModelFileError: Missing, truncated, not-GGUF, unsupported architecture or tensor type.
        EngineError: An invalid ``quant`` / size argument.
    """
    if quant not in QUANT_MODES:
        raise EngineError(f"quant must be one of {', '.join(QUANT_MODES)}, got {quant!r}")
    # On a short-lived thread: the caller's thread (often the one that serves HTTP)
    # must not keep an OpenMP pool beside the engine thread's (llm_backend.threads).
    return run_on_fresh_thread(
        lambda: _load_model(path, quant, device, max_batch, max_seq_len, compile_decode, aot_dir),
        name="ragloom-load-model",
    )


def _load_model(
    path: str | Path,
    quant: str,
    device: str,
    max_batch: int,
    max_seq_len: int,
    compile_decode: bool | Literal["background"],
    aot_dir: Path | None,
) -> LoadedModel:
    """``load_model``'s work, on its own thread."""
    if quant == "fp16" and not device.startswith("cpu"):
        raise EngineError("quant fp16 is the CPU's fbgemm path; on a GPU use bf16")
    started = time.perf_counter()
    gguf_file = GGUFFile.open(path)
    if quant == "auto":
        quant = auto_quant(gguf_file)
    meta = gguf_file.metadata
    tokenizer = EngineTokenizer.from_metadata(meta.tokenizer, meta.architecture)
    with torch.inference_mode(False), torch.no_grad():
        model = build_model(gguf_file, quant, activation_dtype(quant, device)).to(device)
        seq_len = min(max_seq_len, meta.context_length)
        model.setup_caches(max_batch, seq_len, kv_cache_dtype(quant, model.dtype))
    del gguf_file
    _release_freed_memory()
    decode_build = None
    if compile_decode:
        compile_started = time.perf_counter()
        if device.startswith("cpu") and quant != "fp16":  # fp16's fbgemm op is Python-registered
            aot_dir = aot_dir or aot.default_aot_dir()
            batch, seq_len = model.max_batch, model.max_seq_len
            folder = aot.cached_decode_packages(
                path, quant=quant, max_batch=batch, max_seq_len=seq_len, aot_dir=aot_dir
            )
            if compile_decode == "background" and folder is None:
                decode_build = _build_decode_in_background(model, Path(path), quant, aot_dir)
            else:
                if folder is None:
                    folder = aot.build_decode_packages(
                        path, quant=quant, max_batch=batch, max_seq_len=seq_len, aot_dir=aot_dir
                    )
                model.use_aot_decode(aot.AotDecode.load(folder, model))
        else:
            model.compile_decode()
            model.warm_up_decode()
        if decode_build is None:
            logger.info("compiled decode in %.1fs", time.perf_counter() - compile_started)
    logger.info(
        "loaded %s (%s, %d layers) as %s in %.1fs",
        Path(path).name,
        meta.architecture,
        meta.block_count,
        quant,
        time.perf_counter() - started,
    )
    return LoadedModel(model, tokenizer, model.args, Path(path), quant, device, decode_build)


def _build_decode_in_background(
    model: Transformer, path: Path, quant: str, aot_dir: Path
) -> threading.Thread:
    """Start a thread that builds the compiled decode step (in a child process at low
    priority) and attaches it to ``model``: the next decode step runs compiled."""

    def build() -> None:
        started = time.perf_counter()
        try:
            folder = aot.build_decode_packages(
                path,
                quant=quant,
                max_batch=model.max_batch,
                max_seq_len=model.max_seq_len,
                aot_dir=aot_dir,
                low_priority=True,
            )
            model.use_aot_decode(aot.AotDecode.load(folder, model))
        except (EngineError, OSError, RuntimeError) as exc:
            logger.warning("compiled decode unavailable, decode stays eager: %s", exc)
            return
        logger.info("compiled decode ready after %.0fs", time.perf_counter() - started)

    thread = threading.Thread(target=build, name="ragloom-decode-build", daemon=True)
    thread.start()
    logger.info("building the compiled decode step in the background; decode is eager until then")
    return thread
