// Fused CPU forward and backward of LAMA pooling (low-rank multi-head context attention).
//
// Per sequence b, with token states H [T, E], token keys U [T, E] (U = H without u), context c,
// factors P, Q [E, m]:
//
//   g = P^T c [m]     k_t = Q^T u_t     a_t = tanh(g * k_t)     f_t = a_t / max(||a_t||, eps)
//   w_t = exp(f_t - 1) on real tokens (0 on padded ones)        l = sum_t w_t
//   attn_t = w_t / l  (token softmax; else attn_t = f_t, 0 on padded tokens)
//   pooled = sum_t attn_t h_t [m, E]
//
// Every score lies in [-1, 1], so the softmax's stabiliser is the fixed bound 1 and the
// normalisation by l comes last: the forward walks each sequence's tokens once, in tiles of
// kTile; a tile's rows of U and H are read once (once in all when U = H), its keys are m dot
// products per token and its pooled contribution a rank-kTile update of an [m, E] accumulator.
//
// Backward, with dA_t = dpooled h_t + dattn_t [m]:
//
//   df_t = attn_t * (dA_t - delta),  delta = sum_t attn_t dA_t = <dpooled, pooled> + sum_t attn_t dattn_t
//   da_t = (df_t - f_t <f_t, df_t>) / ||a_t||   (head_norm; df_t / eps where ||a_t|| <= eps)
//   dz_t = da_t * (1 - a_t^2)
//   dh_t = dpooled^T attn_t (+ du_t when U = H)      du_t = (g * Q) dz_t
//   dg = sum_t dz_t * k_t    W = sum_t dz_t u_t^T [m, E]
//   dQ = sum_b g_b * W_b    dP = sum_b c_b dg_b^T    dc_b = P dg_b
//
// delta comes from the forward's pooled and attn (the softmax identity), so the backward too is
// one pass over the tokens, recomputing each tile's keys; without the token softmax it needs
// neither. The [B, m, T] attn is the only T-sized array either direction touches besides the
// inputs and gradients (for half inputs the forward keeps its unnormalised weights in an fp32
// [B, m, T] buffer until every chunk's share of the softmax sum is known).
//
// A task is a chunk of one sequence's tokens (Tasks below: one chunk per sequence when the call
// has enough sequences, up to kTasks / B chunks of at least kMinChunk tokens when it has few).
// Each result element is produced by one task, or by a fixed-order sum over chunks and sequences
// (pooled, l, dg after the parallel loop, then dP, dc; W and dQ during it, in task order as the
// tasks finish), and the cut depends on B and T only, so results do not depend on the thread
// count. Every buffer whose size grows with B, T, m or E comes from torch's allocator (Scratch),
// so the profiler's peak is the true one. Arithmetic is fp32 (fp64 for fp64 inputs);
// half token rows are widened in registers as the products load them (a widened copy of a tile
// would be scratch memory beside the gradients, which the eager reference does not have), and
// every result is rounded once. With AVX512-BF16 (SYMATTN_BF16_DOT) the dot products of
// bfloat16 rows take bf16 pairs on vdpbf16ps, exact products with fp32 sums.
//
// This header is compiled once per instruction set (lama_cpu.cpp for DEFAULT, lama_cpu_avx2.cpp,
// lama_cpu_avx512.cpp, lama_cpu_avx512_bf16.cpp for bfloat16 only, and its check build
// lama_cpu_avx2_bf16_pairs.cpp), each time in its own
// CPU_CAPABILITY namespace; everything but the two entry points has internal linkage.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <numeric>
#include <thread>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(SYMATTN_BF16_DOT)
#include <immintrin.h>
#endif
#if defined(SYMATTN_BF16_PAIRS_ON_AVX2)
#include "bf16_pairs_avx2.h"
#endif

#include "in_order.h"
#include "lama_params.h"

namespace symattn::cpu {
namespace CPU_CAPABILITY {
namespace {

// Tokens per tile: the tile's rows (kTile x E) stay in L1/L2 between its keys and its pooled
// update.
constexpr int64_t kTile = 32;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The blocking of a dots product, out[k * ldo + t] = <x[t], r[k]> for t < n tokens and k < K
// rows of r: head blocks of 16 (where Kernel has 16 accumulators), 8, 4, 2 and 1, each over
// groups of Kernel::kAcc / block tokens (a short group repeats its last row), one
// Kernel::dot_block<tokens, heads> per group.
template <class Kernel>
struct HeadBlocks {
  template <int MB, typename X, typename Rr, typename Out>
  static void heads(const X* const* x, int64_t n, const Rr* r, int64_t ldr, int64_t E, Out* out, int64_t ldo) {
    constexpr int NT = Kernel::kAcc / MB;
    for (int64_t t = 0; t < n; t += NT) {
      const X* rows[NT];
      for (int i = 0; i < NT; ++i) rows[i] = x[std::min(t + i, n - 1)];
      Kernel::template dot_block<NT, MB>(rows, r, ldr, E, out + t, ldo, n - t);
    }
  }

  template <typename X, typename Rr, typename Out>
  static void dots(const X* const* x, int64_t n, const Rr* r, int64_t ldr, int64_t K, int64_t E, Out* out,
                   int64_t ldo) {
    int64_t k = 0;
    if constexpr (Kernel::kAcc >= 16) {
      for (; K - k >= 16; k += 16) heads<16>(x, n, r + k * ldr, ldr, E, out + k * ldo, ldo);
    }
    for (; K - k >= 8; k += 8) heads<8>(x, n, r + k * ldr, ldr, E, out + k * ldo, ldo);
    if (K - k >= 4) { heads<4>(x, n, r + k * ldr, ldr, E, out + k * ldo, ldo); k += 4; }
    if (K - k >= 2) { heads<2>(x, n, r + k * ldr, ldr, E, out + k * ldo, ldo); k += 2; }
    if (K - k >= 1) heads<1>(x, n, r + k * ldr, ldr, E, out + k * ldo, ldo);
  }
};

template <typename acc_t>
struct Ops {
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr int64_t kL = Vec::size();
  // Accumulator registers of a micro-kernel: 16 of AVX-512's 32, 8 of AVX2's 16.
  static constexpr int kAcc = (kL * sizeof(acc_t) >= 64) ? 16 : 8;

