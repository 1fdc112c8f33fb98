// int4 x bf16 matmul on bf16 dot products (AVX512-BF16 vdpbf16ps), reading the
// codes in place from ATen's CPU int4 packing (torch._convert_weight_to_int4pack_for_cpu
// on an AVX-512 CPU): (N/64, K, 32) bytes, column nb*64 + d in the low nibble of byte
// (nb, k, d) and column nb*64 + 32 + d in its high nibble; scales_and_zeros (G, N, 2)
// bf16, w[n, k] = (q - 8) * scale[g, n] + zero[g, n] with g = k / group_size.
//
// y[m, n] = sum_g scale[g, n] * sum_{k in g} x[m, k] (q[n, k] - 8) + zero[g, n] * sum_{k in g} x[m, k]
//
// (q - 8) is exact in bf16 and a bf16 product is exact in float32, so each group's dot
// product is summed in float32 from exact products; the scales apply once a group.
// A row's sums are taken in one order whatever the number of rows: its result does not
// depend on the batch it runs in.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "vec_math.h"

namespace {

constexpr int64_t kBlockN = 64;  // columns per block of the packing
constexpr int64_t kUnitN = 32;   // columns one micro-kernel call computes (two vectors)
constexpr int kMaxRows = 6;      // rows one micro-kernel call computes at most (registers)
// Codes are prefetched this many bytes ahead (32 input columns: the next group's), on
// the Zen 4 kind 1,024 beat 256 and 512 by a little
constexpr int64_t kPrefetchBytes = 1024;

// bf16 bits of (i & 15) - 8 for i = 0 .. 31, vpermw's table (it reads 5 index bits)
alignas(64) constexpr uint16_t kCodeValues[32] = {
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,  // -8 .. -1
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0,  //  0 .. 7
    0xC100, 0xC0E0, 0xC0C0, 0xC0A0, 0xC080, 0xC040, 0xC000, 0xBF80,
    0x0000, 0x3F80, 0x4000, 0x4040, 0x4080, 0x40A0, 0x40C0, 0x40E0};

// Columns c0 .. c0+15 of one group's (scale, zero) pairs as two float32 vectors.
inline void load_scales(const at::BFloat16* pairs, __m512& scale, __m512& zero) {
  static const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  static const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
  __m512i raw = _mm512_loadu_si512(pairs);  // 32 bf16: s0 z0 s1 z1 ...
  __m512 a = ragloom::widen_bf16(_mm512_castsi512_si256(raw));
  __m512 b = ragloom::widen_bf16(_mm512_extracti64x4_epi64(raw, 1));
  scale = _mm512_permutex2var_ps(a, even, b);
  zero = _mm512_permutex2var_ps(a, odd, b);
}

// ROWS rows x 32 columns of one 64-column block: the low-nibble vector (block columns
// d0 .. d0+15) and the high-nibble one (32+d0 .. 32+d0+15). Registers: 4 * ROWS
// accumulators (a group's partial sums and the totals) + the two code vectors.
// Measured on the Zen 4 kind: ROWS = 6 beat 4 and 8; decoding a unit's codes once into
// a bf16 panel for all the row blocks (instead of per call) was within noise.
template <int ROWS>
void micro_kernel(
    const at::BFloat16* x, int64_t ldx,      // (ROWS, K) rows
    const uint8_t* block, int64_t d0,        // (K, 32) bytes of one 64-column block
    const at::BFloat16* pairs, int64_t ldp,  // (G, N, 2) at the block's first column
    const float* sums, int64_t G,            // (ROWS, G) group sums of x
    int64_t group_size,
    at::BFloat16* y, int64_t ldy) {          // (ROWS, N) at the block's first column
  const __m512i lut = _mm512_load_si512(kCodeValues);
  __m512 total[ROWS][2];
  for (int r = 0; r < ROWS; ++r) {
    total[r][0] = _mm512_setzero_ps();
    total[r][1] = _mm512_setzero_ps();
  }
  for (int64_t g = 0; g < G; ++g) {
    __m512 part[ROWS][2];
    for (int r = 0; r < ROWS; ++r) {
      part[r][0] = _mm512_setzero_ps();
      part[r][1] = _mm512_setzero_ps();
    }
    const int64_t k_end = (g + 1) * group_size;
    // a later group's scales (a strided stream per group) and codes further on: without
    // these, SmolLM2's 120 linears for one row took 5-15% longer (prefetches never fault)
    _mm_prefetch(reinterpret_cast<const char*>(pairs + (g + 2) * ldp + d0 * 2), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(pairs + (g + 2) * ldp + (kBlockN / 2 + d0) * 2), _MM_HINT_T0);
    for (int64_t k = g * group_size; k < k_end; k += 2) {
      const uint8_t* row = block + k * (kBlockN / 2) + d0;
      _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetchBytes), _MM_HINT_T0);
      __m512i lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row)));
      __m512i hi = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + kBlockN / 2)));
      // 16-bit lanes (k, k+1) per column: byte k in the even lane, byte k+1 in the odd
      __m512i both = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
      __m512bh w0 = (__m512bh)_mm512_permutexvar_epi16(both, lut);                         // low nibbles
      __m512bh w1 = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi32(both, 4), lut);  // high
      for (int r = 0; r < ROWS; ++r) {
        int32_t pair;
        std::memcpy(&pair, x + r * ldx + k, sizeof pair);
        __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
        part[r][0] = _mm512_dpbf16_ps(part[r][0], a, w0);
        part[r][1] = _mm512_dpbf16_ps(part[r][1], a, w1);
      }
    }
    __m512 s0, z0, s1, z1;
    load_scales(pairs + g * ldp + d0 * 2, s0, z0);
    load_scales(pairs + g * ldp + (kBlockN / 2 + d0) * 2, s1, z1);
    for (int r = 0; r < ROWS; ++r) {
      __m512 xs = _mm512_set1_ps(sums[r * G + g]);
      total[r][0] = _mm512_fmadd_ps(part[r][0], s0, _mm512_fmadd_ps(xs, z0, total[r][0]));
      total[r][1] = _mm512_fmadd_ps(part[r][1], s1, _mm512_fmadd_ps(xs, z1, total[r][1]));
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    ragloom::store_bf16(y + r * ldy + d0, total[r][0]);
    ragloom::store_bf16(y + r * ldy + kBlockN / 2 + d0, total[r][1]);
  }
}

