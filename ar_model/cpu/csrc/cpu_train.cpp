// CPU kernels for the training step. Part of the groupgen_cpu_kernels extension (see cpu_kernels.py);
// the autograd functions that use them are in cpu_train_ops.py.
//
// transpose2d: an [R, C] matrix of 2-byte elements (rows contiguous, any row stride) -> its contiguous
// [C, R] transpose. Why: a weight gradient dW = g^T x reduces over the tokens, the outer dimension of
// both stored operands. oneDNN's AMX matmul runs that layout (a transposed source) ~1.7x slower than
// the same product with a contiguous source, and PyTorch's own transposing copy of bf16 moves ~1 GB/s
// (26 ms for GPT-B's [2048, 4096] FFN gradient; this kernel: ~4 ms).
//
// The passes further down (SwiGLU backward, RMSNorm forward and backward, dropout, cross entropy) are described there.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

#include "cpu_simd.h"

namespace {

using namespace groupgen_simd;

// 16-bit elements: 32 x 32 blocks transposed in registers. Five butterfly stages (b = 16, 8, 4, 2, 1)
// each swap the off-diagonal b x b sub-blocks of every 2b x 2b block: rows i and i + b exchange the
// columns with bit b set, one two-source permute per row. Rows and columns beyond the matrix are
// masked on load and store, so the edges need no second code path.
struct Butterfly16 {
  __m512i lo[5], hi[5];
  Butterfly16() {
    for (int s = 0; s < 5; ++s) {
      const int b = 16 >> s;
      alignas(64) uint16_t l[32], h[32];
      for (int c = 0; c < 32; ++c) {
        l[c] = static_cast<uint16_t>((c & b) ? 32 + c - b : c);    // row i: its own low half, row i+b's low half
        h[c] = static_cast<uint16_t>((c & b) ? 32 + c : c + b);    // row i+b: row i's high half, its own high half
      }
      lo[s] = _mm512_load_si512(l);
      hi[s] = _mm512_load_si512(h);
    }
  }
};

inline __mmask32 mask32(int64_t n) { return n >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << n) - 1u); }

void transpose_block16(const Butterfly16& bf, const uint16_t* src, int64_t ld_src, uint16_t* dst, int64_t ld_dst,
                       int64_t nr, int64_t nc) {
  __m512i r[32];
  const __mmask32 mc = mask32(nc);
  _Pragma("GCC unroll 32") for (int i = 0; i < 32; ++i) r[i] = i < nr ? _mm512_maskz_loadu_epi16(mc, src + i * ld_src) : _mm512_setzero_si512();
  // Fully unrolled, so the 32 rows stay in the 32 vector registers (rolled: 2x slower, spilled).
  _Pragma("GCC unroll 5") for (int s = 0; s < 5; ++s) {
    const int b = 16 >> s;
    _Pragma("GCC unroll 32") for (int i = 0; i < 32; ++i) {
      if (i & b) continue;
      const __m512i a = r[i], c = r[i + b];
      r[i] = _mm512_permutex2var_epi16(a, bf.lo[s], c);
      r[i + b] = _mm512_permutex2var_epi16(a, bf.hi[s], c);
    }
  }
  const __mmask32 mr = mask32(nr);
  for (int j = 0; j < nc; ++j) _mm512_mask_storeu_epi16(dst + j * ld_dst, mr, r[j]);
}