  // n <= kL elements of a token row as acc_t, the rest zero: bfloat16 / half rows are widened in
  // registers (exactly), so no widened copy of a tile is kept.
  template <typename R>
  static Vec load(const R* x, int64_t n = kL) {
    if constexpr (std::is_same_v<R, acc_t>) {
      return Vec::loadu(x, n);
    } else {
      Vec v;
      if (n == kL) {
        at::vec::load_to_float(x, v);
        return v;
      }
      __at_align__ acc_t tmp[kL] = {};
      for (int64_t i = 0; i < n; ++i) tmp[i] = static_cast<acc_t>(x[i]);
      return Vec::loadu(tmp);
    }
  }

  // Lane i of the result = sum of v[i]'s lanes, for kAcc vectors (AVX-512 fp32: a transpose
  // tree of 45 instructions instead of 16 horizontal sums).
  static void hsums(const Vec* v, acc_t* out) {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<acc_t, float> && kAcc == 16) {
      __m512 t[8];
      for (int i = 0; i < 8; ++i) {
        const __m512 a = v[2 * i], b = v[2 * i + 1];
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
      }
      __m512 s[4];
      for (int i = 0; i < 4; ++i) {
        const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
        s[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
      }
      const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(s[0], s[1], 0x88), _mm512_shuffle_f32x4(s[0], s[1], 0xDD));
      const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(s[2], s[3], 0x88), _mm512_shuffle_f32x4(s[2], s[3], 0xDD));
      _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, 0x88), _mm512_shuffle_f32x4(w0, w1, 0xDD)));
      return;
    }
#endif
    for (int i = 0; i < kAcc; ++i) out[i] = at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, v[i]);
  }

  // out[j * ldo + t] = <x[t], r[j * ldr + .]> over E elements, t < NT, j < MB (NT * MB = kAcc).
  template <int NT, int MB, typename R>
  static void dot_block(const R* const* x, const acc_t* r, int64_t ldr, int64_t E, acc_t* out, int64_t ldo,
                        int64_t nt) {
    static_assert(NT * MB == kAcc);
    Vec acc[kAcc];
    for (auto& a : acc) a = Vec(acc_t(0));
    int64_t e = 0;
    for (; e + kL <= E; e += kL) {
      Vec xv[NT];
      for (int t = 0; t < NT; ++t) xv[t] = load(x[t] + e);
      for (int j = 0; j < MB; ++j) {
        const Vec rv = Vec::loadu(r + j * ldr + e);
        for (int t = 0; t < NT; ++t) acc[t * MB + j] = at::vec::fmadd(xv[t], rv, acc[t * MB + j]);
      }
    }
    if (e < E) {
      const int64_t n = E - e;
      Vec xv[NT];
      for (int t = 0; t < NT; ++t) xv[t] = load(x[t] + e, n);
      for (int j = 0; j < MB; ++j) {
        const Vec rv = Vec::loadu(r + j * ldr + e, n);
        for (int t = 0; t < NT; ++t) acc[t * MB + j] = at::vec::fmadd(xv[t], rv, acc[t * MB + j]);
      }
    }
    acc_t sums[kAcc];
    hsums(acc, sums);
    for (int t = 0; t < NT && t < nt; ++t) {
      for (int j = 0; j < MB; ++j) out[j * ldo + t] = sums[t * MB + j];
    }
  }

  // out[k * ldo + t] = <x[t], r[k]> for t < n tokens, k < K rows of r (HeadBlocks).
  template <typename R>
  static void dots(const R* const* x, int64_t n, const acc_t* r, int64_t ldr, int64_t K, int64_t E, acc_t* out,
                   int64_t ldo) {
    HeadBlocks<Ops>::dots(x, n, r, ldr, K, E, out, ldo);
  }

  // a[k * lda + e] += sum_t c[k * ldc + t] x[t][e] over e in [e0, e0 + NV kL) (the last vector
  // holding `last` elements), k < KB.
  template <int KB, int NV, typename R>
  static void update_block(const R* const* x, int64_t n, const acc_t* c, int64_t ldc, acc_t* a, int64_t lda,
                           int64_t e0, int64_t last) {
    Vec acc[KB][NV];
    for (int k = 0; k < KB; ++k) {
      for (int v = 0; v < NV; ++v) acc[k][v] = Vec::loadu(a + k * lda + e0 + v * kL, v == NV - 1 ? last : kL);
    }
    for (int64_t t = 0; t < n; ++t) {
      Vec xv[NV];
      for (int v = 0; v < NV; ++v) xv[v] = load(x[t] + e0 + v * kL, v == NV - 1 ? last : kL);
      for (int k = 0; k < KB; ++k) {
        const Vec ck(c[k * ldc + t]);
        for (int v = 0; v < NV; ++v) acc[k][v] = at::vec::fmadd(ck, xv[v], acc[k][v]);
      }
    }
    for (int k = 0; k < KB; ++k) {
      for (int v = 0; v < NV; ++v) acc[k][v].store(a + k * lda + e0 + v * kL, v == NV - 1 ? last : kL);
    }
  }

  template <int KB, typename R>
  static void update_heads(const R* const* x, int64_t n, const acc_t* c, int64_t ldc, acc_t* a, int64_t lda,
                           int64_t E) {
    constexpr int NV = std::min(4, kAcc / KB);
    int64_t e = 0;
    for (; e + NV * kL <= E; e += NV * kL) update_block<KB, NV>(x, n, c, ldc, a, lda, e, kL);
    for (; e < E; e += kL) update_block<KB, 1>(x, n, c, ldc, a, lda, e, std::min(kL, E - e));
  }

  // a[k, :] += sum_t c[k * ldc + t] x[t] for k < K (a: K rows of E, row stride lda).
  template <typename R>
  static void update(const R* const* x, int64_t n, const acc_t* c, int64_t ldc, int64_t K, acc_t* a, int64_t lda,
                     int64_t E) {
    int64_t k = 0;
    for (; K - k >= 8; k += 8) update_heads<8>(x, n, c + k * ldc, ldc, a + k * lda, lda, E);
    if (K - k >= 4) { update_heads<4>(x, n, c + k * ldc, ldc, a + k * lda, lda, E); k += 4; }
    if (K - k >= 2) { update_heads<2>(x, n, c + k * ldc, ldc, a + k * lda, lda, E); k += 2; }
    if (K - k >= 1) update_heads<1>(x, n, c + k * ldc, ldc, a + k * lda, lda, E);
  }

  // y[t][e] = sum_k c[k * ldc + t] r_k[e] for TB tokens from t0, e in [e0, e0 + NV kL), where
  // the K = K1 + K2 rows r_k are r1's K1 rows and then r2's K2 rows, each scaled by s2[k] as it
  // loads (so the scaled rows need no copy); y is rounded once into Y.
  template <int TB, int NV, typename Y>
  static void combine_block(Y* const* y, int64_t t0, const acc_t* c, int64_t ldc, int64_t K1, const acc_t* r1,
                            int64_t K2, const acc_t* r2, const acc_t* s2, int64_t ldr, int64_t e0, int64_t last) {
    Vec acc[TB][NV];
    for (auto& row : acc) {
      for (auto& v : row) v = Vec(acc_t(0));
    }
    for (int64_t k = 0; k < K1 + K2; ++k) {
      const bool scaled = k >= K1;
      const acc_t* r = (scaled ? r2 + (k - K1) * ldr : r1 + k * ldr) + e0;
      Vec rv[NV];
      for (int v = 0; v < NV; ++v) rv[v] = Vec::loadu(r + v * kL, v == NV - 1 ? last : kL);
      if (scaled) {
        const Vec sk(s2[k - K1]);
        for (int v = 0; v < NV; ++v) rv[v] = sk * rv[v];
      }
      for (int t = 0; t < TB; ++t) {
        const Vec ct(c[k * ldc + t0 + t]);
        for (int v = 0; v < NV; ++v) acc[t][v] = at::vec::fmadd(ct, rv[v], acc[t][v]);
      }
    }
    for (int t = 0; t < TB; ++t) {
      if constexpr (std::is_same_v<Y, acc_t>) {
        for (int v = 0; v < NV; ++v) acc[t][v].store(y[t0 + t] + e0 + v * kL, v == NV - 1 ? last : kL);
      } else {
        __at_align__ acc_t row[NV * kL];
        for (int v = 0; v < NV; ++v) acc[t][v].store(row + v * kL);
        at::vec::convert(row, y[t0 + t] + e0, (NV - 1) * kL + last);
      }
    }
  }

  template <int TB, typename Y>
  static void combine_tokens(Y* const* y, int64_t t0, const acc_t* c, int64_t ldc, int64_t K1, const acc_t* r1,
                             int64_t K2, const acc_t* r2, const acc_t* s2, int64_t ldr, int64_t E) {
    constexpr int NV = kAcc / 4;
    int64_t e = 0;
    for (; e + NV * kL <= E; e += NV * kL) combine_block<TB, NV>(y, t0, c, ldc, K1, r1, K2, r2, s2, ldr, e, kL);
    for (; e < E; e += kL) combine_block<TB, 1>(y, t0, c, ldc, K1, r1, K2, r2, s2, ldr, e, std::min(kL, E - e));
  }

  // y[t] = sum_k c[k * ldc + t] r_k for t < n: K1 rows r1, then K2 rows s2[k] * r2 (both row
  // stride ldr, E long), written straight into the output rows y, rounded once.
  template <typename Y>
  static void combine(Y* const* y, int64_t n, const acc_t* c, int64_t ldc, int64_t K1, const acc_t* r1, int64_t K2,
                      const acc_t* r2, const acc_t* s2, int64_t ldr, int64_t E) {
    int64_t t = 0;
    for (; n - t >= 4; t += 4) combine_tokens<4>(y, t, c, ldc, K1, r1, K2, r2, s2, ldr, E);
    for (; t < n; ++t) combine_tokens<1>(y, t, c, ldc, K1, r1, K2, r2, s2, ldr, E);
  }
};

