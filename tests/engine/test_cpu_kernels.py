"""ragloom's C++ CPU kernels: the int4 and int8 x bf16 matmuls on bf16 dot products,
the int4 prefill weights, and the decode and prefill attention over the bf16 KV cache."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import llm_backend.engine.quantize as quantize_module
from llm_backend.engine.cpu_kernels import cpu_has_bf16_dot, load_cpu_kernels
from llm_backend.engine.loader import load_model
from llm_backend.engine.model import Attention, Transformer, apply_rope
from llm_backend.engine.quantize import (
    Int4Linear,
    Int8Linear,
    quantize_int4_grouped,
    quantize_int8_per_channel,
    two_limb_matmul,
)

needs_kernel = pytest.mark.skipif(
    not cpu_has_bf16_dot(), reason="the kernel needs AVX512-BF16 (the Zen 4 kind has it)"
)


def _counting(calls: list[str], name: str) -> Callable[..., torch.Tensor]:
    """``torch.ops.ragloom.<name>``, appending ``name`` to ``calls`` at each call."""
    real = getattr(torch.ops.ragloom, name)

    def call(*args: object) -> torch.Tensor:
        calls.append(name)
        return real(*args)

    return call


def _packed_weight(N: int, K: int, group_size: int, seed: int) -> tuple[torch.Tensor, ...]:
    """(codes q, (G, N, 2) bf16 scales and zeros, the kernel's packing, float64 W)."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(N, K, generator=generator) * 0.05
    q, scales, zeros = quantize_int4_grouped(weight, group_size)
    scales_and_zeros = torch.stack((scales, zeros), -1).bfloat16().transpose(0, 1).contiguous()
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    pairs = scales_and_zeros.double().repeat_interleave(group_size, dim=0)  # (K, N, 2)
    exact = (q.double() - 8) * pairs[..., 0].T + pairs[..., 1].T  # (N, K) float64
    return q, scales_and_zeros, packed, exact


@needs_kernel
@pytest.mark.parametrize(
    ("N", "K", "group_size"), [(576, 576, 32), (192, 1536, 32), (128, 256, 64)]
)
def test_int4_bf16_mm_is_the_exact_product_rounded_once_and_batch_independent(
    N: int, K: int, group_size: int
) -> None:
    """Each output is within float32 summation error of the float64 product, rounded
    to bf16 once; a row's bits are the same alone and among 1-32 rows (whatever row
    blocks the kernel cuts them into)."""
    assert load_cpu_kernels()
    _, scales_and_zeros, packed, exact = _packed_weight(N, K, group_size, seed=N + K)
    x = torch.randn(32, K, generator=torch.Generator().manual_seed(7)).bfloat16()
    y = torch.ops.ragloom.int4_bf16_mm(x, packed, scales_and_zeros, group_size)
    assert y.shape == (32, N) and y.dtype == torch.bfloat16
    reference = x.double() @ exact.T  # (32, N)
    bound = x.double().abs() @ exact.abs().T
    error = (y.double() - reference).abs()
    assert bool((error <= reference.abs() * 2**-8 + bound * 1e-6).all()), float(error.max())
    for rows in (1, 5, 6, 7, 13):
        part = torch.ops.ragloom.int4_bf16_mm(
            x[:rows].contiguous(), packed, scales_and_zeros, group_size
        )
        assert torch.equal(part, y[:rows]), rows


@needs_kernel
def test_int4_bf16_mm_is_closer_than_pytorchs_float32_kernel() -> None:
    """Exact products summed per group: at least as close to the float64 product as
    PyTorch's kernel (float32 weights, float32 FMAs), on the same bf16 outputs."""
    assert load_cpu_kernels()
    _, scales_and_zeros, packed, exact = _packed_weight(960, 576, 32, seed=3)
    x = torch.randn(16, 576, generator=torch.Generator().manual_seed(4)).bfloat16()
    reference = x.double() @ exact.T
    ours = torch.ops.ragloom.int4_bf16_mm(x, packed, scales_and_zeros, 32)
    pytorch = torch._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros)
    ours_error = (ours.double() - reference).abs().mean()
    pytorch_error = (pytorch.double() - reference).abs().mean()
    assert ours_error <= pytorch_error * 1.02, (ours_error, pytorch_error)


