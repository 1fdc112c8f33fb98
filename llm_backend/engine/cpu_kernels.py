"""ragloom's own C++ CPU kernels, compiled on first use and cached.

The quantized linears' decode matmuls on the AVX512-BF16 dot product (``vdpbf16ps``),
where PyTorch's CPU kernels widen each weight to float32 and multiply with float32
FMAs, half the rate of bf16 dot products on a CPU that has them, and the decode
attention over a bf16 KV cache:

- ``torch.ops.ragloom.int4_bf16_mm(x, packed, scales_and_zeros, group_size)``
  (``csrc/int4_bf16_mm.cpp``) reads the codes as PyTorch's int4 kernel packs them (no
  second copy), turns two input columns' codes into exact bf16 integers (q - 8) with
  one table lookup, sums each group's exact products in float32 and applies the
  group's scale and zero once: 1.4-1.6x PyTorch's kernel for 1-8 rows and 1.7-2.2x
  for 32 on SmolLM2's shapes (Zen 4 kind).
- ``torch.ops.ragloom.int4_dequant_t(packed, scales_and_zeros, group_size)`` (same file)
  writes the prefill path's W^T, (K, N) bf16, from that packing in one pass, the bits
  of the tensor ops it replaces at 7-9x their speed (SmolLM2's four shapes: 2.4 -> 0.3
  ms a layer).
- ``torch.ops.ragloom.int8_bf16_mm(x, weight, scales)`` (``csrc/int8_bf16_mm.cpp``)
  reads the (N, K) int8 codes as they are, converts them exactly to bf16 and sums the
  exact products in float32, then scales each output.
- ``torch.ops.ragloom.int8_limbs_mm(limbs, s1, s2, weight, code_sums, scales)``
  (``csrc/int8_limbs_mm.cpp``) is ``quantize.two_limb_matmul``'s product on int8 dot
  products (AVX512-VNNI ``vpdpbusd``), its bits without the int32 sums in memory:
  SmolLM2's vocab projection for one row ~1.1-1.3 ms against ``torch._int_mm``'s ~2.
- ``torch.ops.ragloom.decode_attention(q, k_cache, v_cache, slots, bias, scale)``
  (``csrc/decode_attention.cpp``) reads each row's keys and values in place from its
  cache slot (no gathered copy) and computes in float32.
- ``torch.ops.ragloom.prefill_attention(q, k, v, input_pos, scale)``
  (``csrc/prefill_attention.cpp``) is a prompt chunk's causal attention in one pass
  over the keys (scores on bf16 dot products, an online softmax in float32, the
  probabilities rounded to bf16 for the value product, as the tensor ops round them):
  SmolLM2 per layer 1.5-1.9x ``Attention._blocked_attention``'s matmuls and softmax
  (512 tokens ~2.7 -> ~1.4 ms, 1,500 ~15 -> ~10), no score matrix in memory.
- ``torch.ops.ragloom.rope(x, cos, sin)`` and ``torch.ops.ragloom.silu_mul(x)``
  (``csrc/elementwise.cpp``): RoPE (``model.apply_rope``'s bits) and SwiGLU's
  ``F.silu(gate) * up`` (its rounding steps) in one pass each, for eager bf16 steps.

In the matmuls and the attention, a row's result does not depend on how many rows run beside it.

The library is built with PyTorch's extension builder (g++ and ninja, ~10 s) into
``<cache>/<key>/``, the key hashing the sources, the torch build and the flags, and is
loaded from there by later processes (``torch.ops.load_library``: no build tools
imported). Where it cannot be built or the CPU lacks AVX512-BF16 (or VNNI), ``load_cpu_kernels``
returns False: the quantized linears keep PyTorch's kernels and the attention its
tensor-op forms.

Example:
    >>> if load_cpu_kernels():
    ...     y = torch.ops.ragloom.int4_bf16_mm(x, packed, scales_and_zeros, 32)
    ...     y8 = torch.ops.ragloom.int8_bf16_mm(x, int8_codes, scales)
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from llm_backend.engine.paths import engine_cache_dir

logger = logging.getLogger(__name__)

_CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = (
    _CSRC / "int4_bf16_mm.cpp",
    _CSRC / "int8_bf16_mm.cpp",
    _CSRC / "int8_limbs_mm.cpp",
    _CSRC / "decode_attention.cpp",
    _CSRC / "prefill_attention.cpp",
    _CSRC / "elementwise.cpp",
)
HEADERS = (_CSRC / "vec_math.h",)
LIBRARY_NAME = "ragloom_cpu_kernels"
INT4_BF16_BLOCK_N = 64  # the output-row block of the int4 packing the kernel reads
INT8_BF16_K_STEP = 32  # int8_bf16_mm: input columns a multiple of this
INT8_LIMBS_K_STEP = 64  # int8_limbs_mm: input columns a multiple of this
DECODE_ATTENTION_MAX_HEAD_DIM = 256  # decode_attention: head_dim a multiple of 16 up to this
DECODE_ATTENTION_MAX_QUERIES = 32  # and at most this many query rows per KV head
PREFILL_ATTENTION_HEAD_DIMS = (64, 128)  # prefill_attention: these head_dims only
# -fopenmp: at::parallel_for is inlined, and runs on one thread without it; the
# GOMP symbols resolve to the libgomp torch loaded (one thread pool)
CFLAGS = (
    "-O3",
    "-fopenmp",
    "-mavx512f",
    "-mavx512bw",
    "-mavx512vl",
    "-mavx512bf16",
    "-mavx512vnni",
    "-mfma",
)

_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet in this process


def default_kernel_dir() -> Path:
    """``$XDG_CACHE_HOME/ragloom/kernels`` (``~/.cache/ragloom/kernels``)."""
    return engine_cache_dir("kernels")


def cpu_has_bf16_dot() -> bool:
    """Whether this CPU runs the kernels: AVX-512 (F, BW, VL, as PyTorch's AVX512
    level requires) with the bf16 and int8 (VNNI) dot products. Every CPU with the
    first has the second (Cooper Lake, Sapphire Rapids, Zen 4)."""
    return bool(
        torch.backends.cpu.get_cpu_capability() == "AVX512"
        and torch.cpu._is_avx512_bf16_supported()
        and torch.cpu._is_vnni_supported()
    )


def kernels_key() -> str:
    """The build's cache key: the sources and headers, the torch build and the compiler
    flags."""
    digest = hashlib.sha256()
    for part in (torch.__version__, sys.version, *CFLAGS):
        digest.update(f"{part}\n".encode())
    for source in (*SOURCES, *HEADERS):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:24]


def load_cpu_kernels(cache_dir: Path | None = None) -> bool:
    """Load the kernels into this process (building them the first time); False where
    this CPU cannot run them or they cannot be built (logged once), so callers fall
    back to PyTorch's kernels. Safe to call from several threads and processes."""
    global _loaded
    with _lock:
        if _loaded is None:
            _loaded = _load(cache_dir or default_kernel_dir())
        return _loaded


