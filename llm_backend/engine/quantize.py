"""Weight-only quantization by module swap (gpt-fast style).

Every ``nn.Linear`` inside the transformer blocks, and the output projection, is
replaced by a linear holding quantized weights plus scales; embeddings and norms
stay in the model's float dtype. The int8 / int4 kernels take bfloat16 activations
(they are fast only with bf16 inputs, on every x86 CPU measured). Many rows at once (a
prefill) skip the kernels: the weight is dequantized to the activations' own dtype and
multiplied densely, so on a CPU without native bf16 matmuls (AVX2 only: 6x slower
than float32 there) the model runs float32 activations and only the kernels see bf16.

- ``int8``: symmetric per-output-channel, w ≈ q * scale, q in [-128, 127];
  ``torch._weight_int8pack_mm``.
- ``int4``: asymmetric per group of ``group_size`` input columns,
  w ≈ (q - 8) * scale + zero, q in [0, 15]; ``torch._weight_int4pack_mm_for_cpu``
  (a dequantize-on-the-fly fallback is used when the kernel is absent or the shape
  does not fit it).

Example:
    >>> model = build_model(gguf_file).to(torch.bfloat16)
    >>> quantize_model(model, "int8")
    >>> isinstance(model.layers[0].attention.wqkv, Int8Linear)
    True
"""

from __future__ import annotations

import logging
import os
import platform
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_backend.engine.errors import EngineError

logger = logging.getLogger(__name__)

_INT4_INNER_K_TILES = 2
_ROW_CHUNK = 4096  # rows quantized at a time
# From this many activation rows on, dequantizing the weight and running a dense matmul
# beats the int kernels. bf16 (AMX): 2.5x at 512 rows, break-even near 32. float32 on
# an AVX2 CPU, 3072x576 int4 weight: kernel 6.0 ms vs dense 5.1 at 128 rows, 25 vs 16
# at 512 (dequantizing costs ~2.5 ms), so decode batches keep the kernels.
DEQUANT_MIN_ROWS = 32
DEQUANT_MIN_ROWS_FLOAT32 = 128
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


def cpu_description() -> str:
    """One line naming this CPU (for benchmark output: figures compare only on one CPU)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    bf16 = "native bf16" if cpu_has_native_bf16() else "no native bf16"
    return f"{name}, {os.cpu_count()} logical CPUs, {bf16}"


# A constant, not a call in forward: torch.compile would break its graph at every linear.
_CPU_NATIVE_BF16 = cpu_has_native_bf16()


def _dense_dtype(x: Tensor) -> torch.dtype:
    """The dtype a dense (dequantized) matmul runs in for activations ``x``: x's own,
    except bf16 on a CPU without native bf16 (a decode batch's bf16 kernel output fed
    onward), which goes float32: an emulated bf16 matmul there is ~6x slower."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not _CPU_NATIVE_BF16:
        return torch.float32
    return x.dtype


