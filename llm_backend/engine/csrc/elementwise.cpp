// The eager forward's elementwise steps between the matmuls, one pass each where the
// tensor ops took several and a temporary per step (bf16, AVX-512):
//
// rope(x, cos, sin): x * cos + rotate_half(x) * sin over (B, T, n, head_dim) with the
//   sign in sin (model.apply_rope), rounded as the tensor ops round: x * cos to bf16,
//   then + the other product (exact in float32) to bf16. The same bits.
// silu_mul(x): silu(gate) * up over the fused gate / up projection's rows (M, 2F),
//   rounded as F.silu(gate) * up rounds: silu to bf16, then the product. Its exp is
//   ours (vec_math.h), so a value can differ from PyTorch's by one bf16 step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <torch/library.h>

#include <cstdint>

#include "vec_math.h"

namespace {

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kBFloat16 && x.stride(3) == 1,
              "x must be (B, T, n, head_dim) bf16 with contiguous rows");
  const int64_t B = x.size(0), T = x.size(1), n = x.size(2), hd = x.size(3), half = hd / 2;
  TORCH_CHECK(hd % 32 == 0, "head_dim must be a multiple of 32, got ", hd);
  for (const at::Tensor* table : {&cos, &sin}) {
    TORCH_CHECK(table->dim() == 4 && table->scalar_type() == at::kBFloat16 && table->size(0) == B &&
                    table->size(1) == T && table->size(2) == 1 && table->size(3) == hd && table->stride(3) == 1,
                "cos and sin must be (B, T, 1, head_dim) bf16 with contiguous rows");
  }
  auto out = at::empty({B, T, n, hd}, x.options());
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const at::BFloat16* cp = cos.data_ptr<at::BFloat16>();
  const at::BFloat16* sp = sin.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, B * T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / T, t = bt % T;
      const at::BFloat16* c = cp + b * cos.stride(0) + t * cos.stride(1);
      const at::BFloat16* s = sp + b * sin.stride(0) + t * sin.stride(1);
      for (int64_t h = 0; h < n; ++h) {
        const at::BFloat16* row = xp + b * x.stride(0) + t * x.stride(1) + h * x.stride(2);
        at::BFloat16* o = op + (bt * n + h) * hd;
        for (int64_t d = 0; d < hd; d += 16) {
          const int64_t other = d < half ? d + half : d - half;  // rotate_half's partner
          __m512 direct = ragloom::round_to_bf16(_mm512_mul_ps(ragloom::load_bf16(row + d), ragloom::load_bf16(c + d)));
          __m512 turned = _mm512_mul_ps(ragloom::load_bf16(row + other), ragloom::load_bf16(s + d));  // exact
          ragloom::store_bf16(o + d, _mm512_add_ps(direct, turned));
        }
      }
    }
  });
  return out;
}

// silu(g) = g * sigmoid(g); e = e^-|g| <= 1 never overflows: sigmoid is 1 / (1 + e)
// for g >= 0 and e / (1 + e) below
inline __m512 silu(__m512 g) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 e = ragloom::exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
  __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
  __m512 numerator = _mm512_mask_mov_ps(one, negative, e);
  return _mm512_mul_ps(g, _mm512_div_ps(numerator, _mm512_add_ps(one, e)));
}

at::Tensor silu_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "x must be (M, 2F) contiguous bf16");
  TORCH_CHECK(x.size(1) % 32 == 0, "x's rows must hold 2F values, F a multiple of 16");
  const int64_t M = x.size(0), F = x.size(1) / 2;
  auto out = at::empty({M, F}, x.options());
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  at::BFloat16* op = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const at::BFloat16* gate = xp + m * 2 * F;
      const at::BFloat16* up = gate + F;
      for (int64_t f = 0; f < F; f += 16) {
        __m512 activated = ragloom::round_to_bf16(silu(ragloom::load_bf16(gate + f)));
        ragloom::store_bf16(op + m * F + f, _mm512_mul_ps(activated, ragloom::load_bf16(up + f)));
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(ragloom, m) {
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("silu_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(ragloom, CPU, m) {
  m.impl("rope", &rope);
  m.impl("silu_mul", &silu_mul);
}
