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

// One pass over the prefix in blocks of 16 positions (online softmax): the scores of a block come from
// 16 partial-sum vectors reduced together (a transpose-add tree, ~3 shuffles per position instead of
// a horizontal sum each), the running max rescales the output once per block, and K and V are read in
// the same pass. Against the earlier two-pass kernel (scores, then V): 1.2x (fp32) and 1.3x (bf16) at
// GPT-B's prefix 251, where it reads the cache at ~19-21 GB/s (a streaming sum reads ~20 here).
//
// Software prefetch distance: 4 KB of each stream (K and V), at most one prefix ahead. Rows past the
// prefix prefetch the start of the next (batch, head) this thread reads, so no pass starts cold on a
// page the hardware prefetcher has not seen.
constexpr int64_t kCachePrefetchBytes = 4096;

template <int64_t D, typename T>
inline void prefetch_row(const T* row) {
  for (int64_t off = 0; off < D * static_cast<int64_t>(sizeof(T)); off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(row) + off, _MM_HINT_T0);
}

// 16 vectors of partial sums -> one vector whose lane j is the sum of a[j]'s 16 lanes.
inline __m512 sum16(const __m512 a[16]) {
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i)   // 256-bit halves: x[i] = [a[2i] folded to 8 | a[2i+1] folded to 8]
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)   // 128-bit lane k of y[i]: 4 partials of row 4i + k
    y[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(x[2 * i], x[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    z[i] = _mm512_add_ps(_mm512_shuffle_ps(y[2 * i], y[2 * i + 1], 0x44), _mm512_shuffle_ps(y[2 * i], y[2 * i + 1], 0xEE));
  const __m512 w = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], 0x88), _mm512_shuffle_ps(z[0], z[1], 0xDD));
  // lane 4k + e of w holds row 4e + k
  return _mm512_permutexvar_ps(_mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0), w);
}

// One (batch, head): q is fp32 [DV*16], K/V rows of DV*16 elements; next_k/next_v the K/V blocks this
// thread reads after this one (prefetched past the prefix), or null.
template <int DV, typename T>
void attend_one(const float* q, const T* K, const T* V, int64_t n, float scale, float* out,
                const T* next_k, const T* next_v) {
  constexpr int64_t D = DV * 16;
  constexpr int64_t kAhead = std::max<int64_t>(1, kCachePrefetchBytes / (D * static_cast<int64_t>(sizeof(T))));
  constexpr int NO = DV <= 4 ? 2 : 1;   // two accumulator sets halve the FMA chain (if registers allow)
  const int64_t ahead = std::min<int64_t>(kAhead, n);
  __m512 qv[DV];
  for (int d = 0; d < DV; ++d) qv[d] = _mm512_mul_ps(_mm512_loadu_ps(q + d * 16), _mm512_set1_ps(scale));
  __m512 o[NO][DV];
  for (int i = 0; i < NO; ++i)
    for (int d = 0; d < DV; ++d) o[i][d] = _mm512_setzero_ps();
  __m512 lsum = _mm512_setzero_ps();
  float m = -INFINITY;
  alignas(64) float p[16];
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    const int nb = static_cast<int>(std::min<int64_t>(16, n - t0));
    __m512 a[16];
    for (int j = 0; j < 16; ++j) {
      if (j >= nb) {   // rows past the prefix are not read (they may be past the buffer)
        a[j] = _mm512_setzero_ps();
        continue;
      }
      const int64_t t = t0 + j, f = t + ahead;
      if (f < n) {
        prefetch_row<D>(K + f * D);
        prefetch_row<D>(V + f * D);
      } else if (next_k) {
        prefetch_row<D>(next_k + (f - n) * D);
        prefetch_row<D>(next_v + (f - n) * D);
      }
      const T* kt = K + t * D;
      __m512 acc = _mm512_mul_ps(qv[0], load16(kt));
      for (int d = 1; d < DV; ++d) acc = _mm512_fmadd_ps(qv[d], load16(kt + d * 16), acc);
      a[j] = acc;
    }
    const __mmask16 valid = tail_mask(nb);
    const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, sum16(a));
    const float bm = _mm512_reduce_max_ps(s);
    if (bm > m && t0 > 0) {   // a new running max: rescale what is accumulated
      const __m512 alpha = _mm512_set1_ps(std::exp(m - bm));
      for (int i = 0; i < NO; ++i)
        for (int d = 0; d < DV; ++d) o[i][d] = _mm512_mul_ps(o[i][d], alpha);
      lsum = _mm512_mul_ps(lsum, alpha);
    }
    m = std::max(m, bm);
    const __m512 e = _mm512_maskz_mov_ps(valid, exp_f32(_mm512_sub_ps(s, _mm512_set1_ps(m))));
    lsum = _mm512_add_ps(lsum, e);
    _mm512_store_ps(p, e);
    int j = 0;
    for (; j + 1 < nb; j += 2) {   // rows in pairs, so the accumulator set is known at compile time
      const T* vt = V + (t0 + j) * D;
      const __m512 p0 = _mm512_set1_ps(p[j]), p1 = _mm512_set1_ps(p[j + 1]);
      for (int d = 0; d < DV; ++d) {
        o[0][d] = _mm512_fmadd_ps(p0, load16(vt + d * 16), o[0][d]);
        o[NO - 1][d] = _mm512_fmadd_ps(p1, load16(vt + D + d * 16), o[NO - 1][d]);
      }
    }
    if (j < nb) {
      const T* vt = V + (t0 + j) * D;
      const __m512 p0 = _mm512_set1_ps(p[j]);
      for (int d = 0; d < DV; ++d) o[0][d] = _mm512_fmadd_ps(p0, load16(vt + d * 16), o[0][d]);
    }
  }
  const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(lsum));
  for (int d = 0; d < DV; ++d) {
    const __m512 od = NO == 2 ? _mm512_add_ps(o[0][d], o[NO - 1][d]) : o[0][d];
    _mm512_storeu_ps(out + d * 16, _mm512_mul_ps(od, inv));
  }
}

template <int DV, typename T>
void attend_all(const float* q, const T* kc, const T* vc, float* out, int64_t B, int64_t H, int64_t Hk,
                int64_t Tm, int64_t n) {
  constexpr int64_t D = DV * 16;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const int64_t rep = H / Hk;
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    auto kv_offset = [&](int64_t i) { return ((i / H) * Hk + (i % H) / rep) * Tm * D; };
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t kv = kv_offset(i);
      const int64_t next = i + 1 < i1 ? kv_offset(i + 1) : -1;
      attend_one<DV, T>(q + i * D, kc + kv, vc + kv, n, scale, out + i * D,
                        next >= 0 ? kc + next : nullptr, next >= 0 ? vc + next : nullptr);
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
