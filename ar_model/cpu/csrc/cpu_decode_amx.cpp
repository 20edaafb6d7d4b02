// bf16 GEMM for a few rows: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M <= 32, bf16 in and out, fp32
// accumulation, on Intel AMX where the CPU and OS allow it and with AVX-512F FMAs elsewhere. Part of
// the groupgen_cpu_kernels extension (see cpu_kernels.py).
//
// Why: at decode sizes (16 rows: 8 images x 2 for guidance) oneDNN's AMX matmul reads a GPT-B step's
// 222 MB of bf16 weights at ~10 GB/s; a streaming read runs at ~16-17 GB/s on this machine's 2 cores.
// Here each weight tile is read once, in order, with a software prefetch 4 KB ahead: ~16 GB/s.
//
// Layout: W is packed once into AMX B tiles, [ceil(N/16), ceil(K/32), 16 k-pairs, 16 n, 2] (1 KB per
// tile, zero padded), so one block of 16 outputs streams as one contiguous run. A pair of output
// blocks shares each x tile; rows 17..32 use a second x tile. Each block is computed by one thread in
// a fixed k order, so results do not depend on the thread count.
//
// The AMX code is compiled per function (target attributes), so the rest of the extension still
// runs on CPUs without AMX; amx_bf16_ready() says whether this CPU and kernel allow it.
//
// Without AMX (Intel before Sapphire Rapids, a hypervisor that hides it, AMD) the same packed weights
// can be read by an AVX-512F kernel (cpu_kernels.bf16_fma_preferred() says where decoding uses it):
// a 64-byte row of a tile holds one k-pair of 16 outputs, its even bf16 lanes become fp32 with a
// 16-bit shift and its odd lanes with a mask, and each feeds 16-lane FMAs against x broadcast per row.
// oneDNN's bf16 path there (AVX512-BF16's vdpbf16ps, which retired 4x fewer instructions per second
// than an FMA on the machine measured) takes 1.2-1.6x as long at 2-32 rows (BENCHMARKS.md, session 9).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "cpu_simd.h"

// The AMX intrinsics need GCC >= 11 or Clang >= 12; older compilers build the rest of the extension
// and report AMX as unavailable.
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define GROUPGEN_HAVE_AMX 1
#else
#define GROUPGEN_HAVE_AMX 0
#endif
#define GROUPGEN_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

