// AVX-512 CPU kernels for one decode step: a GEMM for a few rows against a prepacked fp32 weight,
// attention of one query per head over a filled KV-cache prefix (fp32 or bf16 cache), and the top-k
// selection of the sampler.
// Built on first use by ar_model/cpu_kernels.py; everything here has a PyTorch fallback there.
//
// Why: at decode sizes MKL's sgemm and SDPA leave memory bandwidth unused on the CPU (measured
// ~10-12 GB/s against ~16-17 GB/s for a streaming sum on 2 cores). Both kernels below stream their
// big operand once, in order, with software prefetch, and keep the small one in registers/L1.
// Work is split over output blocks (GEMM) or (batch, head) pairs (attention), each computed by one
// thread in a fixed order, so results do not depend on the thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <tuple>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_simd.h"

namespace {

using namespace groupgen_simd;

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
  // Blocks per thread at least ~2M multiply-adds: below that, waking the second thread costs more
  // than it saves (16 rows: 256x256 takes 44 us on one thread, 60 us on two).
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 21) / std::max<int64_t>(1, M * K * 16));
  at::parallel_for(0, NB, grain, [&](int64_t b0, int64_t b1) {
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

// Software prefetch distance of the cache stream: 4 KB (best of 1-8 KB for bf16 at prefixes 64 and 251;
// fp32 is flat there). The stream is chained: the end of a K pass prefetches the start of V, the end
// of V the next pair's K, so no pass starts cold on a page the hardware prefetcher has not seen.
constexpr int64_t kCachePrefetchBytes = 4096;

template <int64_t D, typename T>
inline void prefetch_row(const T* row) {
  for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(row) + off, _MM_HINT_T0);
}

// One (batch, head): q is fp32 [DV*16], K/V rows of DV*16 elements, s scratch of n (+16) floats;
// next_k is the K block this thread reads after this one (prefetched at the end of V), or null.
template <int DV, typename T>
void attend_one(const float* q, const T* K, const T* V, int64_t n, float scale, float* s, float* out,
                const T* next_k) {
  constexpr int64_t D = DV * 16;
  constexpr int64_t ahead = std::max<int64_t>(1, kCachePrefetchBytes / (D * static_cast<int64_t>(sizeof(T))));
  __m512 qv[DV];
  for (int d = 0; d < DV; ++d) qv[d] = _mm512_mul_ps(_mm512_loadu_ps(q + d * 16), _mm512_set1_ps(scale));
  float mx = -INFINITY;
  for (int64_t t = 0; t < n; ++t) {
    const T* kt = K + t * D;
    prefetch_row<D>(t + ahead < n ? kt + ahead * D : V + (t + ahead - n) * D);
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
    const __m512 e = _mm512_maskz_mov_ps(m, exp_f32(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), vmax)));
    _mm512_mask_storeu_ps(s + t, m, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  __m512 o[DV];
  for (int d = 0; d < DV; ++d) o[d] = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const T* vt = V + t * D;
    if (t + ahead < n) prefetch_row<D>(vt + ahead * D);
    else if (next_k) prefetch_row<D>(next_k + (t + ahead - n) * D);
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
    auto kv_offset = [&](int64_t i) { return ((i / H) * Hk + (i % H) / rep) * Tm * D; };
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t kv = kv_offset(i);
      attend_one<DV, T>(q + i * D, kc + kv, vc + kv, n, scale, s.data(), out + i * D,
                        i + 1 < i1 ? kc + kv_offset(i + 1) : nullptr);
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

// ------------------------------------------------------------------------------------------------
// Top-k selection for sampling: the k largest logits of each row, returned in ascending column order
// (ties at the threshold: lowest columns first), so the result does not depend on how they were
// found. torch.topk on the CPU takes ~175-280 us for [8, 2048] (k = 256) and 1.0-1.4 ms for
// [8, 16384] (k = 2000). Here: a radix select of the k-th largest value on order-preserving integer
// keys (a histogram of the top 11 bits, then an exact select among the few keys in the bin that
// holds the k-th), then one vectorised pass that compresses the kept columns out in order.

// Unsigned keys in the order of the floats: flip all bits of negatives, set the sign bit of the rest.
inline __m512i float_keys(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i flip = _mm512_or_si512(_mm512_srai_epi32(u, 31), _mm512_set1_epi32(INT32_MIN));
  return _mm512_xor_si512(u, flip);
}

// Selects one row; keys and cand are scratch of K entries. Returns false if the row holds a NaN.
bool topk_row(const float* row, int64_t K, int64_t k, float* vals, int64_t* idx, uint32_t* keys,
              uint32_t* cand) {
  constexpr int kBits = 11, kShift = 32 - kBits, kBins = 1 << kBits;
  uint32_t hist[4][kBins] = {};   // four copies: repeated bins do not chain on one counter
  __mmask16 nan = 0;
  int64_t i = 0;
  for (; i + 16 <= K; i += 16) {
    const __m512 v = _mm512_loadu_ps(row + i);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    _mm512_storeu_si512(keys + i, float_keys(v));
  }
  if (i < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - i)) - 1u);
    const __m512 v = _mm512_maskz_loadu_ps(m, row + i);
    nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
    _mm512_mask_storeu_epi32(keys + i, m, float_keys(v));
  }
  if (nan) return false;
  for (i = 0; i + 4 <= K; i += 4)
    for (int c = 0; c < 4; ++c) ++hist[c][keys[i + c] >> kShift];
  for (; i < K; ++i) ++hist[0][keys[i] >> kShift];
  int64_t above = 0;   // keys in bins above the one that holds the k-th largest
  uint32_t bin = kBins - 1;
  for (;; --bin) {
    const int64_t h = hist[0][bin] + hist[1][bin] + hist[2][bin] + hist[3][bin];
    if (above + h >= k) break;
    above += h;
  }
  int64_t nc = 0;
  const __m512i vbin = _mm512_set1_epi32(static_cast<int>(bin));
  for (i = 0; i < K; i += 16) {
    const __mmask16 m = K - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - i)) - 1u);
    const __m512i kv = _mm512_maskz_loadu_epi32(m, keys + i);
    const __mmask16 in = _mm512_mask_cmpeq_epi32_mask(m, _mm512_srli_epi32(kv, kShift), vbin);
    _mm512_mask_compressstoreu_epi32(cand + nc, in, kv);
    nc += __builtin_popcount(in);
  }
  const int64_t r = k - above;   // the threshold is the r-th largest candidate
  std::nth_element(cand, cand + (r - 1), cand + nc, std::greater<uint32_t>());
  const uint32_t thr = cand[r - 1];
  int64_t ties = r - std::count_if(cand, cand + nc, [thr](uint32_t c) { return c > thr; });
  const __m512i vthr = _mm512_set1_epi32(static_cast<int>(thr));
  const __m512i step = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  int64_t j = 0;
  for (i = 0; i < K && j < k; i += 16) {
    const __mmask16 m = K - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - i)) - 1u);
    const __m512i kv = _mm512_maskz_loadu_epi32(m, keys + i);
    __mmask16 take = _mm512_mask_cmpgt_epu32_mask(m, kv, vthr);
    __mmask16 eq = _mm512_mask_cmpeq_epi32_mask(m, kv, vthr);
    for (; eq && ties > 0; --ties) {   // the lowest columns among equal keys
      const __mmask16 low = static_cast<__mmask16>(eq & (~eq + 1u));
      take |= low;
      eq ^= low;
    }
    _mm512_mask_compressstoreu_ps(vals + j, take, _mm512_maskz_loadu_ps(m, row + i));
    const __m512i base = _mm512_add_epi64(step, _mm512_set1_epi64(i));
    const int lo = __builtin_popcount(take & 0xFF);
    _mm512_mask_compressstoreu_epi64(idx + j, static_cast<__mmask8>(take), base);
    _mm512_mask_compressstoreu_epi64(idx + j + lo, static_cast<__mmask8>(take >> 8),
                                     _mm512_add_epi64(base, _mm512_set1_epi64(8)));
    j += __builtin_popcount(take);
  }
  return true;
}

