"""Weight-only quantization by module swap (gpt-fast style).

Every ``nn.Linear`` inside the transformer blocks, and the output projection, is
replaced by a linear holding quantized weights plus scales; embeddings and norms
stay in the model's float dtype. The int8 / int4 kernels take bfloat16 activations
(they are fast only with bf16 inputs, on every x86 CPU measured). Many rows at once (a
prefill) skip the kernels: the weight is dequantized to the activations' own dtype and
multiplied densely, so on a CPU without native bf16 matmuls (AVX2 only: 6x slower
than float32 there) the model runs float32 activations and only the kernels see bf16.

- ``int8``: symmetric per-output-channel, w ≈ q * scale, q in [-128, 127];
  ``torch._weight_int8pack_mm``, or on an AVX512-BF16 CPU ragloom's ``int8_bf16_mm``
  (``cpu_kernels``; up to 1.9x faster, exact products).
- ``int4``: asymmetric per group of ``group_size`` input columns,
  w ≈ (q - 8) * scale + zero, q in [0, 15]; ``torch._weight_int4pack_mm_for_cpu``,
  or on an AVX512-BF16 CPU ragloom's ``int4_bf16_mm`` on the same packed codes
  (``cpu_kernels``; 1.4-2x faster, exact products); a dequantize-on-the-fly fallback
  is used when no kernel is present or the shape does not fit one.

Example:
    >>> model = build_model(gguf_file).to(torch.bfloat16)
    >>> quantize_model(model, "int8")
    >>> isinstance(model.layers[0].attention.wqkv, Int8Linear)
    True
"""

from __future__ import annotations

import itertools
import logging
import os
import platform
import weakref
from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_backend.engine.cpu_kernels import (
    INT4_BF16_BLOCK_N,
    INT8_BF16_K_STEP,
    INT8_LIMBS_K_STEP,
    load_cpu_kernels,
)
from llm_backend.engine.errors import EngineError
from llm_backend.threads import run_on_fresh_thread

logger = logging.getLogger(__name__)

_INT4_INNER_K_TILES = 2
_ROW_CHUNK = 4096  # rows quantized at a time
_DENSE_BLOCK_ROWS = 4096  # output rows a dense matmul dequantizes at a time
_DEQUANT_CHUNK_BYTES = 4 << 20  # float32 staging of an int4 weight's dequantizing
# From this many activation rows on, dequantizing the weight and running a dense matmul
# beats the int kernels. bf16 (AMX): 2.5x at 512 rows, break-even near 32. float32 on
# an AVX2 CPU, 3072x576 int4 weight: kernel 6.0 ms vs dense 5.1 at 128 rows, 25 vs 16
# at 512 (dequantizing costs ~2.5 ms), so decode batches keep the kernels.
DEQUANT_MIN_ROWS = 32
DEQUANT_MIN_ROWS_FLOAT32 = 128
# int4 dequantizes slowly (nibbles out of the kernel's layout, a group-wise scale and
# zero: 2.0 ms for a 3072 x 576 weight on the AMD Zen 4 kind, int8 0.3) while its kernel
# keeps pace with int8's, so int4 keeps the kernel to 128 rows in either dtype (Zen 4,
# bf16, 32 rows: kernel 0.68 ms vs dense 2.66; 64 rows: 1.41 vs 2.70).
INT4_DEQUANT_MIN_ROWS = 128
# ragloom's int8 bf16-dot kernel (``cpu_kernels``) keeps pace with the dense path to
# ~128 rows (SmolLM2 layer, Zen 4: 32 rows 0.80 ms vs dense 1.04, 64 rows 1.49-1.63 vs
# 1.65-1.77), so an int8 linear that has it keeps it to 128 rows, as int4 does.
BF16_DOT_DEQUANT_MIN_ROWS = 128
# A wide int8 weight (the vocab projection) goes dense from 16 bf16 rows: the int8
# kernel's time grows with the rows (it dequantizes per row block), the dense path's
# hardly. SmolLM2's 49152 x 576 output on the Zen 4 kind: 16 rows 12.6 ms vs 7.0,
# 32 rows 24.8 vs 10.0; 8 rows 5.9 vs 7-15 (oneDNN is erratic there).
WIDE_DEQUANT_MIN_ROWS = 16
WIDE_OUT_FEATURES = 16384
_KERNEL_DTYPE = torch.bfloat16
_HAS_INT4_CPU_KERNEL = hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(
    torch, "_convert_weight_to_int4pack_for_cpu"
)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AVX512-BF16 or AMX, via oneDNN).

    Without it (an AVX2-only CPU such as AMD Zen 3), a bf16 ``F.linear`` is emulated:
    measured 0.02 TFLOP/s against 0.12 in float32 for a 512-row prefill matmul.
    """
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False


def _cpuinfo_field(key: str) -> str | None:
    """The value of the first ``key`` line of /proc/cpuinfo, or None (no such file or
    line: not Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_description() -> str:
    """One line naming this CPU (for benchmark output: figures compare only on one CPU)."""
    name = _cpuinfo_field("model name") or platform.processor() or platform.machine()
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return f"{name}, {os.cpu_count()} logical CPUs, {bf16}"


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI, AVX-VNNI or AMX),
    which ``torch._int_mm`` needs to be fast: elsewhere it is far slower than the
    weight-only int8 kernel (a reference loop: 13 ms for SmolLM2's vocab projection of
    one row, measured on an older build)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})