@needs_kernel
def test_int4_linear_decodes_through_the_bf16_kernel_and_prefills_densely() -> None:
    torch.manual_seed(5)
    linear = nn.Linear(576, 192, bias=True).requires_grad_(False)
    layer = Int4Linear(linear, 32)
    assert layer.bf16_dot and "bf16_dot=True" in repr(layer)
    x = torch.randn(8, 1, 576).bfloat16()  # decode: one new token per row
    direct = torch.ops.ragloom.int4_bf16_mm(
        x.view(8, 576), layer.weight, layer.scales_and_zeros, 32
    )
    assert torch.equal(layer(x), (direct + layer.bias).view(8, 1, 192))
    layer.bf16_dot = False  # PyTorch's kernel: the same weights, other rounding
    fallback = torch._weight_int4pack_mm_for_cpu(
        x.view(8, 576), layer.weight, 32, layer.scales_and_zeros
    )
    assert torch.equal(layer(x), (fallback + layer.bias).view(8, 1, 192))
    torch.testing.assert_close(direct.float(), fallback.float(), atol=0.02, rtol=0.02)


@needs_kernel
@pytest.mark.parametrize(
    ("N", "K", "group_size"), [(3072, 576, 32), (576, 1536, 32), (128, 256, 64), (64, 96, 32)]
)
def test_int4_dequant_t_is_the_tensor_ops_weight(N: int, K: int, group_size: int) -> None:
    """The prefill path's weight, W^T (K, N) bf16, read from the packing in one pass:
    the bits of the tensor ops it replaces, q * scale + (zero - 8 * scale) in float32
    with the offset rounded to bf16 first, then rounded to bf16."""
    assert load_cpu_kernels()
    q, scales_and_zeros, packed, exact = _packed_weight(N, K, group_size, seed=N - K)
    weight_t = torch.ops.ragloom.int4_dequant_t(packed, scales_and_zeros, group_size)
    assert weight_t.shape == (K, N) and weight_t.dtype == torch.bfloat16
    pairs = scales_and_zeros.repeat_interleave(group_size, dim=0)  # (K, N, 2) bf16
    offsets = (pairs[..., 1] - 8 * pairs[..., 0]).float()  # rounded to bf16 in bf16 math
    expected = q.T.float() * pairs[..., 0].float() + offsets  # (K, N) float32
    assert torch.equal(weight_t, expected.bfloat16())
    error = (weight_t.double() - exact.T).abs()
    assert float(error.max()) <= float(exact.abs().max()) * 2**-7  # within bf16 rounding


@needs_kernel
def test_int4_dequant_t_rejects_a_packing_of_the_wrong_size() -> None:
    assert load_cpu_kernels()
    _, scales_and_zeros, packed, _ = _packed_weight(128, 256, 32, seed=1)
    with pytest.raises(RuntimeError, match="N \\* K / 2 bytes"):
        torch.ops.ragloom.int4_dequant_t(packed[:64], scales_and_zeros, 32)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        torch.ops.ragloom.int4_dequant_t(packed, scales_and_zeros[:, :96].contiguous(), 32)


