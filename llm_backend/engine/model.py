"""A Llama / Qwen2 decoder in plain PyTorch, gpt-fast style, with a slotted KV cache.

Shapes use B = batch rows, T = new tokens per row, S = attended cache length,
D = model dim, H = query heads, Hkv = key/value heads, hd = head dim, V = vocab.

Real multi-request batching: every row carries its own positions (``input_pos``)
and its own cache slot (``slots``), so rows at different positions decode in one
step. The attention mask is built from tensors (no host sync); only a CPU prefill in
bf16 reads its query blocks' key bounds on the host (``Transformer.prefill_key_bounds``).

Example:
    >>> args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128,
    ...                  vocab_size=100)
    >>> model = Transformer(args).eval()
    >>> model.setup_caches(max_batch=2, max_seq_len=32, dtype=torch.float32)
    >>> tokens = torch.tensor([[5, 6, 7]]); pos = torch.arange(3)[None]
    >>> model(tokens, pos, torch.tensor([0])).shape
    torch.Size([1, 3, 100])
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from llm_backend.engine.cpu_kernels import (
    DECODE_ATTENTION_MAX_HEAD_DIM,
    DECODE_ATTENTION_MAX_QUERIES,
    PREFILL_ATTENTION_HEAD_DIMS,
    load_cpu_kernels,
)
from llm_backend.engine.errors import EngineError
from llm_backend.engine.gguf_reader import GGUFMetadata
from llm_backend.engine.quantize import (
    Fp16Linear,
    Int8Embedding,
    Int8Linear,
    as_dtype,
    cpu_has_native_bf16,
)

if TYPE_CHECKING:
    from llm_backend.engine.aot import AotDecode


@dataclass
class ModelArgs:
    """Hyper-parameters of a Llama-family decoder; ``__post_init__`` derives the rest."""

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    hidden_dim: int
    n_kv_heads: int = -1  # -1: same as n_heads (no GQA)
    head_dim: int = -1  # -1: dim // n_heads
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling_type: str | None = None  # None | "none" | "linear"
    rope_scaling_factor: float = 1.0
    max_position: int = 4096  # the model's trained context length
    qkv_bias: bool = False  # Qwen2 has a bias on Q, K and V
    tied_embeddings: bool = False  # output projection shares the token embedding
    architecture: str = "llama"

    def __post_init__(self) -> None:
        if self.n_kv_heads == -1:
            self.n_kv_heads = self.n_heads
        if self.head_dim == -1:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads != 0:
            raise EngineError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise EngineError(f"head_dim must be even for RoPE, got {self.head_dim}")
        self.q_size = self.n_heads * self.head_dim
        self.kv_size = self.n_kv_heads * self.head_dim

    @classmethod
    def from_gguf_metadata(
        cls, meta: GGUFMetadata, *, tied_embeddings: bool, qkv_bias: bool
    ) -> ModelArgs:
        """Build from a GGUF file's metadata (whether the file has ``output.weight``
        and ``attn_q.bias`` decides ``tied_embeddings`` / ``qkv_bias``)."""
        scaling = meta.rope_scaling_type
        if scaling not in (None, "none", "linear"):
            raise EngineError(f"unsupported rope scaling type {scaling!r}")
        return cls(
            dim=meta.embedding_length,
            n_layers=meta.block_count,
            n_heads=meta.head_count,
            n_kv_heads=meta.head_count_kv,
            head_dim=meta.key_length or -1,
            vocab_size=meta.vocab_size,
            hidden_dim=meta.feed_forward_length,
            norm_eps=meta.rms_norm_eps,
            rope_base=meta.rope_freq_base,
            rope_scaling_type=scaling,
            rope_scaling_factor=meta.rope_scaling_factor or 1.0,
            max_position=meta.context_length,
            qkv_bias=qkv_bias,
            tied_embeddings=tied_embeddings,
            architecture=meta.architecture,
        )


SMALL_T_ATTENTION = 4  # up to this many new tokens per row, attention skips SDPA
# bf16 prefill attention on a CPU takes this many query positions per block (see
# Attention._blocked_attention); 64-192 measured alike, SDPA's kernel was 1.4-2x slower.
PREFILL_QUERY_BLOCK = 128
# Attention reads a multiple of this many cache positions (those past a row's own are
# masked; the cache reads as zeros where never written), and each prefill query block
# likewise. A row's result then does not depend on how far its batch's longest row
# reaches: PyTorch's softmax and matmuls on a CPU sum a row's tail apart from its
# vector body, so a row of 174 keys came out a bf16 step off the same row padded to
# 228, and a prompt prefilled or decoded alone drifted from the same prompt beside
# longer ones.
KEY_ALIGN = 32


def whole_key_blocks(positions: int) -> int:
    """``positions`` rounded up to a multiple of ``KEY_ALIGN``."""
    return -(-positions // KEY_ALIGN) * KEY_ALIGN


# Decode attention (Attention._small_t_attention) has three forms. Compiled, "fused":
# products and sums inductor fuses into loops that read the cache as it is. Eager,
# "float32": the cache's rows converted, then two float32 batched matmuls; or "bf16" from
# this many cached positions in all (rows x kv_len) in a bf16 cache, where the float32
# copies outgrow the CPU's caches (PyTorch's bf16 batched matmul copies a strided cache
# slice to a packed one, so bf16 gains nothing below this). SmolLM2 int4, whole eager
# decode step on the Zen 4 kind, float32 / bf16 ms: 1 row x 1,500 positions 31 / 32,
# 2 x 1,500 27 / 29, 4 x 1,024 41 / 38, 8 x 1,500 96 / 67, 16 x 1,024 460 / 105,
# 32 x 1,500 730 / 292. The fused form (timed per layer as a compiled call, against
# the float32 form compiled): 32 x 1,500 3.9 vs 36 ms, 8 x 1,500 0.95 vs 5.2, 1 x 128
# 63 vs 124 us.
BF16_DECODE_MIN_POSITIONS = 4096
# Candidates tied at a position's largest bf16 logit that are told apart in float32
# (Transformer.break_logit_ties): more than this many tied at once is not seen.
TIED_LOGITS = 8
DecodeAttention = Literal["float32", "bf16", "fused", "kernel"]


@dataclass
class StepContext:
    """What every layer of one forward shares, built once by ``Transformer._run``."""

    cos: Tensor  # (B, T, 1, hd) RoPE, in the activations' dtype
    sin: Tensor
    # (B, 1, T, S) bool (True = attend), or for a few query tokens the float 0/-inf
    # bias (B * Hkv, G * T, S) of Transformer.small_t_bias (float32 or bf16)
    mask: Tensor
    write_rows: Tensor  # (B*T*Hkv,): where this step's K/V go in the cache
    slot_index: Tensor  # (B, 1)
    first_slot: int | None  # rows own slots first_slot.. (cache views); None: gather
    kv_len: int  # S, the cache positions attended
    key_bounds: tuple[tuple[int, int], ...] | None = None  # Transformer.prefill_key_bounds
    # (B, T) int64, set where ragloom::prefill_attention runs the prompt chunk's attention
    prefill_positions: Tensor | None = None
    # ragloom::rope and ragloom::silu_mul for bf16 activations (eager steps only: compiled
    # graphs fuse these themselves, and a call through AOT's proxy executor costs more)
    elementwise_kernels: bool = False
    decode_attention: DecodeAttention = "float32"  # the small-T form, see its constant


_NO_CACHE = "call model.setup_caches(max_batch, max_seq_len, dtype) first"


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[Tensor, mmap.mmap]:
    """A zero CPU tensor whose pages only become resident when written, and its mapping.

    ``torch.zeros`` fills every byte (a 32-slot, 2,048-position cache is gigabytes of
    RSS from the start). An anonymous ``mmap`` gets zero pages from the OS on first
    touch, and ``MADV_NOHUGEPAGE`` keeps that touch to 4 KiB: with 2 MiB pages (numpy
    asks for them on large arrays) a few positions written in every slot made the whole
    cache resident. Unwritten positions must hold finite values (masked scores multiply
    them by 0), so zeros. ``release_pages(mapping)`` hands the pages back.
    """
    numel = math.prod(shape)
    size = max(numel * torch.empty(0, dtype=dtype).element_size(), 1)
    # Private: MADV_DONTNEED then frees the pages (a shared anonymous mapping would keep
    # them in shmem and read back the old values).
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    mapping = mmap.mmap(-1, size, flags=flags) if flags else mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        mapping.madvise(mmap.MADV_NOHUGEPAGE)
    return torch.frombuffer(mapping, dtype=dtype, count=numel).view(shape), mapping


def release_pages(mapping: mmap.mmap) -> None:
    """Give a ``lazy_zeros`` mapping's pages back to the OS: it reads as zeros again and
    holds no RSS until written (``MADV_DONTNEED`` on private anonymous memory). A no-op
    where the OS has no such call; stale values are finite, so that is still correct."""
    if hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


class KVCache(nn.Module):
    """Preallocated keys and values: ``max_batch`` slots × ``max_seq_len`` positions."""

    def __init__(
        self, max_batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        shape = (max_batch, n_kv_heads, max_seq_len, head_dim)  # (slots, Hkv, S_max, hd)
        k_cache, k_mapping = lazy_zeros(shape, dtype)
        v_cache, v_mapping = lazy_zeros(shape, dtype)
        self.register_buffer("k_cache", k_cache, persistent=False)
        self.register_buffer("v_cache", v_cache, persistent=False)
        self.k_cache: Tensor
        self.v_cache: Tensor
        self._mappings = (k_mapping, v_mapping)
        self._mapped_at = (k_cache.data_ptr(), v_cache.data_ptr())

    def release_memory(self) -> None:
        """Drop every cached key and value and give their memory back to the OS (the
        cache reads as zeros). Only for a CPU cache still in its own mappings; a cache
        moved elsewhere (``.to("cuda")``) keeps its contents."""
        if (self.k_cache.data_ptr(), self.v_cache.data_ptr()) == self._mapped_at:
            for mapping in self._mappings:
                release_pages(mapping)

    def write(self, write_rows: Tensor, k: Tensor, v: Tensor) -> None:
        """Write ``k``/``v`` (B, T, Hkv, hd) into their rows of the cache
        (``write_rows``: ``Transformer.cache_write_rows``)."""
        hd = k.shape[-1]
        # the quantized linears' kernels may hand over bf16 rows for a float32 cache
        k_rows = as_dtype(k, self.k_cache.dtype).reshape(-1, hd)  # (B*T*Hkv, hd)
        v_rows = as_dtype(v, self.v_cache.dtype).reshape(-1, hd)
        self.k_cache.view(-1, hd).index_copy_(0, write_rows, k_rows)
        self.v_cache.view(-1, hd).index_copy_(0, write_rows, v_rows)

    def update(
        self,
        slot_index: Tensor,  # (B, 1) long: each row's slot
        first_slot: int | None,  # rows own slots first_slot.. (views, no copy); None: gather
        write_rows: Tensor,  # (B*T*Hkv,) long: Transformer.cache_write_rows
        k: Tensor,  # (B, T, Hkv, hd)
        v: Tensor,
        kv_len: int,
    ) -> tuple[Tensor, Tensor]:
        """Write ``k``/``v`` into their rows of the cache, then return the first
        ``kv_len`` positions of the batch's slots, (B, Hkv, kv_len, hd) each.

        The write is one ``index_copy_`` per tensor over the cache viewed as
        (slots * Hkv * S_max, hd) rows: indexing ``cache[slot, :, pos] = k`` costs
        ~70 us per layer in Python-side index handling, this a few.
        """
        self.write(write_rows, k, v)
        if first_slot is not None:
            rows = slice(first_slot, first_slot + k.shape[0])
            return self.k_cache[rows, :, :kv_len], self.v_cache[rows, :, :kv_len]
        slots = slot_index[:, 0]
        k_all = self.k_cache[:, :, :kv_len].index_select(0, slots)  # (B, Hkv, kv_len, hd)
        v_all = self.v_cache[:, :, :kv_len].index_select(0, slots)
        return k_all, v_all


class RMSNorm(nn.Module):
    """x / rms(x) * weight (float32 accumulation)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.out_dtype: torch.dtype | None = None  # None: same as the input
        self.register_buffer("eps_tensor", torch.tensor(eps), persistent=False)
        self.eps_tensor: Tensor

    def forward(self, x: Tensor) -> Tensor:
        # x is the float32 residual stream (weight float32 too); the output feeds the
        # matmuls in ``out_dtype`` (bfloat16 for bf16 / int8 / int4 models).
        # Not F.rms_norm: on CPU it decomposes into ~7 ops, 30-50 us per decode call
        # here; this is 5. rsqrt(|x|^2 / D + eps) with |x| from one fused reduction.
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)  # (..., 1)
        inv_rms = torch.addcmul(self.eps_tensor, norm, norm, value=1.0 / x.shape[-1]).rsqrt_()
        out = (x * inv_rms).mul_(self.weight)
        if self.out_dtype is None or out.dtype == self.out_dtype:
            return out
        return out.to(self.out_dtype)