namespace {

constexpr int64_t kAmxPrefetchBytes = 4096;

// CPUID says AMX-TILE, AMX-BF16 and AVX512-BF16; the OS enables tile state (XCR0 bits 17, 18); and
// Linux grants this process the tile data permission (arch_prctl ARCH_REQ_XCOMP_PERM).
bool amx_bf16_ready() {
  static const bool ready = [] {
    if (!GROUPGEN_HAVE_AMX) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool tile = (d >> 24) & 1, amx_bf16 = (d >> 22) & 1;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    const bool avx512_bf16 = (a >> 5) & 1;
    if (!(tile && amx_bf16 && avx512_bf16)) return false;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if (((lo >> 17) & 3) != 3) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ready;
}

torch::Tensor pack_bf16(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kBFloat16 && w.device().is_cpu(),
              "pack_bf16: expected a 2-D bf16 CPU weight, got ", w.sizes(), " ", w.scalar_type());
  const int64_t N = w.size(0), K = w.size(1), NB = (N + 15) / 16, KB = (K + 31) / 32;
  auto padded = torch::zeros({NB * 16, KB * 32}, w.options());
  padded.narrow(0, 0, N).narrow(1, 0, K).copy_(w);
  // [NB, 16 n, KB, 16 k-pairs, 2] -> [NB, KB, 16 k-pairs, 16 n, 2]
  return padded.view({NB, 16, KB, 16, 2}).permute({0, 2, 3, 1, 4}).contiguous();
}

#if GROUPGEN_HAVE_AMX
struct TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: C(m, n) = 2m + n (fp32 accumulators), A(m) = 4 + m (x rows), B(n) = 6 + n (weights).
GROUPGEN_AMX void configure_tiles(int rows0, int rows1) {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64;
  cfg.rows[0] = cfg.rows[1] = cfg.rows[4] = static_cast<uint8_t>(rows0);
  cfg.rows[2] = cfg.rows[3] = cfg.rows[5] = static_cast<uint8_t>(rows1 ? rows1 : 1);
  cfg.rows[6] = cfg.rows[7] = 16;
  // GCC 12 does not treat ldtilecfg as reading its operand: without this barrier the stores above
  // are dropped and the instruction faults on an invalid configuration.
  __asm__ __volatile__("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

GROUPGEN_AMX void release_tiles() { _tile_release(); }

// NT (1 or 2) output blocks of 16 starting at wb (the second at wb + wstride), 1 or 2 row tiles.
template <int NT>
GROUPGEN_AMX void amx_blocks(const uint16_t* x, int64_t ldx, bool two_row_tiles, const uint16_t* wb,
                             int64_t KB, int64_t wstride, float* c) {
  _tile_zero(0);
  if (NT > 1) _tile_zero(1);
  if (two_row_tiles) {
    _tile_zero(2);
    if (NT > 1) _tile_zero(3);
  }
  for (int64_t kb = 0; kb < KB; ++kb) {
    const uint16_t* b0 = wb + kb * 512;
    for (int off = 0; off < 1024; off += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(b0) + kAmxPrefetchBytes + off, _MM_HINT_T0);
      if (NT > 1) _mm_prefetch(reinterpret_cast<const char*>(b0 + wstride) + kAmxPrefetchBytes + off, _MM_HINT_T0);
    }
    _tile_loadd(4, x + kb * 32, ldx * 2);
    _tile_loadd(6, b0, 64);
    _tile_dpbf16ps(0, 4, 6);
    if (NT > 1) {
      _tile_loadd(7, b0 + wstride, 64);
      _tile_dpbf16ps(1, 4, 7);
    }
    if (two_row_tiles) {
      _tile_loadd(5, x + 16 * ldx + kb * 32, ldx * 2);
      _tile_dpbf16ps(2, 5, 6);
      if (NT > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, 64);
  if (NT > 1) _tile_stored(1, c + 256, 64);
  if (two_row_tiles) {
    _tile_stored(2, c + 512, 64);
    if (NT > 1) _tile_stored(3, c + 768, 64);
  }
}

// fp32 tile rows (+ bias) -> bf16 (round to nearest even), the first `valid` of 16 columns.
GROUPGEN_AMX void store_rows(const float* c, int rows, const uint16_t* bias, int valid, uint16_t* y, int64_t ldy) {
  const __mmask16 m = static_cast<__mmask16>((1u << valid) - 1u);
  __m512 b = _mm512_setzero_ps();
  if (bias) b = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, bias)), 16));
  for (int r = 0; r < rows; ++r)
    _mm256_mask_storeu_epi16(y + r * ldy, m, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_loadu_ps(c + r * 16), b)));
}

#endif  // GROUPGEN_HAVE_AMX

// ------------------------------------------------------------------------------------------------
// AVX-512F path. MR rows of x (transposed to fp32 [K padded, M], ldx = M) against one block of 16
// outputs (wb: K2 rows of 64 bytes, one per k-pair). With few rows the even and odd k go to separate
// accumulators, so the FMA chain per output is half as long.
constexpr int64_t kFmaPrefetchElems = 2048;   // 4 KB ahead in the weight stream

template <int MR>
void fma_block(const float* xt, int64_t ldx, const uint16_t* wb, int64_t K2, const uint16_t* bias, int valid,
               uint16_t* y, int64_t ldy) {
  constexpr int NS = MR <= 8 ? 2 : 1;
  __m512 acc[NS][MR];
  for (int s = 0; s < NS; ++s)
    for (int i = 0; i < MR; ++i) acc[s][i] = _mm512_setzero_ps();
  const __m512i odd_mask = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t r = 0; r < K2; ++r) {
    _mm_prefetch(reinterpret_cast<const char*>(wb + r * 32 + kFmaPrefetchElems), _MM_HINT_T0);
    const __m512i w = _mm512_loadu_si512(wb + r * 32);
    const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(w, odd_mask));
    const float* x0 = xt + 2 * r * ldx;
    const float* x1 = x0 + ldx;
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      acc[0][i] = _mm512_fmadd_ps(_mm512_set1_ps(x0[i]), we, acc[0][i]);
      acc[NS - 1][i] = _mm512_fmadd_ps(_mm512_set1_ps(x1[i]), wo, acc[NS - 1][i]);
    }
  }
  const __mmask16 m = static_cast<__mmask16>((1u << valid) - 1u);
  const __m512 b = bias ? groupgen_simd::load_f32(bias, m) : _mm512_setzero_ps();
  for (int i = 0; i < MR; ++i) {
    const __m512 sum = NS == 2 ? _mm512_add_ps(acc[0][i], acc[NS - 1][i]) : acc[0][i];
    groupgen_simd::store(y + i * ldy, _mm512_add_ps(sum, b), m);
  }
}