@needs_kernel
def test_int4_linear_prefills_on_the_weight_the_kernel_dequantizes() -> None:
    """A prompt chunk multiplies densely with ``int4_dequant_t``'s W^T."""
    torch.manual_seed(6)
    linear = nn.Linear(576, 192, bias=False).requires_grad_(False)
    layer = Int4Linear(linear, 32)
    assert layer.bf16_dot and layer.codes is None
    weight_t = torch.ops.ragloom.int4_dequant_t(layer.weight, layer.scales_and_zeros, 32)
    assert torch.equal(layer.dequantized_weight(torch.bfloat16), weight_t.T)
    layer.bf16_dot = False  # the tensor ops: the same bits
    assert torch.equal(layer.dequantized_weight(torch.bfloat16), weight_t.T)
    layer.bf16_dot = True
    x = torch.randn(1, 40, 576).bfloat16()  # a 40-token chunk
    assert torch.equal(layer(x), (x.view(40, 576) @ weight_t).view(1, 40, 192))


@needs_kernel
@pytest.mark.parametrize(("N", "K"), [(576, 576), (192, 1536), (101, 64)])
def test_int8_bf16_mm_is_the_exact_product_rounded_once_and_batch_independent(
    N: int, K: int
) -> None:
    assert load_cpu_kernels()
    generator = torch.Generator().manual_seed(N * K)
    q, scales = quantize_int8_per_channel(torch.randn(N, K, generator=generator) * 0.05)
    scales = scales.bfloat16()
    exact = q.double() * scales.double()[:, None]  # (N, K)
    x = torch.randn(32, K, generator=generator).bfloat16()
    y = torch.ops.ragloom.int8_bf16_mm(x, q, scales)
    assert y.shape == (32, N) and y.dtype == torch.bfloat16
    reference = x.double() @ exact.T
    bound = x.double().abs() @ exact.abs().T
    error = (y.double() - reference).abs()
    assert bool((error <= reference.abs() * 2**-8 + bound * 1e-6).all()), float(error.max())
    for rows in (1, 5, 6, 7, 13):
        assert torch.equal(
            torch.ops.ragloom.int8_bf16_mm(x[:rows].contiguous(), q, scales), y[:rows]
        )


@needs_kernel
def test_int8_linear_decodes_through_the_bf16_kernel() -> None:
    torch.manual_seed(8)
    layer = Int8Linear(nn.Linear(576, 192, bias=True).requires_grad_(False))
    assert layer.bf16_dot and "bf16_dot=True" in repr(layer)
    x = torch.randn(8, 1, 576).bfloat16()
    direct = torch.ops.ragloom.int8_bf16_mm(x.view(8, 576), layer.weight, layer.scales)
    assert torch.equal(layer(x), (direct + layer.bias).view(8, 1, 192))
    layer.bf16_dot = False
    fallback = torch._weight_int8pack_mm(x.view(8, 576), layer.weight, layer.scales)
    assert torch.equal(layer(x), (fallback + layer.bias).view(8, 1, 192))
    torch.testing.assert_close(direct.float(), fallback.float(), atol=0.02, rtol=0.02)
    assert not Int8Linear(nn.Linear(48, 64)).bf16_dot  # 48 input columns: not whole 32s


@needs_kernel
def test_int8_linear_keeps_the_bf16_kernel_to_128_decode_rows() -> None:
    """Past 32 rows (PyTorch's kernel's limit) the bf16-dot kernel still beats the dense
    path, so a decode batch of up to 127 rows takes it; 128 go dense."""
    torch.manual_seed(9)
    layer = Int8Linear(nn.Linear(64, 96, bias=False).requires_grad_(False))
    assert layer.dense_from_rows(torch.bfloat16) == 128
    x = torch.randn(128, 64).bfloat16()
    kernel = torch.ops.ragloom.int8_bf16_mm(x[:127].contiguous(), layer.weight, layer.scales)
    assert torch.equal(layer(x[:127]), kernel)
    dense = torch.nn.functional.linear(x, layer.weight.bfloat16()).mul_(layer.scales)
    assert torch.equal(layer(x), dense)