void transpose16(const uint16_t* src, int64_t ld, uint16_t* dst, int64_t R, int64_t C) {
  static const Butterfly16 bf;
  // Tasks are kMacro x kMacro tiles, staged through two L2-resident buffers: rows are copied in
  // whole, transposed block by block between the buffers, and copied out whole. Loading blocks
  // straight from the matrix reads 32 rows that are a power of two of bytes apart (GPT-B: 4-32 KB),
  // which all map to a few cache sets and pages: 1.6-4 GB/s. The buffers' row pitch is padded by one
  // block for the same reason.
  constexpr int64_t kMacro = 256, kPitch = kMacro + 32;
  const int64_t mr = (R + kMacro - 1) / kMacro, mc = (C + kMacro - 1) / kMacro;
  at::parallel_for(0, mr * mc, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> in(kMacro * kPitch), out(kMacro * kPitch);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t R0 = (t / mc) * kMacro, C0 = (t % mc) * kMacro;
      const int64_t nr = std::min(kMacro, R - R0), nc = std::min(kMacro, C - C0);
      for (int64_t r = 0; r < nr; ++r) std::memcpy(in.data() + r * kPitch, src + (R0 + r) * ld + C0, nc * 2);
      for (int64_t c0 = 0; c0 < nc; c0 += 32)
        for (int64_t r0 = 0; r0 < nr; r0 += 32)
          transpose_block16(bf, in.data() + r0 * kPitch + c0, kPitch, out.data() + c0 * kPitch + r0, kPitch,
                            std::min<int64_t>(32, nr - r0), std::min<int64_t>(32, nc - c0));
      // Out with non-temporal stores where the rows allow: ordinary stores first read each line they
      // fill, and here every line belongs to a different row (the write stage alone: 5.6 -> 1.1-1.5 ms
      // for [2048, 4096]).
      for (int64_t c = 0; c < nc; ++c) {
        uint16_t* d = dst + (C0 + c) * R + R0;
        const uint16_t* o = out.data() + c * kPitch;
        if ((reinterpret_cast<uintptr_t>(d) & 63) == 0 && nr % 32 == 0) {
          for (int64_t i = 0; i < nr; i += 32)
            _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i), _mm512_loadu_si512(o + i));
        } else {
          std::memcpy(d, o, nr * 2);
        }
      }
    }
    _mm_sfence();   // the streamed lines are visible before the result is used
  });
}

torch::Tensor transpose2d(const torch::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.element_size() == 2 && x.stride(1) == 1 &&
                  x.stride(0) >= x.size(1),
              "transpose2d: expected a 2-D CPU tensor of 2-byte elements (bf16/fp16) with contiguous rows, got ",
              x.sizes(), " ", x.scalar_type(), " with strides ", x.strides());
  const int64_t R = x.size(0), C = x.size(1);
  auto y = torch::empty({C, R}, x.options());
  transpose16(static_cast<const uint16_t*>(x.data_ptr()), x.stride(0), static_cast<uint16_t*>(y.data_ptr()), R, C);
  return y;
}

// ------------------------------------------------------------------------------------------------
// Pointwise backward passes (and RMSNorm's forward) for training-sized inputs. Each replaces a chain
// of PyTorch ops over [tokens, width] tensors, which on the CPU costs a memory pass (and often a
// dtype copy) per op: a GPT-B bf16 step spent ~25% of its time in such ops and casts. Rows go to
// threads in fixed blocks, and every reduction over rows sums per-block partials in block order, so
// results do not depend on the thread count.

constexpr int64_t kRowBlock = 64;

// SwiGLU backward. Forward (FeedForward, PyTorch or swiglu_rows): u = silu(a) rounded to T, y = u * b
// rounded to T. Backward as autograd computes it: db = g * u, du = g * b (each rounded to T), and
// da = du * s * (1 + a (1 - s)) with s = sigmoid(a) (silu_backward, rounded to T); da and db land in
// one [.., 2H] gradient, as the split of h expects (no concatenation).
template <typename T>
void swiglu_backward_rows(const T* h, const T* g, T* dh, int64_t R, int64_t H) {
  at::parallel_for(0, R, kRowBlock, [&](int64_t begin, int64_t end) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t r = begin; r < end; ++r) {
      const T* a = h + r * 2 * H;
      const T* b = a + H;
      const T* gr = g + r * H;
      T* da = dh + r * 2 * H;
      T* db = da + H;
      for (int64_t i = 0; i < H; i += 16) {
        const __mmask16 m = tail_mask(H - i);
        const __m512 av = load_f32(a + i, m), bv = load_f32(b + i, m), gv = load_f32(gr + i, m);
        const __m512 sig = sigmoid_f32(av);
        const __m512 u = as_stored(da, _mm512_mul_ps(av, sig));
        store(db + i, _mm512_mul_ps(gv, u), m);
        const __m512 du = as_stored(da, _mm512_mul_ps(gv, bv));
        const __m512 dsilu = _mm512_mul_ps(sig, _mm512_fmadd_ps(av, _mm512_sub_ps(one, sig), one));
        store(da + i, _mm512_mul_ps(du, dsilu), m);
      }
    }
  });
}

