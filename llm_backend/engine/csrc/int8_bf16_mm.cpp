// int8 x bf16 matmul on bf16 dot products (AVX512-BF16 vdpbf16ps), reading the (N, K)
// int8 codes as torch._weight_int8pack_mm takes them, with one bf16 scale per output:
//
// y[m, n] = scale[n] * sum_k x[m, k] q[n, k]
//
// An int8 code is exact in bf16 and a bf16 product is exact in float32, so the sum
// is of exact products, taken in float32 in one order (16 lanes along k, then a fixed
// lane reduction) whatever the number of rows: a row's result does not depend on the
// batch it runs in. 32 input columns at a time: K must be a multiple of 32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>

namespace {

// input rows x output columns (rows of W) one micro-kernel call computes at most:
// on the Zen 4 kind 8 x 3 beat 6 x 4, 4 x 4 and 12 x 2 (32 rows: ~790 us a SmolLM2
// layer against ~1,000-1,160)
constexpr int kMaxRows = 8;
constexpr int kCols = 3;
// Codes are prefetched this many bytes ahead in each row: a decode streams ~100 MB of
// them from memory a step, and the hardware prefetcher alone left one row's 120
// linears at 8.1 ms (~13 GB/s) against 5.2-6.1 with it (128: 6.5, 512: 8.6).
constexpr int64_t kPrefetchBytes = 256;

// 32 int8 codes as 32 bf16 values in the same order (exact: |q| <= 128).
inline __m512bh codes_to_bf16(const int8_t* codes) {
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes));
  __m512 low = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(raw)));
  __m512 high = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(raw, 1)));
  return _mm512_cvtne2ps_pbh(high, low);  // lanes 0-15 from low
}

// ROWS input rows x COLS output columns; registers: ROWS * COLS accumulators of 16
// partial sums along k, COLS code vectors and one activation vector.
template <int ROWS, int COLS>
void micro_kernel(const at::BFloat16* x, int64_t ldx,  // (ROWS, K)
                  const int8_t* w, int64_t K,          // (COLS, K) codes
                  const at::BFloat16* scales,          // (COLS,)
                  at::BFloat16* y, int64_t ldy) {      // (ROWS, N) at the first column
  __m512 acc[ROWS][COLS];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < COLS; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512bh codes[COLS];
    for (int c = 0; c < COLS; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(w + c * K + k + kPrefetchBytes), _MM_HINT_T0);
      codes[c] = codes_to_bf16(w + c * K + k);
    }
    for (int r = 0; r < ROWS; ++r) {
      __m512bh a = (__m512bh)_mm512_loadu_si512(x + r * ldx + k);
      for (int c = 0; c < COLS; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], a, codes[c]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    for (int c = 0; c < COLS; ++c) {
      const float sum = _mm512_reduce_add_ps(acc[r][c]);
      y[r * ldy + c] = at::BFloat16(sum * static_cast<float>(scales[c]));
    }
  }
}

using MicroKernel = void (*)(const at::BFloat16*, int64_t, const int8_t*, int64_t, const at::BFloat16*,
                             at::BFloat16*, int64_t);

template <int COLS, int... R>
constexpr std::array<MicroKernel, sizeof...(R)> kernels(std::integer_sequence<int, R...>) {
  return {&micro_kernel<R + 1, COLS>...};
}

at::Tensor int8_bf16_mm(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x must be (M, K) contiguous bf16");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar && weight.is_contiguous(),
              "weight must be (N, K) contiguous int8");
  TORCH_CHECK(scales.dim() == 1 && scales.scalar_type() == at::kBFloat16 && scales.is_contiguous(),
              "scales must be (N,) contiguous bf16");
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  TORCH_CHECK(weight.size(1) == K && scales.size(0) == N, "x, weight and scales do not fit");
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32");
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  using Table = std::array<MicroKernel, kMaxRows>;
  static constexpr std::array<Table, kCols> tables = {  // [columns - 1][rows - 1]
      kernels<1>(std::make_integer_sequence<int, kMaxRows>{}),
      kernels<2>(std::make_integer_sequence<int, kMaxRows>{}),
      kernels<3>(std::make_integer_sequence<int, kMaxRows>{})};
  static_assert(kCols == 3, "one table per column count");
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const int8_t* wp = weight.data_ptr<int8_t>();
  const at::BFloat16* sp = scales.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t calls = (M + kMaxRows - 1) / kMaxRows;  // rows split evenly
  at::parallel_for(0, (N + kCols - 1) / kCols, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t n = block * kCols;
      const Table& table = tables[std::min<int64_t>(kCols, N - n) - 1];
      for (int64_t call = 0, m = 0; call < calls; ++call) {
        const int64_t rows = M / calls + (call < M % calls ? 1 : 0);
        table[rows - 1](xp + m * K, K, wp + n * K, K, sp + n, yp + m * N + n, N);
        m += rows;
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ragloom, m) { m.def("int8_bf16_mm(Tensor x, Tensor weight, Tensor scales) -> Tensor"); }

TORCH_LIBRARY_IMPL(ragloom, CPU, m) { m.impl("int8_bf16_mm", &int8_bf16_mm); }