@needs_kernel
@pytest.mark.parametrize(("N", "K"), [(1003, 576), (40, 128), (8, 64)])
def test_int8_limbs_mm_has_the_int_mm_paths_bits(N: int, K: int) -> None:
    """``ragloom::int8_limbs_mm`` is ``two_limb_matmul``'s ``_int_mm`` path, bit for bit,
    for any row count and output columns that are not whole blocks of 8."""
    assert load_cpu_kernels()
    generator = torch.Generator().manual_seed(N + K)
    q, scales = quantize_int8_per_channel(torch.randn(N, K, generator=generator) * 0.05)
    q[0] = 127  # extremes: the largest code sums and the unsigned shift's edges
    q[-1] = -127
    scales = scales.bfloat16()
    code_sums = q.sum(dim=1, dtype=torch.int32)
    x = torch.randn(9, K, generator=generator) * 3
    x[2] = 0.0  # an all-zero row: both limbs zero
    for rows in (1, 2, 9):
        want = two_limb_matmul(x[:rows], q, scales)
        got = two_limb_matmul(x[:rows], q, scales, code_sums)
        assert got.dtype == torch.float32 and got.shape == (rows, N)
        assert torch.equal(got, want)
    # the limbs carry ~15 bits of each row: far closer than bf16 activations
    exact = x.double() @ (q.double() * scales.double()[:, None]).T
    error = (two_limb_matmul(x, q, scales, code_sums).double() - exact).abs().max()
    assert float(error) < 1e-3 * float(exact.abs().max())


@needs_kernel
def test_int8_limbs_mm_rejects_what_it_cannot_read() -> None:
    q = torch.zeros(16, 96, dtype=torch.int8)
    limbs = torch.zeros(2, 96, dtype=torch.int8)
    ones = torch.ones(1)
    sums = torch.zeros(16, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        torch.ops.ragloom.int8_limbs_mm(limbs, ones, ones, q, sums, torch.ones(16).bfloat16())
    with pytest.raises(RuntimeError, match="code_sums"):
        torch.ops.ragloom.int8_limbs_mm(limbs, ones, ones, q, sums[:8], torch.ones(16).bfloat16())


@needs_kernel
def test_the_vocab_projection_takes_the_limbs_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wide int8 linear (the vocab projection) keeps its codes' row sums and multiplies
    through ``ragloom::int8_limbs_mm``; a K the kernel cannot read keeps ``_int_mm``."""
    torch.manual_seed(12)
    layer = Int8Linear(nn.Linear(128, 16384, bias=False).requires_grad_(False))
    assert layer.two_limb("cpu") and layer.code_sums is not None
    assert torch.equal(layer.code_sums, layer.weight.sum(dim=1, dtype=torch.int32))
    calls: list[str] = []
    monkeypatch.setattr(torch.ops.ragloom, "int8_limbs_mm", _counting(calls, "int8_limbs_mm"))
    x = torch.randn(3, 1, 128).bfloat16()
    y = layer(x)
    assert calls == ["int8_limbs_mm"]
    assert torch.equal(y.view(3, -1), two_limb_matmul(x.view(3, 128), layer.weight, layer.scales))
    assert Int8Linear(nn.Linear(96, 16384, bias=False)).code_sums is None  # 96 % 64


@needs_kernel
@pytest.mark.parametrize(("head_dim", "queries"), [(64, 3), (128, 12), (16, 1)])
def test_decode_attention_reads_each_rows_slot_in_place(head_dim: int, queries: int) -> None:
    """Within float32 error of the float64 softmax attention over each row's own slot
    (slots out of order, rows of different lengths, keys past a row's length
    masked), and a row's bits are the same alone and in the batch."""
    assert load_cpu_kernels()
    generator = torch.Generator().manual_seed(head_dim + queries)
    slots_total, Hkv, S_max, S, B = 6, 2, 96, 80, 4
    k_cache = torch.randn(slots_total, Hkv, S_max, head_dim, generator=generator).bfloat16()
    v_cache = torch.randn(slots_total, Hkv, S_max, head_dim, generator=generator).bfloat16()
    slots = torch.tensor([4, 0, 5, 2])
    q = torch.randn(B * Hkv, queries, head_dim, generator=generator) * 2
    lengths = torch.tensor([80, 1, 37, 64]).repeat_interleave(Hkv)  # (B * Hkv,)
    visible = torch.arange(S)[None, None, :] < lengths[:, None, None]
    bias = torch.where(visible, 0.0, float("-inf")).expand(-1, queries, -1).contiguous()
    out = torch.ops.ragloom.decode_attention(q, k_cache, v_cache, slots, bias, head_dim**-0.5)
    keys = k_cache[slots].reshape(B * Hkv, S_max, head_dim)[:, :S].double()
    values = v_cache[slots].reshape(B * Hkv, S_max, head_dim)[:, :S].double()
    scores = q.double() @ keys.transpose(1, 2) * head_dim**-0.5 + bias.double()
    reference = torch.softmax(scores, dim=-1) @ values
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), reference, atol=2e-5, rtol=1e-5)
    # the row of length 1 sees only its first key: its value row, exactly
    assert torch.equal(out[2:4], v_cache[0, :, :1].float().expand(Hkv, queries, head_dim))
    alone = torch.ops.ragloom.decode_attention(
        q[4:6].contiguous(), k_cache, v_cache, slots[2:3], bias[4:6], head_dim**-0.5
    )
    assert torch.equal(alone, out[4:6])
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.ragloom.decode_attention(
            q, k_cache, v_cache, torch.tensor([0, 1, 2, 6]), bias, head_dim**-0.5
        )


