// AVX-512 CPU kernels for one decode step: a GEMM for a few rows against a prepacked fp32 weight,
// and attention of one query per head over a filled KV-cache prefix (fp32 or bf16 cache).
// Built on first use by ar_model/cpu_decode.py; everything here has a PyTorch fallback there.
//
// Why: at decode sizes MKL's sgemm and SDPA leave memory bandwidth unused on the CPU (measured
// ~10-12 GB/s against ~16-17 GB/s for a streaming sum on 2 cores). Both kernels below stream their
// big operand once, in order, with software prefetch, and keep the small one in registers/L1.
// Work is split over output blocks (GEMM) or (batch, head) pairs (attention), each computed by one
// thread in a fixed order, so results do not depend on the thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kPrefetchFloats = 1024;   // 4 KB ahead in the weight stream (best of 64..4096)

// ------------------------------------------------------------------------------------------------
// fp32 GEMM y[M, N] = x[M, K] @ W[N, K]^T (+ bias). W packed as [ceil(N/16), K, 16]: for each block
// of 16 outputs, the 16 weights of one k are one 64-byte vector. x is transposed to [K, M] so the
// M values broadcast at one k share a cache line.

torch::Tensor pack_f32(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32 && w.device().is_cpu(),
              "pack_f32: expected a 2-D fp32 CPU weight, got ", w.sizes(), " ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1), NB = (N + 15) / 16;
  auto padded = torch::zeros({NB * 16, K}, w.options());
  padded.narrow(0, 0, N).copy_(w);
  return padded.view({NB, 16, K}).transpose(1, 2).contiguous();
}

template <int MR>
void gemm_tile_f32(const float* xt, int64_t ldx, const float* wb, int64_t K, const float* bias,
                   __mmask16 cols, float* y, int64_t ldy) {
  __m512 acc[MR];
  for (int i = 0; i < MR; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    _mm_prefetch(reinterpret_cast<const char*>(wb + k * 16 + kPrefetchFloats), _MM_HINT_T0);
    const __m512 w = _mm512_loadu_ps(wb + k * 16);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) acc[i] = _mm512_fmadd_ps(_mm512_set1_ps(xt[k * ldx + i]), w, acc[i]);
  }
  const __m512 b = bias ? _mm512_maskz_loadu_ps(cols, bias) : _mm512_setzero_ps();
  for (int i = 0; i < MR; ++i) _mm512_mask_storeu_ps(y + i * ldy, cols, _mm512_add_ps(acc[i], b));
}

using GemmTile = void (*)(const float*, int64_t, const float*, int64_t, const float*, __mmask16, float*, int64_t);
constexpr GemmTile kGemmTiles[17] = {
    nullptr, gemm_tile_f32<1>, gemm_tile_f32<2>, gemm_tile_f32<3>, gemm_tile_f32<4>, gemm_tile_f32<5>,
    gemm_tile_f32<6>, gemm_tile_f32<7>, gemm_tile_f32<8>, gemm_tile_f32<9>, gemm_tile_f32<10>,
    gemm_tile_f32<11>, gemm_tile_f32<12>, gemm_tile_f32<13>, gemm_tile_f32<14>, gemm_tile_f32<15>,
    gemm_tile_f32<16>};

torch::Tensor linear_f32(const torch::Tensor& x, const torch::Tensor& wp, const c10::optional<torch::Tensor>& bias,
                         int64_t N) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.device().is_cpu(),
              "linear_f32: expected x [M, K] fp32 on the CPU, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(wp.dim() == 3 && wp.size(2) == 16 && wp.size(1) == x.size(1) && wp.is_contiguous() &&
                  wp.scalar_type() == torch::kFloat32 && N > (wp.size(0) - 1) * 16 && N <= wp.size(0) * 16,
              "linear_f32: packed weight ", wp.sizes(), " does not fit x ", x.sizes(), " and N=", N);
  const float* bp = nullptr;
  torch::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == N && b.scalar_type() == torch::kFloat32,
                "linear_f32: bias ", b.sizes(), " ", b.scalar_type(), " for N=", N);
    bp = b.data_ptr<float>();
  }
  const int64_t M = x.size(0), K = x.size(1), NB = wp.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  const auto xt = x.t().contiguous();
  const float* xp = xt.data_ptr<float>();
  const float* w = wp.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb) {
      const int64_t valid = std::min<int64_t>(16, N - nb * 16);
      const __mmask16 cols = static_cast<__mmask16>((1u << valid) - 1u);
      for (int64_t m0 = 0; m0 < M; m0 += 16) {
        const int mr = static_cast<int>(std::min<int64_t>(16, M - m0));
        kGemmTiles[mr](xp + m0, M, w + nb * K * 16, K, bp ? bp + nb * 16 : nullptr, cols,
                       yp + m0 * N + nb * 16, N);
      }
    }
  });
  return y;
}