torch::Tensor swiglu_backward(const torch::Tensor& h, const torch::Tensor& g) {
  TORCH_CHECK(h.device().is_cpu() && h.is_contiguous() && g.is_contiguous() && h.dim() >= 1 &&
                  h.size(-1) % 2 == 0 && g.scalar_type() == h.scalar_type() &&
                  g.numel() * 2 == h.numel() && g.size(-1) * 2 == h.size(-1) &&
                  (h.scalar_type() == torch::kFloat32 || h.scalar_type() == torch::kBFloat16),
              "swiglu_backward: expected contiguous h [..., 2H] and g [..., H] of one dtype (fp32 or bf16), got ",
              h.sizes(), " ", h.scalar_type(), " and ", g.sizes(), " ", g.scalar_type());
  const int64_t H = h.size(-1) / 2, R = H ? g.numel() / H : 0;
  auto dh = torch::empty_like(h);
  if (h.scalar_type() == torch::kFloat32) {
    swiglu_backward_rows<float>(h.data_ptr<float>(), g.data_ptr<float>(), dh.data_ptr<float>(), R, H);
  } else {
    auto p = [](const torch::Tensor& t) { return reinterpret_cast<uint16_t*>(t.data_ptr<at::BFloat16>()); };
    swiglu_backward_rows<uint16_t>(p(h), p(g), p(dh), R, H);
  }
  return dh;
}

// RMSNorm for fp32 x and weight (the fp32 residual stream of autocast training): n = x r with
// r = rsqrt(mean(x^2) + eps), y = n w, computed in fp32 and stored as Y (fp32, or bf16 where the
// next op is a bf16 matmul: the cast autocast would make, done in the same pass). r is kept for
// the backward.
template <typename Y>
void rms_norm_fwd_rows(const float* x, const float* w, Y* y, float* rstd, int64_t R, int64_t D, float eps) {
  at::parallel_for(0, R, kRowBlock, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* xr = x + r * D;
      const float rs = 1.0f / std::sqrt(mean_square(xr, D) + eps);
      rstd[r] = rs;
      const __m512 sc = _mm512_set1_ps(rs);
      for (int64_t i = 0; i < D; i += 16) {
        const __mmask16 m = tail_mask(D - i);
        store(y + r * D + i, _mm512_mul_ps(_mm512_mul_ps(load_f32(xr + i, m), sc), load_f32(w + i, m)), m);
      }
    }
  });
}

std::tuple<torch::Tensor, torch::Tensor> rms_norm_train(const torch::Tensor& x, const torch::Tensor& w, double eps,
                                                        bool bf16_out) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1 && x.scalar_type() == torch::kFloat32 &&
                  w.dim() == 1 && w.is_contiguous() && w.scalar_type() == torch::kFloat32 && w.size(0) == x.size(-1),
              "rms_norm_train: expected contiguous fp32 x [..., D] and weight [D], got ", x.sizes(), " ",
              x.scalar_type(), " and ", w.sizes(), " ", w.scalar_type());
  const int64_t D = x.size(-1), R = D ? x.numel() / D : 0;
  auto y = torch::empty_like(x, bf16_out ? x.options().dtype(torch::kBFloat16) : x.options());
  auto rstd = torch::empty({R}, x.options());
  if (bf16_out) {
    rms_norm_fwd_rows<uint16_t>(x.data_ptr<float>(), w.data_ptr<float>(),
                                reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), rstd.data_ptr<float>(), R, D,
                                static_cast<float>(eps));
  } else {
    rms_norm_fwd_rows<float>(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), rstd.data_ptr<float>(), R,
                             D, static_cast<float>(eps));
  }
  return {y, rstd};
}