#if defined(SYMATTN_BF16_DOT)
// out[j * ldo + t] = <x[t], r[j]> for bfloat16 rows of even length E: bf16 pairs on vdpbf16ps.
struct Bf16Dots {
  static constexpr int kAcc = Ops<float>::kAcc;  // 16 (AVX-512); 8 in the check build on AVX2

  template <int NT, int MB>
  static void dot_block(const c10::BFloat16* const* x, const c10::BFloat16* r, int64_t ldr, int64_t E, float* out,
                        int64_t ldo, int64_t nt) {
#if defined(SYMATTN_BF16_PAIRS_ON_AVX2)
    // The check build (isa.h): eight pairs per register, the products as two FMAs.
    __m256 acc[kAcc];
    for (auto& a : acc) a = _mm256_setzero_ps();
    for (int64_t e = 0; e < E; e += 16) {
      __m256i xv[NT];
      for (int t = 0; t < NT; ++t) xv[t] = load_pairs(x[t] + e, (E - e) / 2);
      for (int j = 0; j < MB; ++j) {
        const __m256i rv = load_pairs(r + j * ldr + e, (E - e) / 2);
        for (int t = 0; t < NT; ++t) acc[t * MB + j] = dot_pairs(acc[t * MB + j], xv[t], rv);
      }
    }
#else
    __m512 acc[kAcc];
    for (auto& a : acc) a = _mm512_setzero_ps();
    for (int64_t e = 0; e < E; e += 32) {
      const __mmask16 lanes = static_cast<__mmask16>((1u << std::min<int64_t>(16, (E - e) / 2)) - 1u);
      __m512i xv[NT];
      for (int t = 0; t < NT; ++t) xv[t] = _mm512_maskz_loadu_epi32(lanes, x[t] + e);
      for (int j = 0; j < MB; ++j) {
        const __m512i rv = _mm512_maskz_loadu_epi32(lanes, r + j * ldr + e);
        for (int t = 0; t < NT; ++t) {
          acc[t * MB + j] = _mm512_dpbf16_ps(acc[t * MB + j], (__m512bh)xv[t], (__m512bh)rv);
        }
      }
    }
#endif
    at::vec::Vectorized<float> vacc[kAcc];
    for (int i = 0; i < kAcc; ++i) vacc[i] = acc[i];
    float sums[kAcc];
    Ops<float>::hsums(vacc, sums);
    for (int t = 0; t < NT && t < nt; ++t) {
      for (int j = 0; j < MB; ++j) out[j * ldo + t] = sums[t * MB + j];
    }
  }

  static void dots(const c10::BFloat16* const* x, int64_t n, const c10::BFloat16* r, int64_t ldr, int64_t K,
                   int64_t E, float* out, int64_t ldo) {
    HeadBlocks<Bf16Dots>::dots(x, n, r, ldr, K, E, out, ldo);
  }
};
#endif

template <typename T, typename acc_t>
void widen(const T* src, acc_t* dst, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename T, typename acc_t>
void narrow(const acc_t* src, T* dst, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t>) {
    std::memcpy(dst, src, n * sizeof(acc_t));
  } else {
    at::vec::convert(src, dst, n);
  }
}

