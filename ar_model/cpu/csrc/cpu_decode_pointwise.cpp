// RMSNorm, rotary embedding and the SwiGLU gate for decode-sized inputs (a few rows), fp32 or bf16,
// in one pass each.
// Part of the groupgen_cpu_kernels extension (see cpu_kernels.py).
//
// Why: at decode sizes these are chains of small PyTorch ops, each paying dispatch and allocation:
// a GPT-B layer step at 16 rows spent ~88 us per RMSNorm (8 ops) and ~217 us on RoPE (7 ops), about
// 4.7 ms of a ~26 ms bf16 decode step, against ~12 ms for all its matmuls. Here each is one loop.
// Each follows the PyTorch formulation in ar_model/layers.py step for step, including where it
// rounds to bf16, so they differ from it only by fp32 rounding: the summation order of RMSNorm's mean
// of squares, the exp polynomial of SwiGLU's sigmoid (~2e-7 relative).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "cpu_simd.h"

namespace {

using namespace groupgen_simd;

// Rows per parallel task: decode inputs (a few rows) run inline on the calling thread; training-sized
// ones (thousands of rows, through cpu_kernels.rope_train / swiglu_train) are split over threads.
constexpr int64_t kRowGrain = 64;

// RMSNorm.forward: n = (x * rsqrt(mean(x^2) + eps)) in fp32, cast to T; y = n * w, rounded to T.
template <typename T>
void rms_norm_rows(const T* x, const T* w, T* y, int64_t R, int64_t D, double eps) {
  for (int64_t r = 0; r < R; ++r) {
    const T* xr = x + r * D;
    T* yr = y + r * D;
    const float mean = mean_square(xr, D);
    const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(mean + static_cast<float>(eps)));
    for (int64_t i = 0; i < D; i += 16) {
      const __mmask16 m = tail_mask(D - i);
      const __m512 n = as_stored(yr, _mm512_mul_ps(load_f32(xr + i, m), scale));
      store(yr + i, _mm512_mul_ps(n, load_f32(w + i, m)), m);
    }
  }
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1 && w.dim() == 1 && w.is_contiguous() &&
                  w.size(0) == x.size(-1) && w.scalar_type() == x.scalar_type() &&
                  (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "rms_norm: expected contiguous x [..., D] and weight [D] of one dtype (fp32 or bf16), got ",
              x.sizes(), " ", x.scalar_type(), " and ", w.sizes(), " ", w.scalar_type());
  auto y = torch::empty_like(x);
  const int64_t D = x.size(-1), R = D ? x.numel() / D : 0;
  if (x.scalar_type() == torch::kFloat32) {
    rms_norm_rows<float>(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), R, D, eps);
  } else {
    auto p = [](const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
    rms_norm_rows<uint16_t>(p(x), p(w), p(y), R, D, eps);
  }
  return y;
}

// apply_rope: interleaved pairs (a, b) of each head times (cos + i sin) in fp32, cast to T.
// x [B, T, H, D] with the last two dims dense (rows may be strided), tables [T, D/2] fp32.
template <typename T>
void rope_rows(const T* x, T* y, const float* cs, const float* sn, int64_t B, int64_t Tn, int64_t H, int64_t D,
               int64_t sb, int64_t st) {
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
  // Rows (b, t) in parallel for training-sized inputs; decode steps (<= kRowGrain rows) run inline.
  at::parallel_for(0, B * Tn, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / Tn, t = bt % Tn;
      const float* c = cs + t * (D / 2);
      const float* s = sn + t * (D / 2);
      for (int64_t h = 0; h < H; ++h) {
        const T* xr = x + b * sb + t * st + h * D;
        T* yr = y + ((b * Tn + t) * H + h) * D;
        for (int64_t i = 0; i < D; i += 32) {   // 16 pairs: 32 values in, 32 out
          const __mmask16 m0 = tail_mask(D - i), m1 = tail_mask(D - i - 16);
          const __m512 v0 = load_f32(xr + i, m0), v1 = load_f32(xr + i + 16, m1);
          const __m512 a = _mm512_permutex2var_ps(v0, even, v1), bb = _mm512_permutex2var_ps(v0, odd, v1);
          const __mmask16 mp = tail_mask((D - i) / 2);
          const __m512 cv = _mm512_maskz_loadu_ps(mp, c + i / 2), sv = _mm512_maskz_loadu_ps(mp, s + i / 2);
          const __m512 re = _mm512_sub_ps(_mm512_mul_ps(a, cv), _mm512_mul_ps(bb, sv));
          const __m512 im = _mm512_add_ps(_mm512_mul_ps(a, sv), _mm512_mul_ps(bb, cv));
          store(yr + i, _mm512_permutex2var_ps(re, lo, im), m0);
          store(yr + i + 16, _mm512_permutex2var_ps(re, hi, im), m1);
        }
      }
    }
  });
}

torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.size(3) % 2 == 0 && x.stride(3) == 1 &&
                  x.stride(2) == x.size(3) && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "rope: expected x [B, T, H, D] (fp32 or bf16, even D, each row of heads dense), got ", x.sizes(),
              " strides ", x.strides(), " ", x.scalar_type());
  const int64_t B = x.size(0), Tn = x.size(1), H = x.size(2), D = x.size(3);
  TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() == 2 && cos.size(0) == Tn && cos.size(1) == D / 2 &&
                  cos.scalar_type() == torch::kFloat32 && sin.scalar_type() == torch::kFloat32 &&
                  cos.is_contiguous() && sin.is_contiguous(),
              "rope: expected contiguous fp32 tables [", Tn, ", ", D / 2, "], got ", cos.sizes(), " and ", sin.sizes());
  auto y = torch::empty({B, Tn, H, D}, x.options());
  if (x.scalar_type() == torch::kFloat32) {
    rope_rows<float>(x.data_ptr<float>(), y.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), B, Tn,
                     H, D, x.stride(0), x.stride(1));
  } else {
    rope_rows<uint16_t>(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
                        reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), cos.data_ptr<float>(),
                        sin.data_ptr<float>(), B, Tn, H, D, x.stride(0), x.stride(1));
  }
  return y;
}

// FeedForward's F.silu(a) * b for h = [a | b] of H columns each: silu in fp32 cast to T, product
// rounded to T (PyTorch's two ops, one pass).
template <typename T>
void swiglu_rows(const T* h, T* y, int64_t R, int64_t H) {
  at::parallel_for(0, R, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* a = h + r * 2 * H;
      const T* b = a + H;
      T* yr = y + r * H;
      for (int64_t i = 0; i < H; i += 16) {
        const __mmask16 m = tail_mask(H - i);
        const __m512 av = load_f32(a + i, m);
        const __m512 sig = sigmoid_f32(av);
        store(yr + i, _mm512_mul_ps(as_stored(yr, _mm512_mul_ps(av, sig)), load_f32(b + i, m)), m);
      }
    }
  });
}

torch::Tensor swiglu(const torch::Tensor& h) {
  TORCH_CHECK(h.device().is_cpu() && h.is_contiguous() && h.dim() >= 1 && h.size(-1) % 2 == 0 &&
                  (h.scalar_type() == torch::kFloat32 || h.scalar_type() == torch::kBFloat16),
              "swiglu: expected contiguous [..., 2H] fp32 or bf16, got ", h.sizes(), " ", h.scalar_type());
  auto shape = h.sizes().vec();
  const int64_t H = shape.back() / 2, R = H ? h.numel() / (2 * H) : 0;
  shape.back() = H;
  auto y = torch::empty(shape, h.options());
  if (h.scalar_type() == torch::kFloat32) {
    swiglu_rows<float>(h.data_ptr<float>(), y.data_ptr<float>(), R, H);
  } else {
    swiglu_rows<uint16_t>(reinterpret_cast<const uint16_t*>(h.data_ptr<at::BFloat16>()),
                          reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), R, H);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(groupgen, m) {
  m.def("swiglu(Tensor h) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor w, float eps) -> Tensor");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(groupgen, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("rope", &rope);
  m.impl("swiglu", &swiglu);
}