# Constants, not calls in forward: torch.compile would break its graph at every linear.
_CPU_NATIVE_BF16 = cpu_has_native_bf16()
_CPU_INT8_DOT = cpu_has_int8_dot()


def _dense_dtype(x: Tensor) -> torch.dtype:
    """The dtype a dense (dequantized) matmul runs in for activations ``x``: x's own,
    except bf16 on a CPU without native bf16 (a decode batch's bf16 kernel output fed
    onward), which goes float32: an emulated bf16 matmul there is ~6x slower."""
    return _dense_dtype_for(x.dtype, x.device.type)


def _dense_dtype_for(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """``_dense_dtype`` for activations of ``dtype`` on a ``device_type`` device."""
    if dtype == torch.bfloat16 and device_type == "cpu" and not _CPU_NATIVE_BF16:
        return torch.float32
    return dtype


def dense_min_rows(
    dtype: torch.dtype, *, int4: bool = False, out_features: int = 0, bf16_dot: bool = False
) -> int:
    """Rows from which the quantized linears (``int4``: ``Int4Linear``) dequantize and
    multiply densely in ``dtype``; ``out_features``: the weight's output rows (a wide
    int8 weight goes dense sooner); ``bf16_dot``: an int8 linear on ragloom's kernel."""
    if dtype != torch.bfloat16:
        rows = DEQUANT_MIN_ROWS_FLOAT32
    elif out_features >= WIDE_OUT_FEATURES and not int4:
        rows = WIDE_DEQUANT_MIN_ROWS
    else:
        rows = DEQUANT_MIN_ROWS
    if int4:
        return max(rows, INT4_DEQUANT_MIN_ROWS)
    if bf16_dot and out_features < WIDE_OUT_FEATURES:
        return max(rows, BF16_DOT_DEQUANT_MIN_ROWS)
    return rows


def _kernel_input(x: Tensor) -> Tensor:
    """``x`` in the int kernels' dtype (bf16). The dtype check is Python's: a no-op
    ``.to`` still costs a dispatch (~2 us), and a decode step makes hundreds.

    The quantized linears return ``_dense_dtype(x)`` from their dense path (many rows) and bf16
    from the kernels (decode): every consumer in the model either feeds the next kernel
    or adds into the float32 residual stream, which promotes without a cast op.
    """
    return as_dtype(x, _KERNEL_DTYPE)


def as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)`` without the dispatch when it is a no-op (decode makes hundreds)."""
    return x if x.dtype == dtype else x.to(dtype)


def quantize_int8_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(N, K) float -> int8 (N, K) and float32 scales (N,) with w ≈ q * scale.

    Works in row chunks so a large matrix (the vocab projection) needs no full-size
    float temporaries.
    """
    N = weight.shape[0]
    chunks = (weight[start : start + _ROW_CHUNK] for start in range(0, N, _ROW_CHUNK))
    return quantize_int8_rows(chunks, (N, weight.shape[1]))