@needs_kernel
@pytest.mark.parametrize("new_tokens", [1, 3])
def test_a_bf16_model_decodes_through_the_attention_kernel(
    tiny_gguf: Callable[..., Path], new_tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bf16-cache model's decode step takes ``ragloom::decode_attention`` and gives
    the float32 form's logits (slots out of order, rows at different positions)."""
    path = tiny_gguf(dim=128, n_heads=4, n_kv_heads=2, hidden_dim=256)
    model = load_model(path, quant="bf16", max_batch=4, max_seq_len=64).model
    assert model._attention_kernel
    assert model.decode_attention(4, 40, compiled=False) == "kernel"
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, 250, (4, 30), generator=generator)
    with torch.inference_mode():
        for slot in range(4):
            model.fill_cache(prompts[slot : slot + 1], torch.arange(30)[None], torch.tensor([slot]))
        tokens = torch.randint(0, 250, (3, new_tokens), generator=generator)
        slots = torch.tensor([2, 0, 3])
        start = torch.tensor([[30], [12], [25]])
        positions = start + torch.arange(new_tokens)  # (3, new_tokens)
        calls: list[str] = []
        with monkeypatch.context() as patched:
            patched.setattr(
                torch.ops.ragloom, "decode_attention", _counting(calls, "decode_attention")
            )
            kernel = model.forward(tokens, positions, slots, kv_len=30 + new_tokens)
        assert len(calls) == 2  # one per layer
        model._attention_kernel = False
        model._bf16_decode = False  # the float32 form
        float32 = model.forward(tokens, positions, slots, kv_len=30 + new_tokens)
    torch.testing.assert_close(kernel, float32, atol=0.05, rtol=0.01)