// Zeroed working memory from torch's CPU allocator, at least one element: profilers count it (the
// bench's peak memory replays their allocation events), and it starts on a 64-byte boundary
// (c10::gAlignment), so full-width vector loads of rows at multiples of 16 elements never
// straddle a cache line. Every buffer of these kernels whose size grows with B, T, m or E is one.
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n) : bytes_(static_cast<size_t>(std::max<int64_t>(n, 1)) * sizeof(T)),
                                mem_(c10::GetCPUAllocator()->allocate(bytes_)) {
    std::memset(mem_.get(), 0, bytes_);
  }
  T* data() const { return static_cast<T*>(mem_.get()); }
  T* begin() const { return data(); }
  T* end() const { return data() + bytes_ / sizeof(T); }
  T& operator[](int64_t i) const { return data()[i]; }

 private:
  size_t bytes_;
  c10::DataPtr mem_;
};

template <typename T>
Scratch<T> scratch(int64_t n) {
  return Scratch<T>(n);
}

// One call's shared inputs in the accumulation type: Q^T, the gates, and row access.
template <typename scalar_t>
class Lama {
 public:
  using acc_t = acc_type<scalar_t>;
  using O = Ops<acc_t>;
  using Vec = typename O::Vec;
  static constexpr bool kWiden = !std::is_same_v<scalar_t, acc_t>;
#if defined(SYMATTN_BF16_DOT)
  static constexpr bool kPairs = std::is_same_v<scalar_t, c10::BFloat16>;
#else
  static constexpr bool kPairs = false;
#endif

  explicit Lama(const LamaParams& p)
      : p_(p), B_(p.batch), T_(p.seqlen), E_(p.dim), m_(p.heads), qt_(m_ * E_), qt_raw_(kPairs ? m_ * E_ : 0),
        gate_(B_ * m_) {
    const auto* q = static_cast<const scalar_t*>(p.q);
    const auto* pf = static_cast<const scalar_t*>(p.p);
    const auto* c = static_cast<const scalar_t*>(p.context);
    for (int64_t e = 0; e < E_; ++e) {
      for (int64_t j = 0; j < m_; ++j) qt_[j * E_ + e] = static_cast<acc_t>(q[e * m_ + j]);
    }
    if constexpr (kPairs) {
      for (int64_t e = 0; e < E_; ++e) {
        for (int64_t j = 0; j < m_; ++j) qt_raw_[j * E_ + e] = q[e * m_ + j];
      }
    }
    // g_b = P^T c_b, summed over e in order.
    const int64_t contexts = p.context_batched ? B_ : std::min<int64_t>(B_, 1);
    for (int64_t b = 0; b < contexts; ++b) {
      for (int64_t e = 0; e < E_; ++e) {
        const acc_t ce = static_cast<acc_t>(c[b * E_ + e]);
        for (int64_t j = 0; j < m_; ++j) gate_[b * m_ + j] += ce * static_cast<acc_t>(pf[e * m_ + j]);
      }
    }
    for (int64_t b = contexts; b < B_; ++b) std::copy_n(gate_.data(), m_, gate_.data() + b * m_);
  }

  // Pairs serve whole pairs only: with an odd E a row's last pair would reach past the row.
  bool use_pairs() const { return kPairs && E_ % 2 == 0; }

  const scalar_t* h_row(int64_t b, int64_t t) const {
    return static_cast<const scalar_t*>(p_.h.data) + b * p_.h.batch + t * p_.h.token;
  }
  const scalar_t* u_row(int64_t b, int64_t t) const {
    if (p_.u.data == nullptr) return h_row(b, t);
    return static_cast<const scalar_t*>(p_.u.data) + b * p_.u.batch + t * p_.u.token;
  }
  bool real(int64_t b, int64_t t) const { return p_.key_padding_mask == nullptr || p_.key_padding_mask[b * T_ + t]; }

  // The real tokens of [t0, t1) in sequence b into tok; returns their count.
  int64_t real_tokens(int64_t b, int64_t t0, int64_t t1, int64_t* tok) const {
    int64_t n = 0;
    for (int64_t t = t0; t < t1; ++t) {
      if (real(b, t)) tok[n++] = t;
    }
    return n;
  }

  // The tile's rows, the input's own (Ops widens half rows as it loads them).
  template <bool kKeys>
  void tile_rows(int64_t b, const int64_t* tok, int64_t n, const scalar_t** rows) const {
    for (int64_t i = 0; i < n; ++i) rows[i] = kKeys ? u_row(b, tok[i]) : h_row(b, tok[i]);
  }

  // out[k * kTile + i] = <row i, r[k]> for K rows r (r_raw: the same rows in scalar_t, for pairs).
  void dots(const scalar_t* const* rows, int64_t n, const acc_t* r, const scalar_t* r_raw, int64_t K,
            acc_t* out) const {
#if defined(SYMATTN_BF16_DOT)
    if constexpr (kPairs) {
      if (use_pairs()) return Bf16Dots::dots(rows, n, r_raw, E_, K, E_, out, kTile);
    }
#endif
    (void)r_raw;
    O::dots(rows, n, r, E_, K, E_, out, kTile);
  }

  // From keys k [m, kTile]: a = tanh(g * k), norm = max(||a||, eps) per token (1 without
  // head_norm) and f = a / norm, over the first n tokens rounded up to whole vectors.
  void activate(int64_t b, const acc_t* k, acc_t* a, acc_t* f, acc_t* norm, int64_t n) const {
    const acc_t* g = gate_.data() + b * m_;
    const int64_t nv = (n + O::kL - 1) / O::kL * O::kL;
    for (int64_t j = 0; j < m_; ++j) {
      const Vec gj(g[j]);
      for (int64_t t = 0; t < nv; t += O::kL) (gj * Vec::loadu(k + j * kTile + t)).tanh().store(a + j * kTile + t);
    }
    if (!p_.head_norm) {
      std::copy_n(a, m_ * kTile, f);
      std::fill_n(norm, kTile, acc_t(1));
      return;
    }
    const Vec eps(static_cast<acc_t>(p_.eps));
    for (int64_t t = 0; t < nv; t += O::kL) {
      Vec ss(acc_t(0));
      for (int64_t j = 0; j < m_; ++j) {
        const Vec x = Vec::loadu(a + j * kTile + t);
        ss = at::vec::fmadd(x, x, ss);
      }
      const Vec nrm = at::vec::maximum(ss.sqrt(), eps);
      nrm.store(norm + t);
      for (int64_t j = 0; j < m_; ++j) (Vec::loadu(a + j * kTile + t) / nrm).store(f + j * kTile + t);
    }
  }