def quantize_int8_rows(chunks: Iterable[Tensor], shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Like ``quantize_int8_per_channel`` for a weight that arrives as consecutive row
    chunks (a GGUF tensor dequantized a slice at a time): the float matrix is never
    whole in memory. Raises ``EngineError`` when the chunks do not add up to ``shape``."""
    N, K = shape
    q = torch.empty((N, K), dtype=torch.int8)
    scales = torch.empty(N, dtype=torch.float32)
    start = 0
    for chunk in chunks:
        n = chunk.shape[0]
        if chunk.shape[1:] != (K,) or start + n > N:
            raise EngineError(f"row chunk of shape {tuple(chunk.shape)} does not fit ({N}, {K})")
        w = chunk.to(torch.float32, copy=True)  # (n, K)
        chunk_scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (n,)
        q[start : start + n] = w.div_(chunk_scales[:, None]).round_().clamp_(-128, 127)
        scales[start : start + n] = chunk_scales
        start += n
    if start != N:
        raise EngineError(f"row chunks hold {start} rows, expected {N}")
    return q, scales


def quantize_int4_grouped(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(N, K) float -> int32 codes in [0, 15] (N, K), scales and zeros (N, K/group_size).

    Dequantize: w ≈ (q - 8) * scale + zero (gpt-fast's convention, zero = min + 8 * scale).
    """
    N, K = weight.shape
    G = K // group_size
    q = torch.empty((N, K), dtype=torch.int32)
    scales = torch.empty((N, G), dtype=torch.float32)
    zeros = torch.empty((N, G), dtype=torch.float32)
    for start in range(0, N, _ROW_CHUNK):
        w = weight[start : start + _ROW_CHUNK].to(torch.float32, copy=True)
        w = w.reshape(-1, G, group_size)  # (n, G, gs)
        w_max = w.amax(dim=-1, keepdim=True)
        w_min = w.amin(dim=-1, keepdim=True)
        step = (w_max - w_min).clamp(min=1e-6) / 15.0  # (n, G, 1)
        codes = (w - w_min).div_(step).round_().clamp_(0, 15)
        q[start : start + _ROW_CHUNK] = codes.reshape(-1, K)
        scales[start : start + _ROW_CHUNK] = step.squeeze(-1)
        zeros[start : start + _ROW_CHUNK] = (w_min + step * 8.0).squeeze(-1)
    return q, scales, zeros


def _blocked_dense_matmul(x: Tensor, N: int, weight_rows: Callable[[slice], Tensor]) -> Tensor:
    """``x @ W.T`` for a quantized W that ``weight_rows(rows)`` dequantizes a slice of
    output rows at a time, ``_DENSE_BLOCK_ROWS`` rows per matmul: a large weight (the
    vocab projection of a 32-row decode batch) is never whole in float, and oneDNN's
    reordered copy of it neither (SmolLM2 in bf16: 2 x 54 MiB held at once otherwise).

    Args:
        x: Activations, (M, K).
        N: Output features.
        weight_rows: Dequantizes rows ``rows`` of W: (n, K) in ``x``'s dtype.

    Returns:
        (M, N) in ``x``'s dtype.
    """
    if N <= _DENSE_BLOCK_ROWS:
        return F.linear(x, weight_rows(slice(0, N)))
    parts = [
        F.linear(x, weight_rows(slice(start, start + _DENSE_BLOCK_ROWS)))
        for start in range(0, N, _DENSE_BLOCK_ROWS)
    ]  # (M, n) each
    return torch.cat(parts, dim=-1)  # (M, N)


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with W stored int8 per output channel; bf16 activations.

    Args:
        linear: The layer to quantize (its weight may be on ``meta`` when ``quantized``
            is given).
        quantized: ``(q, scales)`` already computed for ``linear``'s weight
            (``quantize_int8_rows``: a weight streamed from the file in row chunks).
    """

    def __init__(
        self, linear: nn.Linear, *, quantized: tuple[Tensor, Tensor] | None = None
    ) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        if quantized is None:
            quantized = quantize_int8_per_channel(linear.weight.detach())
        q, scales = quantized
        if q.shape != (self.out_features, self.in_features) or q.dtype != torch.int8:
            raise EngineError(
                f"int8 weight of shape {tuple(q.shape)} ({q.dtype}) does not fit "
                f"{self.in_features} -> {self.out_features}"
            )
        self.register_buffer("weight", q)  # (N, K) int8
        self.register_buffer("scales", scales.to(torch.bfloat16))  # (N,)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)
        self.weight: Tensor
        self.scales: Tensor
        self.bias: Tensor | None
        # ragloom's bf16-dot kernel for decode rows on a CPU (whole 32-column steps)
        self.bf16_dot = self.in_features % INT8_BF16_K_STEP == 0 and load_cpu_kernels()
        # ragloom's int8-dot kernel for the two-limb product (whole 64-column steps):
        # it takes each row's code sum
        limb_kernel = (
            self.two_limb("cpu")
            and self.in_features % INT8_LIMBS_K_STEP == 0
            and load_cpu_kernels()
        )
        code_sums = _row_sums_int32(q) if limb_kernel else None
        self.register_buffer("code_sums", code_sums, persistent=False)  # (N,) int32
        self.code_sums: Tensor | None

    def two_limb(self, device_type: str) -> bool:
        """Whether ``forward`` runs through ``two_limb_matmul`` on a ``device_type``
        device: a wide weight (the vocab projection) on a CPU with int8 dot products."""
        return device_type == "cpu" and _CPU_INT8_DOT and self.out_features >= WIDE_OUT_FEATURES

    def dense_from_rows(self, dtype: torch.dtype, device_type: str = "cpu") -> int | None:
        """The row count from which ``forward`` multiplies densely for activations of
        ``dtype`` (below it, the int8 kernel); None: one path for every row count."""
        if self.two_limb(device_type):
            return None
        return self._dense_rows(_dense_dtype_for(dtype, device_type), device_type)

    def _dense_rows(self, dense: torch.dtype, device_type: str) -> int:
        return dense_min_rows(
            dense, out_features=self.out_features, bf16_dot=self._uses_bf16_dot(device_type)
        )

    def _uses_bf16_dot(self, device_type: str) -> bool:
        return self.bf16_dot and device_type == "cpu"

    def forward(self, x: Tensor) -> Tensor:  # (..., K) -> (..., N), see _kernel_input
        x2 = x.reshape(-1, self.in_features)
        if self.two_limb(x2.device.type):
            y = two_limb_matmul(x2, self.weight, self.scales, self.code_sums)  # (M, N) float32
            if self.bias is not None:
                y = y + self.bias
            return y.view(*x.shape[:-1], self.out_features)
        dense = _dense_dtype(x2)
        # A prompt chunk (several tokens a row) goes dense however few its rows: the
        # kernel and the dense path round differently, and a prompt's numbers must not
        # depend on what it is batched with (SmolLM2, 8 tokens: 38 ms either way).
        chunk = x.dim() == 3 and x.shape[1] > 1
        if chunk or x2.shape[0] >= self._dense_rows(dense, x2.device.type):
            # The codes convert exactly (|q| <= 128) and the scales apply to the output,
            # as in the kernel: a plain conversion is 4x faster than a mixed-dtype
            # multiply (49152 x 576 on the Zen 4 kind: 0.16 vs 0.72 ms per 4096 rows).
            y = _blocked_dense_matmul(
                as_dtype(x2, dense), self.out_features, lambda rows: self.weight[rows].to(dense)
            ).mul_(as_dtype(self.scales, dense))  # (M, N)
        elif self._uses_bf16_dot(x2.device.type):  # exact products, float32 sums
            y = torch.ops.ragloom.int8_bf16_mm(
                _kernel_input(x2).contiguous(), self.weight, self.scales
            )  # (M, N) bf16
        else:  # bf16 out: the model's next op promotes it, a cast back would be wasted
            y = torch._weight_int8pack_mm(_kernel_input(x2), self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, int8, "
            f"bf16_dot={self.bf16_dot}"
        )


def two_limb_matmul(
    x: Tensor, weight: Tensor, scales: Tensor, code_sums: Tensor | None = None
) -> Tensor:
    """``x @ (weight * scales[:, None]).T`` in int8 arithmetic, more exact than bf16.

    Each row of x is split into two int8 limbs, x ≈ s1 * q1 + s2 * q2 with s1 = max|x| /
    127 and s2 = s1 / 254 (q2 quantizes what q1 leaves), both stacked as 2M rows of one
    ``torch._int_mm`` (int32 sums, exact), then combined and scaled in float32. About
    15 bits of each row, against bf16's 8; no weight copy (the (N, K) int8 codes are
    read as a transposed view). Per row and exact in its sums, so a row's logits do not
    depend on its batch. For SmolLM2's vocab projection (49,152 x 576) on the Zen 4 kind
    an int8 GEMM runs at 750-800 GOP/s: eager, 8 rows 3.6 ms against the int8 kernel's
    6.1, 16 rows 5.1 against the dense path's 7.3, 32 rows 8.2 against 10.0 (1 row: 2.0
    against 1.4); SmolLM2 int4 against fp32 on the docs text: greedy agreement 0.973 ->
    0.977, ppl +0.15% -> +0.06%. Used for the wide (vocab) projection only: for the
    per-layer weights the int4 / int8 kernels win at decode sizes. With ``code_sums``
    the product runs in ``ragloom::int8_limbs_mm`` (the same bits, no (2M, N) int32
    sums in memory): SmolLM2's vocab projection for one row ~1.2 ms against ~2.

    Args:
        x: Activations, (M, K) float.
        weight: (N, K) int8 codes.
        scales: (N,) per-output-channel scales (bf16 for the kernel).
        code_sums: (N,) int32 sums of each row's codes: run the product in
            ``ragloom::int8_limbs_mm`` (``cpu_kernels``; K a multiple of
            ``INT8_LIMBS_K_STEP``).

    Returns:
        (M, N) float32.
    """
    xf = x.float()  # (M, K)
    s1 = xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-30) / 127.0  # (M, 1)
    q1 = (xf / s1).round()  # in [-127, 127]
    s2 = s1 / 254.0
    q2 = ((xf - q1 * s1) / s2).round().clamp(-127, 127)  # the residual, |r| <= s1 / 2
    limbs = torch.cat((q1, q2)).to(torch.int8)  # (2M, K)
    if code_sums is not None:
        return torch.ops.ragloom.int8_limbs_mm(
            limbs, s1.view(-1), s2.view(-1), weight, code_sums, scales
        )  # (M, N) float32
    sums = torch._int_mm(limbs, weight.t())  # (2M, N) int32
    M = x.shape[0]
    y = torch.addcmul(sums[:M].float() * s1, sums[M:].float(), s2)  # (M, N)
    return y * scales.float()


def _row_sums_int32(q: Tensor, rows_at_once: int = 512) -> Tensor:
    """Each row's sum of int8 codes, (N,) int32. A few rows at a time: ``sum(dtype=
    torch.int32)`` converts its whole input first (SmolLM2's vocab codes: a 113 MB
    temporary, which raised the engine's peak RSS by as much)."""
    return torch.cat(
        [chunk.sum(dim=1, dtype=torch.int32) for chunk in q.split(rows_at_once)]
    )  # (N,)


class Int8Embedding(nn.Module):
    """A token embedding looked up in an int8 table with one float32 scale per row.

    A quarter of a float32 table's bytes (SmolLM2: 27 MiB instead of 108), and with
    tied embeddings the table *is* the int8 output projection's weight, so the model
    holds the vocab matrix once. Rows come out float32 (the residual stream's dtype).

    Args:
        weight: (V, D) int8.
        scales: (V,) float32, row v ≈ weight[v] * scales[v].
        compute_dtype: The model's matmul dtype, reported by ``Transformer.dtype``.
    """

    def __init__(self, weight: Tensor, scales: Tensor, compute_dtype: torch.dtype) -> None:
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2 or scales.shape != weight.shape[:1]:
            raise EngineError(
                f"int8 embedding needs (V, D) int8 rows and (V,) scales, got "
                f"{tuple(weight.shape)} {weight.dtype} and {tuple(scales.shape)}"
            )
        self.num_embeddings, self.embedding_dim = weight.shape
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", weight)
        self.register_buffer("row_scales", scales.float())
        self.weight: Tensor
        self.row_scales: Tensor

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, T, D) float32
        rows = F.embedding(tokens, self.weight).float()  # (B, T, D)
        return rows.mul_(F.embedding(tokens, self.row_scales[:, None]))  # * (B, T, 1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def _int4pack_rows(packed: Tensor, N: int, K: int, block_n: int = 0) -> Tensor:
    """The codes held in ``torch._convert_weight_to_int4pack_for_cpu``'s layout as a
    (N/BN, 2, BN/2, K) uint8 view in row order, with no transpose copy. That layout is
    (N/BN, K, BN/2) bytes whose low nibble is row nb*BN + d and high nibble row
    nb*BN + BN/2 + d, where the block BN depends on the kernel the CPU runs: 32 with
    AVX2, 64 with AVX-512 (measured on torch 2.13; ``_INT4PACK_BLOCK_N`` is found at
    import; ``block_n`` overrides it)."""
    block_n = block_n or _INT4PACK_BLOCK_N
    blocks = packed.view(N // block_n, K, block_n // 2)  # (N/BN, K, BN/2)
    halves = torch.stack((blocks & 0x0F, blocks >> 4), dim=1)  # (N/BN, 2, K, BN/2)
    return halves.transpose(2, 3)  # (N/BN, 2, BN/2, K): rows (nb, half, d)


def unpack_int4pack(packed: Tensor, N: int, K: int, block_n: int = 0) -> Tensor:
    """The (N, K) uint8 codes held in the CPU int4 kernel's packed layout."""
    return _int4pack_rows(packed, N, K, block_n).reshape(N, K)


def _int4pack_block_n() -> int:
    """The row block of this torch build's CPU int4 packing on this CPU, or 0 when
    ``unpack_int4pack`` inverts none of the known ones."""
    if not _HAS_INT4_CPU_KERNEL:
        return 0
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (128, 64), generator=generator)  # a multiple of every block
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.int(), _INT4_INNER_K_TILES)
    except RuntimeError:
        return 0
    for block_n in (32, 64, 16):
        try:
            if torch.equal(unpack_int4pack(packed, 128, 64, block_n).long(), codes):
                return block_n
        except RuntimeError:  # another layout (its size does not fit the view)
            continue
    return 0