def _causal_attention_float64(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v over keys s <= each row's position, in float64:
    q (B, T, H, hd), k and v (B, Hkv, S, hd), positions (B, T) -> (B, T, H, hd)."""
    G = q.shape[2] // k.shape[1]
    keys = k.double().repeat_interleave(G, dim=1)  # (B, H, S, hd)
    values = v.double().repeat_interleave(G, dim=1)
    scores = torch.einsum("bthd,bhsd->bhts", q.double(), keys) * q.shape[-1] ** -0.5
    visible = torch.arange(k.shape[2]) <= positions[:, None, :, None]  # (B, 1, T, S)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhts,bhsd->bthd", probs, values)


@needs_kernel
@pytest.mark.parametrize(("head_dim", "n_heads", "n_kv_heads"), [(64, 9, 3), (128, 4, 2)])
def test_prefill_attention_is_the_causal_attention_and_row_independent(
    head_dim: int, n_heads: int, n_kv_heads: int
) -> None:
    """A prompt chunk's attention over cache views: row 0 continues at position 40 over
    its cached prefix, row 1 starts at 0 (50 new tokens each, 93 keys: a short last
    32-key tile). Within bf16 probability rounding of the float64 attention, closer than
    the tensor ops' blocked path; a row's bits are the same alone, in the batch and in
    a shorter chunk (each row's sums run over its own keys in fixed 32-key tiles)."""
    assert load_cpu_kernels()
    generator = torch.Generator().manual_seed(head_dim)
    B, T, S = 2, 50, 93
    cache_k = torch.randn(3, n_kv_heads, 128, head_dim, generator=generator).bfloat16()
    cache_v = torch.randn(3, n_kv_heads, 128, head_dim, generator=generator).bfloat16()
    k, v = cache_k[1:3, :, :S], cache_v[1:3, :, :S]  # strided views, as the cache gives
    q = (torch.randn(B, T, n_heads + n_kv_heads, head_dim, generator=generator) * 2).bfloat16()
    q = q[:, :, :n_heads]  # a view of the fused q / k heads, as RoPE leaves it
    positions = torch.stack((torch.arange(40, 90), torch.arange(50)))
    out = torch.ops.ragloom.prefill_attention(q, k, v, positions, head_dim**-0.5)
    assert out.shape == (B, T, n_heads, head_dim) and out.dtype == torch.bfloat16
    reference = _causal_attention_float64(q, k, v, positions)
    error = (out.double() - reference).abs()
    assert float(error.max()) < 0.02 and float(error.mean()) < 1e-3, float(error.max())
    attention = Attention.__new__(Attention)
    nn.Module.__init__(attention)
    attention.n_heads, attention.n_kv_heads, attention.head_dim = n_heads, n_kv_heads, head_dim
    attention.q_size = n_heads * head_dim
    mask = torch.arange(S) <= positions[:, None, :, None]  # (B, 1, T, S)
    bounds = Transformer.prefill_key_bounds(positions, S)
    blocked = attention._blocked_attention(q, k, v, mask, bounds).view(out.shape)
    assert float(error.mean()) <= float((blocked.double() - reference).abs().mean())
    alone = torch.ops.ragloom.prefill_attention(
        q[1:], k[1:], v[1:], positions[1:].contiguous(), head_dim**-0.5
    )
    assert torch.equal(alone, out[1:])
    shorter = torch.ops.ragloom.prefill_attention(
        q[:, :13], k, v, positions[:, :13].contiguous(), head_dim**-0.5
    )
    assert torch.equal(shorter, out[:, :13])


@needs_kernel
def test_prefill_attention_rejects_other_head_dims() -> None:
    assert load_cpu_kernels()
    q, k = torch.zeros(1, 4, 2, 32).bfloat16(), torch.zeros(1, 2, 8, 32).bfloat16()
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128"):
        torch.ops.ragloom.prefill_attention(q, k, k, torch.arange(4)[None], 1.0)


@needs_kernel
def test_a_bf16_model_prefills_through_the_attention_kernel(
    tiny_gguf: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bf16 model with head_dim 64 runs a prompt chunk's attention in
    ``ragloom::prefill_attention``, once per layer: batched rows at different offsets,
    one over its cached prefix, give the float32 model's logits to bf16 accuracy, as
    close as the blocked tensor-op path."""
    path = tiny_gguf(dim=256, n_heads=4, n_kv_heads=2, hidden_dim=256)
    reference = load_model(path, quant="fp32", max_batch=2, max_seq_len=256).model
    model = load_model(path, quant="bf16", max_batch=2, max_seq_len=256).model
    assert model._prefill_kernel
    ids = torch.randint(0, 250, (2, 200), generator=torch.Generator().manual_seed(3))

    def run(m: Transformer) -> torch.Tensor:
        with torch.inference_mode():
            m(ids[:1, :60], torch.arange(60)[None], torch.tensor([0]), kv_len=60)
            positions = torch.stack((torch.arange(60, 200), torch.arange(140)))
            tokens = torch.stack((ids[0, 60:200], ids[1, :140]))
            return m(tokens, positions, torch.tensor([0, 1]), kv_len=200, first_slot=0)

    expected = run(reference)
    scale = expected.abs().max()
    calls: list[str] = []
    with monkeypatch.context() as patched:
        patched.setattr(
            torch.ops.ragloom, "prefill_attention", _counting(calls, "prefill_attention")
        )
        kernel_error = ((run(model) - expected).abs().max() / scale).item()
    assert len(calls) == 2 * 2  # two forwards, two layers
    model._prefill_kernel = False  # the blocked tensor ops
    blocked_error = ((run(model) - expected).abs().max() / scale).item()
    assert kernel_error < 0.02, kernel_error
    assert kernel_error < 1.5 * blocked_error + 0.005, (kernel_error, blocked_error)


@needs_kernel
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rope_kernel_has_the_tensor_ops_bits(head_dim: int) -> None:
    """``ragloom::rope`` over the q / k heads' view of a fused projection gives
    ``apply_rope``'s bits (x * cos rounded to bf16, then + the exact other product)."""
    assert load_cpu_kernels()
    generator = torch.Generator().manual_seed(head_dim)
    B, T, heads = 2, 37, 12
    fused = torch.randn(B, T, (heads + 4) * head_dim, generator=generator).bfloat16()
    x = fused[..., : heads * head_dim].view(B, T, heads, head_dim)  # rows 16 heads apart
    angles = torch.randn(B, T, 1, head_dim, generator=generator) * 50
    cos = angles.cos().bfloat16()
    sin = angles.sin().bfloat16()
    out = torch.ops.ragloom.rope(x, cos, sin)
    assert out.shape == x.shape and out.is_contiguous()
    assert torch.equal(out, apply_rope(x, cos, sin))
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.ragloom.rope(x[..., :48], cos[..., :48], sin[..., :48])


@needs_kernel
def test_silu_mul_kernel_rounds_as_the_tensor_ops() -> None:
    """``ragloom::silu_mul`` rounds silu(gate) to bf16 and then the product, as
    ``F.silu(gate) * up`` does; its exp is not PyTorch's, so a value may be one bf16
    step away (none was over 2.3 million values). Extremes: silu(x) is x for large x
    and 0 or tiny for very negative x (ours 0 below -87, where PyTorch's is under 1e-36)."""
    assert load_cpu_kernels()
    generator = torch.Generator().manual_seed(9)
    x = (torch.randn(300, 2 * 1536, generator=generator) * 4).bfloat16()
    gate, up = x.split(1536, dim=-1)
    out = torch.ops.ragloom.silu_mul(x)
    expected = torch.nn.functional.silu(gate) * up
    differ = out != expected
    assert int(differ.sum()) <= out.numel() // 10_000
    step = expected.float().abs() * 2**-7
    assert bool(((out.float() - expected.float()).abs() <= step).all())
    edges = torch.tensor([-1e4, -100.0, -88.0, -1e-30, 0.0, 1e-30, 20.0, 1e4] * 2)
    ones = torch.ones(16)
    activated = torch.ops.ragloom.silu_mul(torch.cat((edges, ones))[None].bfloat16())
    expected = torch.nn.functional.silu(edges.bfloat16()).float()
    torch.testing.assert_close(activated[0].float(), expected, atol=1e-36, rtol=0)
    with pytest.raises(RuntimeError, match="F a multiple of 16"):
        torch.ops.ragloom.silu_mul(x[:, :48].contiguous())


@needs_kernel
def test_eager_bf16_steps_take_the_elementwise_kernels(
    tiny_gguf: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bf16 model's eager prefill and decode steps run RoPE and SwiGLU's gate through
    the kernels, once per layer each, with the tensor ops' logits; a compiled step's
    context does not ask for them."""
    path = tiny_gguf(dim=256, n_heads=4, n_kv_heads=2, hidden_dim=256)
    model = load_model(path, quant="bf16", max_batch=1, max_seq_len=128).model
    assert model._elementwise_kernels
    ids = torch.randint(0, 250, (1, 41), generator=torch.Generator().manual_seed(4))
    calls: list[str] = []

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode():
            prompt = model(ids[:, :40], torch.arange(40)[None], kv_len=40)
            step = model(ids[:, 40:], torch.tensor([[40]]), kv_len=41)
        return prompt, step

    with monkeypatch.context() as patched:
        patched.setattr(torch.ops.ragloom, "rope", _counting(calls, "rope"))
        patched.setattr(torch.ops.ragloom, "silu_mul", _counting(calls, "silu_mul"))
        with_kernels = run()
    assert sorted(calls) == ["rope"] * 4 + ["silu_mul"] * 4  # 2 forwards x 2 layers
    model._elementwise_kernels = False
    without = run()
    for a, b in zip(with_kernels, without, strict=True):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    model._elementwise_kernels = True
    seen: list[bool] = []
    monkeypatch.setattr(
        type(model.layers[0]),
        "forward",
        lambda self, x, step: (seen.append(step.elementwise_kernels), x)[1],
    )
    with torch.inference_mode():
        model._run(ids[:, :1], torch.tensor([[0]]), torch.tensor([[0]]), None, 32, compiled=True)
    assert seen == [False, False]


def test_a_weight_the_kernel_cannot_read_keeps_pytorchs_kernel(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Output rows that are not whole 64-row blocks of the packing, or no kernels at
    all, leave the linear on PyTorch's kernel."""
    torch.manual_seed(6)
    assert not Int4Linear(nn.Linear(64, 96, bias=False), 32).bf16_dot  # 96 % 64
    monkeypatch.setattr(quantize_module, "load_cpu_kernels", lambda: False)
    layer = Int4Linear(nn.Linear(64, 128, bias=False), 32)
    assert not layer.bf16_dot
    x = torch.randn(3, 64).bfloat16()
    expected = torch._weight_int4pack_mm_for_cpu(x, layer.weight, 32, layer.scales_and_zeros)
    assert torch.equal(layer(x), expected)


@needs_kernel
@pytest.mark.slow
def test_the_kernel_library_is_built_once_and_loaded_from_the_cache(tmp_path: Path) -> None:
    """A process with an empty cache builds the library; the next one loads it
    (fresh processes: a library of operators loads once per process)."""
    script = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout)\n"
        "import torch\n"
        "from llm_backend.engine.cpu_kernels import load_cpu_kernels\n"
        "assert load_cpu_kernels()\n"
        "x = torch.ones(1, 64, dtype=torch.bfloat16)\n"
        "q = torch.full((64, 64), 9, dtype=torch.int32)  # q - 8 = 1\n"
        "packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)\n"
        "sz = torch.tensor([1.0, 0.5]).bfloat16().expand(2, 64, 2).contiguous()\n"
        "print('sum', torch.ops.ragloom.int4_bf16_mm(x, packed, sz, 32)[0, 0].item())\n"
    )
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    runs = [
        subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
        )
        for _ in range(2)
    ]
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
        assert "sum 96.0" in run.stdout  # 64 * (1 * 1 + 0.5)
    assert "building ragloom's CPU kernels" in runs[0].stdout
    assert "building" not in runs[1].stdout and "loaded ragloom's CPU kernels" in runs[1].stdout
    [library] = (tmp_path / "ragloom" / "kernels").glob("*/ragloom_cpu_kernels.so")
    assert not list(library.parent.parent.glob(".build-*"))  # no scratch folder left
