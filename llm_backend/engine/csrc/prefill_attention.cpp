// Causal attention for a prompt chunk over a bf16 KV cache, on bf16 dot products
// (AVX512-BF16 vdpbf16ps), in the manner of FlashAttention: scores, softmax and the
// weighted sum of values in one pass over the keys, no score matrix in memory.
//
// out[b, t, h] = sum_{s <= pos[b, t], s < S} softmax_s(scale * q[b, t, h] . k[b, h / G, s]) v[b, h / G, s]
//
// Each (row, KV head)'s keys are first packed by pairs of dimensions, 16 keys a vector
// (lanes = keys), and its values by pairs of keys (lanes = dimensions): both once per
// call, small (S x head_dim each). Query rows are (t, g) pairs of one KV head, R at a
// time; per 32-key tile: exact products summed in float32, a running max and sum
// (online softmax, float32), the probabilities rounded to bf16 for the value product,
// as the tensor-op path rounds them. head_dim 64 or 128.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "vec_math.h"

namespace {

constexpr int64_t kTile = 32;  // keys per tile: two score vectors a row

struct Packed {
  const uint32_t* keys;    // (S_pad / 16, hd / 2, 16): k[s, 2j], k[s, 2j + 1] per lane s
  const uint32_t* values;  // (S_pad / 2, hd): v[s, d], v[s + 1, d] per element
};

// R query rows x NV * 16 dimensions against keys [0, end), rows' own limits pos[r].
template <int R, int NV>
void rows_kernel(const at::BFloat16* const* q, const int64_t* pos, int64_t end, Packed packed, float scale,
                 at::BFloat16* const* out) {
  constexpr int HD = NV * 16;
  __m512 acc[R][NV];
  __m512 l[R];  // per lane sums of the probabilities, reduced at the end
  float m[R];
  for (int r = 0; r < R; ++r) {
    m[r] = -std::numeric_limits<float>::infinity();
    l[r] = _mm512_setzero_ps();
    for (int n = 0; n < NV; ++n) acc[r][n] = _mm512_setzero_ps();
  }
  int64_t lowest = pos[0];
  for (int r = 1; r < R; ++r) lowest = std::min(lowest, pos[r]);
  const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  alignas(64) uint16_t probs[R][kTile];
  for (int64_t s0 = 0; s0 < end; s0 += kTile) {
    __m512 score[R][2];
    for (int r = 0; r < R; ++r) score[r][0] = score[r][1] = _mm512_setzero_ps();
    const uint32_t* k0 = packed.keys + (s0 / 16) * (HD / 2) * 16;
    const uint32_t* k1 = k0 + (HD / 2) * 16;
    for (int j = 0; j < HD / 2; ++j) {
      __m512bh kv0 = (__m512bh)_mm512_loadu_si512(k0 + j * 16);
      __m512bh kv1 = (__m512bh)_mm512_loadu_si512(k1 + j * 16);
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, q[r] + 2 * j, sizeof pair);
        __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
        score[r][0] = _mm512_dpbf16_ps(score[r][0], a, kv0);
        score[r][1] = _mm512_dpbf16_ps(score[r][1], a, kv1);
      }
    }
    const bool masked = s0 + kTile - 1 > lowest;  // some key of the tile is past some row
    for (int r = 0; r < R; ++r) {
      __m512 s_lo = _mm512_mul_ps(score[r][0], _mm512_set1_ps(scale));
      __m512 s_hi = _mm512_mul_ps(score[r][1], _mm512_set1_ps(scale));
      if (masked) {
        const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        __m512i limit = _mm512_set1_epi32(static_cast<int32_t>(pos[r] - s0));  // key s0 + i visible iff i <= limit
        s_lo = _mm512_mask_mov_ps(minus_inf, _mm512_cmple_epi32_mask(lanes, limit), s_lo);
        s_hi = _mm512_mask_mov_ps(
            minus_inf, _mm512_cmple_epi32_mask(_mm512_add_epi32(lanes, _mm512_set1_epi32(16)), limit), s_hi);
      }
      // The running max moves only when some score beats it: most tiles past the first
      // few skip the horizontal max and the rescale (the same numbers either way).
      const __m512 tile_max = _mm512_max_ps(s_lo, s_hi);
      if (_mm512_cmp_ps_mask(tile_max, _mm512_set1_ps(m[r]), _CMP_GT_OQ) != 0) {
        const float m_new = _mm512_reduce_max_ps(tile_max);
        const float correction = std::exp(m[r] - m_new);  // 0 on the first visible tile
        m[r] = m_new;
        if (correction != 1.f) {
          const __m512 c = _mm512_set1_ps(correction);
          l[r] = _mm512_mul_ps(l[r], c);
          for (int n = 0; n < NV; ++n) acc[r][n] = _mm512_mul_ps(acc[r][n], c);
        }
      } else if (m[r] == -std::numeric_limits<float>::infinity()) {  // nothing visible yet
        std::memset(probs[r], 0, sizeof probs[r]);
        continue;
      }
      const __m512 shift = _mm512_set1_ps(m[r]);
      __m512 p_lo = ragloom::round_to_bf16(ragloom::exp_nonpositive(_mm512_sub_ps(s_lo, shift)));
      __m512 p_hi = ragloom::round_to_bf16(ragloom::exp_nonpositive(_mm512_sub_ps(s_hi, shift)));
      ragloom::store_bf16(reinterpret_cast<at::BFloat16*>(probs[r]), p_lo);  // exact: already bf16
      ragloom::store_bf16(reinterpret_cast<at::BFloat16*>(probs[r] + 16), p_hi);
      l[r] = _mm512_add_ps(l[r], _mm512_add_ps(p_lo, p_hi));
    }
    const uint32_t* v = packed.values + (s0 / 2) * HD;
    for (int kp = 0; kp < kTile / 2; ++kp) {
      __m512bh vv[NV];
      for (int n = 0; n < NV; ++n) vv[n] = (__m512bh)_mm512_loadu_si512(v + kp * HD + n * 16);
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, probs[r] + 2 * kp, sizeof pair);
        __m512bh p = (__m512bh)_mm512_set1_epi32(pair);
        for (int n = 0; n < NV; ++n) acc[r][n] = _mm512_dpbf16_ps(acc[r][n], p, vv[n]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    const __m512 inv = _mm512_set1_ps(1.f / _mm512_reduce_add_ps(l[r]));
    for (int n = 0; n < NV; ++n) ragloom::store_bf16(out[r] + n * 16, _mm512_mul_ps(acc[r][n], inv));
  }
}