# On a thread of its own: packing runs a parallel region, and the importing thread
# (often the one that serves) would keep an OpenMP pool (llm_backend.threads).
_INT4PACK_BLOCK_N = run_on_fresh_thread(_int4pack_block_n, name="ragloom-int4-probe")
_INT4PACK_UNPACKS = _INT4PACK_BLOCK_N > 0


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W stored as 4-bit codes, group-wise scale and zero.

    One copy of the codes: the int4 kernel's packed layout (decode), which the dense
    path (prefill; the kernel is slow for many rows: SmolLM2 512-token prefill 472
    tok/s vs 915 dequantized) unpacks with tensor ops. Only where that layout is not
    known (no kernel, or a shape or torch build it does not cover) are plain nibbles kept.
    Decode rows go through ragloom's ``int4_bf16_mm`` where ``bf16_dot`` (an AVX512-BF16
    CPU, whole 64-row blocks; ``cpu_kernels``), else through PyTorch's kernel; there the
    dense path's bf16 weight comes from ragloom's ``int4_dequant_t`` too.
    """

    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.group_size = group_size
        N, K = self.out_features, self.in_features
        if K % group_size != 0:
            raise EngineError(f"in_features {K} is not a multiple of group_size {group_size}")
        q, scales, zeros = quantize_int4_grouped(linear.weight.detach(), group_size)
        fits_kernel = N % 16 == 0 and K % (16 * _INT4_INNER_K_TILES) == 0
        self.use_kernel = _HAS_INT4_CPU_KERNEL and fits_kernel
        # (G, N, 2): per group and output channel, (scale, zero): the kernel's order.
        scales_and_zeros = torch.stack((scales, zeros), -1).bfloat16().transpose(0, 1)
        self.register_buffer("scales_and_zeros", scales_and_zeros.contiguous())
        packed = None
        if self.use_kernel:
            packed = torch._convert_weight_to_int4pack_for_cpu(q, _INT4_INNER_K_TILES)
        self.register_buffer("weight", packed)  # (N, K/2) uint8, the kernel's layout
        # ragloom's bf16-dot kernel reads that layout as packed on AVX-512 (64-row blocks)
        self.bf16_dot = bool(
            self.use_kernel
            and _INT4PACK_BLOCK_N == INT4_BF16_BLOCK_N
            and N % INT4_BF16_BLOCK_N == 0
            and group_size % 2 == 0
            and load_cpu_kernels()
        )
        codes = None
        if not (self.use_kernel and _INT4PACK_UNPACKS and N % _INT4PACK_BLOCK_N == 0):
            nibbles = q.to(torch.uint8).reshape(N, K // 2, 2)  # low nibble first
            codes = nibbles[..., 0] | (nibbles[..., 1] << 4)  # (N, K/2)
        self.register_buffer("codes", codes)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)
        self.weight: Tensor
        self.scales_and_zeros: Tensor
        self.codes: Tensor | None
        self.bias: Tensor | None

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """The (N, K) weight in ``dtype`` that the fallback and prefill paths multiply with:
        (q - 8) * scale + zero. From the kernel's layout it is a transposed view of a
        (K, N) tensor (``F.linear`` takes either at the same speed): in bf16 with
        ``bf16_dot`` by ``int4_dequant_t`` in one pass, else by the tensor ops of
        ``_dequantized_from_pack`` (the same bits)."""
        if self.codes is None:
            if self.bf16_dot and dtype == torch.bfloat16:  # one pass in C++ (cpu_kernels)
                return torch.ops.ragloom.int4_dequant_t(
                    self.weight, self.scales_and_zeros, self.group_size
                ).t()  # (N, K) view of W^T
            return self._dequantized_from_pack(dtype).t()  # (N, K) view
        N, K = self.out_features, self.in_features
        G, gs = K // self.group_size, self.group_size
        # (N, G, 2), contiguous so the result is laid out like q (small: N * G pairs)
        scales_and_zeros = self.scales_and_zeros.to(dtype).transpose(0, 1).contiguous()
        scales = scales_and_zeros[..., 0:1]  # (N, G, 1)
        offsets = scales_and_zeros[..., 1:2] - 8 * scales  # zero - 8 * scale
        nibbles = torch.stack((self.codes & 0x0F, self.codes >> 4), dim=-1)  # (N, K/2, 2)
        return torch.addcmul(offsets, nibbles.view(N, G, gs), scales).view(N, K)

    def _dequantized_from_pack(self, dtype: torch.dtype) -> Tensor:
        """W^T, (K, N) in ``dtype``, read from the kernel's packed layout.

        That layout holds, per block of BN output rows and per input column k, BN/2
        bytes: row d in the low nibble and row BN/2 + d in the high one
        (``_int4pack_rows``). Split into two nibble planes, each (K, BN/2) plane of a
        block is BN/2 *contiguous* columns of W^T, so the codes reach W^T's order by a
        copy of 32-element runs, where W's row order needs a byte-wise transpose. Then
        a float32 multiply-add with the (G, N) scales and offsets (rows of W^T) and one
        cast, a few groups of rows at a time (``_DEQUANT_CHUNK_BYTES`` of float32).
        Same bits as multiplying the codes in row order. SmolLM2's four weight shapes,
        Zen 4 kind: 2.2 -> 1.3 ms a layer, a 512-token prefill 521 -> 468 ms.
        """
        N, K = self.out_features, self.in_features
        gs, BN = self.group_size, _INT4PACK_BLOCK_N
        scales_and_zeros = self.scales_and_zeros.to(dtype)  # (G, N, 2)
        scales = scales_and_zeros[..., 0].float()  # (G, N)
        offsets = (scales_and_zeros[..., 1] - 8 * scales_and_zeros[..., 0]).float()  # (G, N)
        blocks = self.weight.view(N // BN, K, BN // 2)  # (N/BN, K, BN/2) bytes
        weight_t = torch.empty(K, N, dtype=dtype)  # (K, N)
        groups = K // gs
        chunks = max(1, -(-K * N * 4 // _DEQUANT_CHUNK_BYTES))
        step = -(-groups // chunks) * gs  # input rows per chunk, whole groups
        staging = None if dtype == torch.float32 else torch.empty(min(step, K), N)
        for k0 in range(0, K, step):
            k1 = min(K, k0 + step)
            part = blocks[:, k0:k1]  # (N/BN, r, BN/2)
            codes = torch.empty(N // BN, 2, k1 - k0, BN // 2, dtype=torch.uint8)
            torch.bitwise_and(part, 0x0F, out=codes[:, 0])
            torch.bitwise_right_shift(part, 4, out=codes[:, 1])
            rows = weight_t[k0:k1] if staging is None else staging[: k1 - k0]  # (r, N) f32
            rows.view(k1 - k0, N // BN, 2, BN // 2).permute(1, 2, 0, 3).copy_(codes)
            g0, g1 = k0 // gs, k1 // gs
            grouped = rows.view(g1 - g0, gs, N)  # (g, gs, N)
            grouped.mul_(scales[g0:g1, None]).add_(offsets[g0:g1, None])
            if staging is not None:
                weight_t[k0:k1].copy_(rows)
        return weight_t

    def dense_from_rows(self, dtype: torch.dtype, device_type: str = "cpu") -> int | None:
        """The row count from which ``forward`` multiplies densely for activations of
        ``dtype`` (below it, the int4 kernel); None: always dense (no kernel)."""
        if not self.use_kernel:
            return None
        return dense_min_rows(_dense_dtype_for(dtype, device_type), int4=True)

    def forward(self, x: Tensor) -> Tensor:  # (..., K) -> (..., N), see _kernel_input
        x2 = x.reshape(-1, self.in_features)
        dense = _dense_dtype(x2)
        # A prompt chunk goes dense however few its rows, as in Int8Linear: the kernel
        # rounds differently (SmolLM2, 8 / 30 / 60 tokens alone: 76 / 93 / 117 ms dense
        # against 25 / 59 / 102 through the kernel; from ~80 tokens dense is faster).
        # Its bf16-rounded weights only fill the cache: a prompt's last token, whose
        # logits are sampled, runs as a decode step through the kernel (scheduler).
        chunk = x.dim() == 3 and x.shape[1] > 1
        if self.use_kernel and not chunk and x2.shape[0] < dense_min_rows(dense, int4=True):
            if self.bf16_dot:  # exact products, float32 sums (cpu_kernels)
                y = torch.ops.ragloom.int4_bf16_mm(
                    _kernel_input(x2).contiguous(),
                    self.weight,
                    self.scales_and_zeros,
                    self.group_size,
                )  # (M, N) bf16
            else:
                y = torch._weight_int4pack_mm_for_cpu(
                    _kernel_input(x2), self.weight, self.group_size, self.scales_and_zeros
                )  # (M, N) bf16, like Int8Linear's kernel path
        else:  # a dense matmul (the kernel is slow for many rows)
            y = F.linear(as_dtype(x2, dense), self.dequantized_weight(dense))  # (M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 group_size={self.group_size}, kernel={self.use_kernel}, "
            f"bf16_dot={self.bf16_dot}"
        )


def fbgemm_fp16_available() -> bool:
    """Whether this PyTorch build has fbgemm's fp16 GEMM (x86 CPUs)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(
        torch.ops.quantized, "linear_prepack_fp16"
    )


