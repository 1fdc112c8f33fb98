// The vocab projection's two-limb int8 product (quantize.two_limb_matmul) on int8 dot
// products (AVX512-VNNI vpdpbusd), reading the (N, K) int8 codes as they are:
//
// y[m, n] = (S1[m, n] * s1[m] + S2[m, n] * s2[m]) * scale[n],
// S_i[m, n] = sum_k limb_i[m, k] * q[n, k]   (int32, exact)
//
// The limbs (int8 in [-127, 127]) enter vpdpbusd's unsigned operand as limb + 128, and
// 128 * sum_k q[n, k] (``code_sums``) comes off the sums. The combination rounds as the
// tensor ops (two products, a sum, the scale) round, so the result is _int_mm's path's
// bits, without its (2M, N) int32 sums in memory: one row reads the 28 MB of SmolLM2's
// vocab codes once at memory speed (~1.1 ms against _int_mm's ~2). K a multiple of 64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

#include "vec_math.h"

namespace {

constexpr int kCols = 8;  // output columns a micro-kernel call: one transposed reduction
constexpr int64_t kPrefetchBytes = 256;

// 8 vectors of 16 int32 partial sums -> their 8 totals, in order
inline __m256i reduce8(const __m512i* a) {
  // per 128-bit lane: [a0 a1 a0 a1], then [a0 a1 a2 a3]
  __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[0], a[1]), _mm512_unpackhi_epi32(a[0], a[1]));
  __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[2], a[3]), _mm512_unpackhi_epi32(a[2], a[3]));
  __m512i s45 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[4], a[5]), _mm512_unpackhi_epi32(a[4], a[5]));
  __m512i s67 = _mm512_add_epi32(_mm512_unpacklo_epi32(a[6], a[7]), _mm512_unpackhi_epi32(a[6], a[7]));
  __m512i s0123 = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
  __m512i s4567 = _mm512_add_epi32(_mm512_unpacklo_epi64(s45, s67), _mm512_unpackhi_epi64(s45, s67));
  // 128-bit lanes (A = a0..a3, B = a4..a7): A0+A1, A2+A3, B0+B1, B2+B3
  __m512i z = _mm512_add_epi32(_mm512_shuffle_i32x4(s0123, s4567, _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_i32x4(s0123, s4567, _MM_SHUFFLE(3, 1, 3, 1)));
  z = _mm512_shuffle_i32x4(z, z, _MM_SHUFFLE(3, 1, 2, 0));  // A01, B01, A23, B23
  return _mm256_add_epi32(_mm512_castsi512_si256(z), _mm512_extracti64x4_epi64(z, 1));
}

// One activation row (its two limbs) x COLS output columns.
template <int COLS>
void micro_kernel(const int8_t* limb1, const int8_t* limb2, const int8_t* w, int64_t K,
                  const int32_t* code_sums, float s1, float s2, const at::BFloat16* scales, float* y) {
  __m512i acc[2][kCols];
  for (int c = 0; c < kCols; ++c) acc[0][c] = acc[1][c] = _mm512_setzero_si512();
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));  // x ^ 0x80 = x + 128 as unsigned
  for (int64_t k = 0; k < K; k += 64) {
    const __m512i x1 = _mm512_xor_si512(_mm512_loadu_si512(limb1 + k), bias);
    const __m512i x2 = _mm512_xor_si512(_mm512_loadu_si512(limb2 + k), bias);
    for (int c = 0; c < COLS; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(w + c * K + k + kPrefetchBytes), _MM_HINT_T0);
      const __m512i codes = _mm512_loadu_si512(w + c * K + k);
      acc[0][c] = _mm512_dpbusd_epi32(acc[0][c], x1, codes);
      acc[1][c] = _mm512_dpbusd_epi32(acc[1][c], x2, codes);
    }
  }
  const __mmask8 cols = static_cast<__mmask8>((1u << COLS) - 1);
  const __m256i offset = _mm256_slli_epi32(_mm256_maskz_loadu_epi32(cols, code_sums), 7);  // 128 * sum q
  const __m256 sum1 = _mm256_cvtepi32_ps(_mm256_sub_epi32(reduce8(acc[0]), offset));
  const __m256 sum2 = _mm256_cvtepi32_ps(_mm256_sub_epi32(reduce8(acc[1]), offset));
  const __m256 scale = _mm512_castps512_ps256(ragloom::widen_bf16(_mm256_maskz_loadu_epi16(cols, scales)));
  const __m256 combined = _mm256_add_ps(_mm256_mul_ps(sum1, _mm256_set1_ps(s1)), _mm256_mul_ps(sum2, _mm256_set1_ps(s2)));
  _mm256_mask_storeu_ps(y, cols, _mm256_mul_ps(combined, scale));
}