def _load(cache_dir: Path) -> bool:
    if not cpu_has_bf16_dot():
        return False
    folder = cache_dir / kernels_key()
    library = folder / f"{LIBRARY_NAME}.so"
    try:
        if library.is_file():
            torch.ops.load_library(str(library))
        else:
            _build_and_load(folder)
    except (OSError, RuntimeError, ImportError) as exc:
        logger.warning("ragloom's CPU kernels are unavailable, PyTorch's are used: %s", exc)
        return False
    _register_fakes()
    logger.info("loaded ragloom's CPU kernels from %s", folder)
    return True


def _build_and_load(folder: Path) -> None:
    """Compile into a fresh folder beside ``folder`` (loading the library from it) and
    move it into place, so no process loads a half-written library."""
    from torch.utils.cpp_extension import load

    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".build-", dir=folder.parent))
    path = os.environ.get("PATH", "")
    scripts = str(Path(sys.executable).parent)  # ninja from the venv, activated or not
    try:
        os.environ["PATH"] = os.pathsep.join((scripts, path)) if path else scripts
        logger.info("building ragloom's CPU kernels (once, ~10 s)")
        load(
            name=LIBRARY_NAME,
            sources=[str(source) for source in SOURCES],
            extra_cflags=list(CFLAGS),
            build_directory=str(scratch),
            with_cuda=False,
            is_python_module=False,  # loads it as a library of operators
        )
        try:
            scratch.rename(folder)
        except OSError:  # another process put its build there first
            if not (folder / f"{LIBRARY_NAME}.so").is_file():
                raise
    except (OSError, RuntimeError, ImportError):
        raise
    except Exception as exc:  # the builder raises bare Exception and CalledProcessError
        raise RuntimeError(f"building {LIBRARY_NAME} failed: {exc}") from exc
    finally:
        os.environ["PATH"] = path
        shutil.rmtree(scratch, ignore_errors=True)


def _register_fakes() -> None:
    """Output shapes for tracing (``torch.export``, ``torch.compile``): the matmuls
    (M, N) bf16, the attention q's shape in float32."""

    @torch.library.register_fake("ragloom::int4_bf16_mm")
    def _(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
        return x.new_empty(x.shape[0], scales_and_zeros.shape[1])

    @torch.library.register_fake("ragloom::int4_dequant_t")
    def _dequant(packed: Tensor, scales_and_zeros: Tensor, group_size: int) -> Tensor:
        groups, columns = scales_and_zeros.shape[:2]
        return scales_and_zeros.new_empty(groups * group_size, columns)

    @torch.library.register_fake("ragloom::int8_bf16_mm")
    def _int8(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("ragloom::int8_limbs_mm")
    def _limbs(
        limbs: Tensor, s1: Tensor, s2: Tensor, weight: Tensor, code_sums: Tensor, scales: Tensor
    ) -> Tensor:
        return limbs.new_empty(limbs.shape[0] // 2, weight.shape[0], dtype=torch.float32)

    @torch.library.register_fake("ragloom::prefill_attention")
    def _prefill(q: Tensor, k: Tensor, v: Tensor, input_pos: Tensor, scale: float) -> Tensor:
        return q.new_empty(q.shape)

    @torch.library.register_fake("ragloom::rope")
    def _rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return x.new_empty(x.shape)

    @torch.library.register_fake("ragloom::silu_mul")
    def _silu_mul(x: Tensor) -> Tensor:
        return x.new_empty(x.shape[0], x.shape[1] // 2)

    @torch.library.register_fake("ragloom::decode_attention")
    def _attention(
        q: Tensor, k_cache: Tensor, v_cache: Tensor, slots: Tensor, bias: Tensor, scale: float
    ) -> Tensor:
        return q.new_empty(q.shape)