class Fp16Linear(nn.Module):
    """y = x W^T (+ b) with W held in half precision, packed for fbgemm's fp16 GEMM.

    Weight-only: activations stay float32 and fbgemm widens the weight tile by tile
    (F16C), so the result is a float32 matmul against fp16-rounded weights. On an AVX2
    CPU with no native bf16 it is the fastest kernel PyTorch has for a decode batch,
    measured here against the int kernels (3,072 x 576 weight: 8 rows 295 us vs int8
    597 / int4 ~600; 32 rows 951 vs 2,267), and a 512-row prefill runs as fast as a
    float32 matmul (13.6 ms vs 16.5) with no dequantizing. It holds twice int8's bytes.

    A matrix may be packed in several row blocks (``from_row_chunks``: a vocab
    projection streamed from the file never exists whole in float32); their outputs
    are concatenated.

    Args:
        linear: The layer to convert (float weight, optional bias).

    Example:
        >>> layer = Fp16Linear(nn.Linear(576, 1536, bias=False))
        >>> layer(torch.randn(4, 576)).shape
        torch.Size([4, 1536])
    """

    def __init__(self, linear: nn.Linear | None = None) -> None:
        super().__init__()
        if not fbgemm_fp16_available():
            raise EngineError("quant fp16 needs PyTorch's fbgemm (an x86 CPU build)")
        self.in_features = 0 if linear is None else linear.in_features
        self.out_features = 0 if linear is None else linear.out_features
        self._blocks: list[int] = []  # handles of fbgemm's packed blocks of output rows
        if linear is not None:
            self.add_block(linear.weight.detach())
        bias = None if linear is None or linear.bias is None else linear.bias.detach().float()
        self.register_buffer("bias", bias)
        self.bias: Tensor | None

    def add_block(self, rows: Tensor) -> None:
        """Pack the weight's next block of output rows, (n, K) float."""
        packed = torch.ops.quantized.linear_prepack_fp16(rows.float().contiguous(), None)
        handle = next(_FP16_HANDLES)
        _FP16_BLOCKS[handle] = (packed, rows.shape[0])
        weakref.finalize(self, _FP16_BLOCKS.pop, handle, None)  # freed with the layer
        self._blocks.append(handle)

    @classmethod
    def from_row_chunks(
        cls, chunks: Iterable[Tensor], shape: tuple[int, int], block_rows: int = 4096
    ) -> Fp16Linear:
        """A bias-free layer of weight ``shape`` (N, K) from float row chunks (in order),
        packed ``block_rows`` rows at a time so at most one block is float32 at once."""
        layer = cls()
        layer.out_features, layer.in_features = shape
        pending: list[Tensor] = []
        rows = 0
        for chunk in chunks:
            pending.append(chunk)
            rows += chunk.shape[0]
            if sum(part.shape[0] for part in pending) >= block_rows:
                layer.add_block(torch.cat(pending))
                pending = []
        if pending:
            layer.add_block(torch.cat(pending))
        if rows != shape[0]:
            raise EngineError(f"row chunks hold {rows} rows, expected {shape[0]}")
        return layer

    def forward(self, x: Tensor) -> Tensor:  # (..., K) -> (..., N) float32
        x2 = as_dtype(x.reshape(-1, self.in_features), torch.float32)
        # Compiled, the packed weights are reached through a custom op that takes their
        # handle (dynamo cannot trace a TorchScript object); eager calls fbgemm directly.
        matmul = _fp16_block_op if torch.compiler.is_compiling() else _fp16_block
        if len(self._blocks) == 1:
            y = matmul(x2, self._blocks[0])  # (M, N)
        else:
            y = torch.cat([matmul(x2, handle) for handle in self._blocks], dim=-1)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp16"