// Its backward, with dy in fp32 or bf16: dn = dy w, dx = r (dn - n mean(dn n)) in fp32, and
// dw = sum over rows of dy n (per-block partials summed in block order).
template <typename G>
void rms_norm_bwd_rows(const G* dy, const float* x, const float* w, const float* rstd, float* dx, float* partial,
                       int64_t R, int64_t D) {
  const int64_t nb = (R + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, nb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) {
      float* pw = partial + blk * D;
      for (int64_t i = 0; i < D; ++i) pw[i] = 0.0f;
      for (int64_t r = blk * kRowBlock; r < std::min(R, (blk + 1) * kRowBlock); ++r) {
        const float* xr = x + r * D;
        const G* gr = dy + r * D;
        const __m512 rs = _mm512_set1_ps(rstd[r]);
        __m512 dot = _mm512_setzero_ps();
        for (int64_t i = 0; i < D; i += 16) {
          const __mmask16 m = tail_mask(D - i);
          const __m512 n = _mm512_mul_ps(load_f32(xr + i, m), rs), gv = load_f32(gr + i, m);
          dot = _mm512_fmadd_ps(_mm512_mul_ps(gv, load_f32(w + i, m)), n, dot);
          _mm512_mask_storeu_ps(pw + i, m, _mm512_fmadd_ps(gv, n, _mm512_maskz_loadu_ps(m, pw + i)));
        }
        const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(dot) / static_cast<float>(D));
        for (int64_t i = 0; i < D; i += 16) {
          const __mmask16 m = tail_mask(D - i);
          const __m512 n = _mm512_mul_ps(load_f32(xr + i, m), rs);
          const __m512 dn = _mm512_mul_ps(load_f32(gr + i, m), load_f32(w + i, m));
          _mm512_mask_storeu_ps(dx + r * D + i, m, _mm512_mul_ps(rs, _mm512_fnmadd_ps(n, mean, dn)));
        }
      }
    }
  });
}

std::tuple<torch::Tensor, torch::Tensor> rms_norm_backward(const torch::Tensor& dy, const torch::Tensor& x,
                                                           const torch::Tensor& w, const torch::Tensor& rstd) {
  TORCH_CHECK(dy.is_contiguous() && dy.sizes() == x.sizes() && x.is_contiguous() &&
                  x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32 &&
                  rstd.scalar_type() == torch::kFloat32 && rstd.numel() * x.size(-1) == x.numel() &&
                  (dy.scalar_type() == torch::kFloat32 || dy.scalar_type() == torch::kBFloat16),
              "rms_norm_backward: expected contiguous dy like x [..., D] (fp32 or bf16), fp32 x, weight and rstd, "
              "got dy ", dy.sizes(), " ", dy.scalar_type(), ", x ", x.sizes(), " ", x.scalar_type());
  const int64_t D = x.size(-1), R = D ? x.numel() / D : 0;
  const int64_t nb = (R + kRowBlock - 1) / kRowBlock;
  auto dx = torch::empty_like(x);
  auto partial = torch::empty({nb, D}, x.options());
  if (dy.scalar_type() == torch::kFloat32) {
    rms_norm_bwd_rows<float>(dy.data_ptr<float>(), x.data_ptr<float>(), w.data_ptr<float>(), rstd.data_ptr<float>(),
                             dx.data_ptr<float>(), partial.data_ptr<float>(), R, D);
  } else {
    rms_norm_bwd_rows<uint16_t>(reinterpret_cast<const uint16_t*>(dy.data_ptr<at::BFloat16>()), x.data_ptr<float>(),
                                w.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr<float>(),
                                partial.data_ptr<float>(), R, D);
  }
  // Block partials summed in block order (torch's sum over dim 0 of a contiguous [nb, D] is a fixed
  // column-wise order, independent of the thread count).
  return {dx, partial.sum(0)};
}

// ------------------------------------------------------------------------------------------------
// Dropout: y = x * keep / (1 - p), the keep mask drawn from Philox4x32-10 (Salmon et al., SC'11; the
// counter-based generator of cuRAND and PyTorch's CUDA dropout), so the mask of element e depends on
// (seed, e) only: the backward pass regenerates it instead of saving it, and the result does not
// depend on the thread count. Why: PyTorch's CPU generator draws a 64-bit number in ~11 ns, and
// masking one GPT-B activation [8, 256, 768] took ~7 ms forward + ~2 ms backward (25 per step, ~6%).
//
// Element e = 128 c + 16 k + l (chunk c, vector k of 8, lane l) takes the 16 bits (k % 2: high or low
// half) of word k / 2 of Philox(counter = 16 c + l, key = seed); it is kept where they are >= thr.

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