using MicroKernel = void (*)(const at::BFloat16*, int64_t, const uint8_t*, int64_t, const at::BFloat16*, int64_t,
                             const float*, int64_t, int64_t, at::BFloat16*, int64_t);

template <int... R>
constexpr std::array<MicroKernel, sizeof...(R)> kernels(std::integer_sequence<int, R...>) {
  return {&micro_kernel<R + 1>...};
}

at::Tensor int4_bf16_mm(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales_and_zeros,
                        int64_t group_size) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x must be (M, K) contiguous bf16");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(scales_and_zeros.dim() == 3 && scales_and_zeros.scalar_type() == at::kBFloat16 &&
                  scales_and_zeros.is_contiguous() && scales_and_zeros.size(2) == 2,
              "scales_and_zeros must be (G, N, 2) contiguous bf16");
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t G = scales_and_zeros.size(0), N = scales_and_zeros.size(1);
  TORCH_CHECK(group_size % 2 == 0 && G * group_size == K, "K must be G * group_size (even)");
  TORCH_CHECK(N % kBlockN == 0, "N must be a multiple of 64");
  TORCH_CHECK(packed.numel() == N * K / 2, "packed must hold N * K / 2 bytes");
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  // float32 sums of x over each group: (M, G)
  std::vector<float> sums(M * G);
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = g * group_size; k < (g + 1) * group_size; ++k) s += static_cast<float>(xp[m * K + k]);
      sums[m * G + g] = s;
    }
  }
  static constexpr auto table = kernels(std::make_integer_sequence<int, kMaxRows>{});
  const uint8_t* codes = packed.data_ptr<uint8_t>();
  const at::BFloat16* pairs = scales_and_zeros.data_ptr<at::BFloat16>();
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  const int64_t units = N / kUnitN;
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      const int64_t nb = u / 2, d0 = (u % 2) * 16;
      const uint8_t* block = codes + nb * K * (kBlockN / 2);
      // rows split evenly: 32 = 6 + 6 + 5 + 5 + 5 + 5, not five 6s and a 2
      const int64_t calls = (M + kMaxRows - 1) / kMaxRows;
      for (int64_t call = 0, m = 0; call < calls; ++call) {
        const int64_t rows = M / calls + (call < M % calls ? 1 : 0);
        table[rows - 1](xp + m * K, K, block, d0, pairs + nb * kBlockN * 2, N * 2, sums.data() + m * G, G,
                        group_size, yp + m * N + nb * kBlockN, N);
        m += rows;
      }
    }
  });
  return y;
}


