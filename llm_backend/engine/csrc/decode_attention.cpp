// Attention for a few new tokens per row (decode) over a bf16 KV cache, in float32:
//
// out[r, i] = sum_s softmax_s(scale * q[r, i] . k[r, s] + bias[r, i, s]) v[r, s]
//
// r runs over (row, KV head) pairs and i over the query heads of that KV head (times the
// new tokens), the grouping Attention._small_t_attention uses; bias holds 0 / -inf.
// k[r, s] is k_cache[slots[r / Hkv], r % Hkv, s], read in place (no gathered copy of
// the batch's slots), s < S = bias.size(2).
// Each key and value row is read once per (row, KV head) for all its query heads, the
// scores live in a per-thread buffer, and every sum runs in one order whatever the
// batch: a row's result does not depend on the rows beside it. head_dim a multiple of 16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "vec_math.h"

namespace {

constexpr int kMaxQueries = 32;  // query rows per (row, KV head): G * T
constexpr int kMaxHeadDim = 256;

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            const at::Tensor& slots, const at::Tensor& bias, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "q must be (B * Hkv, queries, head_dim) contiguous float32");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.scalar_type() == at::kBFloat16 && k_cache.is_contiguous() &&
                  v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == at::kBFloat16 &&
                  v_cache.is_contiguous(),
              "k_cache and v_cache must be (slots, Hkv, S_max, head_dim) contiguous bf16");
  TORCH_CHECK(slots.dim() == 1 && slots.scalar_type() == at::kLong && slots.is_contiguous(),
              "slots must be (B,) contiguous int64");
  TORCH_CHECK(bias.dim() == 3 && bias.scalar_type() == at::kFloat && bias.stride(2) == 1,
              "bias must be (B * Hkv, queries, S) float32 with contiguous S");
  const int64_t B = slots.size(0), Hkv = k_cache.size(1), S_max = k_cache.size(2), D = k_cache.size(3);
  const int64_t R = q.size(0), Q = q.size(1), S = bias.size(2);
  TORCH_CHECK(R == B * Hkv && q.size(2) == D && bias.size(0) == R && bias.size(1) == Q && S <= S_max,
              "q, the caches, slots and bias do not fit");
  TORCH_CHECK(D % 16 == 0 && D <= kMaxHeadDim && Q <= kMaxQueries && S > 0, "unsupported attention shape");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(sp[b] >= 0 && sp[b] < k_cache.size(0), "slot ", sp[b], " is out of range");
  auto out = at::empty({R, Q, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const at::BFloat16* kp = k_cache.data_ptr<at::BFloat16>();
  const at::BFloat16* vp = v_cache.data_ptr<at::BFloat16>();
  const float* bp = bias.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t bs0 = bias.stride(0), bs1 = bias.stride(1);
  const int64_t chunks = D / 16;
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(Q * ((S + 15) / 16 * 16));  // (Q, S padded to 16)
    const int64_t ld = (S + 15) / 16 * 16;
    for (int64_t r = begin; r < end; ++r) {
      // scores: each key row once, against every query of this (row, KV head)
      __m512 qv[kMaxQueries][kMaxHeadDim / 16];
      for (int64_t i = 0; i < Q; ++i)
        for (int64_t c = 0; c < chunks; ++c) qv[i][c] = _mm512_loadu_ps(qp + (r * Q + i) * D + c * 16);
      // this (row, KV head)'s positions in its slot of the cache, read in place
      const int64_t offset = ((sp[r / Hkv] * Hkv) + r % Hkv) * S_max * D;
      const at::BFloat16* krow = kp + offset;
      for (int64_t s = 0; s < S; ++s) {
        __m512 kv[kMaxHeadDim / 16];
        for (int64_t c = 0; c < chunks; ++c) kv[c] = ragloom::load_bf16(krow + s * D + c * 16);
        for (int64_t i = 0; i < Q; ++i) {
          __m512 acc = _mm512_mul_ps(qv[i][0], kv[0]);
          for (int64_t c = 1; c < chunks; ++c) acc = _mm512_fmadd_ps(qv[i][c], kv[c], acc);
          scores[i * ld + s] = _mm512_reduce_add_ps(acc) * fscale + bp[r * bs0 + i * bs1 + s];
        }
      }
      // softmax per query, normalized at the end
      float inverse[kMaxQueries];
      for (int64_t i = 0; i < Q; ++i) {
        float* row = scores.data() + i * ld;
        for (int64_t s = S; s < ld; ++s) row[s] = -INFINITY;
        __m512 m = _mm512_set1_ps(-INFINITY);
        for (int64_t s = 0; s < ld; s += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(row + s));
        const float top = _mm512_reduce_max_ps(m);
        const __m512 shift = _mm512_set1_ps(top);
        __m512 total = _mm512_setzero_ps();
        for (int64_t s = 0; s < ld; s += 16) {
          __m512 e = ragloom::exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + s), shift));
          _mm512_storeu_ps(row + s, e);
          total = _mm512_add_ps(total, e);
        }
        inverse[i] = 1.0f / _mm512_reduce_add_ps(total);
      }
      // out = probabilities x values, each value row once
      __m512 acc[kMaxQueries][kMaxHeadDim / 16];
      for (int64_t i = 0; i < Q; ++i)
        for (int64_t c = 0; c < chunks; ++c) acc[i][c] = _mm512_setzero_ps();
      const at::BFloat16* vrow = vp + offset;
      for (int64_t s = 0; s < S; ++s) {
        __m512 vv[kMaxHeadDim / 16];
        for (int64_t c = 0; c < chunks; ++c) vv[c] = ragloom::load_bf16(vrow + s * D + c * 16);
        for (int64_t i = 0; i < Q; ++i) {
          const __m512 p = _mm512_set1_ps(scores[i * ld + s]);
          for (int64_t c = 0; c < chunks; ++c) acc[i][c] = _mm512_fmadd_ps(p, vv[c], acc[i][c]);
        }
      }
      for (int64_t i = 0; i < Q; ++i) {
        const __m512 norm = _mm512_set1_ps(inverse[i]);
        for (int64_t c = 0; c < chunks; ++c)
          _mm512_storeu_ps(op + (r * Q + i) * D + c * 16, _mm512_mul_ps(acc[i][c], norm));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ragloom, m) {
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor slots, Tensor bias, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ragloom, CPU, m) { m.impl("decode_attention", &decode_attention); }