  // dst[j * kTile + i] = src[j * T + tok[i]] (one sequence's [m, T] slice), widened.
  void gather(const scalar_t* src, const int64_t* tok, int64_t n, acc_t* dst) const {
    const bool run = tok[n - 1] - tok[0] == n - 1;
    for (int64_t j = 0; j < m_; ++j) {
      if (run) {
        widen(src + j * T_ + tok[0], dst + j * kTile, n);
      } else {
        for (int64_t i = 0; i < n; ++i) dst[j * kTile + i] = static_cast<acc_t>(src[j * T_ + tok[i]]);
      }
    }
  }

  const LamaParams& p_;
  const int64_t B_, T_, E_, m_;
  // Q^T [m, E], and in bfloat16 for the pair products; the tasks read them in place.
  const Scratch<acc_t> qt_;
  const Scratch<scalar_t> qt_raw_;
  const Scratch<acc_t> gate_;  // [B, m]
};

// A call's tasks: chunks of one sequence's tokens (whole tiles), as many per sequence as bring the
// call to about kTasks tasks, each at least kMinChunk tokens long. The cut depends on B and T
// only, never on the thread count; partial results of a sequence's chunks are summed in chunk
// order, so results do not depend on the thread count either.
constexpr int64_t kTasks = 32;
constexpr int64_t kMinChunk = 256;

struct Tasks {
  int64_t chunk = 1;    // tokens per chunk, a multiple of kTile
  int64_t chunks = 1;   // chunks per sequence
  int64_t n = 0;        // tasks, B * chunks
  Scratch<int64_t> order;  // task ids (b * chunks + c): most real tokens first, or in id order

  Tasks(int64_t B, int64_t T, const bool* key_padding_mask, bool longest_first = true)
      : Tasks(B, T, key_padding_mask, longest_first, chunk_length(B, T)) {}

  int64_t count() const { return n; }

 private:
  // A multiple of kTile that cuts T into about kTasks / B chunks of at least kMinChunk tokens.
  static int64_t chunk_length(int64_t B, int64_t T) {
    const int64_t want = std::max<int64_t>(1, (kTasks + B - 1) / std::max<int64_t>(B, 1));
    const int64_t chunks = std::max<int64_t>(1, std::min(want, T / kMinChunk));
    return std::max<int64_t>(kTile, ((T + chunks - 1) / chunks + kTile - 1) / kTile * kTile);
  }

  Tasks(int64_t B, int64_t T, const bool* key_padding_mask, bool longest_first, int64_t length)
      : chunk(length), chunks(std::max<int64_t>(1, (T + length - 1) / length)), n(B * chunks), order(n) {
    std::iota(order.data(), order.data() + n, int64_t{0});
    if (!longest_first) return;
    Scratch<int64_t> work(n);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t t0 = c * chunk, t1 = std::min(T, t0 + chunk);
        work[b * chunks + c] = key_padding_mask == nullptr
                                   ? t1 - t0
                                   : std::count(key_padding_mask + b * T + t0, key_padding_mask + b * T + t1, true);
      }
    }
    // Ties in task id order: the stable order, without stable_sort's heap buffer.
    std::sort(order.data(), order.data() + n,
              [&](int64_t x, int64_t y) { return work[x] != work[y] ? work[x] > work[y] : x < y; });
  }
};

// Runs worker(next) on every thread, where next() hands out the tasks of `tasks` in their order
// (-1 when none is left): a worker sets up its scratch once and takes tasks until none remain, so
// a worker slowed by other load takes fewer. Each task writes only its own results (and hands
// the backward's W to OrderedFold).
template <typename Worker>
void for_each_task(const Tasks& tasks, const Worker& worker) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(tasks.count(), at::get_num_threads()));
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      worker([&]() -> int64_t {
        const int64_t i = next.fetch_add(1);
        return i < tasks.count() ? tasks.order[i] : -1;
      });
    }
  });
}

template <typename acc_t>
acc_t sum_first(const acc_t* x, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec s(acc_t(0));
  for (int64_t t = 0; t < n; t += Vec::size()) s = s + Vec::loadu(x + t, std::min<int64_t>(Vec::size(), n - t));
  return at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, s);
}