template <int NV>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& input_pos, double scale,
         at::Tensor& out) {
  constexpr int HD = NV * 16;
  constexpr int R = NV <= 4 ? 4 : 2;
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2);
  const int64_t Hkv = k.size(1), S = k.size(2), G = H / Hkv;
  const int64_t S_pad = (S + kTile - 1) / kTile * kTile;
  const at::BFloat16* qp = q.data_ptr<at::BFloat16>();
  const at::BFloat16* kp = k.data_ptr<at::BFloat16>();
  const at::BFloat16* vp = v.data_ptr<at::BFloat16>();
  const int64_t* posp = input_pos.data_ptr<int64_t>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  // packed keys and values of each (row, KV head), zero past S (0 * 0 weighs nothing)
  std::vector<uint32_t> keys(B * Hkv * S_pad * HD / 2, 0), values(B * Hkv * S_pad * HD / 2, 0);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / Hkv, h = bh % Hkv;
      uint32_t* kdst = keys.data() + bh * S_pad * HD / 2;
      uint16_t* vdst = reinterpret_cast<uint16_t*>(values.data() + bh * S_pad * HD / 2);
      for (int64_t s = 0; s < S; ++s) {
        const at::BFloat16* krow = kp + b * k.stride(0) + h * k.stride(1) + s * k.stride(2);
        const at::BFloat16* vrow = vp + b * v.stride(0) + h * v.stride(1) + s * v.stride(2);
        uint32_t* kblock = kdst + (s / 16) * (HD / 2) * 16 + s % 16;
        for (int j = 0; j < HD / 2; ++j) std::memcpy(kblock + j * 16, krow + 2 * j, sizeof(uint32_t));
        uint16_t* vpair = vdst + (s / 2) * HD * 2 + s % 2;
        for (int d = 0; d < HD; ++d) std::memcpy(vpair + 2 * d, vrow + d, sizeof(uint16_t));
      }
    }
  });
  // units: R query rows ((t, g) pairs, t-major) of one (row, KV head); ordered
  // first, last, second, second to last, ... so equal ranges of them hold equal work
  const int64_t rows = T * G, tiles = (rows + R - 1) / R, units = B * Hkv * tiles;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / tiles, within = i % tiles;
      const int64_t tile = within % 2 == 0 ? within / 2 : tiles - 1 - within / 2;
      const int64_t b = bh / Hkv, h = bh % Hkv;
      const at::BFloat16* qr[R];
      at::BFloat16* orow[R];
      int64_t pos[R];
      int64_t last = 0;
      for (int r = 0; r < R; ++r) {
        const int64_t row = std::min(tile * R + r, rows - 1);  // a short last tile repeats its last row
        const int64_t t = row / G, head = h * G + row % G;
        qr[r] = qp + b * q.stride(0) + t * q.stride(1) + head * q.stride(2);
        orow[r] = op + ((b * T + t) * H + head) * HD;
        pos[r] = std::min(posp[b * T + t], S - 1);
        last = std::max(last, pos[r]);
      }
      Packed packed{keys.data() + bh * S_pad * HD / 2, values.data() + bh * S_pad * HD / 2};
      rows_kernel<R, NV>(qr, pos, last + 1, packed, static_cast<float>(scale), orow);
    }
  });
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                             const at::Tensor& input_pos, double scale) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kBFloat16 && q.stride(3) == 1,
              "q must be (B, T, H, head_dim) bf16 with contiguous rows");
  TORCH_CHECK(k.dim() == 4 && k.scalar_type() == at::kBFloat16 && k.stride(3) == 1 && v.sizes() == k.sizes() &&
                  v.scalar_type() == at::kBFloat16 && v.stride(3) == 1,
              "k and v must be (B, Hkv, S, head_dim) bf16 with contiguous rows");
  TORCH_CHECK(input_pos.dim() == 2 && input_pos.scalar_type() == at::kLong && input_pos.is_contiguous(),
              "input_pos must be (B, T) contiguous int64");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), hd = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(3) == hd && H % k.size(1) == 0, "k and v must match q's batch, heads and head_dim");
  TORCH_CHECK(input_pos.size(0) == B && input_pos.size(1) == T, "input_pos must be (B, T)");
  TORCH_CHECK(k.size(2) > 0, "no keys to attend to");
  auto out = at::empty({B, T, H, hd}, q.options());
  if (B * T == 0) return out;
  if (hd == 64) {
    run<4>(q, k, v, input_pos, scale, out);
  } else if (hd == 128) {
    run<8>(q, k, v, input_pos, scale, out);
  } else {
    TORCH_CHECK(false, "head_dim must be 64 or 128, got ", hd);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ragloom, m) {
  m.def("prefill_attention(Tensor q, Tensor k, Tensor v, Tensor input_pos, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(ragloom, CPU, m) { m.impl("prefill_attention", &prefill_attention); }
