"""Weight-only int8 / int4 quantization: layer-level math and end-to-end quality on SmolLM2."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from llm_backend.engine.errors import EngineError
from llm_backend.engine.loader import LoadedModel, load_model
from llm_backend.engine.quantize import (
    Fp16Linear,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    dense_min_rows,
    quantize_int4_grouped,
    quantize_int8_per_channel,
    quantize_model,
    two_limb_matmul,
)

TEXT_FILE = Path(__file__).resolve().parents[3] / "shared" / "data" / "docs-samples" / "rst"
TEXT_TOKENS = 1000


def test_int8_linear_matches_its_dequantized_weight() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True).requires_grad_(False)
    q, scales = quantize_int8_per_channel(linear.weight)
    assert q.dtype == torch.int8 and scales.shape == (96,)
    # Per-channel rounding error is at most half a step.
    error = (q.float() * scales[:, None] - linear.weight).abs()
    assert bool((error <= scales[:, None] / 2 + 1e-6).all())
    layer = Int8Linear(linear)
    x = torch.randn(3, 5, 256, dtype=torch.bfloat16)
    expected = x.float() @ (q.float() * layer.scales.float()[:, None]).T + linear.bias
    out = layer(x)
    assert out.shape == (3, 5, 96) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_dense_path_dequantizes_a_large_weight_in_row_blocks(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past ``dense_min_rows`` a weight with more output rows than a block (the vocab
    projection) is multiplied a block at a time; the result is the whole matmul's."""
    import llm_backend.engine.quantize as quantize_module

    monkeypatch.setattr(quantize_module, "_DENSE_BLOCK_ROWS", 16)
    dequantized: list[int] = []
    real_linear = quantize_module.F.linear

    def counting_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dequantized.append(weight.shape[0])
        return real_linear(x, weight)

    monkeypatch.setattr(quantize_module.F, "linear", counting_linear)
    torch.manual_seed(5)
    linear = nn.Linear(64, 40, bias=True).requires_grad_(False)
    layer = Int8Linear(linear)
    x = torch.randn(layer.dense_from_rows(dtype) + 3, 64).to(dtype)
    weight = layer.weight.float() * layer.scales.float()[:, None]
    expected = x.float() @ weight.T + linear.bias.bfloat16().float()
    out = layer(x)
    assert dequantized == [16, 16, 8]  # never the whole (40, 64) weight at once
    assert out.shape == (x.shape[0], 40)
    tolerance = 1e-4 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


def test_a_wide_int8_weight_goes_dense_sooner(monkeypatch: pytest.MonkeyPatch) -> None:
    """The vocab projection's int8 weight (16,384+ output rows) leaves the int8 kernel
    from ``WIDE_DEQUANT_MIN_ROWS`` bf16 rows, a narrow one from ``DEQUANT_MIN_ROWS``;
    both paths give the dequantized weight's product (on a CPU without int8 dot products
    or ragloom's bf16-dot kernel; with them the wide weight takes ``two_limb_matmul`` and
    the narrow one our kernel to 128 rows)."""
    import llm_backend.engine.quantize as quantize_module

    monkeypatch.setattr(quantize_module, "_CPU_INT8_DOT", False)
    monkeypatch.setattr(quantize_module, "load_cpu_kernels", lambda: False)
    torch.manual_seed(6)
    wide = Int8Linear(nn.Linear(32, quantize_module.WIDE_OUT_FEATURES, bias=False))
    narrow = Int8Linear(nn.Linear(32, 64, bias=False))
    assert not (wide.bf16_dot or narrow.bf16_dot)
    rows = quantize_module.WIDE_DEQUANT_MIN_ROWS
    assert rows < quantize_module.DEQUANT_MIN_ROWS
    assert wide.dense_from_rows(torch.bfloat16) == rows
    assert narrow.dense_from_rows(torch.bfloat16) == quantize_module.DEQUANT_MIN_ROWS
    assert wide.dense_from_rows(torch.float32) == quantize_module.DEQUANT_MIN_ROWS_FLOAT32
    kernel_rows: list[int] = []
    real_kernel = torch._weight_int8pack_mm

    def counting_kernel(
        x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor
    ) -> torch.Tensor:
        kernel_rows.append(x.shape[0])
        return real_kernel(x, weight, scales)

    monkeypatch.setattr(torch, "_weight_int8pack_mm", counting_kernel)
    for layer in (wide, narrow):
        weight = layer.weight.float() * layer.scales.float()[:, None]
        for n in (rows - 1, rows):
            x = torch.randn(n, 32).bfloat16()
            torch.testing.assert_close(layer(x).float(), x.float() @ weight.T, atol=0.1, rtol=0.02)
    assert kernel_rows == [rows - 1, rows - 1, rows]  # wide: kernel, dense; narrow: both kernel