template <typename scalar_t>
void forward(const LamaParams& p) {
  using L = Lama<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  constexpr int64_t kL = L::O::kL;
  const L lama(p);
  const int64_t T = p.seqlen, E = p.dim, m = p.heads;
  const bool shared = p.u.data == nullptr;
  const Tasks tasks(p.batch, T, p.key_padding_mask);
  // Per task: its chunk's share of pooled [m, E] and of l [m]; the unnormalised weights [B, m, T]
  // go to attn itself when it holds acc_t.
  auto part_pooled = scratch<acc_t>(tasks.count() * m * E);
  auto part_total = scratch<acc_t>(tasks.count() * m);
  auto weights_buf = scratch<acc_t>(L::kWiden ? p.batch * m * T : 0);
  acc_t* weights_all = L::kWiden ? weights_buf.data() : static_cast<acc_t*>(p.attn);
  for_each_task(tasks, [&](const auto& next) {
    auto tok = scratch<int64_t>(kTile);
    const scalar_t* hrows[kTile];  // the tile's rows: kTile pointers, whatever the shape
    const scalar_t* urows[kTile];
    auto k = scratch<acc_t>(m * kTile), a = scratch<acc_t>(m * kTile), w = scratch<acc_t>(m * kTile);
    auto norm = scratch<acc_t>(kTile);
    for (int64_t task; (task = next()) >= 0;) {
      const int64_t b = task / tasks.chunks, c = task % tasks.chunks;
      acc_t* weights = weights_all + b * m * T;
      acc_t* pooled = part_pooled.data() + task * m * E;
      acc_t* total = part_total.data() + task * m;
      for (int64_t t0 = c * tasks.chunk; t0 < std::min(T, (c + 1) * tasks.chunk); t0 += kTile) {
        const int64_t t1 = std::min(T, t0 + kTile);
        for (int64_t j = 0; j < m; ++j) std::fill(weights + j * T + t0, weights + j * T + t1, acc_t(0));
        const int64_t n = lama.real_tokens(b, t0, t1, tok.data());
        if (n == 0) continue;
        lama.template tile_rows<false>(b, tok.data(), n, hrows);
        if (shared) {
          lama.dots(hrows, n, lama.qt_.data(), lama.qt_raw_.data(), m, k.data());
        } else {
          lama.template tile_rows<true>(b, tok.data(), n, urows);
          lama.dots(urows, n, lama.qt_.data(), lama.qt_raw_.data(), m, k.data());
        }
        lama.activate(b, k.data(), a.data(), w.data(), norm.data(), n);
        if (p.token_softmax) {
          const Vec one(acc_t(1));
          for (int64_t j = 0; j < m; ++j) {
            acc_t* wj = w.data() + j * kTile;
            for (int64_t t = 0; t < n; t += kL) {
              const int64_t cnt = std::min<int64_t>(kL, n - t);
              (Vec::loadu(wj + t, cnt) - one).exp().store(wj + t, cnt);
            }
            total[j] += sum_first(wj, n);
          }
        }
        L::O::update(hrows, n, w.data(), kTile, m, pooled, E, E);
        for (int64_t j = 0; j < m; ++j) {
          for (int64_t i = 0; i < n; ++i) weights[j * T + tok[i]] = w[j * kTile + i];
        }
      }
    }
  });
  // Each task normalises its own chunk of the weights; a sequence's first chunk also sums and
  // writes its pooled rows. l and pooled are summed over the chunks in chunk order.
  for_each_task(tasks, [&](const auto& next) {
    auto l = scratch<acc_t>(m), sum = scratch<acc_t>(E);
    // Weights and pooled rows are divided by l, not multiplied by 1 / l: a sequence with one real
    // token then weighs it exactly 1 (e * (1 / e) can round to 1 - ulp), as the reference's
    // softmax does. l = 0 (no real token: every weight and pooled row is 0) leaves them 0; NaN
    // stays NaN.
    auto normalise = [&](acc_t* x, int64_t n, int64_t j) {
      if (!p.token_softmax || l[j] == acc_t(0)) return;
      for (int64_t i = 0; i < n; ++i) x[i] /= l[j];
    };
    for (int64_t task; (task = next()) >= 0;) {
      const int64_t b = task / tasks.chunks, c = task % tasks.chunks;
      const int64_t first = b * tasks.chunks;
      for (int64_t j = 0; j < m; ++j) {
        acc_t total = part_total[first * m + j];
        for (int64_t i = 1; i < tasks.chunks; ++i) total += part_total[(first + i) * m + j];
        l[j] = total;
      }
      const int64_t t0 = c * tasks.chunk, t1 = std::min(T, t0 + tasks.chunk);
      for (int64_t j = 0; j < m; ++j) {
        acc_t* wj = weights_all + (b * m + j) * T;
        normalise(wj + t0, t1 - t0, j);
        if constexpr (L::kWiden) narrow(wj + t0, static_cast<scalar_t*>(p.attn) + (b * m + j) * T + t0, t1 - t0);
      }
      if (c != 0) continue;
      for (int64_t j = 0; j < m; ++j) {
        const acc_t* part = part_pooled.data() + (first * m + j) * E;
        std::copy_n(part, E, sum.data());
        for (int64_t i = 1; i < tasks.chunks; ++i) {
          part += m * E;
          for (int64_t e = 0; e < E; ++e) sum[e] += part[e];
        }
        normalise(sum.data(), E, j);
        narrow(sum.data(), static_cast<scalar_t*>(p.pooled) + (b * m + j) * E, E);
      }
    }
  });
}

template <typename scalar_t>
void zero_rows(const Rows<void>& rows, int64_t b, int64_t t, int64_t E) {
  if (rows.data == nullptr) return;
  std::fill_n(static_cast<scalar_t*>(rows.data) + b * rows.batch + t * rows.token, E, scalar_t(0));
}

// dQ's sum over the sequences, sum_b g_b * W_b with W_b = sum_c W_bc over its chunks, folded in
// task id order (sequences, then chunks) whichever worker computed which task: a worker hands a
// task's W_bc over in one of its own slots, and whoever completes the run of tasks from the next
// unfolded one folds the run and gives the slots back. So W takes one [m, E] slot per worker
// (more only while a slower worker's task holds up the fold) instead of one per task (128 KiB
// at B = 32, m = 4, E = 256), and the sum keeps the fixed order.
template <typename acc_t>
class OrderedFold {
 public:
  OrderedFold(const Tasks& tasks, const acc_t* gate, int64_t m, int64_t E)
      : chunks_(tasks.chunks), m_(m), E_(E), gate_(gate), sum_(m * E), seq_(tasks.chunks > 1 ? m * E : 0),
        slots_(tasks.count()), order_(tasks.count()) {}

  // Task t's W, in a slot whose flag stays set until the fold has read it.
  void publish(int64_t t, const acc_t* w, std::atomic<bool>* busy) {
    slots_[t] = Slot{w, busy};
    order_.hand_in(t, [&](int64_t j) {
      fold(j, slots_[j].w);
      slots_[j].busy->store(false, std::memory_order_release);
    });
  }

  const acc_t* sum() const { return sum_.data(); }  // [m, E], complete once every task is published

 private:
  struct Slot {
    const acc_t* w;
    std::atomic<bool>* busy;
  };

  void fold(int64_t t, const acc_t* w) {
    const int64_t b = t / chunks_, c = t % chunks_, m = m_, E = E_;
    if (chunks_ > 1) {  // the sequence's chunks in order, then its W as one
      acc_t* seq = seq_.data();
      if (c == 0) {
        std::copy_n(w, m * E, seq);
      } else {
        for (int64_t x = 0; x < m * E; ++x) seq[x] += w[x];
      }
      if (c != chunks_ - 1) return;
      w = seq;
    }
    acc_t* sum = sum_.data();
    for (int64_t j = 0; j < m; ++j) {
      for (int64_t e = 0; e < E; ++e) sum[j * E + e] += gate_[b * m + j] * w[j * E + e];
    }
  }

  const int64_t chunks_, m_, E_;
  const acc_t* gate_;
  Scratch<acc_t> sum_, seq_;
  Scratch<Slot> slots_;  // per task: its W once published
  InOrder order_;
};