using FmaBlock = void (*)(const float*, int64_t, const uint16_t*, int64_t, const uint16_t*, int, uint16_t*, int64_t);
constexpr FmaBlock kFmaBlocks[17] = {
    nullptr, fma_block<1>, fma_block<2>, fma_block<3>, fma_block<4>, fma_block<5>, fma_block<6>, fma_block<7>,
    fma_block<8>, fma_block<9>, fma_block<10>, fma_block<11>, fma_block<12>, fma_block<13>, fma_block<14>,
    fma_block<15>, fma_block<16>};

void linear_bf16_fma_into(const torch::Tensor& x, const torch::Tensor& wp, const uint16_t* bp, int64_t N,
                          torch::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), NB = wp.size(0), KB = wp.size(1);
  // x (contiguous bf16) -> fp32 [KB * 32, M], zero past K: one small loop instead of three torch ops
  // per call (the sub-token head makes thousands of tiny calls per generation).
  auto xt = torch::empty({KB * 32, M}, x.options().dtype(torch::kFloat32));
  float* xtp = xt.data_ptr<float>();
  const uint16_t* xs = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  for (int64_t k = 0; k < KB * 32; ++k)
    for (int64_t m = 0; m < M; ++m) {
      const uint32_t bits = k < K ? static_cast<uint32_t>(xs[m * K + k]) << 16 : 0u;
      std::memcpy(xtp + k * M + m, &bits, sizeof(bits));
    }
  const uint16_t* w = reinterpret_cast<const uint16_t*>(wp.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int64_t K2 = KB * 16;
  // Blocks per thread at least ~2M multiply-adds, as the fp32 kernel.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 21) / std::max<int64_t>(1, M * KB * 32 * 16));
  at::parallel_for(0, NB, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t nb = b0; nb < b1; ++nb) {
      const int valid = static_cast<int>(std::min<int64_t>(16, N - nb * 16));
      for (int64_t m0 = 0; m0 < M; m0 += 16) {
        const int mr = static_cast<int>(std::min<int64_t>(16, M - m0));
        kFmaBlocks[mr](xtp + m0, M, w + nb * K2 * 32, K2, bp ? bp + nb * 16 : nullptr, valid, yp + m0 * N + nb * 16, N);
      }
    }
  });
}

// The shared checks of both paths; returns the bias pointer (or null) and keeps `b` alive.
const uint16_t* check_linear_bf16(const char* name, const torch::Tensor& x, const torch::Tensor& wp,
                                  const c10::optional<torch::Tensor>& bias, int64_t N, torch::Tensor& b) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kBFloat16 && x.device().is_cpu() && x.size(0) <= 32,
              name, ": expected x [M <= 32, K] bf16 on the CPU, got ", x.sizes(), " ", x.scalar_type());
  const int64_t K = x.size(1);
  TORCH_CHECK(wp.dim() == 5 && wp.size(2) == 16 && wp.size(3) == 16 && wp.size(4) == 2 && wp.is_contiguous() &&
                  wp.scalar_type() == torch::kBFloat16 && wp.size(1) == (K + 31) / 32 &&
                  N > (wp.size(0) - 1) * 16 && N <= wp.size(0) * 16,
              name, ": packed weight ", wp.sizes(), " does not fit x ", x.sizes(), " and N=", N);
  if (!(bias.has_value() && bias->defined())) return nullptr;
  b = bias->contiguous();
  TORCH_CHECK(b.dim() == 1 && b.size(0) == N && b.scalar_type() == torch::kBFloat16,
              name, ": bias ", b.sizes(), " ", b.scalar_type(), " for N=", N);
  return reinterpret_cast<const uint16_t*>(b.data_ptr<at::BFloat16>());
}