def dense_min_rows(dtype: torch.dtype) -> int:
    """Rows from which the quantized linears dequantize and multiply densely in ``dtype``."""
    return DEQUANT_MIN_ROWS if dtype == torch.bfloat16 else DEQUANT_MIN_ROWS_FLOAT32


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
    q = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(N, dtype=torch.float32)
    for start in range(0, N, _ROW_CHUNK):
        w = weight[start : start + _ROW_CHUNK].to(torch.float32, copy=True)  # (n, K)
        chunk_scales = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (n,)
        q[start : start + _ROW_CHUNK] = w.div_(chunk_scales[:, None]).round_().clamp_(-128, 127)
        scales[start : start + _ROW_CHUNK] = chunk_scales
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


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with W stored int8 per output channel; bf16 activations."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        q, scales = quantize_int8_per_channel(linear.weight.detach())
        self.register_buffer("weight", q)  # (N, K) int8
        self.register_buffer("scales", scales.to(torch.bfloat16))  # (N,)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)
        self.weight: Tensor
        self.scales: Tensor
        self.bias: Tensor | None

    def forward(self, x: Tensor) -> Tensor:  # (..., K) -> (..., N), see _kernel_input
        x2 = x.reshape(-1, self.in_features)
        dense = _dense_dtype(x2)
        if x2.shape[0] >= dense_min_rows(dense):  # prefill: a dense matmul
            weight = self.weight.to(dense) * self.scales.to(dense)[:, None]
            y = F.linear(as_dtype(x2, dense), weight)  # (M, N)
        else:  # bf16 out: the model's next op promotes it, a cast back would be wasted
            y = torch._weight_int8pack_mm(_kernel_input(x2), self.weight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W stored as 4-bit codes, group-wise scale and zero."""

    def __init__(self, linear: nn.Linear, group_size: int) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.group_size = group_size
        N, K = self.out_features, self.in_features
        if K % group_size != 0:
            raise EngineError(f"in_features {K} is not a multiple of group_size {group_size}")
        q, scales, zeros = quantize_int4_grouped(linear.weight.detach(), group_size)
        fits_kernel = N % 8 == 0 and K % (16 * _INT4_INNER_K_TILES) == 0
        self.use_kernel = _HAS_INT4_CPU_KERNEL and fits_kernel
        # Two codes per byte, low nibble first: (N, K/2) uint8; (N, G, 2) scale and zero.
        # The fallback multiplies with it, and so does a prefill: the int4 kernel is
        # slow for many rows (SmolLM2 512-token prefill 472 tok/s vs 915 dequantized).
        nibbles = q.to(torch.uint8).reshape(N, K // 2, 2)
        self.register_buffer("codes", nibbles[..., 0] | (nibbles[..., 1] << 4))
        self.register_buffer("codes_scales", torch.stack((scales, zeros), -1).bfloat16())
        if self.use_kernel:
            packed = torch._convert_weight_to_int4pack_for_cpu(q, _INT4_INNER_K_TILES)
            self.register_buffer("weight", packed)  # (N, K/2) uint8, the kernel's layout
            # (G, N, 2): per group and output channel, (scale, zero): the kernel's order.
            scales_and_zeros = self.codes_scales.transpose(0, 1).contiguous()
            self.register_buffer("scales_and_zeros", scales_and_zeros)
        bias = None if linear.bias is None else linear.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)
        self.codes: Tensor
        self.codes_scales: Tensor
        self.weight: Tensor
        self.scales_and_zeros: Tensor
        self.bias: Tensor | None

    def dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> Tensor:
        """The (N, K) weight in ``dtype`` that the fallback and prefill paths multiply with."""
        N, K = self.out_features, self.in_features
        G = K // self.group_size
        nibbles = torch.stack((self.codes & 0x0F, self.codes >> 4), dim=-1)  # (N, K/2, 2)
        q = nibbles.view(N, G, self.group_size).to(dtype)  # (N, G, gs)
        scales = self.codes_scales[..., 0:1].to(dtype)  # (N, G, 1)
        offsets = self.codes_scales[..., 1:2].to(dtype) - 8 * scales  # zero - 8 * scale
        return torch.addcmul(offsets, q, scales).view(N, K)  # (q - 8) * scale + zero

    def forward(self, x: Tensor) -> Tensor:  # (..., K) -> (..., N), see _kernel_input
        x2 = x.reshape(-1, self.in_features)
        dense = _dense_dtype(x2)
        if self.use_kernel and x2.shape[0] < dense_min_rows(dense):
            y = torch._weight_int4pack_mm_for_cpu(
                _kernel_input(x2), self.weight, self.group_size, self.scales_and_zeros
            )  # (M, N) bf16, like Int8Linear's kernel path
        else:  # a dense matmul (the kernel is slow for many rows)
            y = F.linear(as_dtype(x2, dense), self.dequantized_weight(dense))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 group_size={self.group_size}, kernel={self.use_kernel}"
        )


def quantize_linears(module: nn.Module, mode: Literal["int8", "int4"], group_size: int = 32) -> int:
    """Replace every ``nn.Linear`` under ``module`` (recursively); return how many."""
    swapped = 0
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            new: nn.Module = Int8Linear(child) if mode == "int8" else Int4Linear(child, group_size)
            setattr(module, name, new)
            swapped += 1
        else:
            swapped += quantize_linears(child, mode, group_size)
    return swapped


@torch.no_grad()
def quantize_model(
    model: nn.Module, mode: Literal["int8", "int4"], group_size: int = 32
) -> nn.Module:
    """Swap every ``nn.Linear`` in ``model`` for a weight-only quantized linear, in place.

    Embeddings and norms are not ``nn.Linear`` and stay as they are. A tied output
    projection gets its own quantized copy; the embedding keeps the float weight.

    Args:
        model: Usually a bf16 ``Transformer`` (activations must be bf16 for speed).
        mode: ``"int8"`` (per-channel) or ``"int4"`` (group-wise).
        group_size: Input columns per int4 group (32, 64, 128, ...).

    Returns:
        The same model, for chaining.
    """
    if mode not in ("int8", "int4"):
        raise EngineError(f"quantization mode must be 'int8' or 'int4', got {mode!r}")
    if group_size <= 0 or group_size % 2 != 0:
        raise EngineError(f"group_size must be a positive even number, got {group_size}")
    swapped = quantize_linears(model, mode, group_size)
    logger.info("quantized %d linear layers to %s", swapped, mode)
    return model