// High 32 bits of the 16 unsigned products a * m.
inline __m512i mulhi_epu32(__m512i a, __m512i m) {
  const __m512i even = _mm512_srli_epi64(_mm512_mul_epu32(a, m), 32);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  return _mm512_mask_blend_epi32(0xAAAA, even, odd);
}

// Philox4x32-10 on 16 counters at once: c[0..3] are the four words of each lane's counter, in place.
inline void philox4x32_10(__m512i c[4], uint64_t seed) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kPhiloxM0)), m1 = _mm512_set1_epi32(static_cast<int>(kPhiloxM1));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < 10; ++r) {
    const __m512i lo0 = _mm512_mullo_epi32(c[0], m0), hi0 = mulhi_epu32(c[0], m0);
    const __m512i lo1 = _mm512_mullo_epi32(c[2], m1), hi1 = mulhi_epu32(c[2], m1);
    c[0] = _mm512_xor_si512(_mm512_xor_si512(hi1, c[1]), _mm512_set1_epi32(static_cast<int>(k0)));
    c[1] = lo1;
    c[2] = _mm512_xor_si512(_mm512_xor_si512(hi0, c[3]), _mm512_set1_epi32(static_cast<int>(k1)));
    c[3] = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}

template <typename T>
void dropout_chunks(const T* x, T* y, int64_t n, uint64_t seed, uint32_t thr, float scale) {
  const int64_t chunks = (n + 127) / 128;
  at::parallel_for(0, chunks, 64, [&](int64_t c0, int64_t c1) {
    const __m512i lanes = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i low16 = _mm512_set1_epi32(0xFFFF), vthr = _mm512_set1_epi32(static_cast<int>(thr));
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int64_t c = c0; c < c1; ++c) {
      const uint64_t ctr = static_cast<uint64_t>(c) * 16;   // a multiple of 16: + lane never carries
      __m512i w[4] = {_mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr))), lanes),
                      _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr >> 32))), _mm512_setzero_si512(),
                      _mm512_setzero_si512()};
      philox4x32_10(w, seed);
      for (int k = 0; k < 8; ++k) {
        const int64_t e0 = c * 128 + k * 16;
        if (e0 >= n) break;
        const __m512i bits = (k & 1) ? _mm512_srli_epi32(w[k / 2], 16) : _mm512_and_si512(w[k / 2], low16);
        const __mmask16 keep = _mm512_cmpge_epu32_mask(bits, vthr);
        const __mmask16 m = tail_mask(n - e0);
        store(y + e0, _mm512_maskz_mul_ps(keep, load_f32(x + e0, m), vscale), m);
      }
    }
  });
}

// x (fp32 or bf16, any shape) -> x * keep / (1 - p) in x's dtype (the product in fp32, rounded once).
torch::Tensor dropout_apply(const torch::Tensor& x, int64_t seed, double p) {
  TORCH_CHECK(x.device().is_cpu() && (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "dropout_apply: expected an fp32 or bf16 CPU tensor, got ", x.scalar_type(), " on ", x.device());
  TORCH_CHECK(p >= 0.0 && p < 1.0, "dropout_apply: p=", p, " outside [0, 1)");
  const auto xc = x.contiguous();
  auto y = torch::empty_like(xc);
  const uint32_t thr = static_cast<uint32_t>(std::min(65535.0, std::nearbyint(p * 65536.0)));
  const float scale = static_cast<float>(1.0 / (1.0 - p));
  const uint64_t key = static_cast<uint64_t>(seed);
  if (xc.scalar_type() == torch::kFloat32) {
    dropout_chunks(xc.data_ptr<float>(), y.data_ptr<float>(), xc.numel(), key, thr, scale);
  } else {
    dropout_chunks(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()),
                   reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), xc.numel(), key, thr, scale);
  }
  return y;
}