// ------------------------------------------------------------------------------------------------
// Decode attention: out[b, h] = softmax(q[b, h] . K[b, h/rep, :n]^T / sqrt(D)) @ V[b, h/rep, :n].

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {   // bf16 -> fp32 is a 16-bit left shift
  const __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

// e^x for x <= 0 (scores minus their max): 2^(x log2 e) = 2^n 2^f with |f| <= 1/2 and a degree-6
// polynomial for 2^f (relative error ~2e-7, below fp32 rounding of the sums that follow).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// One (batch, head): q is fp32 [DV*16], K/V rows of DV*16 elements, s scratch of n (+16) floats.
template <int DV, typename T>
void attend_one(const float* q, const T* K, const T* V, int64_t n, float scale, float* s, float* out) {
  constexpr int64_t D = DV * 16;
  constexpr int64_t ahead = 8 * D;   // rows prefetched ahead
  __m512 qv[DV];
  for (int d = 0; d < DV; ++d) qv[d] = _mm512_mul_ps(_mm512_loadu_ps(q + d * 16), _mm512_set1_ps(scale));
  float mx = -INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    const T* kt = K + t * D;
    for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(kt + ahead) + off, _MM_HINT_T0);
    __m512 a = _mm512_mul_ps(qv[0], load16(kt));
    for (int d = 1; d < DV; ++d) a = _mm512_fmadd_ps(qv[d], load16(kt + d * 16), a);
    const float v = _mm512_reduce_add_ps(a);
    s[t] = v;
    mx = v > mx ? v : mx;
  }
  const __m512 vmax = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 m = n - t >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - t)) - 1u);
    const __m512 e = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), vmax)));
    _mm512_mask_storeu_ps(s + t, m, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  __m512 o[DV];
  for (int d = 0; d < DV; ++d) o[d] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const T* vt = V + t * D;
    for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64)
      _mm_prefetch(reinterpret_cast<const char*>(vt + ahead) + off, _MM_HINT_T0);
    const __m512 p = _mm512_set1_ps(s[t]);
    for (int d = 0; d < DV; ++d) o[d] = _mm512_fmadd_ps(p, load16(vt + d * 16), o[d]);
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
  for (int d = 0; d < DV; ++d) _mm512_storeu_ps(out + d * 16, _mm512_mul_ps(o[d], inv));
}

template <int DV, typename T>
void attend_all(const float* q, const T* kc, const T* vc, float* out, int64_t B, int64_t H, int64_t Hk,
                int64_t Tm, int64_t n) {
  constexpr int64_t D = DV * 16;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t rep = H / Hk;
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(n + 16);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, hk = (i % H) / rep;
      const int64_t kv = (b * Hk + hk) * Tm * D;
      attend_one<DV, T>(q + i * D, kc + kv, vc + kv, n, scale, s.data(), out + i * D);
    }
  });
}

template <typename T>
void attend_dispatch(const float* q, const T* kc, const T* vc, float* out, int64_t B, int64_t H, int64_t Hk,
                     int64_t Tm, int64_t D, int64_t n) {
  switch (D / 16) {
    case 1: return attend_all<1, T>(q, kc, vc, out, B, H, Hk, Tm, n);
    case 2: return attend_all<2, T>(q, kc, vc, out, B, H, Hk, Tm, n);
    case 4: return attend_all<4, T>(q, kc, vc, out, B, H, Hk, Tm, n);
    case 8: return attend_all<8, T>(q, kc, vc, out, B, H, Hk, Tm, n);
    default: TORCH_CHECK(false, "decode_attention: head_dim ", D, " not in {16, 32, 64, 128}");
  }
}

// q [B, H, D] fp32; kc, vc [B, Hk, Tmax, D] contiguous fp32 or bf16; attends to positions 0..n-1.
// Returns fp32 [B, H, D].
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& kc, const torch::Tensor& vc, int64_t n) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.is_contiguous(),
              "decode_attention: expected q [B, H, D] contiguous fp32, got ", q.sizes(), " ", q.scalar_type());
  TORCH_CHECK(kc.dim() == 4 && kc.sizes() == vc.sizes() && kc.scalar_type() == vc.scalar_type() &&
                  kc.is_contiguous() && vc.is_contiguous(),
              "decode_attention: expected contiguous k/v caches [B, Hk, T, D] of one shape and dtype, got ",
              kc.sizes(), " and ", vc.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hk = kc.size(1), Tm = kc.size(2);
  TORCH_CHECK(kc.size(0) == B && kc.size(3) == D && Hk > 0 && H % Hk == 0,
              "decode_attention: q ", q.sizes(), " does not match the caches ", kc.sizes());
  TORCH_CHECK(n >= 1 && n <= Tm, "decode_attention: n=", n, " outside 1..", Tm);
  auto out = torch::empty({B, H, D}, q.options());
  if (kc.scalar_type() == torch::kFloat32) {
    attend_dispatch<float>(q.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(), out.data_ptr<float>(),
                           B, H, Hk, Tm, D, n);
  } else {
    TORCH_CHECK(kc.scalar_type() == torch::kBFloat16, "decode_attention: cache dtype ", kc.scalar_type(),
                " is neither fp32 nor bf16");
    attend_dispatch<uint16_t>(q.data_ptr<float>(), reinterpret_cast<const uint16_t*>(kc.data_ptr<at::BFloat16>()),
                              reinterpret_cast<const uint16_t*>(vc.data_ptr<at::BFloat16>()), out.data_ptr<float>(),
                              B, H, Hk, Tm, D, n);
  }
  return out;
}

}  // namespace

// Registered as torch ops (torch.ops.groupgen.*) so the profiler and the dispatcher see them.
TORCH_LIBRARY(groupgen, m) {
  m.def("pack_f32(Tensor w) -> Tensor");
  m.def("linear_f32(Tensor x, Tensor wp, Tensor? bias, int n) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor kc, Tensor vc, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(groupgen, CPU, m) {
  m.impl("pack_f32", &pack_f32);
  m.impl("linear_f32", &linear_f32);
  m.impl("decode_attention", &decode_attention);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