// The AVX-512F path alone (tests compare it with the AMX path where both run).
torch::Tensor linear_bf16_fma(const torch::Tensor& x, const torch::Tensor& wp, const c10::optional<torch::Tensor>& bias,
                              int64_t N) {
  torch::Tensor b;
  const uint16_t* bp = check_linear_bf16("linear_bf16_fma", x, wp, bias, N, b);
  auto y = torch::empty({x.size(0), N}, x.options());
  if (x.size(0) > 0) linear_bf16_fma_into(x.contiguous(), wp, bp, N, y);
  return y;
}

// AMX where amx_bf16_ready(), else the AVX-512F path.
torch::Tensor linear_bf16(const torch::Tensor& x, const torch::Tensor& wp, const c10::optional<torch::Tensor>& bias,
                          int64_t N) {
  if (!amx_bf16_ready()) return linear_bf16_fma(x, wp, bias, N);
  torch::Tensor b;
  const uint16_t* bp = check_linear_bf16("linear_bf16", x, wp, bias, N, b);
  const int64_t M = x.size(0), K = x.size(1);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
#if GROUPGEN_HAVE_AMX
  const int64_t NB = wp.size(0), KB = wp.size(1);
  // Tiles read 32 columns at a time: pad K with zeros unless it is already a multiple of 32.
  const torch::Tensor xa = K % 32 == 0 ? x.contiguous()
                                       : torch::constant_pad_nd(x, {0, KB * 32 - K}, 0).contiguous();
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(xa.data_ptr<at::BFloat16>());
  const uint16_t* w = reinterpret_cast<const uint16_t*>(wp.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  const int rows0 = static_cast<int>(std::min<int64_t>(M, 16)), rows1 = static_cast<int>(std::max<int64_t>(M - 16, 0));
  const int64_t pairs = (NB + 1) / 2, ldx = KB * 32, tile_elems = 512;
  // Pairs per thread at least ~4M multiply-adds (16-row tiles): fewer do not pay for the second thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 22) / (32 * 16 * ldx));
  at::parallel_for(0, pairs, grain, [&](int64_t p0, int64_t p1) {
    configure_tiles(rows0, rows1);
    alignas(64) float c[1024];
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t nb = 2 * p;
      const int nt = nb + 1 < NB ? 2 : 1;
      const uint16_t* wb = w + nb * KB * tile_elems;
      if (nt == 2) amx_blocks<2>(xp, ldx, rows1 > 0, wb, KB, KB * tile_elems, c);
      else amx_blocks<1>(xp, ldx, rows1 > 0, wb, KB, KB * tile_elems, c);
      for (int j = 0; j < nt; ++j) {
        const int64_t n0 = (nb + j) * 16;
        const int valid = static_cast<int>(std::min<int64_t>(16, N - n0));
        store_rows(c + j * 256, rows0, bp ? bp + n0 : nullptr, valid, yp + n0, N);
        if (rows1) store_rows(c + 512 + j * 256, rows1, bp ? bp + n0 : nullptr, valid, yp + 16 * N + n0, N);
      }
    }
    release_tiles();   // leave the tile state as found: oneDNN configures its own per call
  });
#endif
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(groupgen, m) {
  m.def("amx_bf16_ready() -> bool");
  m.def("pack_bf16(Tensor w) -> Tensor");
  m.def("linear_bf16(Tensor x, Tensor wp, Tensor? bias, int n) -> Tensor");
  m.def("linear_bf16_fma(Tensor x, Tensor wp, Tensor? bias, int n) -> Tensor");
}

TORCH_LIBRARY_IMPL(groupgen, CPU, m) {
  m.impl("pack_bf16", &pack_bf16);
  m.impl("linear_bf16", &linear_bf16);
  m.impl("linear_bf16_fma", &linear_bf16_fma);
}

TORCH_LIBRARY_IMPL(groupgen, CatchAll, m) { m.impl("amx_bf16_ready", &amx_bf16_ready); }