// dQ, dP and dc from dQ's sum over the sequences (OrderedFold) and dg [B, m], summed over
// sequences in order.
template <typename scalar_t, typename acc_t>
void factor_grads(const LamaBackwardParams& p, const acc_t* sum, const acc_t* dg) {
  const int64_t B = p.batch, E = p.dim, m = p.heads;
  if (p.dq != nullptr) {
    auto* dq = static_cast<scalar_t*>(p.dq);
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t j = 0; j < m; ++j) dq[e * m + j] = static_cast<scalar_t>(sum[j * E + e]);
    }
  }
  const auto* ctx = static_cast<const scalar_t*>(p.context);
  if (p.dp != nullptr) {
    auto* dp = static_cast<scalar_t*>(p.dp);
    for (int64_t e = 0; e < E; ++e) {
      for (int64_t j = 0; j < m; ++j) {
        acc_t s = 0;
        for (int64_t b = 0; b < B; ++b) s += static_cast<acc_t>(ctx[(p.context_batched ? b : 0) * E + e]) * dg[b * m + j];
        dp[e * m + j] = static_cast<scalar_t>(s);
      }
    }
  }
  if (p.dcontext != nullptr) {
    const auto* pf = static_cast<const scalar_t*>(p.p);
    auto* dc = static_cast<scalar_t*>(p.dcontext);
    auto dg_sum = scratch<acc_t>(m);
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < m; ++j) dg_sum[j] += dg[b * m + j];
    }
    for (int64_t b = 0; b < (p.context_batched ? B : 1); ++b) {
      const acc_t* dgb = p.context_batched ? dg + b * m : dg_sum.data();
      for (int64_t e = 0; e < E; ++e) {
        acc_t s = 0;
        for (int64_t j = 0; j < m; ++j) s += static_cast<acc_t>(pf[e * m + j]) * dgb[j];
        dc[b * E + e] = static_cast<scalar_t>(s);
      }
    }
  }
}