# handle -> (fbgemm's packed fp16 block, its rows); an Fp16Linear drops its own on free
_FP16_BLOCKS: dict[int, tuple[object, int]] = {}
_FP16_HANDLES = itertools.count()


def _fp16_block(x: Tensor, handle: int) -> Tensor:
    """x (M, K) float32 times packed block ``handle``: (M, n) float32."""
    return torch.ops.quantized.linear_dynamic_fp16(x, _FP16_BLOCKS[handle][0])


@torch.library.custom_op("ragloom::fp16_block_matmul", mutates_args=())
def _fp16_block_op(x: Tensor, handle: int) -> Tensor:
    """``_fp16_block`` as an operator torch.compile can put in a graph."""
    return _fp16_block(x, handle)


@_fp16_block_op.register_fake
def _(x: Tensor, handle: int) -> Tensor:
    return x.new_empty(x.shape[0], _FP16_BLOCKS[handle][1])


def quantize_linears(
    module: nn.Module, mode: Literal["int8", "int4", "fp16"], group_size: int = 32
) -> int:
    """Replace every ``nn.Linear`` under ``module`` (recursively); return how many."""
    swapped = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            new: nn.Module
            if mode == "int8":
                new = Int8Linear(child)
            elif mode == "int4":
                new = Int4Linear(child, group_size)
            else:
                new = Fp16Linear(child)
            setattr(module, name, new)
            swapped += 1
        else:
            swapped += quantize_linears(child, mode, group_size)
    return swapped


@torch.no_grad()
def quantize_model(
    model: nn.Module, mode: Literal["int8", "int4", "fp16"], group_size: int = 32
) -> nn.Module:
    """Swap every ``nn.Linear`` in ``model`` for a weight-only quantized linear, in place.

    Embeddings and norms are not ``nn.Linear`` and stay as they are. A tied output
    projection gets its own quantized copy; the embedding keeps the float weight.

    Args:
        model: Usually a bf16 ``Transformer`` (activations must be bf16 for speed).
        mode: ``"int8"`` (per-channel), ``"int4"`` (group-wise) or ``"fp16"``
            (``Fp16Linear``: float32 activations, CPU only).
        group_size: Input columns per int4 group (32, 64, 128, ...).

    Returns:
        The same model, for chaining.
    """
    if mode not in ("int8", "int4", "fp16"):
        raise EngineError(f"quantization mode must be 'int8', 'int4' or 'fp16', got {mode!r}")
    if group_size <= 0 or group_size % 2 != 0:
        raise EngineError(f"group_size must be a positive even number, got {group_size}")
    swapped = quantize_linears(model, mode, group_size)
    logger.info("quantized %d linear layers to %s", swapped, mode)
    return model