@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_kernel_and_fallback_agree_with_the_grouped_codes(
    group_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llm_backend.engine.quantize as quantize_module

    torch.manual_seed(1)
    linear = nn.Linear(128, 64, bias=False).requires_grad_(False)
    q, scales, zeros = quantize_int4_grouped(linear.weight, group_size)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    groups = q.reshape(64, -1, group_size).float()
    dequant = ((groups - 8) * scales[..., None] + zeros[..., None]).reshape(64, 128)
    assert float((dequant - linear.weight).abs().max()) <= float(scales.max()) / 2 + 1e-5
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    expected = x.float() @ dequant.T
    fast = Int4Linear(linear, group_size)
    assert fast.use_kernel == quantize_module._HAS_INT4_CPU_KERNEL
    torch.testing.assert_close(fast(x).float(), expected, atol=0.05, rtol=0.02)
    many = torch.randn(dense_min_rows(torch.bfloat16, int4=True) + 3, 128, dtype=torch.bfloat16)
    torch.testing.assert_close(  # a prefill's rows take the dequantized bf16 matmul
        fast(many).float(), many.float() @ dequant.T, atol=0.05, rtol=0.02
    )
    monkeypatch.setattr(quantize_module, "_HAS_INT4_CPU_KERNEL", False)
    slow = Int4Linear(linear, group_size)
    assert not slow.use_kernel
    torch.testing.assert_close(slow(x).float(), expected, atol=0.05, rtol=0.02)


# 128: whole pack blocks (32 rows with AVX2, 64 with AVX-512); 96: whole with AVX2 only;
# 48: a half AVX2 block; 40: no kernel
@pytest.mark.parametrize("out_features", [128, 96, 48, 40])
# staging bytes: one chunk, one group per chunk, 2 + 1 groups (a shorter last chunk)
@pytest.mark.parametrize("chunk_bytes", [4 << 20, 32 * 128 * 4, 64 * 128 * 4])
def test_int4_holds_one_copy_of_its_codes(
    out_features: int, chunk_bytes: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the kernel, the dense (prefill) path unpacks the kernel's own layout instead
    of keeping a second copy of the codes; the weight it multiplies with is exact, in
    float32 and in bf16 (staged through float32 a few groups of input rows at a time)."""
    import llm_backend.engine.quantize as quantize_module

    monkeypatch.setattr(quantize_module, "_DEQUANT_CHUNK_BYTES", chunk_bytes)
    torch.manual_seed(2)
    linear = nn.Linear(96, out_features, bias=False).requires_grad_(False)
    layer = Int4Linear(linear, 32)
    q, scales, zeros = quantize_int4_grouped(linear.weight, 32)
    scales, zeros = scales.bfloat16().float(), zeros.bfloat16().float()  # as stored
    groups = q.reshape(out_features, -1, 32).float()
    expected = ((groups - 8) * scales[..., None] + zeros[..., None]).reshape(out_features, 96)
    block_n = quantize_module._INT4PACK_BLOCK_N
    if layer.use_kernel:
        assert block_n in (32, 64)  # this torch build's layout on this CPU is a known one
    assert (layer.codes is None) == (layer.use_kernel and out_features % block_n == 0)
    torch.testing.assert_close(layer.dequantized_weight(torch.float32), expected)
    # bf16: offsets (zero - 8 * scale) rounded to bf16 first, as the kernel rounds them;
    # with bf16_dot ragloom's int4_dequant_t, else tensor ops: the same bits
    offsets = (zeros.bfloat16() - 8 * scales.bfloat16()).float()
    expected_bf16 = ((groups * scales[..., None]) + offsets[..., None]).reshape(out_features, 96)
    for bf16_dot in sorted({layer.bf16_dot, False}):
        layer.bf16_dot = bf16_dot
        assert torch.equal(layer.dequantized_weight(torch.bfloat16), expected_bf16.bfloat16())
    many = torch.randn(dense_min_rows(torch.float32, int4=True) + 1, 96)
    torch.testing.assert_close(layer(many), many @ expected.T, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 7, 300])  # fbgemm takes a GEMV path for one row
def test_fp16_linear_is_a_float32_matmul_against_half_weights(rows: int) -> None:
    torch.manual_seed(4)
    linear = nn.Linear(96, 40, bias=True).requires_grad_(False)
    layer = Fp16Linear(linear)
    x = torch.randn(2, rows, 96)
    expected = x @ linear.weight.half().float().T + linear.bias
    out = layer(x)
    assert out.shape == (2, rows, 40) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - x @ linear.weight.T - linear.bias).abs().max() > 0  # really half weights
    torch.testing.assert_close(layer(x.bfloat16()), layer(x.bfloat16().float()))


def test_fp16_linear_packed_from_row_chunks_equals_one_pack() -> None:
    """A vocab projection is packed a block of rows at a time (never whole in float32)."""
    torch.manual_seed(5)
    weight = torch.randn(100, 64)
    chunks = list(weight.split(30))  # 30 + 30 + 30 + 10 rows
    blocked = Fp16Linear.from_row_chunks(chunks, (100, 64), block_rows=45)
    assert len(blocked._blocks) == 2  # 60 rows, then the last 40
    whole = Fp16Linear()
    whole.in_features, whole.out_features = 64, 100
    whole.add_block(weight)
    x = torch.randn(5, 64)
    torch.testing.assert_close(blocked(x), whole(x), atol=0, rtol=0)
    with pytest.raises(EngineError, match="hold 90 rows, expected 100"):
        Fp16Linear.from_row_chunks(chunks[:3], (100, 64))


def test_fp16_is_refused_where_fbgemm_cannot_run_it(tiny_gguf: Callable[..., Path]) -> None:
    with pytest.raises(EngineError, match="on a GPU use bf16"):
        load_model(tiny_gguf(), quant="fp16", device="cuda", max_batch=1, max_seq_len=16)


def test_quantize_model_swaps_linears_and_keeps_embeddings() -> None:
    model = nn.Sequential(nn.Embedding(10, 32), nn.Linear(32, 32), nn.Sequential(nn.Linear(32, 8)))
    quantize_model(model, "int8")
    assert isinstance(model[0], nn.Embedding)
    assert isinstance(model[1], Int8Linear) and isinstance(model[2][0], Int8Linear)
    half = quantize_model(nn.Sequential(nn.Linear(32, 8)), "fp16")
    assert isinstance(half[0], Fp16Linear)
    with pytest.raises(EngineError, match="'int8', 'int4' or 'fp16', got 'int3'"):
        quantize_model(model, "int3")  # type: ignore[arg-type]


# ---------------------------------------------------------------- real model quality


def _real_text_ids(loaded: LoadedModel) -> list[int]:
    text = (TEXT_FILE / "json.rst.txt").read_text(encoding="utf-8")
    ids = loaded.tokenizer.encode(text)
    assert len(ids) >= TEXT_TOKENS
    return ids[:TEXT_TOKENS]


def _score_text(loaded: LoadedModel, ids: list[int]) -> tuple[float, torch.Tensor]:
    """Perplexity of ``ids`` (teacher forcing) and the argmax prediction at each position."""
    with torch.inference_mode():
        logits = loaded.model(
            torch.tensor([ids]), torch.arange(len(ids))[None], torch.tensor([0]), kv_len=len(ids)
        )[0]  # (T, V)
    log_probs = torch.log_softmax(logits[:-1].float(), dim=-1)
    targets = torch.tensor(ids[1:])
    nll = -log_probs.gather(1, targets[:, None]).mean().item()
    return math.exp(nll), logits[:-1].argmax(dim=-1)


@pytest.fixture(scope="module")
def fp32_reference(smollm2_fp32: LoadedModel) -> tuple[list[int], float, torch.Tensor]:
    ids = _real_text_ids(smollm2_fp32)
    ppl, argmax = _score_text(smollm2_fp32, ids)
    return ids, ppl, argmax


@pytest.mark.integration
@pytest.mark.slow
def test_int8_matches_fp32_quality_on_real_text(
    smollm2_int8: LoadedModel, fp32_reference: tuple[list[int], float, torch.Tensor]
) -> None:
    ids, fp32_ppl, fp32_argmax = fp32_reference
    assert 1.5 < fp32_ppl < 60, f"fp32 perplexity {fp32_ppl} is implausible for docs text"
    int8_ppl, int8_argmax = _score_text(smollm2_int8, ids)
    agreement = (int8_argmax == fp32_argmax).float().mean().item()
    assert agreement >= 0.95, f"int8 greedy agreement {agreement:.3f} < 0.95"
    assert abs(int8_ppl / fp32_ppl - 1) <= 0.02, f"int8 ppl {int8_ppl:.3f} vs fp32 {fp32_ppl:.3f}"


@pytest.mark.integration
@pytest.mark.slow
def test_int4_bf16_and_fp16_stay_close_to_fp32_on_real_text(
    smollm2_gguf_path: Path, fp32_reference: tuple[list[int], float, torch.Tensor]
) -> None:
    ids, fp32_ppl, fp32_argmax = fp32_reference
    # (quant, max relative perplexity change, min greedy agreement)
    # int4 holds this Q4_1 file's block weights exactly (the output projection is int8).
    # fp16 holds the file's weights to 11 bits: measured ppl +0.1%, agreement 0.99.
    cases = (("bf16", 0.02, 0.95), ("int4", 0.02, 0.95), ("fp16", 0.005, 0.98))
    for quant, max_ppl_change, min_agreement in cases:
        loaded = load_model(smollm2_gguf_path, quant=quant, max_batch=1, max_seq_len=1024)
        ppl, argmax = _score_text(loaded, ids)
        agreement = (argmax == fp32_argmax).float().mean().item()
        assert agreement >= min_agreement, f"{quant} greedy agreement {agreement:.3f}"
        assert abs(ppl / fp32_ppl - 1) <= max_ppl_change, f"{quant} ppl {ppl:.3f} vs {fp32_ppl:.3f}"
        del loaded


def test_auto_quant_is_int4_only_for_q4_1_blocks(
    smollm2_gguf_path: Path, tiny_gguf: Callable[..., Path]
) -> None:
    from llm_backend.engine.gguf_reader import GGUFFile
    from llm_backend.engine.loader import auto_quant

    assert auto_quant(GGUFFile.open(smollm2_gguf_path)) == "int4"  # Q4_1 blocks
    tiny = tiny_gguf()  # float blocks: int4 would round them, so int8
    assert auto_quant(GGUFFile.open(tiny)) == "int8"
    loaded = load_model(tiny, max_batch=1, max_seq_len=16)  # quant="auto" by default
    assert loaded.quant == "int8"
    assert isinstance(loaded.model.layers[0].attention.wqkv, Int8Linear)


@pytest.mark.integration
def test_int4_model_keeps_the_vocab_projection_int8(smollm2_gguf_path: Path) -> None:
    loaded = load_model(smollm2_gguf_path, quant="auto", max_batch=1, max_seq_len=64)
    assert loaded.quant == "int4"
    assert isinstance(loaded.model.layers[0].feed_forward.w13, Int4Linear)
    assert isinstance(loaded.model.output, Int8Linear)


@pytest.mark.integration
def test_fp16_model_is_fp16_matmuls_over_int8_lookups(smollm2_gguf_path: Path) -> None:
    loaded = load_model(smollm2_gguf_path, quant="fp16", max_batch=1, max_seq_len=64)
    model = loaded.model
    assert loaded.dtype == torch.float32  # weight-only: fbgemm multiplies in float32
    assert isinstance(model.layers[0].feed_forward.w13, Fp16Linear)
    assert isinstance(model.output, Fp16Linear) and len(model.output._blocks) > 1
    assert isinstance(model.tok_embeddings, Int8Embedding)


@pytest.mark.parametrize("rows", [3, 300])  # the int kernel's rows, and a prefill's
def test_quantized_linears_compute_in_float32_activations(rows: int) -> None:
    """On a CPU without native bf16 the model runs float32 activations: the quantized
    linears take float32 and feed only their int kernels bf16. The dense path (many rows)
    returns float32; the kernel path returns the kernel's bf16 (the model adds it into
    the float32 residual or feeds the next kernel, so casting back would be wasted)."""
    torch.manual_seed(2)
    linear = nn.Linear(128, 64, bias=True).requires_grad_(False)
    x = torch.randn(rows, 128)
    int8, int4 = Int8Linear(linear), Int4Linear(linear, 32)
    held = {  # the weight each layer holds, as float32
        "int8": int8.weight.float() * int8.scales.float()[:, None],
        "int4": int4.dequantized_weight(torch.float32),
    }
    for name, layer in (("int8", int8), ("int4", int4)):
        dense = rows >= dense_min_rows(torch.float32, int4=name == "int4")
        out = layer(x)
        assert out.dtype == (torch.float32 if dense else torch.bfloat16)
        assert out.shape == (rows, 64)
        out = out.float()
        expected = x @ held[name].T + linear.bias.bfloat16().float()
        # the dense path (many rows) is float32 throughout; the kernel rounds x to bf16
        tolerance = 1e-4 if dense else 0.05
        torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)
        torch.testing.assert_close(out, layer(x.bfloat16()).float(), atol=0.1, rtol=0.05)


def test_activation_dtype_follows_the_cpu_and_the_request(tiny_gguf: Callable[..., Path]) -> None:
    from llm_backend.engine.gguf_reader import GGUFFile
    from llm_backend.engine.loader import activation_dtype, build_model
    from llm_backend.engine.quantize import cpu_has_native_bf16

    native = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert activation_dtype("int8") == native and activation_dtype("int4") == native
    assert activation_dtype("int8", "cuda") == torch.bfloat16
    assert activation_dtype("fp32") == torch.float32 and activation_dtype("bf16") == torch.bfloat16
    assert load_model(tiny_gguf(), quant="int8", max_batch=1, max_seq_len=16).dtype == native
    # Both activation dtypes give the same predictions from the same int8 weights.
    path = tiny_gguf()
    ids = torch.arange(1, 9)[None]
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_model(GGUFFile.open(path), "int8", dtype)
        wqkv = model.layers[0].attention.wqkv
        assert isinstance(wqkv, Int8Linear) and wqkv.scales.dtype == torch.bfloat16
        assert model.dtype == dtype
        model.setup_caches(1, 16, model.dtype)
        with torch.inference_mode():
            logits[dtype] = model(ids, torch.arange(8)[None], kv_len=8)[0]
    assert (logits[torch.float32].argmax(-1) == logits[torch.bfloat16].argmax(-1)).all()
    torch.testing.assert_close(logits[torch.float32], logits[torch.bfloat16], atol=0.1, rtol=0.05)


def test_bf16_decode_rows_past_the_threshold_multiply_densely_in_a_native_dtype() -> None:
    """The kernels hand bf16 to the next linear (SwiGLU's w2). A decode batch as large as
    the dense threshold must not then run an emulated bf16 matmul on a CPU without
    native bf16 (32 users: 2x slower per step): it multiplies in float32 there."""
    from llm_backend.engine.quantize import cpu_has_native_bf16

    torch.manual_seed(3)
    linear = nn.Linear(128, 64, bias=False).requires_grad_(False)
    native = cpu_has_native_bf16()
    for layer in (Int8Linear(linear), Int4Linear(linear, 32)):
        rows = dense_min_rows(
            torch.bfloat16 if native else torch.float32, int4=isinstance(layer, Int4Linear)
        )
        x = torch.randn(rows, 128).bfloat16()
        out = layer(x)
        assert out.dtype == (torch.bfloat16 if native else torch.float32)
        expected = layer(x.float())  # the float32 dense path on the same rows
        torch.testing.assert_close(out.float(), expected.float(), atol=0.05, rtol=0.05)


def test_two_limb_matmul_is_closer_than_bf16_and_per_row_exact() -> None:
    """The vocab projection's int8 x int8 product: nearer the float64 result than the
    int8 kernel with bf16 activations, and a row's output is the same bits alone and
    inside any batch (its sums are exact int32)."""
    torch.manual_seed(3)
    weight = torch.randint(-127, 128, (512, 96), dtype=torch.int8)
    scales = torch.rand(512) / 100 + 1e-3
    x = torch.randn(33, 96) * torch.logspace(-2, 1, 96)  # columns of very different sizes
    exact = x.double() @ (weight.double() * scales.double()[:, None]).T
    two_limb = two_limb_matmul(x, weight, scales)
    assert two_limb.dtype == torch.float32
    kernel = torch._weight_int8pack_mm(x.bfloat16(), weight, scales.bfloat16()).double()
    two_limb_error = (two_limb.double() - exact).abs().max().item()
    kernel_error = (kernel - exact).abs().max().item()
    assert two_limb_error < kernel_error / 20
    for rows in (slice(0, 1), slice(5, 13), slice(32, 33)):
        assert torch.equal(two_limb_matmul(x[rows], weight, scales), two_limb[rows])


def test_wide_int8_linear_takes_the_two_limb_path_on_a_cpu_with_int8_dot() -> None:
    import llm_backend.engine.quantize as quantize_module

    wide = Int8Linear(nn.Linear(64, quantize_module.WIDE_OUT_FEATURES, bias=False))
    narrow = Int8Linear(nn.Linear(64, 256, bias=False))
    assert not narrow.two_limb("cpu") and not wide.two_limb("cuda")
    assert wide.two_limb("cpu") == quantize_module.cpu_has_int8_dot()
    if wide.two_limb("cpu"):
        assert wide.dense_from_rows(torch.bfloat16) is None  # one path for every batch
        x = torch.randn(3, 1, 64)
        expected = two_limb_matmul(x.view(3, 64), wide.weight, wide.scales)
        assert torch.equal(wide(x).view(3, -1), expected)