// Philox4x32-10 of the counters [n, 4] (int64 holding uint32 words) under key (k0, k1), for tests.
torch::Tensor philox4x32_10_words(const torch::Tensor& ctr, int64_t seed) {
  TORCH_CHECK(ctr.dim() == 2 && ctr.size(1) == 4 && ctr.scalar_type() == torch::kInt64,
              "philox4x32_10_words: expected int64 [n, 4], got ", ctr.sizes(), " ", ctr.scalar_type());
  const auto c = ctr.contiguous();
  auto out = torch::empty_like(c);
  const int64_t* src = c.data_ptr<int64_t>();
  int64_t* dst = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < c.size(0); ++i) {
    __m512i w[4];
    for (int j = 0; j < 4; ++j) w[j] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(src[i * 4 + j])));
    philox4x32_10(w, static_cast<uint64_t>(seed));
    for (int j = 0; j < 4; ++j) dst[i * 4 + j] = static_cast<uint32_t>(_mm_cvtsi128_si32(_mm512_castsi512_si128(w[j])));
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// Cross entropy over rows of logits [N, V] (fp32 or bf16) against targets [N], in fp32: the forward
// pass keeps each row's log-sum-exp, the backward pass writes (softmax - onehot) * scale in the
// logits' dtype. One thread per row (a fixed order, so results do not depend on the thread count).
// Why: the blocked PyTorch formulation in loss.py walks each block with ~8 ops (casts, log_softmax,
// gathers, exp, scatter, mul, copy); at GPT-B's [2048, 16384] bf16 that was ~80 ms forward and
// ~140 ms backward, for 67 MB of logits.

// Rows holding a NaN get a NaN log-sum-exp (so the loss shows it), whatever max/min do with NaN.
template <typename T>
float row_lse(const T* x, int64_t V) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  __mmask16 nan = 0;
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 m = tail_mask(V - i);
    const __m512 v = load_f32(x + i, m);
    nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
    mx = _mm512_mask_max_ps(mx, m, mx, v);
  }
  if (nan) return NAN;
  const float rmax = _mm512_reduce_max_ps(mx);
  if (std::isinf(rmax)) return rmax;   // +inf: the loss is not finite either way; -inf: an empty row
  const __m512 vmax = _mm512_set1_ps(rmax);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < V; i += 16) {
    const __mmask16 m = tail_mask(V - i);
    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, exp_f32(_mm512_sub_ps(load_f32(x + i, m), vmax))));
  }
  return rmax + std::log(_mm512_reduce_add_ps(sum));
}

template <typename T>
void ce_forward_rows(const T* x, const int64_t* t, float* lse, float* nll, int64_t N, int64_t V) {
  at::parallel_for(0, N, 4, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * V;
      lse[r] = row_lse(row, V);
      nll[r] = lse[r] - _mm512_cvtss_f32(load_f32(row + t[r], 1));
    }
  });
}

template <typename T>
void ce_backward_rows(const T* x, const int64_t* t, const float* lse, float scale, T* g, int64_t N, int64_t V) {
  at::parallel_for(0, N, 4, [&](int64_t r0, int64_t r1) {
    const __m512 vscale = _mm512_set1_ps(scale), one = _mm512_set1_ps(1.0f);
    for (int64_t r = r0; r < r1; ++r) {
      const T* row = x + r * V;
      T* out = g + r * V;
      if (std::isnan(lse[r])) {   // a NaN row stays NaN (exp_f32 would clamp it to a finite value)
        for (int64_t i = 0; i < V; i += 16) store(out + i, _mm512_set1_ps(NAN), tail_mask(V - i));
        continue;
      }
      const __m512 vlse = _mm512_set1_ps(lse[r]);
      for (int64_t i = 0; i < V; i += 16) {
        const __mmask16 m = tail_mask(V - i);
        __m512 p = exp_f32(_mm512_sub_ps(load_f32(row + i, m), vlse));   // softmax, as loss.py: exp(x - lse)
        const int64_t at = t[r] - i;
        if (at >= 0 && at < 16) p = _mm512_mask_sub_ps(p, static_cast<__mmask16>(1u << at), p, one);
        store(out + i, _mm512_mul_ps(p, vscale), m);
      }
    }
  });
}