using MicroKernel = void (*)(const int8_t*, const int8_t*, const int8_t*, int64_t, const int32_t*, float, float,
                             const at::BFloat16*, float*);

template <int... C>
constexpr std::array<MicroKernel, sizeof...(C)> kernels(std::integer_sequence<int, C...>) {
  return {&micro_kernel<C + 1>...};
}

at::Tensor int8_limbs_mm(const at::Tensor& limbs, const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& weight,
                         const at::Tensor& code_sums, const at::Tensor& scales) {
  TORCH_CHECK(limbs.dim() == 2 && limbs.scalar_type() == at::kChar && limbs.is_contiguous() && limbs.size(0) % 2 == 0,
              "limbs must be (2M, K) contiguous int8: the first limbs of M rows, then their second limbs");
  const int64_t M = limbs.size(0) / 2, K = limbs.size(1);
  for (const at::Tensor* s : {&s1, &s2}) {
    TORCH_CHECK(s->dim() == 1 && s->scalar_type() == at::kFloat && s->is_contiguous() && s->size(0) == M,
                "s1 and s2 must be (M,) contiguous float32");
  }
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous() && weight.size(1) == K,
              "weight must be (N, K) contiguous int8");
  const int64_t N = weight.size(0);
  TORCH_CHECK(code_sums.dim() == 1 && code_sums.scalar_type() == at::kInt && code_sums.is_contiguous() &&
                  code_sums.size(0) == N,
              "code_sums must be (N,) contiguous int32");
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kBFloat16 && scales.is_contiguous() && scales.size(0) == N,
              "scales must be (N,) contiguous bf16");
  TORCH_CHECK(K % 64 == 0, "K must be a multiple of 64, got ", K);
  auto y = at::empty({M, N}, limbs.options().dtype(at::kFloat));
  if (M == 0) return y;
  static constexpr std::array<MicroKernel, kCols> table = kernels(std::make_integer_sequence<int, kCols>{});
  const int8_t* lp = limbs.data_ptr<int8_t>();
  const float* s1p = s1.data_ptr<float>();
  const float* s2p = s2.data_ptr<float>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const int32_t* cp = code_sums.data_ptr<int32_t>();
  const at::BFloat16* sp = scales.data_ptr<at::BFloat16>();
  float* yp = y.data_ptr<float>();
  // a block's codes (8 x K) stay in L1 while every row passes over them
  at::parallel_for(0, (N + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t n = block * kCols;
      const MicroKernel kernel = table[std::min<int64_t>(kCols, N - n) - 1];
      for (int64_t m = 0; m < M; ++m) {
        kernel(lp + m * K, lp + (M + m) * K, wp + n * K, K, cp + n, s1p[m], s2p[m], sp + n, yp + m * N + n);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ragloom, m) {
  m.def("int8_limbs_mm(Tensor limbs, Tensor s1, Tensor s2, Tensor weight, Tensor code_sums, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(ragloom, CPU, m) { m.impl("int8_limbs_mm", &int8_limbs_mm); }