def apply_rope(x: Tensor, cos: Tensor, sin_signed: Tensor) -> Tensor:
    """Rotate ``x`` (B, T, n, hd) by per-position angles (Hugging Face's half layout).

    ``x * cos + rotate_half(x) * sin`` with rotate_half(x1, x2) = (-x2, x1), in three
    ops: swapping the halves is a ``flip`` over a (2, hd/2) view, and the minus sign
    lives in ``sin_signed`` = (-sin, sin), precomputed per position. (B, T, 1, hd) each.
    """
    B, T, n, hd = x.shape
    swapped = x.view(B, T, n, 2, hd // 2).flip(3).view(B, T, n, hd)  # (x2, x1)
    return torch.addcmul(x * cos, swapped, sin_signed)


class Attention(nn.Module):
    """Grouped-query attention with one fused QKV projection."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads
        self.head_dim = args.head_dim
        self.q_size = args.q_size
        self.kv_size = args.kv_size
        self.wqkv = nn.Linear(args.dim, args.q_size + 2 * args.kv_size, bias=args.qkv_bias)
        self.wo = nn.Linear(args.q_size, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: Tensor, step: StepContext) -> Tensor:  # (B, T, D) -> (B, T, D)
        B, T, _ = x.shape
        if self.kv_cache is None:
            raise EngineError(_NO_CACHE)
        q, k, v = self._project(x, step)
        if step.decode_attention == "kernel":  # set for a few query tokens only (_run)
            # ragloom::decode_attention reads each row's slot in place: no gathered copy
            self.kv_cache.write(step.write_rows, k, v)
            y = self._kernel_attention(q, self.kv_cache, step.slot_index, step.mask)
            return self.wo(as_dtype(y, q.dtype))  # (B, T, D)
        k_all, v_all = self.kv_cache.update(
            step.slot_index, step.first_slot, step.write_rows, k, v, step.kv_len
        )  # (B, Hkv, S, hd)
        mask = step.mask
        if mask.dtype != torch.bool:  # the float bias built for a few query tokens
            form = step.decode_attention
            y = self._small_t_attention(q, k_all, v_all, mask, form)  # (B, T, H * hd)
            y = as_dtype(y, q.dtype)
        elif step.prefill_positions is not None and q.dtype == k_all.dtype == torch.bfloat16:
            # ragloom::prefill_attention: scores, softmax and values in one pass
            y = torch.ops.ragloom.prefill_attention(
                q, k_all, v_all, step.prefill_positions, self.head_dim**-0.5
            ).view(B, T, self.q_size)
        elif step.key_bounds is not None and q.dtype == k_all.dtype == torch.bfloat16:
            y = self._blocked_attention(q, k_all, v_all, mask, step.key_bounds)  # (B, T, H*hd)
        else:
            # a bf16 cache under float32 activations: the chunk's keys in q's dtype
            k_all, v_all = as_dtype(k_all, q.dtype), as_dtype(v_all, q.dtype)
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k_all, v_all, attn_mask=mask, enable_gqa=True
            )  # (B, H, T, hd)
            y = y.transpose(1, 2).reshape(B, T, self.q_size)
        return self.wo(y)  # (B, T, D)

    def write_cache(self, x: Tensor, step: StepContext) -> None:  # x (B, T, D)
        """Project ``x`` and write its keys and values into the cache, nothing more: the
        last layer of a prefill whose output nobody reads (``Transformer.fill_cache``)."""
        if self.kv_cache is None:
            raise EngineError(_NO_CACHE)
        _, k, v = self._project(x, step)
        self.kv_cache.write(step.write_rows, k, v)

    def _project(self, x: Tensor, step: StepContext) -> tuple[Tensor, Tensor, Tensor]:
        """The fused QKV projection, RoPE on Q and K: q (B, T, H, hd), k and v
        (B, T, Hkv, hd)."""
        B, T, _ = x.shape
        qkv = self.wqkv(x)  # (B, T, q_size + 2 kv_size)
        qk, v = qkv.split((self.q_size + self.kv_size, self.kv_size), dim=-1)
        # RoPE on Q and K heads together: (B, T, H + Hkv, hd)
        qk = qk.view(B, T, self.n_heads + self.n_kv_heads, self.head_dim)
        if step.elementwise_kernels and qk.dtype == step.cos.dtype == torch.bfloat16:
            qk = torch.ops.ragloom.rope(qk, step.cos, step.sin)  # apply_rope's bits
        else:
            qk = apply_rope(qk, step.cos, step.sin)
        q, k = qk.split((self.n_heads, self.n_kv_heads), dim=2)  # (B, T, H | Hkv, hd)
        return q, k, v.view(B, T, self.n_kv_heads, self.head_dim)

    def _blocked_attention(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        mask: Tensor,
        key_bounds: tuple[tuple[int, int], ...],
    ) -> Tensor:
        """Prefill attention in bf16 on a CPU, ``PREFILL_QUERY_BLOCK`` query positions
        at a time, each block against only the keys it can see: ``key_bounds`` holds
        (lo, hi) per block, keys [hi, S) are masked for all its rows and [0, lo) for none,
        so the mask is applied to columns [lo, hi) only.

        PyTorch's CPU flash-attention kernel runs at ~60-100 GFLOP/s here whether it gets
        a mask or ``is_causal`` (bf16 matmuls reach ~420): it multiplies small tiles one
        head at a time. This path makes each block two batched matmuls over the KV heads
        with their G query heads stacked as rows (no K/V repeat), a masked fill and a
        softmax: 1.4-2x faster for 512-1,500 token prompts on the Zen 4 kind, the
        causal upper triangle skipped a block at a time.
        q (B, T, H, hd); k, v (B, Hkv, S, hd); mask (B, 1, T, S) bool (True = attend).
        """
        B, T = q.shape[:2]
        S = k.shape[2]
        G = self.n_heads // self.n_kv_heads
        hd = self.head_dim
        rows = B * self.n_kv_heads
        qg = (q * hd**-0.5).view(B, T, self.n_kv_heads, G, hd).permute(0, 2, 3, 1, 4)
        keys = k.reshape(rows, S, hd)  # a view of the cache when its slots are consecutive
        values = v.reshape(rows, S, hd)
        y = torch.empty(B, T, self.n_kv_heads, G, hd, dtype=q.dtype, device=q.device)
        for block, (lo, Sk) in enumerate(key_bounds):
            start = block * PREFILL_QUERY_BLOCK
            end = min(T, start + PREFILL_QUERY_BLOCK)
            n = end - start
            qb = qg[:, :, :, start:end].reshape(rows, G * n, hd)  # (B*Hkv, G*n, hd)
            scores = torch.bmm(qb, keys[:, :Sk].transpose(1, 2))  # (B*Hkv, G*n, Sk)
            hidden = mask[:, :, None, start:end, lo:Sk].logical_not()  # (B, 1, 1, n, Sk - lo)
            scores.view(B, self.n_kv_heads, G, n, Sk)[..., lo:].masked_fill_(hidden, -math.inf)
            probs = torch.softmax(scores, dim=-1).view(rows, G * n, Sk)  # float32 inside
            out = torch.bmm(probs, values[:, :Sk])  # (B*Hkv, G*n, hd)
            y[:, start:end] = out.view(B, self.n_kv_heads, G, n, hd).permute(0, 3, 1, 2, 4)
        return y.view(B, T, self.q_size)

    def _kernel_attention(
        self, q: Tensor, cache: KVCache, slot_index: Tensor, bias: Tensor
    ) -> Tensor:
        """Decode attention by ``ragloom::decode_attention`` (``cpu_kernels``): the
        grouping of ``_small_t_attention``, each row's keys and values read in place from
        its cache slot, float32 math. q (B, T, H, hd); slot_index (B, 1); bias
        (B*Hkv, G*T, S) 0 / -inf. Returns (B, T, H * hd) float32."""
        B, T = q.shape[:2]
        G = self.n_heads // self.n_kv_heads
        hd = self.head_dim
        qg = q.view(B, T, self.n_kv_heads, G, hd).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, T, hd)
        qg = as_dtype(qg.reshape(B * self.n_kv_heads, G * T, hd), torch.float32).contiguous()
        y = torch.ops.ragloom.decode_attention(
            qg, cache.k_cache, cache.v_cache, slot_index.reshape(-1), bias, hd**-0.5
        )  # (B*Hkv, G*T, hd)
        y = y.view(B, self.n_kv_heads, G, T, hd).permute(0, 3, 1, 2, 4)  # (B, T, Hkv, G, hd)
        return y.reshape(B, T, self.q_size)

    def _small_t_attention(
        self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor, form: DecodeAttention
    ) -> Tensor:
        """Attention for a few query tokens (decode), in one of three ``form``s
        (``BF16_DECODE_MIN_POSITIONS``): "float32" and "bf16", two batched matmuls in
        ``bias``'s dtype (bf16: scores rounded to bf16 as in the bf16 prefill); "fused",
        for compiled steps only, products and sums that inductor turns into loops reading
        the cache in place (eagerly it would build a (rows, G*T, S, hd) tensor).

        CPU SDPA costs ~0.15-0.8 ms per call at T=1 (3-6x this path). Query heads are
        grouped under their KV head, so GQA needs no K/V repeat, and every op is a view
        at T=1 except the ones that compute:
        q (B, T, H, hd) -> (B*Hkv, G*T, hd); scores (B*Hkv, G*T, S).
        ``bias`` (B*Hkv, G*T, S) holds 0 / -inf (``Transformer.small_t_bias``).

        Returns:
            (B, T, H * hd): float32, or bf16 for "bf16".
        """
        B, T = q.shape[:2]
        S = k.shape[2]
        G = self.n_heads // self.n_kv_heads
        hd = self.head_dim
        rows = B * self.n_kv_heads
        qg = q.view(B, T, self.n_kv_heads, G, hd).permute(0, 2, 3, 1, 4)  # (B, Hkv, G, T, hd)
        qg = qg.reshape(rows, G * T, hd)
        keys = k.reshape(rows, S, hd)  # a view of the cache when its slots are consecutive
        values = v.reshape(rows, S, hd)
        if form == "fused":  # float32 sums; the products never exist as a tensor
            qf = qg.float()[:, :, None, :]  # (rows, G*T, 1, hd)
            scores = (qf * keys.float()[:, None]).sum(-1) * hd**-0.5 + bias  # (rows, G*T, S)
            probs = torch.softmax(scores, dim=-1)
            y = (probs[..., None] * values.float()[:, None]).sum(2)  # (rows, G*T, hd)
        elif form == "bf16":  # the cache as it is; keys the first operand (not transposed)
            qg = as_dtype(qg, torch.bfloat16)  # float32 under an fp16 model's linears
            scores_t = torch.baddbmm(
                bias.transpose(1, 2), keys, qg.transpose(1, 2), alpha=hd**-0.5
            )  # (rows, S, G*T) bf16
            probs = torch.softmax(scores_t, dim=1, dtype=torch.float32).to(torch.bfloat16)
            y = torch.bmm(probs.transpose(1, 2), values)  # (rows, G*T, hd)
        else:
            qg = as_dtype(qg, torch.float32)
            keys, values = as_dtype(keys, torch.float32), as_dtype(values, torch.float32)
            # scale * q k^T + bias in one op
            scores = torch.baddbmm(bias, qg, keys.transpose(1, 2), alpha=hd**-0.5)
            y = torch.bmm(torch.softmax(scores, dim=-1), values)  # (rows, G*T, hd)
        y = y.view(B, self.n_kv_heads, G, T, hd).permute(0, 3, 1, 2, 4)  # (B, T, Hkv, G, hd)
        return y.reshape(B, T, self.q_size)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(x W1) * (x W3)), with W1 (gate) and W3 (up) fused into ``w13``."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.hidden_dim = args.hidden_dim
        self.w13 = nn.Linear(args.dim, 2 * args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x: Tensor, step: StepContext | None = None) -> Tensor:  # (B, T, D)
        gate_up = self.w13(x)  # (B, T, 2F)
        if step is not None and step.elementwise_kernels and gate_up.dtype == torch.bfloat16:
            # one pass, F.silu(gate) * up's rounding (cpu_kernels)
            activated = torch.ops.ragloom.silu_mul(gate_up.reshape(-1, 2 * self.hidden_dim))
            return self.w2(activated.view(*gate_up.shape[:-1], self.hidden_dim))
        gate, up = gate_up.split(self.hidden_dim, dim=-1)  # (B, T, F) each
        return self.w2(F.silu(gate) * up)  # (B, T, D); bf16 from a quantized kernel


class TransformerBlock(nn.Module):
    """Pre-norm attention + pre-norm SwiGLU, each with a residual connection."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: Tensor, step: StepContext) -> Tensor:  # (B, T, D) -> (B, T, D)
        h = x + self.attention(self.attention_norm(x), step)
        return h + self.feed_forward(self.ffn_norm(h), step)


class Transformer(nn.Module):
    """The decoder: embedding, ``n_layers`` blocks, final norm, output projection."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        # nn.Embedding, or an Int8Embedding in an int8 / int4 model (loader)
        self.tok_embeddings: nn.Embedding | Int8Embedding = _embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output: nn.Linear | Int8Linear | Fp16Linear = nn.Linear(
            args.dim, args.vocab_size, bias=False
        )
        self.max_batch = 0
        self.max_seq_len = 0
        self._compiled_run: Callable[..., Tensor] | None = None  # see compile_decode
        self._aot_decode: AotDecode | None = None  # see use_aot_decode
        self._blocked_prefill = False  # see Attention._blocked_attention, setup_caches
        self._bf16_decode = False  # a bf16 cache decode may read as is (setup_caches)
        self._attention_kernel = False  # ragloom::decode_attention (setup_caches)
        self._prefill_kernel = False  # ragloom::prefill_attention (setup_caches)
        self._elementwise_kernels = False  # ragloom::rope, ragloom::silu_mul (setup_caches)
        self.rope_freq_factors: Tensor | None = None  # llama3-style per-frequency divisors
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        # (S_max, hd) each; rope_sin holds (-sin, sin) over the two halves (apply_rope).
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.register_buffer("key_positions", torch.empty(0, dtype=torch.long), persistent=False)
        self.rope_cos: Tensor
        self.rope_sin: Tensor
        self.key_positions: Tensor

    def blocks(self) -> list[TransformerBlock]:
        """The transformer blocks, typed."""
        return [cast(TransformerBlock, block) for block in self.layers]

    @property
    def dtype(self) -> torch.dtype:
        """The matmul activation dtype (a float embedding's dtype); the residual stream
        and the norms are float32."""
        if isinstance(self.tok_embeddings, Int8Embedding):
            return self.tok_embeddings.compute_dtype
        return self.tok_embeddings.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the weights and caches live."""
        return self.tok_embeddings.weight.device

    def keep_norms_float32(self) -> None:
        """After a cast to bf16: put every RMSNorm back in float32 (its weights are tiny)
        and make it emit the matmul dtype."""
        compute_dtype = self.dtype
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight = nn.Parameter(module.weight.float(), requires_grad=False)
                module.eps_tensor = torch.tensor(module.eps, device=module.weight.device)
                module.out_dtype = None if compute_dtype == torch.float32 else compute_dtype

    def setup_caches(self, max_batch: int, max_seq_len: int, dtype: torch.dtype) -> None:
        """Allocate the KV cache (``max_batch`` slots × ``max_seq_len`` positions) and RoPE
        tables. Calling it again with other sizes reallocates (old cache contents are lost)."""
        if max_batch < 1 or max_seq_len < 1:
            raise EngineError(
                f"max_batch and max_seq_len must be >= 1, got {max_batch}, {max_seq_len}"
            )
        args = self.args
        device = self.device
        # compiled steps hold the old cache's pointers (use_aot_decode binds anew)
        self._aot_decode = None
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self._blocked_prefill = (
            device.type == "cpu" and dtype == torch.bfloat16 and cpu_has_native_bf16()
        )
        self._bf16_decode = dtype == torch.bfloat16 and (
            device.type != "cpu" or cpu_has_native_bf16()
        )
        G = args.n_heads // args.n_kv_heads
        self._attention_kernel = bool(
            device.type == "cpu"
            and dtype == torch.bfloat16
            and args.head_dim % 16 == 0
            and args.head_dim <= DECODE_ATTENTION_MAX_HEAD_DIM
            and G * SMALL_T_ATTENTION <= DECODE_ATTENTION_MAX_QUERIES
            and load_cpu_kernels()
        )
        self._prefill_kernel = bool(
            self._blocked_prefill
            and args.head_dim in PREFILL_ATTENTION_HEAD_DIMS
            and load_cpu_kernels()
        )
        self._elementwise_kernels = bool(
            device.type == "cpu"
            and args.head_dim % 32 == 0
            and args.hidden_dim % 16 == 0
            and load_cpu_kernels()
        )
        for block in self.blocks():
            block.attention.kv_cache = KVCache(
                max_batch, max_seq_len, args.n_kv_heads, args.head_dim, dtype
            ).to(device)
        # inv_freq_i = base^(-2i/hd), i < hd/2; angles (S_max, hd/2); HF layout cat(a, a).
        exponents = torch.arange(0, args.head_dim, 2, dtype=torch.float64) / args.head_dim
        inv_freq = 1.0 / (args.rope_base**exponents)
        if self.rope_freq_factors is not None:
            inv_freq = inv_freq / self.rope_freq_factors.to(torch.float64).cpu()
        positions = torch.arange(max_seq_len, dtype=torch.float64)
        if args.rope_scaling_type == "linear":
            positions = positions / args.rope_scaling_factor
        angles = torch.outer(positions, inv_freq)  # (S_max, hd/2)
        angles = torch.cat((angles, angles), dim=-1)  # (S_max, hd)
        self.rope_cos = angles.cos().to(device=device, dtype=torch.float32)
        sin = angles.sin()
        half = args.head_dim // 2
        sin[:, :half] = -sin[:, :half]  # (-sin, sin): apply_rope's rotate_half sign
        self.rope_sin = sin.to(device=device, dtype=torch.float32)
        self.key_positions = torch.arange(max_seq_len, device=device)

    def copy_slot_prefix(self, src_slot: int, dst_slot: int, length: int) -> None:
        """Copy cached K/V of positions [0, length) from ``src_slot`` to ``dst_slot``
        (prefix caching: a new request reuses a finished request's prompt prefix)."""
        if not (0 <= src_slot < self.max_batch and 0 <= dst_slot < self.max_batch):
            raise EngineError(
                f"slots must be in [0, {self.max_batch}), got src={src_slot} dst={dst_slot}"
            )
        if not 0 <= length <= self.max_seq_len:
            raise EngineError(f"length must be in [0, {self.max_seq_len}], got {length}")
        if src_slot == dst_slot or length == 0:
            return
        with torch.no_grad():
            for block in self.blocks():
                cache = block.attention.kv_cache
                if cache is None:
                    raise EngineError(_NO_CACHE)
                cache.k_cache[dst_slot, :, :length] = cache.k_cache[src_slot, :, :length]
                cache.v_cache[dst_slot, :, :length] = cache.v_cache[src_slot, :, :length]

    def release_cache_memory(self) -> None:
        """Forget every slot's cached K/V and hand the cache's pages back to the OS. A new
        ``Scheduler`` calls it: it starts with no cached prefixes, so whatever earlier
        requests left is dead, and would otherwise stay resident (up to 46 KB a position
        for SmolLM2 in float32)."""
        for block in self.blocks():
            if block.attention.kv_cache is not None:
                block.attention.kv_cache.release_memory()

    def forward(
        self,
        tokens: Tensor,  # (B, T) long
        input_pos: Tensor,  # (B, T) long, each row's absolute positions
        slots: Tensor | None = None,  # (B,) long; None = row b uses slot b
        *,
        last_only: bool = False,
        logits_index: Tensor | None = None,  # (B,) which t gives logits when last_only
        kv_len: int | None = None,
        first_slot: int | None = None,
    ) -> Tensor:
        """Run ``tokens`` through the model, writing their K/V into the cache.

        Row b writes into slot ``slots[b]`` at positions ``input_pos[b]`` and attends
        causally to every cached position <= its own in that slot.

        Args:
            tokens: Token ids, (B, T).
            input_pos: Absolute positions, (B, T).
            slots: Cache slot of each row, (B,); None means row b uses slot b (no gather).
            last_only: Return logits of one position per row only: (B, 1, V). Which one is
                ``logits_index[b]`` when given (right-padded prefill), else T-1.
            kv_len: Upper bound (exclusive) on every position in ``input_pos``: attention
                reads only cache positions [0, kv_len) (rounded up to ``KEY_ALIGN``).
                The caller knows it host-side; None reads the whole cache (correct,
                slower).
            first_slot: A promise that ``slots`` is ``first_slot, first_slot + 1, ...``
                (the caller knows it host-side): attention then reads cache views instead
                of gathering every layer's K/V (at 1,500 cached positions that gather
                copies ~70 MB per token). Ignored by the compiled decode step, whose
                graphs are built for gathering.

        Returns:
            Float logits, (B, T, V) or (B, 1, V) with ``last_only``.
        """
        S, slot_index, first_slot = self._step_args(tokens, slots, kv_len, first_slot)
        aot = self._aot_decode
        if aot is not None and tokens.shape[1] == 1 and aot.covers(tokens.shape[0], S):
            # One new token per row: last_only changes nothing (logits_index is 0).
            return aot(tokens, input_pos, slot_index[:, 0], S)
        if self._compiled_run is not None and tokens.shape[1] <= SMALL_T_ATTENTION:
            first_slot = 0 if slots is None else None  # the graphs warm_up_decode built
            return self._compiled_run(
                tokens, input_pos, slot_index, first_slot, S, last_only, logits_index, compiled=True
            )
        return self._run(tokens, input_pos, slot_index, first_slot, S, last_only, logits_index)

    def fill_cache(
        self,
        tokens: Tensor,  # (B, T) long
        input_pos: Tensor,  # (B, T) long
        slots: Tensor | None = None,  # (B,) long; None = row b uses slot b
        *,
        kv_len: int | None = None,
        first_slot: int | None = None,
    ) -> None:
        """``forward`` for its cache writes only: a prefill whose logits nobody samples
        (a prompt's last token runs as a decode step), so the last layer's attention and
        feed-forward, the final norm, the vocab projection and the tie check are skipped.
        Arguments as in ``forward``."""
        if tokens.shape[1] <= SMALL_T_ATTENTION:  # compiled steps make logits anyway
            self.forward(
                tokens, input_pos, slots, last_only=True, kv_len=kv_len, first_slot=first_slot
            )
            return
        S, slot_index, first_slot = self._step_args(tokens, slots, kv_len, first_slot)
        x, step = self._embed_and_context(tokens, input_pos, slot_index, first_slot, S)
        # The last layer's output is read by nothing (its keys and values come from its
        # input), so it stops after its QKV projection: ~1/n_layers of the prompt's work.
        *layers, last = self.blocks()
        for layer in layers:
            x = layer(x, step)  # (B, T, D)
        last.attention.write_cache(last.attention_norm(x), step)

    def _step_args(
        self, tokens: Tensor, slots: Tensor | None, kv_len: int | None, first_slot: int | None
    ) -> tuple[int, Tensor, int | None]:
        """``forward``'s arguments as ``_run`` takes them: the attended length S (whole
        key blocks), the (B, 1) slot of each row, and ``first_slot``."""
        if self.max_seq_len == 0:
            raise EngineError(_NO_CACHE)
        S = self.max_seq_len if kv_len is None else min(kv_len, self.max_seq_len)
        # whole key blocks, short of the last position unless needed: the compiled step
        # covers up to max_seq_len - 1 (aot: the whole cache is a case export specializes)
        S = min(whole_key_blocks(S), max(S, self.max_seq_len - 1))
        if slots is None:
            first_slot = 0  # row b owns slot b
        slot_index = (
            slots if slots is not None else torch.arange(tokens.shape[0], device=tokens.device)
        )[:, None]  # (B, 1)
        return S, slot_index, first_slot

    def use_aot_decode(self, decode: AotDecode | None) -> None:
        """Run steps of one new token per row through ``decode`` (compiled ahead of time
        for this model's weights and cache: ``llm_backend.engine.aot``) where it covers
        the batch size and cache length; the rest stays eager. None: all eager.
        ``setup_caches`` drops it (the library holds the old cache's pointers)."""
        if decode is not None and decode.max_batch > self.max_batch:
            raise EngineError(
                f"the compiled decode step covers {decode.max_batch} rows, the cache "
                f"{self.max_batch} slots"
            )
        self._aot_decode = decode

    def compile_decode(self) -> None:
        """Run decode steps (at most ``SMALL_T_ATTENTION`` new tokens per row) through
        ``torch.compile`` (inductor): it fuses the ~40 small ops per layer that dominate
        an eager CPU decode step (SmolLM2 int4 batch 1 on the AMD kind: 34 -> 20 ms).

        Prefill stays eager (its matmuls dominate). Each new shape class compiles on
        first use, about a minute on a 2-core CPU: batch 1, batch > 1, with and without
        slot gathering; ``kv_len`` and the batch size are symbolic, so decoding itself
        never recompiles. Call ``warm_up_decode`` to pay that before serving.
        """
        # cpp_wrapper: the generated code calls its kernels from C++, not Python. SmolLM2
        # int4 here: batch 1 19.7 ms per step vs 23.2, batch 8 46.5 vs 53.4; a cold
        # compile takes ~5 min instead of ~2 (inductor's disk cache makes later ones
        # ~40 s).
        self._compiled_run = torch.compile(self._run, dynamic=True, options={"cpp_wrapper": True})

    @torch.inference_mode()
    def warm_up_decode(self, batch_sizes: tuple[int, ...] | None = None) -> None:
        """Compile the decode graphs the scheduler uses (slots given) for ``batch_sizes``
        by running steps on slots 0..B-1 at positions 2 and 3 (overwritten by the next
        prefill). Sizes 0 and 1 are specialized by the compiler, so the batch sizes
        should include one > 1 and ``kv_len`` stays >= 2 here: the graphs built are the
        symbolic ones real requests reuse. By default (1, 2, ``max_batch``): the graph
        built at 2 guards ``B < max_batch`` (measured: a full batch of 32 recompiled
        mid-run, ~20 s), and at ``max_batch`` rows the quantized linears may switch to
        their dequantized path (``dense_min_rows``), another branch it guards on.
        """
        if self.max_seq_len == 0:
            raise EngineError(_NO_CACHE)
        device = self.device
        if batch_sizes is None:
            batch_sizes = tuple(sorted({1, 2, self.max_batch}))
        for batch in batch_sizes:
            batch = min(batch, self.max_batch)
            tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
            slots = torch.arange(batch, device=device)
            for position in (2, 3):  # the second call reuses the graph (kv_len symbolic)
                positions = torch.full((batch, 1), position, dtype=torch.long, device=device)
                self(tokens, positions, slots, kv_len=position + 1)

    def cache_write_rows(self, slot_index: Tensor, input_pos: Tensor) -> Tensor:
        """Rows of a KV cache viewed as (slots * Hkv * S_max, hd) that receive each new
        token's heads, ordered (b, t, head) like ``k.reshape(-1, hd)``: (B*T*Hkv,).
        Row = (slot * Hkv + head) * S_max + position; computed once per step."""
        S_max = self.max_seq_len
        base = slot_index * (self.args.n_kv_heads * S_max) + input_pos  # (B, T)
        heads = torch.arange(self.args.n_kv_heads, device=base.device) * S_max  # (Hkv,)
        return (base[:, :, None] + heads).reshape(-1)

    @staticmethod
    def prefill_key_bounds(input_pos: Tensor, S: int) -> tuple[tuple[int, int], ...]:
        """For each block of ``PREFILL_QUERY_BLOCK`` query positions, (lo, hi): every
        row of the block attends to cache positions [0, lo) (1 + its smallest position)
        and none attends past hi (1 + its largest position, rounded up to a multiple of
        ``KEY_ALIGN``); both at most ``S``.

        Read on the host: the blocked attention runs only on a CPU, where this costs a
        few microseconds and no device sync.
        """
        B, T = input_pos.shape
        blocks = -(-T // PREFILL_QUERY_BLOCK)
        last = input_pos[:, -1:].expand(B, blocks * PREFILL_QUERY_BLOCK - T)
        padded = torch.cat((input_pos, last), dim=1).view(B, blocks, PREFILL_QUERY_BLOCK)
        lo = padded.amin(dim=(0, 2)).tolist()  # (blocks,)
        hi = padded.amax(dim=(0, 2)).tolist()
        return tuple(
            (min(S, a + 1), min(S, whole_key_blocks(b + 1))) for a, b in zip(lo, hi, strict=True)
        )

    def decode_attention(self, batch: int, kv_len: int, *, compiled: bool) -> DecodeAttention:
        """The form of a decode step's attention for ``batch`` rows attending to ``kv_len``
        cached positions (``BF16_DECODE_MIN_POSITIONS``): "kernel" (ragloom's, eager or
        compiled) for a bf16 cache on a CPU that runs ``cpu_kernels``; "fused" when
        ``compiled``; else "bf16" for many positions in a bf16 cache on a device with
        native bf16, or "float32"."""
        if self._attention_kernel:
            return "kernel"
        if compiled:
            return "fused"
        if self._bf16_decode and batch * kv_len >= BF16_DECODE_MIN_POSITIONS:
            return "bf16"
        return "float32"

    def small_t_bias(self, mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """The decode attention's additive bias: bool ``mask`` (B, 1, T, S) -> 0 / -inf,
        (B * Hkv, G * T, S) in ``dtype`` (the attention's), laid out like
        ``Attention._small_t_attention``'s grouped scores. Built once per step and shared
        by every layer."""
        B, _, T, S = mask.shape
        Hkv = self.args.n_kv_heads
        G = self.args.n_heads // Hkv
        bias = as_dtype(torch.where(mask, 0.0, float("-inf")), dtype)  # (B, 1, T, S)
        return bias.unsqueeze(2).expand(B, Hkv, G, T, S).reshape(B * Hkv, G * T, S)

    def _run(
        self,
        tokens: Tensor,  # (B, T)
        input_pos: Tensor,  # (B, T)
        slot_index: Tensor,  # (B, 1)
        first_slot: int | None,
        S: int,
        last_only: bool = False,
        logits_index: Tensor | None = None,  # (B,)
        *,
        compiled: bool = False,
    ) -> Tensor:
        """The forward pass proper (``forward`` checks arguments and picks eager or
        compiled). ``compiled``: traced for compilation (the decode attention's form)."""
        B = tokens.shape[0]
        x, step = self._embed_and_context(
            tokens, input_pos, slot_index, first_slot, S, compiled=compiled
        )
        for layer in self.layers:
            x = layer(x, step)  # (B, T, D)
        if last_only:
            if logits_index is None:
                x = x[:, -1:]  # (B, 1, D)
            else:
                x = x[torch.arange(B, device=x.device), logits_index].unsqueeze(1)  # (B, 1, D)
        h = self.norm(x)  # (B, T or 1, D)
        return self.break_logit_ties(self.output(h).float(), h)  # (B, T or 1, V)

    def _embed_and_context(
        self,
        tokens: Tensor,  # (B, T)
        input_pos: Tensor,  # (B, T)
        slot_index: Tensor,  # (B, 1)
        first_slot: int | None,
        S: int,
        *,
        compiled: bool = False,
    ) -> tuple[Tensor, StepContext]:
        """The token embeddings, (B, T, D) float32, and the step context every layer
        shares (RoPE rows, mask, cache rows, the attention's form)."""
        B = tokens.shape[0]
        # The residual stream stays float32 whatever the weights' dtype: summing 30
        # layers' outputs in bf16 costs accuracy, and the extra casts are cheap.
        x = as_dtype(self.tok_embeddings(tokens), torch.float32)  # (B, T, D)
        cos = as_dtype(self.rope_cos[input_pos], self.dtype).unsqueeze(2)  # (B, T, 1, hd)
        sin = as_dtype(self.rope_sin[input_pos], self.dtype).unsqueeze(2)
        # Causal per-row mask over cache positions: key position <= query position.
        mask = self.key_positions[:S] <= input_pos[:, None, :, None]  # (B, 1, T, S) bool
        key_bounds = prefill_positions = None
        decode_attention: DecodeAttention = "float32"
        if tokens.shape[1] <= SMALL_T_ATTENTION:  # decode path wants an additive float bias
            decode_attention = self.decode_attention(B, S, compiled=compiled)
            dtype = torch.bfloat16 if decode_attention == "bf16" else torch.float32
            mask = self.small_t_bias(mask, dtype)  # (B * Hkv, G * T, S)
        elif self._prefill_kernel:
            prefill_positions = input_pos.contiguous()
        elif self._blocked_prefill:
            key_bounds = self.prefill_key_bounds(input_pos, S)
        step = StepContext(
            cos=cos,
            sin=sin,
            mask=mask,
            write_rows=self.cache_write_rows(slot_index, input_pos),  # (B*T*Hkv,)
            slot_index=slot_index,
            first_slot=first_slot,
            kv_len=S,
            key_bounds=key_bounds,
            decode_attention=decode_attention,
            prefill_positions=prefill_positions,
            elementwise_kernels=self._elementwise_kernels and not compiled,
        )
        return x, step

    def break_logit_ties(self, logits: Tensor, h: Tensor) -> Tensor:
        """``logits`` where candidates tied at a position's largest value are told apart
        by their float32 logit: the best of them is raised by one float32 step.

        A bf16 or int8 output projection returns bf16 logits: near 25 their step is
        0.125, so two candidates a few hundredths apart come out exactly equal and
        greedy decoding took the lower token id. SmolLM2 int4 answered "What is the
        capital of France?" with "L'Étoile ..." that way ("The" and "L" both 25.25; its
        float32 product puts "The" 0.035 ahead). Only exact ties change: a unique bf16 maximum
        stays the argmax whatever float32 says (recomputing every top logit exposed
        bf16-level differences between a prompt prefilled alone and beside others).
        The cost is one top-k and ``TIED_LOGITS`` dot products a row, with no host sync.
        Float32, fp16 and two-limb int8 projections (float32 logits,
        ``quantize.two_limb_matmul``) are returned as they are.
        """
        out = self.output
        bf16_linear = isinstance(out, nn.Linear) and out.weight.dtype == torch.bfloat16
        int8_bf16 = isinstance(out, Int8Linear) and not out.two_limb(logits.device.type)
        if not (int8_bf16 or bf16_linear):
            return logits
        values, top = logits.topk(min(TIED_LOGITS, logits.shape[-1]), dim=-1)  # (B, T, k)
        best = values[..., :1]  # (B, T, 1)
        weight = cast(Tensor, out.weight)[top].float()  # (B, T, k, D)
        if isinstance(out, Int8Linear):
            weight = weight * out.scales[top].float()[..., None]
        exact = (weight * h.float()[..., None, :]).sum(-1)  # (B, T, k)
        bias = cast(Tensor | None, out.bias)
        if bias is not None:
            exact = exact + bias[top].float()
        exact = exact.masked_fill(values != best, float("-inf"))  # only the tied ones
        winner = top.gather(-1, exact.argmax(dim=-1, keepdim=True))  # (B, T, 1)
        raised = torch.nextafter(best, torch.full_like(best, float("inf")))
        raised = torch.where(values[..., 1:2] == best, raised, best)  # a tie, or as it was
        return logits.scatter(-1, winner, raised)  # (B, T, V)


def _embedding(vocab_size: int, dim: int) -> nn.Embedding:
    """``nn.Embedding(vocab_size, dim)``; under ``torch.device("meta")`` (the loader's
    skeleton) without the random init, whose meta decomposition imports torch._dynamo
    and sympy: 40 MiB of modules resident for the life of the process."""
    if torch.empty(0).is_meta:
        return nn.Embedding(vocab_size, dim, _weight=torch.empty(vocab_size, dim))
    return nn.Embedding(vocab_size, dim)


def unpermute_llama_qk(weight: Tensor, n_heads: int) -> Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved RoPE pairs -> rotate_half halves).

    llama.cpp's converter maps HF rows (head, half, i) to (head, i, half); this maps back.
    Works for weights (out, in) and biases (out,).
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    w = weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
    return w.transpose(1, 2).reshape(weight.shape)


def param_count(model: nn.Module) -> int:
    """Number of parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