std::tuple<torch::Tensor, torch::Tensor> cross_entropy_forward(const torch::Tensor& x, const torch::Tensor& t) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu() &&
                  (x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kBFloat16),
              "cross_entropy_forward: expected contiguous fp32 or bf16 CPU logits [N, V], got ", x.sizes(), " ",
              x.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(0) && t.scalar_type() == torch::kInt64 && t.is_contiguous(),
              "cross_entropy_forward: expected int64 targets [", x.size(0), "], got ", t.sizes(), " ", t.scalar_type());
  const int64_t N = x.size(0), V = x.size(1);
  if (N > 0) {
    const auto [lo, hi] = torch::aminmax(t);
    TORCH_CHECK(lo.item<int64_t>() >= 0 && hi.item<int64_t>() < V, "cross_entropy_forward: targets outside [0, ", V,
                "): min ", lo.item<int64_t>(), ", max ", hi.item<int64_t>());
  }
  auto lse = torch::empty({N}, x.options().dtype(torch::kFloat32));
  auto nll = torch::empty({N}, x.options().dtype(torch::kFloat32));
  if (x.scalar_type() == torch::kFloat32) {
    ce_forward_rows(x.data_ptr<float>(), t.data_ptr<int64_t>(), lse.data_ptr<float>(), nll.data_ptr<float>(), N, V);
  } else {
    ce_forward_rows(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), t.data_ptr<int64_t>(),
                    lse.data_ptr<float>(), nll.data_ptr<float>(), N, V);
  }
  return {lse, nll};
}

torch::Tensor cross_entropy_backward(const torch::Tensor& x, const torch::Tensor& t, const torch::Tensor& lse,
                                     double scale) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && t.is_contiguous() && lse.is_contiguous() &&
                  t.size(0) == x.size(0) && lse.size(0) == x.size(0) && lse.scalar_type() == torch::kFloat32 &&
                  t.scalar_type() == torch::kInt64,
              "cross_entropy_backward: logits ", x.sizes(), ", targets ", t.sizes(), ", lse ", lse.sizes(),
              " do not fit");
  const int64_t N = x.size(0), V = x.size(1);
  auto g = torch::empty_like(x);
  if (x.scalar_type() == torch::kFloat32) {
    ce_backward_rows(x.data_ptr<float>(), t.data_ptr<int64_t>(), lse.data_ptr<float>(), static_cast<float>(scale),
                     g.data_ptr<float>(), N, V);
  } else {
    TORCH_CHECK(x.scalar_type() == torch::kBFloat16, "cross_entropy_backward: logits dtype ", x.scalar_type());
    ce_backward_rows(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()), t.data_ptr<int64_t>(),
                     lse.data_ptr<float>(), static_cast<float>(scale),
                     reinterpret_cast<uint16_t*>(g.data_ptr<at::BFloat16>()), N, V);
  }
  return g;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(groupgen, m) {
  m.def("transpose2d(Tensor x) -> Tensor");
  m.def("swiglu_backward(Tensor h, Tensor g) -> Tensor");
  m.def("rms_norm_train(Tensor x, Tensor w, float eps, bool bf16_out) -> (Tensor, Tensor)");
  m.def("rms_norm_backward(Tensor dy, Tensor x, Tensor w, Tensor rstd) -> (Tensor, Tensor)");
  m.def("dropout_apply(Tensor x, int seed, float p) -> Tensor");
  m.def("philox4x32_10_words(Tensor ctr, int seed) -> Tensor");
  m.def("cross_entropy_forward(Tensor x, Tensor t) -> (Tensor, Tensor)");
  m.def("cross_entropy_backward(Tensor x, Tensor t, Tensor lse, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(groupgen, CPU, m) {
  m.impl("transpose2d", &transpose2d);
  m.impl("swiglu_backward", &swiglu_backward);
  m.impl("rms_norm_train", &rms_norm_train);
  m.impl("rms_norm_backward", &rms_norm_backward);
  m.impl("dropout_apply", &dropout_apply);
  m.impl("philox4x32_10_words", &philox4x32_10_words);
  m.impl("cross_entropy_forward", &cross_entropy_forward);
  m.impl("cross_entropy_backward", &cross_entropy_backward);
}