std::tuple<torch::Tensor, torch::Tensor> topk_select(const torch::Tensor& x, int64_t k) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              "topk_select: expected contiguous fp32 logits [rows, K] on the CPU, got ", x.sizes(), " ",
              x.scalar_type());
  const int64_t R = x.size(0), K = x.size(1);
  TORCH_CHECK(k >= 1 && k <= K, "topk_select: k=", k, " outside 1..", K);
  auto values = torch::empty({R, k}, x.options());
  auto index = torch::empty({R, k}, x.options().dtype(torch::kLong));
  const float* xp = x.data_ptr<float>();
  float* vp = values.data_ptr<float>();
  int64_t* ip = index.data_ptr<int64_t>();
  std::vector<char> has_nan(R, 0);
  // Rows in parallel only when there is enough work to pay for waking the other threads.
  at::parallel_for(0, R, std::max<int64_t>(1, 32768 / std::max<int64_t>(K, 1)), [&](int64_t r0, int64_t r1) {
    std::vector<uint32_t> scratch(2 * K);
    for (int64_t r = r0; r < r1; ++r)
      has_nan[r] = !topk_row(xp + r * K, K, k, vp + r * k, ip + r * k, scratch.data(), scratch.data() + K);
  });
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(!has_nan[r], "topk_select: row ", r, " of the logits contains NaN");
  return {values, index};
}

}  // namespace

// Registered as torch ops (torch.ops.groupgen.*) so the profiler and the dispatcher see them.
TORCH_LIBRARY(groupgen, m) {
  m.def("pack_f32(Tensor w) -> Tensor");
  m.def("linear_f32(Tensor x, Tensor wp, Tensor? bias, int n) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor kc, Tensor vc, int n) -> Tensor");
  m.def("topk_select(Tensor x, int k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(groupgen, CPU, m) {
  m.impl("pack_f32", &pack_f32);
  m.impl("linear_f32", &linear_f32);
  m.impl("decode_attention", &decode_attention);
  m.impl("topk_select", &topk_select);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}
