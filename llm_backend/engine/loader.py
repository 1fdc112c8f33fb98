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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch

from llm_backend.engine.errors import EngineError, ModelFileError
from llm_backend.engine.gguf_reader import GGUFFile
from llm_backend.engine.model import ModelArgs, Transformer, unpermute_llama_qk
from llm_backend.engine.quantize import quantize_model
from llm_backend.engine.tokenizer import EngineTokenizer

logger = logging.getLogger(__name__)

QuantMode = Literal["fp32", "bf16", "int8", "int4"]
QUANT_MODES: tuple[str, ...] = ("fp32", "bf16", "int8", "int4")


@dataclass
class LoadedModel:
    """A model ready for ``prefill`` / ``decode_one_token``, with its tokenizer."""

    model: Transformer
    tokenizer: EngineTokenizer
    args: ModelArgs
    path: Path
    quant: str
    device: str

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype (float32 for fp32, bfloat16 otherwise)."""
        return self.model.dtype


def _state_dict_from_gguf(gguf_file: GGUFFile, args: ModelArgs) -> dict[str, torch.Tensor]:
    """Map GGUF tensor names to ours, fusing Q/K/V and gate/up, un-permuting llama Q/K."""

    def get(name: str) -> torch.Tensor:
        return gguf_file.tensor(name)

    llama_layout = args.architecture == "llama"
    state: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": get("token_embd.weight"),
        "norm.weight": get("output_norm.weight"),
    }
    if args.tied_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    else:
        state["output.weight"] = get("output.weight")
    for i in range(args.n_layers):
        src, dst = f"blk.{i}", f"layers.{i}"
        q = get(f"{src}.attn_q.weight")  # (H*hd, D)
        k = get(f"{src}.attn_k.weight")  # (Hkv*hd, D)
        v = get(f"{src}.attn_v.weight")
        if llama_layout:  # llama.cpp stores Q/K rows interleaved for its RoPE
            q = unpermute_llama_qk(q, args.n_heads)
            k = unpermute_llama_qk(k, args.n_kv_heads)
        state[f"{dst}.attention.wqkv.weight"] = torch.cat((q, k, v), dim=0)  # (q+2kv, D)
        if args.qkv_bias:
            qb, kb = get(f"{src}.attn_q.bias"), get(f"{src}.attn_k.bias")
            vb = get(f"{src}.attn_v.bias")
            if llama_layout:
                qb = unpermute_llama_qk(qb, args.n_heads)
                kb = unpermute_llama_qk(kb, args.n_kv_heads)
            state[f"{dst}.attention.wqkv.bias"] = torch.cat((qb, kb, vb), dim=0)
        state[f"{dst}.attention.wo.weight"] = get(f"{src}.attn_output.weight")
        gate, up = get(f"{src}.ffn_gate.weight"), get(f"{src}.ffn_up.weight")
        state[f"{dst}.feed_forward.w13.weight"] = torch.cat((gate, up), dim=0)  # (2F, D)
        state[f"{dst}.feed_forward.w2.weight"] = get(f"{src}.ffn_down.weight")
        state[f"{dst}.attention_norm.weight"] = get(f"{src}.attn_norm.weight")
        state[f"{dst}.ffn_norm.weight"] = get(f"{src}.ffn_norm.weight")
    return state


def _check_shapes(gguf_file: GGUFFile, state: dict[str, torch.Tensor], model: Transformer) -> None:
    expected = {name: p.shape for name, p in model.state_dict().items()}
    for name, tensor in state.items():
        if name not in expected:
            raise ModelFileError(gguf_file.path, f"unexpected tensor {name}")
        if tensor.shape != expected[name]:
            raise ModelFileError(
                gguf_file.path,
                f"tensor {name} has shape {tuple(tensor.shape)}, "
                f"metadata implies {tuple(expected[name])}",
            )
    missing = set(expected) - set(state)
    if missing:
        raise ModelFileError(gguf_file.path, f"missing tensors for {sorted(missing)[:3]}")


def build_model(gguf_file: GGUFFile) -> Transformer:
    """A float32 ``Transformer`` holding the file's dequantized weights (no caches yet)."""
    meta = gguf_file.metadata
    tied = not gguf_file.has_tensor("output.weight")
    qkv_bias = gguf_file.has_tensor("blk.0.attn_q.bias")
    try:
        args = ModelArgs.from_gguf_metadata(meta, tied_embeddings=tied, qkv_bias=qkv_bias)
    except EngineError as exc:
        raise ModelFileError(gguf_file.path, str(exc)) from exc
    with torch.device("meta"):
        model = Transformer(args)
    state = _state_dict_from_gguf(gguf_file, args)
    _check_shapes(gguf_file, state, model)
    model.load_state_dict(state, assign=True, strict=True)
    # Non-persistent buffers were created on "meta"; setup_caches fills them later.
    model.rope_cos = torch.empty(0)
    model.rope_sin = torch.empty(0)
    model.key_positions = torch.empty(0, dtype=torch.long)
    if tied:  # one Parameter for both, as in the file
        model.output.weight = model.tok_embeddings.weight
    if gguf_file.has_tensor("rope_freqs.weight"):
        model.rope_freq_factors = gguf_file.tensor("rope_freqs.weight")
    return model.eval()


def load_model(
    path: str | Path,
    *,
    quant: str = "int8",
    device: str = "cpu",
    max_batch: int = 8,
    max_seq_len: int = 4096,
) -> LoadedModel:
    """Read a GGUF file and return the model (quantized, caches allocated) and tokenizer.

    Args:
        path: A local ``.gguf`` file.
        quant: ``fp32`` | ``bf16`` | ``int8`` (weight-only, bf16 activations) |
            ``int4`` (weight-only group-wise, bf16 activations).
        device: Torch device for weights and cache (``cpu``).
        max_batch: KV-cache slots (concurrent sequences).
        max_seq_len: Positions per slot; capped at the model's trained context length.

    Raises:
        ModelFileError: Missing, truncated, not-GGUF, unsupported architecture or tensor type.
        EngineError: An invalid ``quant`` / size argument.
    """
    if quant not in QUANT_MODES:
        raise EngineError(f"quant must be one of {', '.join(QUANT_MODES)}, got {quant!r}")
    started = time.perf_counter()
    gguf_file = GGUFFile.open(path)
    meta = gguf_file.metadata
    tokenizer = EngineTokenizer.from_metadata(meta.tokenizer, meta.architecture)
    with torch.inference_mode(False), torch.no_grad():
        model = build_model(gguf_file)
        if quant == "fp32":
            dtype = torch.float32
        else:
            dtype = torch.bfloat16
            model = model.to(dtype)
            if quant in ("int8", "int4"):
                quantize_model(model, cast(Literal["int8", "int4"], quant))
        model = model.to(device)
        for param in model.parameters():
            param.requires_grad_(False)
        seq_len = min(max_seq_len, meta.context_length)
        model.setup_caches(max_batch, seq_len, dtype)
    del gguf_file
    gc.collect()
    logger.info(
        "loaded %s (%s, %d layers) as %s in %.1fs",
        Path(path).name,
        meta.architecture,
        meta.block_count,
        quant,
        time.perf_counter() - started,
    )
    return LoadedModel(model, tokenizer, model.args, Path(path), quant, device)