// W^T, (K, N) bf16, from the packing: the dense (prefill) path's weight, the same bits
// as Int4Linear._dequantized_from_pack's tensor ops (and PyTorch's int4 kernel's
// weights): w = q * scale + offset in float32, rounded to bf16, where the offset
// zero - 8 * scale is rounded to bf16 first. q * scale is exact in float32 (a 4-bit
// integer times a bf16), so the fused multiply-add rounds as their multiply and add.
// Rows of W^T are split across threads; each converts its group's scales once.
at::Tensor int4_dequant_t(const at::Tensor& packed, const at::Tensor& scales_and_zeros, int64_t group_size) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous(), "packed must be contiguous uint8");
  TORCH_CHECK(scales_and_zeros.dim() == 3 && scales_and_zeros.scalar_type() == at::kBFloat16 &&
                  scales_and_zeros.is_contiguous() && scales_and_zeros.size(2) == 2,
              "scales_and_zeros must be (G, N, 2) contiguous bf16");
  TORCH_CHECK(group_size > 0, "group_size must be positive");
  const int64_t G = scales_and_zeros.size(0), N = scales_and_zeros.size(1), K = G * group_size;
  TORCH_CHECK(N % kBlockN == 0, "N must be a multiple of 64");
  TORCH_CHECK(packed.numel() == N * K / 2, "packed must hold N * K / 2 bytes");
  auto w = at::empty({K, N}, scales_and_zeros.options());
  if (K == 0) return w;
  const uint8_t* codes = packed.data_ptr<uint8_t>();
  const at::BFloat16* pairs = scales_and_zeros.data_ptr<at::BFloat16>();
  at::BFloat16* wp = w.data_ptr<at::BFloat16>();
  const __m512i low_bits = _mm512_set1_epi32(15);
  at::parallel_for(0, K, group_size, [&](int64_t begin, int64_t end) {
    std::vector<float> scales(2 * N);  // one group's scales, then its offsets, float32
    int64_t loaded = -1;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t g = k / group_size;
      if (g != loaded) {
        for (int64_t n = 0; n < N; n += 16) {
          __m512 s, z;
          load_scales(pairs + (g * N + n) * 2, s, z);
          // zero - 8 * scale rounded to bf16 (exact products; the difference rounds)
          __m512 offset = ragloom::round_to_bf16(_mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s, z));
          _mm512_storeu_ps(scales.data() + n, s);
          _mm512_storeu_ps(scales.data() + N + n, offset);
        }
        loaded = g;
      }
      const float* s = scales.data();
      const float* z = scales.data() + N;
      at::BFloat16* out = wp + k * N;
      for (int64_t nb = 0; nb < N / kBlockN; ++nb) {
        const uint8_t* row = codes + (nb * K + k) * (kBlockN / 2);
        for (int64_t half = 0; half < 2; ++half) {
          __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + half * 16)));
          __m512i lo = _mm512_and_si512(bytes, low_bits);
          __m512i hi = _mm512_srli_epi32(bytes, 4);
          const int64_t c0 = nb * kBlockN + half * 16, c1 = c0 + kBlockN / 2;
          __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_loadu_ps(s + c0), _mm512_loadu_ps(z + c0));
          __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_loadu_ps(s + c1), _mm512_loadu_ps(z + c1));
          ragloom::store_bf16(out + c0, w0);
          ragloom::store_bf16(out + c1, w1);
        }
      }
    }
  });
  return w;
}

}  // namespace

TORCH_LIBRARY(ragloom, m) {
  m.def("int4_bf16_mm(Tensor x, Tensor packed, Tensor scales_and_zeros, int group_size) -> Tensor");
  m.def("int4_dequant_t(Tensor packed, Tensor scales_and_zeros, int group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(ragloom, CPU, m) {
  m.impl("int4_bf16_mm", &int4_bf16_mm);
  m.impl("int4_dequant_t", &int4_dequant_t);
}