template <typename scalar_t>
void backward(const LamaBackwardParams& p) {
  using L = Lama<scalar_t>;
  using acc_t = typename L::acc_t;
  using Vec = typename L::Vec;
  constexpr int64_t kL = L::O::kL;
  const L lama(p);
  const int64_t B = p.batch, T = p.seqlen, E = p.dim, m = p.heads;
  const bool shared = p.u.data == nullptr;  // the keys are h: one row serves keys, dA and dh
  const bool want_w = p.dq != nullptr;
  // In id order: W is folded in that order, and a task handed out later than the next tasks
  // would hold up their fold (and keep its workers' slots).
  const Tasks tasks(B, T, p.key_padding_mask, false);
  OrderedFold<acc_t> fold(tasks, lama.gate_.data(), want_w ? m : 0, E);
  // Per task: its chunk's share of dg [m], summed over a sequence's chunks in order.
  auto dg_all = scratch<acc_t>(tasks.count() * m);
  const auto* attn_in = static_cast<const scalar_t*>(p.attn);
  const auto* dattn = static_cast<const scalar_t*>(p.dattn);
  for_each_task(tasks, [&](const auto& next) {
    auto tok = scratch<int64_t>(kTile);
    const scalar_t* hrows[kTile];  // the tile's rows: kTile pointers, whatever the shape
    const scalar_t* urows[kTile];
    scalar_t* out_rows[kTile];
    // Half dpooled rows widened once per task (the dA products would otherwise widen each row
    // again for every token); fp32 ones are read in place. The rows of g * Q^T are Q^T's, scaled
    // by g as the combine loads them: no copy.
    auto dpooled_wide = scratch<acc_t>(L::kWiden ? m * E : 0);
    auto kd = scratch<acc_t>(2 * m * kTile);  // [keys; dA]
    auto a = scratch<acc_t>(m * kTile), f = scratch<acc_t>(m * kTile), norm = scratch<acc_t>(kTile);
    auto coef = scratch<acc_t>(2 * m * kTile);  // [attn; dz]
    // The task's W [m, E], in a slot of this worker's until its fold has read it: the first free
    // one, or a new one while all wait for a slower worker's task (so no worker waits for
    // another, and one thread needs one slot). The deque keeps the slots in place and holds only
    // their handles; the buffers are Scratch.
    struct Slot {
      explicit Slot(int64_t n) : w(n) {}
      Scratch<acc_t> w;
      std::atomic<bool> busy{false};
    };
    std::deque<Slot> slots;
    if (want_w) slots.emplace_back(m * E);
    auto delta = scratch<acc_t>(m);
    const acc_t* qt = lama.qt_.data();
    const scalar_t* qt_raw = lama.qt_raw_.data();
    for (int64_t task; (task = next()) >= 0;) {
      const int64_t b = task / tasks.chunks, c = task % tasks.chunks;
      const acc_t* g = lama.gate_.data() + b * m;
      const scalar_t* dpooled_in = static_cast<const scalar_t*>(p.dpooled) + b * m * E;
      const acc_t* dpooled = nullptr;
      if constexpr (L::kWiden) {
        widen(dpooled_in, dpooled_wide.data(), m * E);
        dpooled = dpooled_wide.data();
      } else {
        dpooled = dpooled_in;
      }
      if (p.token_softmax) {  // delta = <dpooled, pooled> + sum_t attn_t dattn_t over the real tokens
        const scalar_t* pooled = static_cast<const scalar_t*>(p.pooled) + b * m * E;
        for (int64_t j = 0; j < m; ++j) {
          acc_t s = 0;
          for (int64_t e = 0; e < E; ++e) s += dpooled[j * E + e] * static_cast<acc_t>(pooled[j * E + e]);
          if (dattn != nullptr) {
            const scalar_t* aj = attn_in + (b * m + j) * T;
            const scalar_t* dj = dattn + (b * m + j) * T;
            for (int64_t t = 0; t < T; ++t) {
              if (lama.real(b, t)) s += static_cast<acc_t>(aj[t]) * static_cast<acc_t>(dj[t]);
            }
          }
          delta[j] = s;
        }
      }
      Slot* slot = nullptr;
      while (want_w && slot == nullptr) {
        for (auto& s : slots) {
          if (!s.busy.load(std::memory_order_acquire)) {
            slot = &s;
            break;
          }
        }
        if (slot != nullptr) break;
        try {
          slot = &slots.emplace_back(m * E);
        } catch (...) {  // out of memory: wait for a fold instead (a throw would strand the others)
          std::this_thread::yield();
        }
      }
      acc_t* w = want_w ? slot->w.data() : nullptr;
      if (want_w) std::fill_n(w, m * E, acc_t(0));
      acc_t* dg = dg_all.data() + task * m;
      for (int64_t t0 = c * tasks.chunk; t0 < std::min(T, (c + 1) * tasks.chunk); t0 += kTile) {
        const int64_t t1 = std::min(T, t0 + kTile);
        const int64_t n = lama.real_tokens(b, t0, t1, tok.data());
        for (int64_t t = t0; t < t1; ++t) {
          if (!lama.real(b, t)) {
            zero_rows<scalar_t>(p.dh, b, t, E);
            zero_rows<scalar_t>(p.du, b, t, E);
          }
        }
        if (n == 0) continue;
        lama.template tile_rows<false>(b, tok.data(), n, hrows);
        const scalar_t* const* krows = hrows;
        if (!shared) {
          lama.template tile_rows<true>(b, tok.data(), n, urows);
          krows = urows;
        }
        lama.dots(krows, n, qt, qt_raw, m, kd.data());
        lama.dots(hrows, n, dpooled, dpooled_in, m, kd.data() + m * kTile);
        const acc_t* keys = kd.data();
        acc_t* dfeat = kd.data() + m * kTile;  // dA, then df
        if (dattn != nullptr) {
          lama.gather(dattn + b * m * T, tok.data(), n, coef.data());
          for (int64_t j = 0; j < m; ++j) {
            for (int64_t i = 0; i < n; ++i) dfeat[j * kTile + i] += coef[j * kTile + i];
          }
        }
        lama.activate(b, keys, a.data(), f.data(), norm.data(), n);
        acc_t* att = coef.data();
        acc_t* dz = coef.data() + m * kTile;
        const int64_t nv = (n + kL - 1) / kL * kL;
        if (p.token_softmax) {
          lama.gather(attn_in + b * m * T, tok.data(), n, att);
          for (int64_t j = 0; j < m; ++j) {
            const Vec dj(delta[j]);
            for (int64_t t = 0; t < nv; t += kL) {
              const int64_t o = j * kTile + t;
              (Vec::loadu(att + o) * (Vec::loadu(dfeat + o) - dj)).store(dfeat + o);
            }
          }
        } else {
          std::copy_n(f.data(), m * kTile, att);
        }
        const Vec eps(static_cast<acc_t>(p.eps)), one(acc_t(1)), zero(acc_t(0));
        for (int64_t t = 0; t < nv; t += kL) {
          // F.normalize's clamp: where ||a|| <= eps the norm is the constant eps, no radial term.
          Vec radial = zero;
          const Vec nrm = Vec::loadu(norm.data() + t);
          if (p.head_norm) {
            for (int64_t j = 0; j < m; ++j) {
              radial = at::vec::fmadd(Vec::loadu(f.data() + j * kTile + t), Vec::loadu(dfeat + j * kTile + t), radial);
            }
            radial = Vec::blendv(radial, zero, nrm <= eps);
          }
          for (int64_t j = 0; j < m; ++j) {
            const int64_t o = j * kTile + t;
            const Vec act = Vec::loadu(a.data() + o);
            const Vec da = (Vec::loadu(dfeat + o) - Vec::loadu(f.data() + o) * radial) / nrm;
            (da * (one - act * act)).store(dz + o);
          }
        }
        for (int64_t j = 0; j < m; ++j) {
          Vec s = zero;
          for (int64_t t = 0; t < n; t += kL) {
            const int64_t cnt = std::min<int64_t>(kL, n - t);
            s = at::vec::fmadd(Vec::loadu(dz + j * kTile + t, cnt), Vec::loadu(keys + j * kTile + t, cnt), s);
          }
          dg[j] += at::vec::vec_reduce_all<acc_t>([](Vec& x, Vec& y) { return x + y; }, s);
        }
        if (want_w) L::O::update(krows, n, dz, kTile, m, w, E, E);
        // The tile's gradient rows, straight into the output: dh_t = dpooled^T attn_t (+ (g Q^T)^T dz_t
        // when U = H; the coefficient rows [attn; dz] are consecutive), du_t = (g Q^T)^T dz_t.
        auto write_rows = [&](const Rows<void>& out, const acc_t* c, int64_t K1, int64_t K2) {
          for (int64_t i = 0; i < n; ++i) {
            out_rows[i] = static_cast<scalar_t*>(out.data) + b * out.batch + tok[i] * out.token;
          }
          L::O::combine(out_rows, n, c, kTile, K1, dpooled, K2, qt, g, E, E);
        };
        if (p.dh.data != nullptr) write_rows(p.dh, coef.data(), m, shared ? m : 0);
        if (p.du.data != nullptr) write_rows(p.du, dz, 0, m);
      }
      if (want_w) {
        slot->busy.store(true, std::memory_order_relaxed);
        fold.publish(task, w, &slot->busy);
      }
    }
    for (auto& s : slots) {  // the slots outlive their folds
      while (s.busy.load(std::memory_order_acquire)) std::this_thread::yield();
    }
  });
  // A sequence's chunks summed in chunk order into its first chunk's slot, then [B, m].
  if (tasks.chunks > 1) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t first = b * tasks.chunks;
      for (int64_t i = 1; i < tasks.chunks; ++i) {
        for (int64_t j = 0; j < m; ++j) dg_all[first * m + j] += dg_all[(first + i) * m + j];
      }
      if (b == 0) continue;  // slot b < first, and every sequence before b has been summed already
      std::copy_n(dg_all.data() + first * m, m, dg_all.data() + b * m);
    }
  }
  factor_grads<scalar_t>(p, fold.sum(), dg_all.data());
}

}  // namespace

#if SYMATTN_ISA_LEVEL == 3 || defined(SYMATTN_BF16_PAIRS_ON_AVX2)
// The AVX512-BF16 build serves bfloat16 only (the other dtypes gain nothing from it), as does
// its check build on AVX2.
void lama_forward(const LamaParams& p) { forward<c10::BFloat16>(p); }
void lama_backward(const LamaBackwardParams& p) { backward<c10::BFloat16>(p); }
#else
void lama_forward(const LamaParams& p) {
  switch (p.dtype) {
    case LamaDType::kFloat32: return forward<float>(p);
    case LamaDType::kFloat64: return forward<double>(p);
    case LamaDType::kBFloat16: return forward<c10::BFloat16>(p);
    case LamaDType::kFloat16: return forward<c10::Half>(p);
  }
}

void lama_backward(const LamaBackwardParams& p) {
  switch (p.dtype) {
    case LamaDType::kFloat32: return backward<float>(p);
    case LamaDType::kFloat64: return backward<double>(p);
    case LamaDType::kBFloat16: return backward<c10::BFloat16>(p);
    case LamaDType::kFloat16: return backward<c10::Half>(p);
  }
}
#endif

}  // namespace CPU_CAPABILITY
}  // namespace symattn::cpu
