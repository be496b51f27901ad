// Fused CPU forward and backward of symmetric / shared-weight attention.
//
// Per sequence b and head h, with Y = q[b, :, h] ([L, D]) and M = I | diag(c_h) | C_h:
//
//   Qm = Y M                        S = scale Qm Y^T (+ mask)  P = softmax_rows(S)
//   out = dropout(P) V              lse = logsumexp_rows(S)    V = Y (shared) or v[b, :, h]
//   G  = P * (dP - delta),  dP = dout V^T * keep * keep_scale, delta = rowsum(P * dP) - dlse
//   dY = scale (G Y M^T + G^T Qm)  (+ Pd^T dout when V = Y)    dV = Pd^T dout
//   dM = scale Y^T G Y             (its diagonal for a diagonal M)
//
// A task reads its (b, h)'s Y once into operand panels (Y^T for the score products, Qm for the
// query side; in shared mode the same panels serve as keys and values) and walks query rows in
// blocks. A forward task owns a fixed slice of a head's query rows (a whole head up to a few
// hundred tokens), so one long head runs on many cores. Heads up to kWholeHead tokens keep whole
// score rows [block, L] in cache; longer ones run flash-style: a query block meets the keys one
// tile at a time (dropout drawn per tile), its row max and sum updated online and its output
// block rescaled, so the working set stays in L2 at any length. Where their scores are
// symmetric, the forward is mirrored instead: a task owns a pair of row groups of the head and
// multiplies each score tile between them once, for the rows of both groups (one read across,
// one down its columns); each group's running states from its tasks are merged in task order
// (run_mirrored, plan_mirrored; not on AMX tiles, where that merge and the per-task packing cost
// what the products save, see kMirrorTile). Their backward, wherever M is symmetric (none or
// diagonal; any dtype, causal or not, with or without dropout), cuts a head into row blocks and
// computes each score tile S_IJ (I >= J) once, in one task that takes both of its roles: S_JI =
// S_IJ^T, so the tile gives the gradients of rows I and of rows J (pair_tile). Such a task writes
// two blocks' accumulators, so the tasks run in rounds in which no block meets two of them
// (tiled_backward), and every block takes its tiles in round order. Other backward tasks (a full
// M) own a whole head, or, when a call has few heads, a slice of a long head's query rows; they
// accumulate their gradients in fp32 buffers, and a head's slices are summed in slice order
// afterwards.
// Results are independent of the thread count: the tasks are cut without regard to it, and each
// output element is produced by one task, or one fixed-order sum of tasks. The tasks are dealt
// to the workers before any runs (for_each_head, tiled_backward).
//
// For heads of at most kWholeHead tokens, non-causal, with M symmetric (none / diagonal) and
// at most a quarter of trailing padded keys, the score matrix is symmetric: only its lower tile
// triangle is multiplied, and the backward's two Y-gradient products G (Y M) + G^T (Y M) collapse
// into one (G + G^T) Y M. That is 1.5 instead of 2 L^2 D products forward, 3.5 instead of 5
// backward; the mirrored forward of longer heads does the same 1.5. The backward, and the forward
// on bf16 operands or with dropout, mirror the lower triangle into the upper one (transposed
// copies); the fp32 forward without dropout reads a row's keys beyond its diagonal tile down the
// stored tiles' columns instead, and feeds those probabilities to P V as P^T (run_symmetric).
// Other heads take query blocks against keys up to the last real one, with causal blocks (and
// the diagonal tiles of causal heads) trimmed at micro-tile granularity.
//
// Every product is a register-tiled micro-kernel on at::vec (no BLAS call inside the parallel
// region, so nothing depends on a BLAS library's threading), accumulating in fp32. Its operand
// format is a template parameter (FloatDot, Bf16Dot below): fp32 operands with one FMA per
// element, or, for bfloat16 inputs where the CPU has AVX512-BF16, bf16 pairs on vdpbf16ps with
// P and G rounded to bf16 as flash-attn does on GPUs. fp16 inputs are widened to fp32. Where the
// CPU has AMX-BF16, the AVX512_AMX build runs the same bf16 products on AMX tiles (amx_gemm.h).
//
// This header is compiled once per instruction set (attention_cpu.cpp for DEFAULT,
// attention_cpu_avx2.cpp, attention_cpu_avx512.cpp, and attention_cpu_avx512_bf16.cpp and
// attention_cpu_avx512_amx.cpp for bfloat16 only), each time in its own CPU_CAPABILITY
// namespace; everything but the two entry points has internal linkage.
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
#include <limits>
#include <memory>
#include <numeric>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(SYMATTN_BF16_DOT)
#include <immintrin.h>
#endif
#if defined(SYMATTN_AMX_DOT)
#include "amx_gemm.h"
#endif

#include "attention_params.h"
#include "philox_vec.h"

namespace symattn::cpu {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
#if !defined(SYMATTN_AMX_DOT)
// A task's products hold no tile state where they don't run on AMX tiles (see amx_gemm.h).
struct AmxTileScope {
  AmxTileScope() {}  // user-provided: a scope object is not an unused variable
};
#endif
// Micro-tile: kMR rows x kNV vectors. AVX-512: 6 x 64 keeps 24 of 32 registers as accumulators;
// AVX2: 6 x 16 keeps 12 of 16. kMR is even so that query blocks start on a bf16 pair.
constexpr int kMR = 6;
constexpr int kNV = kVec >= 16 ? 4 : 2;
constexpr int64_t kNR = kNV * kVec;
static_assert(kMR % 2 == 0, "query blocks must start on an even row");
// Words of k per pass of a product (see gemm): [kDepth, kNR] of B fills 32 KiB, within L1.
constexpr int64_t kDepth = 128;
// Heads up to this length keep their whole fp32 score matrix (1 MiB) in one task.
constexpr int64_t kWholeHead = 512;
// Longer heads take query blocks of about kBlockFloats score floats, in whole steps of
// kBlockRowStep rows: the micro-tile height, or the 32 rows of an AMX block where the products run
// on tiles (a 6-row multiple leaves tiles part empty, and the backward's key-side products take
// the block's rows as k, 32 to a tile). On AMX tiles the symmetric schedule
// (see the file comment) is off: the products it halves cost less than the transposes it adds
// (the mirrored forward of longer heads is off there too, see kMirrorTile); so short heads take
// query blocks too, and smaller ones, whose score passes stay in L2.
#if defined(SYMATTN_AMX_DOT)
constexpr int64_t kBlockFloats = int64_t{1} << 15;
constexpr int64_t kBlockRowStep = 32;
constexpr bool kSymmetricSchedule = false;
#else
constexpr int64_t kBlockFloats = int64_t{1} << 17;
constexpr int64_t kBlockRowStep = kMR;
constexpr bool kSymmetricSchedule = true;
#endif
// A forward task owns at least this many query rows of a longer head (whole query blocks): enough
// rows that repacking the head's keys per task costs little, few enough that one head of a few
// thousand tokens feeds a dozen or more cores.
constexpr int64_t kTaskRows = 128;
// Tiled heads of more than kTaskRows * kTasksPerHead tokens take proportionally longer tasks (up
// to kMaxTaskRows rows), so that the L·D keys each task repacks stay a small share of its
// 4·rows·L·D multiply-adds while a head still feeds kTasksPerHead cores.
constexpr int64_t kTasksPerHead = 32;
constexpr int64_t kMaxTaskRows = 512;
#if defined(SYMATTN_AMX_DOT)
constexpr int64_t kForwardTasks = 64;
#endif
// The backward cuts long heads into slices until a call has about this many tasks.
constexpr int64_t kBackwardTasks = 32;
// The forward of long causal heads takes slices of whole query blocks, as few as give the call
// about this many tasks (whole blocks when it has fewer heads): each task packs the keys up to
// its last row once for all its blocks, so longer slices pack fewer keys over the head.
constexpr int64_t kCausalTasks = 64;
// Square tile of the symmetric score product and of its mirror.
constexpr int64_t kSymTile = 64;
// Longer heads run the forward flash-style: query blocks of kQueryTile rows
// against key tiles of kKeyTile keys, the row max and sum updated online, so that a task's
// scores, output block and current key/value tile stay in a core's L2 at any length.
constexpr int64_t kQueryTile = 128;
constexpr int64_t kKeyTile = 256;
// Where their scores are symmetric (M none or diagonal, not causal; not on AMX tiles) the
// forward is mirrored: a head is cut into groups of whole kQueryTile blocks, walked in square
// score tiles of up to kMirrorTile, and a task takes one pair of groups, so each off-diagonal
// score tile is multiplied once for both of its query blocks (see run_mirrored). With dropout,
// the tile read down its columns takes its queries' masks drawn by query and bit-transposed.
// The head takes as many groups (at most kMirrorGroups) as make about kMirrorTasks tasks in the
// call; each group's running states (kept per task until they are merged) cost
// groups * L * (Dv + 2) floats per head, and a call whose states would pass kMirrorStateBytes
// runs unmirrored. On AMX tiles it does not pay: there the products are about half the forward's
// time, and merging those states and packing per task cost as much as the quarter of them the
// mirror saves, even with the column side's product taken transposed (O_J^T += V_I^T P_IJ, the
// probabilities the B operand as computed down the tile), which needs no transpose of them.
constexpr int64_t kMirrorTile = 256;
constexpr int64_t kMirrorGroups = 8;
constexpr int64_t kMirrorTasks = 32;
constexpr int64_t kMirrorStateBytes = int64_t{128} << 20;
// The tiled backward cuts a head into blocks of kPairTile rows, or of kPairTileMin rows for heads
// under kPairBlocks * kPairTile tokens: a round of tiles (see tiled_backward) then still holds
// kPairBlocks / 2 tasks per head. Block sizes depend on the length alone, never on threads.
constexpr int64_t kPairTile = 128;
constexpr int64_t kPairTileMin = 64;
constexpr int64_t kPairBlocks = 16;
constexpr int64_t kUnbounded = std::numeric_limits<int64_t>::max() / 4;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Operand formats of the products. A product C[m, n] (=|+=) alpha * op(A)[m, k] * B[k, n] reads
// arrays of Words, each holding kPack consecutive k elements (k counts elements; an odd k is
// padded with a zero element):
//   A: op(A)(i, kk) in word a[i * lda + kk / kPack], or a[(kk / kPack) * lda + i] when kTransA;
//   B: B(kk, j) in word b[(kk / kPack) * ldb + j].
// So a panel in "A rows" form is the matrix row-major, and in "B rows" form (also the kTransA
// form of A) it is pairs of its rows interleaved (the VNNI layout). For fp32 both are the plain
// row-major matrix, so fp32 inputs need no copies.

// One fp32 element per word, one FMA per element.
struct FloatDot {
  using Word = float;
  using Reg = Vec;
  static constexpr int64_t kPack = 1;
  static Vec load(const float* p) { return Vec::loadu(p); }
  static Vec load(const float* p, int64_t count) { return Vec::loadu(p, count); }
  static Vec broadcast(const float* p) { return Vec(*p); }
  static Vec fma(const Vec& a, const Vec& b, const Vec& acc) { return at::vec::fmadd(a, b, acc); }
};

// Elements of an A row written from fp32 lanes: [j, j + count) <- x, and zeros over [j0, j1)
// (the bf16 overloads below also zero the pad element of an odd j1).
void store_elems(float* row, int64_t j, const Vec& x, int64_t count) { x.store(row + j, count); }
void zero_elems(float* row, int64_t j0, int64_t j1) { std::fill(row + j0, row + std::max(j0, j1), 0.f); }

#if defined(SYMATTN_BF16_DOT)
// A pair of bf16 per word (the even k in the low half); vdpbf16ps adds both exact products to
// the fp32 accumulator: twice the multiply rate of FloatDot on half the operand bytes.
struct Bf16Dot {
  using Word = uint32_t;
  using Reg = __m512i;
  static constexpr int64_t kPack = 2;
  static __mmask16 lanes(int64_t count) {
    return static_cast<__mmask16>((1u << std::clamp<int64_t>(count, 0, 16)) - 1u);
  }
  static __m512i load(const uint32_t* p) { return _mm512_loadu_si512(p); }
  static __m512i load(const uint32_t* p, int64_t count) { return _mm512_maskz_loadu_epi32(lanes(count), p); }
  static __m512i broadcast(const uint32_t* p) {
    uint32_t word;
    std::memcpy(&word, p, sizeof(word));
    return _mm512_set1_epi32(static_cast<int>(word));
  }
  static Vec fma(const __m512i& a, const __m512i& b, const Vec& acc) {
    return Vec(_mm512_dpbf16_ps(static_cast<__m512>(acc), (__m512bh)a, (__m512bh)b));
  }
};

// Sixteen elements from p as bf16 bits, zero from count on (fp32 rounds to nearest even).
// (Masked loads only for tails: unmasked ones overlap their cache misses better.)
template <typename T>
__m256i bf16x16(const T* p, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    const __m512 x = count >= 16 ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(Bf16Dot::lanes(count), p);
    return (__m256i)_mm512_cvtneps_pbh(x);
  } else {
    static_assert(std::is_same_v<T, c10::BFloat16>);
    return count >= 16 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                       : _mm256_maskz_loadu_epi16(Bf16Dot::lanes(count), p);
  }
}

// Stores the bf16 bits of x to dst[0, count).
inline void store_bf16x16(uint16_t* dst, const Vec& x, int64_t count) {
  const __m256i bits = (__m256i)_mm512_cvtneps_pbh(x);
  if (count >= 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), bits);
  } else {
    _mm256_mask_storeu_epi16(dst, Bf16Dot::lanes(count), bits);
  }
}

void store_elems(uint32_t* row, int64_t j, const Vec& x, int64_t count) {
  store_bf16x16(reinterpret_cast<uint16_t*>(row) + j, x, count);
}
void zero_elems(uint32_t* row, int64_t j0, int64_t j1) {
  auto* elems = reinterpret_cast<uint16_t*>(row);
  std::fill(elems + j0, elems + std::max(j0, round_up(j1, 2)), uint16_t{0});
}

// "A rows": dst [m, round_up(k, 2)] bf16 (row stride 2 ldd_words) <- src [m, k] (row stride ld).
template <typename T>
void pack_bf16_rows(const T* src, int64_t ld, int64_t m, int64_t k, uint32_t* dst, int64_t ldd_words) {
  auto* out = reinterpret_cast<uint16_t*>(dst);
  for (int64_t i = 0; i < m; ++i) {
    uint16_t* row = out + i * 2 * ldd_words;
    const T* in = src + i * ld;
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t j = 0; j < k; j += 16) {
        store_bf16x16(row + j, Vec::loadu(in + j, std::min<int64_t>(16, k - j)), k - j);
      }
    } else {
      std::memcpy(row, in, k * sizeof(uint16_t));
    }
    if (k % 2 != 0) row[k] = 0;
  }
}

// "B rows": dst [ceil(m / 2), n] words (row stride ldd) <- rows 2t and 2t + 1 of src [m, n].
template <typename T>
void pack_bf16_pairs(const T* src, int64_t ld, int64_t m, int64_t n, uint32_t* dst, int64_t ldd) {
  alignas(64) static constexpr uint16_t kInterleave[32] = {
      0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
      8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i index = _mm512_load_si512(kInterleave);
  for (int64_t t = 0; 2 * t < m; ++t) {
    const T* even = src + 2 * t * ld;
    const bool has_odd = 2 * t + 1 < m;
    for (int64_t j = 0; j < n; j += 16) {
      const __m256i lo = bf16x16(even + j, n - j);
      const __m256i hi = has_odd ? bf16x16(even + ld + j, n - j) : _mm256_setzero_si256();
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
      _mm512_mask_storeu_epi32(dst + t * ldd + j, Bf16Dot::lanes(n - j), _mm512_permutexvar_epi16(index, both));
    }
  }
}
#endif

// The operand format for inputs of type scalar_t in this build.
template <typename scalar_t>
#if defined(SYMATTN_BF16_DOT)
using DotFor = std::conditional_t<std::is_same_v<scalar_t, c10::BFloat16>, Bf16Dot, FloatDot>;
#else
using DotFor = FloatDot;
#endif

// A product operand in its Dot's word format.
template <typename Word>
struct Operand {
  const Word* data = nullptr;
  int64_t ld = 0;
};

// Band describes what a causal mask makes zero or unneeded, per output row i: op(A)(i, kk) is
// zero outside [i + k_lo, i + k_hi], and C(i, j) is not needed for j > i + n_hi. The driver
// trims the k range of each micro row block and skips micro-tiles, at micro-tile granularity.
struct Band {
  int64_t k_lo = -kUnbounded;
  int64_t k_hi = kUnbounded;
  int64_t n_hi = kUnbounded;
};

// Fully unrolled loops over the micro-tile's registers: GCC keeps the accumulator array in
// registers only when it unrolls them before scalar replacement, else it spills the array to the
// stack around the k loop.
#if defined(__GNUC__)
#define SYMATTN_UNROLL _Pragma("GCC unroll 8")
#else
#define SYMATTN_UNROLL
#endif

template <typename Dot, int MR, int NV, bool kTransA, bool kTail>
inline void micro_kernel(int64_t k0, int64_t k1, const typename Dot::Word* a, int64_t lda,
                         const typename Dot::Word* b, int64_t ldb, float* c, int64_t ldc, int64_t tail, float alpha,
                         bool accumulate) {
  Vec acc[MR][NV];
  SYMATTN_UNROLL for (int r = 0; r < MR; ++r) {
    SYMATTN_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = Vec(0.f);
  }
  for (int64_t k = k0; k < k1; ++k) {
    const typename Dot::Word* brow = b + k * ldb;
    typename Dot::Reg bv[NV];
    SYMATTN_UNROLL for (int v = 0; v < NV; ++v) {
      bv[v] = (kTail && v == NV - 1) ? Dot::load(brow + v * kVec, tail) : Dot::load(brow + v * kVec);
    }
    SYMATTN_UNROLL for (int r = 0; r < MR; ++r) {
      const typename Dot::Reg av = Dot::broadcast(kTransA ? a + k * lda + r : a + r * lda + k);
      SYMATTN_UNROLL for (int v = 0; v < NV; ++v) acc[r][v] = Dot::fma(av, bv[v], acc[r][v]);
    }
  }
  const Vec valpha(alpha);
  SYMATTN_UNROLL for (int r = 0; r < MR; ++r) {
    float* crow = c + r * ldc;
    SYMATTN_UNROLL for (int v = 0; v < NV; ++v) {
      const int64_t count = (kTail && v == NV - 1) ? tail : kVec;
      Vec result = acc[r][v] * valpha;
      if (accumulate) result = result + Vec::loadu(crow + v * kVec, count);
      result.store(crow + v * kVec, count);
    }
  }
}

template <typename Dot, int MR, bool kTransA>
void micro_cols(int64_t cols, int64_t k0, int64_t k1, const typename Dot::Word* a, int64_t lda,
                const typename Dot::Word* b, int64_t ldb, float* c, int64_t ldc, float alpha, bool accumulate) {
  if (cols == kNR) {
    micro_kernel<Dot, MR, kNV, kTransA, false>(k0, k1, a, lda, b, ldb, c, ldc, kVec, alpha, accumulate);
    return;
  }
  const int64_t nv = (cols + kVec - 1) / kVec;
  const int64_t tail = cols - (nv - 1) * kVec;
  switch (nv) {
    case 1:
      micro_kernel<Dot, MR, 1, kTransA, true>(k0, k1, a, lda, b, ldb, c, ldc, tail, alpha, accumulate);
      break;
    case 2:
      micro_kernel<Dot, MR, 2, kTransA, true>(k0, k1, a, lda, b, ldb, c, ldc, tail, alpha, accumulate);
      break;
    case 3:
      if constexpr (kNV >= 3) {
        micro_kernel<Dot, MR, 3, kTransA, true>(k0, k1, a, lda, b, ldb, c, ldc, tail, alpha, accumulate);
      }
      break;
    default:
      if constexpr (kNV >= 4) {
        micro_kernel<Dot, MR, 4, kTransA, true>(k0, k1, a, lda, b, ldb, c, ldc, tail, alpha, accumulate);
      }
      break;
  }
}

template <typename Dot, bool kTransA>
void micro_tile(int64_t rows, int64_t cols, int64_t k0, int64_t k1, const typename Dot::Word* a, int64_t lda,
                const typename Dot::Word* b, int64_t ldb, float* c, int64_t ldc, float alpha, bool accumulate) {
  switch (rows) {
    case 1: micro_cols<Dot, 1, kTransA>(cols, k0, k1, a, lda, b, ldb, c, ldc, alpha, accumulate); break;
    case 2: micro_cols<Dot, 2, kTransA>(cols, k0, k1, a, lda, b, ldb, c, ldc, alpha, accumulate); break;
    case 3: micro_cols<Dot, 3, kTransA>(cols, k0, k1, a, lda, b, ldb, c, ldc, alpha, accumulate); break;
    case 4: micro_cols<Dot, 4, kTransA>(cols, k0, k1, a, lda, b, ldb, c, ldc, alpha, accumulate); break;
    case 5: micro_cols<Dot, 5, kTransA>(cols, k0, k1, a, lda, b, ldb, c, ldc, alpha, accumulate); break;
    default: micro_cols<Dot, 6, kTransA>(cols, k0, k1, a, lda, b, ldb, c, ldc, alpha, accumulate); break;
  }
}

// C[m, n] (=|+=) alpha * op(A)[m, k] * B[k, n] on operands in Dot's format; C fp32 row-major.
template <typename Dot, bool kTransA>
void gemm(int64_t m, int64_t n, int64_t k, const typename Dot::Word* a, int64_t lda, const typename Dot::Word* b,
          int64_t ldb, float* c, int64_t ldc, float alpha, bool accumulate, const Band& band = Band{}) {
#if defined(SYMATTN_AMX_DOT)
  if constexpr (std::is_same_v<Dot, Bf16Dot>) {
    if (amx_worthwhile(m, n, (k + 1) / 2)) {
      amx_gemm<kTransA>(m, n, k, a, lda, b, ldb, c, ldc, alpha, accumulate, band.k_lo, band.k_hi, band.n_hi);
      return;
    }
  }
#endif
  constexpr int64_t kPack = Dot::kPack;
  const int64_t k_words = (k + kPack - 1) / kPack;
  // k in blocks of kDepth words, column panels inside them, rows inside those: one [kDepth, kNR]
  // panel of B (32 KiB) stays in L1 for every row block, where a panel of the whole k (a P V
  // product over 256 keys: 64 KiB) would stream from L2 once per row block.
  for (int64_t kb = 0; kb == 0 || kb < k_words; kb += kDepth) {
    const bool first = kb == 0;
    for (int64_t n0 = 0; n0 < n; n0 += kNR) {
      const int64_t cols = std::min(kNR, n - n0);
      for (int64_t r0 = 0; r0 < m; r0 += kMR) {
        const int64_t rows = std::min<int64_t>(kMR, m - r0);
        const int64_t last_row = r0 + rows - 1;
        if (n0 > last_row + band.n_hi) continue;
        // The band's element range, widened to whole words (the zeros outside it add nothing).
        const int64_t k0 = std::max<int64_t>(0, r0 + band.k_lo) / kPack;
        const int64_t k1 =
            (std::max<int64_t>(0, std::min<int64_t>(k, last_row + band.k_hi + 1)) + kPack - 1) / kPack;
        const int64_t lo = std::max(k0, kb), hi = std::min(k1, kb + kDepth);
        // Outside its range a row block still takes C = 0 from the first k block.
        if (lo >= hi && !(first && !accumulate)) continue;
        const typename Dot::Word* ap = kTransA ? a + r0 : a + r0 * lda;
        micro_tile<Dot, kTransA>(rows, cols, lo, std::max(lo, hi), ap, lda, b + n0, ldb, c + r0 * ldc + n0, ldc,
                                 alpha, accumulate || !first);
      }
    }
  }
}

template <typename Dot, bool kTransA>
void gemm(int64_t m, int64_t n, int64_t k, const Operand<typename Dot::Word>& a,
          const Operand<typename Dot::Word>& b, float* c, int64_t ldc, float alpha, bool accumulate,
          const Band& band = Band{}) {
  gemm<Dot, kTransA>(m, n, k, a.data, a.ld, b.data, b.ld, c, ldc, alpha, accumulate, band);
}

// Row primitives on fp32, vectorised with masked tails so every element takes the same path.

// exp(x) for softmax arguments (x - row max, x - lse: at most 0 up to rounding), within
// 1 ulp of the correctly rounded result (measured against double). Cody-Waite reduction
// x = n ln2 + r, n = rint(x log2(e)) from one FMA with the 1.5 * 2^23 shifter (its rounding is the
// rint), and exp(r) = 1 + r (1 + r q(r)) with q a degree-4 minimax fit of (exp(r) - 1 - r) / r^2 on
// |r| <= ln2 / 2: 13 vector operations, where at::vec's exp_u20 is cheaper still but its error
// fails flash-attn's rule on fp32 gradients. Results under e^-87 flush to zero, so
// exp(-inf) = 0 exactly and no denormal reaches the products; NaN stays NaN, and large x give
// +inf (+inf itself, which no softmax argument is, gives NaN).
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kShifter = 12582912.f;  // 1.5 * 2^23: x + kShifter rounds x to an integer
constexpr float kLn2Hi = 0.693359375f;  // ln 2 in 9 bits: n * kLn2Hi is exact
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kExpFlush = -87.f;  // e^-87 > FLT_MIN

inline Vec exp_poly(const Vec& r) {
  Vec q(1.38145988e-3f);
  q = at::vec::fmadd(q, r, Vec(8.36871658e-3f));
  q = at::vec::fmadd(q, r, Vec(4.16683890e-2f));
  q = at::vec::fmadd(q, r, Vec(1.66665211e-1f));
  q = at::vec::fmadd(q, r, Vec(4.99999940e-1f));
  q = at::vec::fmadd(q, r, Vec(1.f));
  return at::vec::fmadd(q, r, Vec(1.f));
}

#if defined(CPU_CAPABILITY_AVX512)
inline Vec exp_vec(const Vec& x) {
  const __m512 n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(kLog2e), _mm512_set1_ps(kShifter)),
                                 _mm512_set1_ps(kShifter));
  const Vec r = at::vec::fmadd(Vec(n), Vec(-kLn2Lo), at::vec::fmadd(Vec(n), Vec(-kLn2Hi), x));
  // 2^n scaling in one instruction; lanes under the flush bound (-inf included: its r is NaN) are
  // zeroed by the mask, NaN lanes compare unordered and stay NaN.
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpFlush), _CMP_NLT_UQ);
  return _mm512_maskz_scalef_ps(normal, exp_poly(r), n);
}

#else
// The same reduction and polynomial; 2^n from the shifter's integer bits, for x clamped to
// [-88, ln(FLT_MAX)] so that n + 127 stays in [0, 254].
inline Vec exp_vec(const Vec& x) {
  using IVec = at::vec::Vectorized<int32_t>;
  const Vec xc = at::vec::clamp_max(at::vec::clamp_min(x, Vec(-88.f)), Vec(88.37626f));  // ln(FLT_MAX)
  const Vec t = at::vec::fmadd(xc, Vec(kLog2e), Vec(kShifter));
  const Vec n = t - Vec(kShifter);
  const Vec r = at::vec::fmadd(n, Vec(-kLn2Lo), at::vec::fmadd(n, Vec(-kLn2Hi), xc));
  const IVec biased = at::vec::cast<int32_t>(t) - IVec(0x4B400000 - 127);  // n + 127
  const Vec p = exp_poly(r) * at::vec::cast<float>(biased << IVec(23));
  return Vec::blendv(p, Vec(0.f), xc < Vec(kExpFlush));
}
#endif

// Lane-wise max(a, x) for a running maximum a: one instruction where the ISA has one. A NaN in x
// may be dropped (vmaxps returns its second operand, a, when either is NaN): the exponentials of
// those scores carry the NaN into the row's sum instead.
inline Vec max_running(const Vec& a, const Vec& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_max_ps(x, a);
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_max_ps(x, a);
#else
  return at::vec::maximum(a, x);
#endif
}

// max(a, b) that keeps a NaN from either side (std::max keeps its first argument against NaN).
inline float max_nan(float a, float b) { return std::isnan(a) || a > b ? a : b; }

// The maximum of x[0, n): -inf for none, NaN where the NaN-less maximum is -inf but x holds NaN
// (where it is finite, the NaN reaches the row's sum of exponentials).
float row_max(const float* x, int64_t n) {
  // Four independent maxima: one would wait on the latency of each max before the next.
  Vec acc[4] = {Vec(kNegInf), Vec(kNegInf), Vec(kNegInf), Vec(kNegInf)};
  int64_t j = 0;
  for (; j + 4 * kVec <= n; j += 4 * kVec) {
    for (int u = 0; u < 4; ++u) acc[u] = max_running(acc[u], Vec::loadu(x + j + u * kVec));
  }
  for (; j + kVec <= n; j += kVec) acc[0] = max_running(acc[0], Vec::loadu(x + j));
  if (j < n) acc[1] = max_running(acc[1], Vec::set(Vec(kNegInf), Vec::loadu(x + j, n - j), n - j));
  const Vec m = max_running(max_running(acc[0], acc[1]), max_running(acc[2], acc[3]));
  const float out = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return max_running(a, b); }, m);
  if (out == kNegInf && std::any_of(x, x + n, [](float v) { return std::isnan(v); })) {
    return std::numeric_limits<float>::quiet_NaN();
  }
  return out;
}

// A row's dropout multipliers as keep bits (draw_keep_bits): scale where bit j is set, else 0.
struct KeepBits {
  const uint64_t* bits;
  float scale;
};

// x times the dropout multipliers of elements [j, j + kVec), j a multiple of kVec: the bits
// select lanes, no multiplier row is stored.
Vec apply_keep(const Vec& x, const KeepBits& keep, int64_t j) {
  const uint64_t lanes = keep.bits[j / 64] >> (j % 64);
#if defined(CPU_CAPABILITY_AVX512)
  return _mm512_maskz_mul_ps(static_cast<__mmask16>(lanes), x, _mm512_set1_ps(keep.scale));
#elif defined(CPU_CAPABILITY_AVX2)
  return _mm256_and_ps(keep_lanes(lanes), _mm256_mul_ps(x, _mm256_set1_ps(keep.scale)));
#else
  alignas(64) float multiplier[kVec];
  for (int64_t i = 0; i < kVec; ++i) multiplier[i] = (lanes >> i) & 1 ? keep.scale : 0.f;
  return x * Vec::loadu(multiplier);
#endif
}

#if defined(SYMATTN_BF16_DOT)
// 2^x for x <= 0 (or NaN), within 3e-6 relative (measured against double): x = n + r with
// n = round(x), a degree-4 polynomial of r in [-1/2, 1/2] fitted to 2^r with p(0) = 1, and
// vscalefps for 2^n. Only for probabilities about to be rounded to bf16 (half an ulp is 2e-3),
// whose row sums stay fp32: about half of exp_vec's operations. Inputs below -200 (masked scores
// are -inf) give 2^-200 = +0 exactly; NaN stays NaN (vmaxps returns its second operand).
inline Vec exp2_for_bf16(const Vec& x) {
  const __m512 xc = _mm512_max_ps(_mm512_set1_ps(-200.f), static_cast<__m512>(x));
  const __m512 n = _mm512_roundscale_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(xc, n);
  __m512 p = _mm512_fmadd_ps(_mm512_set1_ps(9.582818e-3f), r, _mm512_set1_ps(5.590637e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.4024099e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.931242e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return Vec(_mm512_scalef_ps(p, n));
}
#endif

// dst[j] = exp(x[j] - shift), times the dropout multiplier where keep is given, for j < n, as
// fp32 (dst may be x) or bf16; returns the sum of the exponentials. For bf16 (which the products
// see rounded anyway) the exponentials come from exp2_for_bf16.
template <typename Word>
float exp_sum_store(const float* x, int64_t n, float shift, const KeepBits* keep, Word* dst) {
#if defined(SYMATTN_BF16_DOT)
  constexpr bool kBase2 = std::is_same_v<Word, uint32_t>;
#else
  constexpr bool kBase2 = false;
#endif
  const Vec vshift(shift);
  auto exp_shifted = [&](const Vec& v) {
#if defined(SYMATTN_BF16_DOT)
    if constexpr (kBase2) return exp2_for_bf16(at::vec::fmadd(v, Vec(kLog2e), Vec(-shift * kLog2e)));
#endif
    return exp_vec(v - vshift);
  };
  Vec acc(0.f);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) {
    Vec e = exp_shifted(Vec::loadu(x + j));
    acc = acc + e;
    if (keep != nullptr) e = apply_keep(e, *keep, j);
    store_elems(dst, j, e, kVec);
  }
  if (j < n) {
    Vec e = Vec::set(Vec(0.f), exp_shifted(Vec::loadu(x + j, n - j)), n - j);
    acc = acc + e;
    if (keep != nullptr) e = apply_keep(e, *keep, j);
    store_elems(dst, j, e, n - j);
  }
  return at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, acc);
}

// x = exp(x - shift) in place, no sum (the backward knows the normaliser: shift = lse).
void exp_inplace(float* x, int64_t n, float shift) {
  const Vec vshift(shift);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) exp_vec(Vec::loadu(x + j) - vshift).store(x + j);
  if (j < n) exp_vec(Vec::loadu(x + j, n - j) - vshift).store(x + j, n - j);
}

void scale_inplace(float* x, int64_t n, float s) {
  const Vec vs(s);
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) (Vec::loadu(x + j) * vs).store(x + j);
  if (j < n) (Vec::loadu(x + j, n - j) * vs).store(x + j, n - j);
}

void add_inplace(float* x, const float* y, int64_t n) {
  int64_t j = 0;
  for (; j + kVec <= n; j += kVec) (Vec::loadu(x + j) + Vec::loadu(y + j)).store(x + j);
  if (j < n) (Vec::loadu(x + j, n - j) + Vec::loadu(y + j, n - j)).store(x + j, n - j);
}

void fill(float* x, int64_t n, float value) { std::fill(x, x + n, value); }

// Asks for rows [0, rows) of a strided panel up front: a head's rows sit a whole token apart in
// memory, and requesting them all at once overlaps the cache misses its first pass would
// otherwise take one row at a time.
void prefetch_rows(const void* data, int64_t row_stride_bytes, int64_t rows, int64_t row_bytes) {
#if defined(__GNUC__)
  const char* base = static_cast<const char*>(data);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t x = 0; x < row_bytes; x += 64) __builtin_prefetch(base + i * row_stride_bytes + x, 0, 3);
  }
#endif
}

template <typename T>
void store_row(T* dst, const float* src, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    at::vec::convert(src, dst, n);
  }
}

template <typename T>
void load_row(float* dst, const T* src, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    int64_t j = 0;
    for (; j + kVec <= n; j += kVec) {
      Vec x;
      at::vec::load_to_float<T>(src + j, x);
      x.store(dst + j);
    }
    for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
  }
}

// kVec elements of src (count of them, zeros after) widened to fp32.
template <typename T>
Vec load_float(const T* src, int64_t count) {
  if constexpr (std::is_same_v<T, float>) {
    return Vec::loadu(src, count);
  } else {
    if (count >= kVec) {
      Vec x;
      at::vec::load_to_float<T>(src, x);
      return x;
    }
    float tail[kVec] = {};
    for (int64_t j = 0; j < count; ++j) tail[j] = static_cast<float>(src[j]);
    return Vec::loadu(tail);
  }
}

// sum_j a[j] * b[j] in fp32, vector lanes first (a fixed order).
template <typename T>
float dot_row(const T* a, const T* b, int64_t n) {
  Vec acc(0.f);
  for (int64_t j = 0; j < n; j += kVec) {
    const int64_t count = std::min(kVec, n - j);
    acc = at::vec::fmadd(load_float(a + j, count), load_float(b + j, count), acc);
  }
  return at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, acc);
}

// Whether x[0, n) holds neither NaN nor Inf (x * 0 is NaN exactly for those).
template <typename T>
bool finite_row(const T* x, int64_t n) {
  Vec acc(0.f);
  for (int64_t j = 0; j < n; j += kVec) acc = at::vec::fmadd(load_float(x + j, std::min(kVec, n - j)), Vec(0.f), acc);
  return !std::isnan(at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, acc));
}

#if defined(CPU_CAPABILITY_AVX512)
// dst[j * ld_dst + i] = src[i * ld_src + j] for a whole 16 x 16 block, in registers: 32-bit, then
// 64-bit elements of row pairs interleaved, then 128-bit lanes of row quads, then of row octets.
// (at::vec's transpose keeps the block in a stack array handed to an out-of-line call.)
inline void transpose16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 a[16], b[16];
  SYMATTN_UNROLL for (int i = 0; i < 16; ++i) a[i] = _mm512_loadu_ps(src + i * ld_src);
  SYMATTN_UNROLL for (int i = 0; i < 16; i += 2) {
    b[i] = _mm512_unpacklo_ps(a[i], a[i + 1]);
    b[i + 1] = _mm512_unpackhi_ps(a[i], a[i + 1]);
  }
  auto lo64 = [](__m512 x, __m512 y) { return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(x), _mm512_castps_pd(y))); };
  auto hi64 = [](__m512 x, __m512 y) { return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(x), _mm512_castps_pd(y))); };
  SYMATTN_UNROLL for (int i = 0; i < 16; i += 4) {
    a[i] = lo64(b[i], b[i + 2]);
    a[i + 1] = hi64(b[i], b[i + 2]);
    a[i + 2] = lo64(b[i + 1], b[i + 3]);
    a[i + 3] = hi64(b[i + 1], b[i + 3]);
  }
  SYMATTN_UNROLL for (int i = 0; i < 16; i += 8) {
    SYMATTN_UNROLL for (int j = 0; j < 4; ++j) {
      b[i + j] = _mm512_shuffle_f32x4(a[i + j], a[i + j + 4], 0x88);
      b[i + j + 4] = _mm512_shuffle_f32x4(a[i + j], a[i + j + 4], 0xdd);
    }
  }
  SYMATTN_UNROLL for (int j = 0; j < 8; ++j) {
    _mm512_storeu_ps(dst + j * ld_dst, _mm512_shuffle_f32x4(b[j], b[j + 8], 0x88));
    _mm512_storeu_ps(dst + (j + 8) * ld_dst, _mm512_shuffle_f32x4(b[j], b[j + 8], 0xdd));
  }
}
#endif

// dst[j * ld_dst + i] = src[i * ld_src + j] for i < m, j < n: register-blocked where at::vec has
// a transpose for this instruction set.
void transpose(const float* src, int64_t ld_src, float* dst, int64_t ld_dst, int64_t m, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  constexpr int64_t kTile = 16;
  for (int64_t i = 0; i < m; i += kTile) {
    for (int64_t j = 0; j < n; j += kTile) {
      if (i + kTile <= m && j + kTile <= n) {
        transpose16(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
      } else {
        at::vec::transpose_mxn<float>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst,
                                      static_cast<int>(std::min(kTile, m - i)), static_cast<int>(std::min(kTile, n - j)));
      }
    }
  }
#else
  constexpr int64_t kTile = 8;
  for (int64_t i = 0; i < m; i += kTile) {
    const int64_t rows = std::min(kTile, m - i);
    int64_t j = 0;
#if defined(CPU_CAPABILITY_AVX2)
    if (rows == kTile) {
      for (; j + kTile <= n; j += kTile) {
        at::vec::transpose_mxn<float, 8, 8>(src + i * ld_src + j, ld_src, dst + j * ld_dst + i, ld_dst);
      }
    }
#endif
    for (; j < n; ++j) {
      for (int64_t r = 0; r < rows; ++r) dst[j * ld_dst + i + r] = src[(i + r) * ld_src + j];
    }
  }
#endif
}

// Lower tile triangle -> upper: a[j][i] = a[i][j] for tiles (I, J) with J < I.
void mirror_lower_tiles(float* a, int64_t lda, int64_t n) {
  for (int64_t t0 = kSymTile; t0 < n; t0 += kSymTile) {
    transpose(a + t0 * lda, lda, a + t0, lda, std::min(kSymTile, n - t0), t0);
  }
}

// a <- a + a^T over the full [n, n] square, in place; scratch holds kSymTile^2 floats.
void symmetrize(float* a, int64_t lda, int64_t n, float* scratch) {
  for (int64_t t0 = 0; t0 < n; t0 += kSymTile) {
    const int64_t tr = std::min(kSymTile, n - t0);
    for (int64_t u0 = 0; u0 <= t0; u0 += kSymTile) {
      const int64_t ur = std::min(kSymTile, n - u0);
      float* lower = a + t0 * lda + u0;  // tile (I, J), [tr, ur]
      float* upper = a + u0 * lda + t0;  // tile (J, I), [ur, tr]
      transpose(upper, lda, scratch, kSymTile, ur, tr);
      for (int64_t i = 0; i < tr; ++i) add_inplace(lower + i * lda, scratch + i * kSymTile, ur);
      if (u0 != t0) transpose(lower, lda, upper, lda, tr, ur);
    }
  }
}


// Bump allocator over one block from torch's CPU allocator (so profilers see it), per thread.
class Workspace {
 public:
  explicit Workspace(size_t bytes) : data_(c10::GetCPUAllocator()->allocate(bytes)), size_(bytes) {}
  void reset() { used_ = 0; }
  template <typename T>
  T* take(int64_t count) {
    constexpr size_t kAlign = 64;
    used_ = (used_ + kAlign - 1) / kAlign * kAlign;
    T* out = reinterpret_cast<T*>(static_cast<char*>(data_.get()) + used_);
    used_ += static_cast<size_t>(count) * sizeof(T);
    TORCH_INTERNAL_ASSERT(used_ <= size_, "symattn: CPU workspace overflow");
    return out;
  }
  // Room for the floats plus the alignment padding of up to 64 take() calls.
  static size_t bytes_for(int64_t floats) { return static_cast<size_t>(floats) * sizeof(float) + 64 * 64; }

 private:
  c10::DataPtr data_;
  size_t size_;
  size_t used_ = 0;
};

// Row stride of a key-indexed panel of n keys: n rounded up to a vector, and past it where that
// is a multiple of 1 KiB. The panels are read down their columns (a micro-tile's B rows, the
// transposes of the whole-head scores), and a stride of a multiple of 1 KiB would map those rows
// onto a few L1 sets: at 512 tokens the whole-head forward took about 5 % longer with it.
int64_t key_stride(int64_t n) {
  const int64_t ld = round_up(std::max<int64_t>(n, 1), kVec);
  return ld % 256 == 0 ? ld + kVec : ld;
}

// Row stride of a copied [rows, n] fp32 panel that products read as B (keys along k): n rounded up
// to an odd count of 64-byte lines. A micro-kernel reuses a [kDepth, kNR] window of it for every
// row block; at an odd count of lines per row the window's rows fall on every L1 set, where an
// even count (a head's 3 KiB input stride, or 64 floats) puts the kNR = 16 window of AVX2 on 4 or
// 16 of the 64 sets (the wider AVX-512 window covers whole rows either way).
int64_t panel_stride(int64_t n) {
  const int64_t ld = round_up(std::max<int64_t>(n, 1), 16);
  return (ld / 16) % 2 == 0 ? ld + 16 : ld;
}

// Sizes shared by every head of one call.
struct Geometry {
  int64_t L = 0;      // longest sequence
  int64_t ldk = 0;    // row stride of key-indexed fp32 panels (key_stride(L))
  int64_t block = 0;  // query rows per block
  int64_t task_rows = 0;  // query rows per forward task: whole blocks, never depends on threads
  bool symmetric = false;  // whole heads with symmetric scores (see the file comment)
  bool tiled = false;      // query blocks against key tiles (kQueryTile, kKeyTile)
  bool mirrored = false;   // tiled forward whose heads can take the mirrored schedule
  int64_t tile = 0;        // rows per block of the tiled backward (pair_tile)

  Geometry(const ForwardParams& p, bool backward) {
    L = p.cu_seqlens != nullptr ? 0 : p.seqlen;
    if (p.cu_seqlens != nullptr) {
      for (int64_t b = 0; b < p.batch; ++b) L = std::max<int64_t>(L, p.cu_seqlens[b + 1] - p.cu_seqlens[b]);
    }
    ldk = key_stride(L);
    tiled = L > kWholeHead && (!backward || p.coef_mode != CoefMode::kFull);
    tile = L >= kPairBlocks * kPairTile ? kPairTile : kPairTileMin;
    block = L <= kWholeHead && kSymmetricSchedule
                ? std::max<int64_t>(L, 1)
            : tiled ? kQueryTile
                    : std::clamp<int64_t>(kBlockFloats / ldk / kBlockRowStep * kBlockRowStep, kBlockRowStep,
                                          std::max<int64_t>(L, kBlockRowStep));
    task_rows = round_up(kTaskRows, block);  // >= L for heads of at most kWholeHead tokens, but on AMX
    if (tiled) {
      task_rows = std::clamp(round_up((L + kTasksPerHead - 1) / kTasksPerHead, block), task_rows, kMaxTaskRows);
    }
#if defined(SYMATTN_AMX_DOT)
    // On AMX tiles a forward task's products are cheap next to packing the head's keys, which
    // every task of the head repeats: tasks take up to whole heads while the call still has
    // about kForwardTasks of them.
    if (!backward) {
      const int64_t per_head = std::max<int64_t>(1, kForwardTasks / std::max<int64_t>(1, p.batch * p.heads));
      task_rows = std::clamp(round_up((L + per_head - 1) / per_head, block), task_rows,
                             std::max(task_rows, tiled ? kMaxTaskRows : round_up(L, block)));
    }
#endif
    symmetric = kSymmetricSchedule && L <= kWholeHead && !p.causal && p.coef_mode != CoefMode::kFull;
    mirrored = kSymmetricSchedule && tiled && !backward && !p.causal && p.coef_mode != CoefMode::kFull;
  }
};

// Rows per group of a mirrored head of L tokens cut into `groups`: whole query blocks.
int64_t mirror_group_rows(int64_t L, int64_t groups) {
  return round_up((L + groups - 1) / groups, kQueryTile);
}

// Groups of a mirrored head of L tokens in a call of `heads` (b, h) pairs: enough for about
// kMirrorTasks group-pair tasks in the call, at most kMirrorGroups, whole query blocks each (so
// the rounding may leave fewer; mirror_group_rows gives the same rows for either count).
int64_t mirror_groups(int64_t L, int64_t heads) {
  const int64_t blocks = (L + kQueryTile - 1) / kQueryTile;
  int64_t groups = 1;
  while (groups < std::min(kMirrorGroups, blocks) && groups * (groups + 1) / 2 * heads < kMirrorTasks) ++groups;
  return (L + mirror_group_rows(L, groups) - 1) / mirror_group_rows(L, groups);
}

// A query row's running softmax state over the keys seen so far: unnormalised output o [Dv],
// max m and sum l; rows of one block at o + r * Dv, m + r, l + r.
struct RowState {
  float* o = nullptr;
  float* m = nullptr;
  float* l = nullptr;
  RowState from(int64_t r, int64_t Dv) const { return {o + r * Dv, m + r, l + r}; }
};

// Everything one task needs to know about its (b, h), and the per-head panels it packs.
template <typename scalar_t>
class Head {
 public:
  using Dot = DotFor<scalar_t>;
  using Word = typename Dot::Word;
  using Panel = Operand<Word>;
  static constexpr bool kPairs = Dot::kPack == 2;  // bf16 operands, else fp32 ones
  static constexpr bool kHalf = !std::is_same_v<scalar_t, float>;

  Head(const ForwardParams& p, const Geometry& g, Workspace& ws, int64_t b, int64_t h)
      : p_(p), g_(g), ws_(ws), b_(b), h_(h) {
    start_ = p.cu_seqlens != nullptr ? p.cu_seqlens[b] : 0;
    L_ = p.cu_seqlens != nullptr ? p.cu_seqlens[b + 1] - start_ : p.seqlen;
    D_ = p.head_dim;
    Dv_ = p.value_dim;
    shared_ = p.v.data == nullptr;
    if (p.dropout_p > 0.0) {
      keep_rule_ = KeepRule(p.seed, p.dropout_p);
      row_id0_ = p.cu_seqlens != nullptr ? start_ : b * p.seqlen;
    }
    y_rows_ = {row_ptr(p.q, 0), p.q.token};
    if (!shared_) v_rows_ = {row_ptr(p.v, 0), p.v.token};
  }

  int64_t length() const { return L_; }

  // Row i of this (b, h) in a [B, S, H, X] or [total, H, X] tensor of scalar_t.
  template <typename T>
  auto row_ptr(const Strided<T>& t, int64_t i) const {
    using Elem = std::conditional_t<std::is_const_v<T>, const scalar_t, scalar_t>;
    return static_cast<Elem*>(t.data) + b_ * t.batch + (start_ + i) * t.token + h_ * t.head;
  }
  float* lse_ptr(int64_t i) const {
    return p_.lse.data + b_ * p_.lse.batch + (start_ + i) * p_.lse.token + h_ * p_.lse.head;
  }

  // Words that k elements take in Dot's format.
  static int64_t words(int64_t k) { return (k + Dot::kPack - 1) / Dot::kPack; }

  // fp32 rows of Y: the fp32 operands' source; bf16 operands need them only for M.
  static bool needs_fp32_y(const ForwardParams& p) { return !kPairs || p.coef_mode != CoefMode::kNone; }

  // Workspace of setup_keys, pack_query_key and pack_values.
  static int64_t panel_floats(const ForwardParams& p, const Geometry& g, bool backward) {
    const int64_t L = g.L, D = p.head_dim, Dv = p.value_dim;
    const bool shared = p.v.data == nullptr, coef = p.coef_mode != CoefMode::kNone;
    return (p.key_padding_mask != nullptr ? g.ldk + L + 1 : 0)            // key bias, prefix counts
           + (needs_fp32_y(p) && kHalf ? L * D : 0)                       // Yf
           + (kPairs ? L * words(D) : 0) + words(D) * g.ldk               // Ya, Yt
           + (kPairs && (backward || shared) ? words(L) * D : 0)          // Yb
           + (coef ? L * D + (kPairs ? L * words(D) : 0) : 0)             // Qm, Qa
           + (shared ? 0 : (kPairs ? words(L) * Dv : (kHalf ? L * Dv : 0)));  // Vb
  }

  // Prefetches this head's rows of a [B, S, H, X] / [total, H, X] input.
  template <typename T>
  void prefetch(const Strided<T>& t, int64_t width) const {
    if (t.data != nullptr) {
      prefetch_rows(row_ptr(t, 0), t.token * int64_t{sizeof(scalar_t)}, L_, width * int64_t{sizeof(scalar_t)});
    }
  }

  // Key-side masks: kbias_[j] in {0, -inf} over [0, L) (null when there is no padding),
  // key_end_ = one past the last real key, prefix_[j] = real keys in [0, j).
  void setup_keys() {
    key_end_ = L_;
    n_real_ = L_;
    symmetric_ = g_.symmetric;
    if (p_.key_padding_mask == nullptr) return;
    const bool* real = p_.key_padding_mask + b_ * p_.seqlen;
    kbias_ = ws_.take<float>(g_.ldk);
    prefix_ = ws_.take<int32_t>(L_ + 1);
    key_end_ = 0;
    prefix_[0] = 0;
    for (int64_t j = 0; j < L_; ++j) {
      kbias_[j] = real[j] ? 0.f : kNegInf;
      prefix_[j + 1] = prefix_[j] + (real[j] ? 1 : 0);
      if (real[j]) key_end_ = j + 1;
    }
    n_real_ = prefix_[L_];
    // The symmetric schedule multiplies all L^2 scores (1.5 L^2 D), the row schedule only the
    // keys up to the last real one (2 L key_end D): keep it only for lightly padded heads.
    symmetric_ = g_.symmetric && 4 * key_end_ > 3 * L_;
    read_padding_as_finite(real);
  }

  // Whether key i is a real token (kbias_ holds 0 there, -inf on padding).
  bool real_key(int64_t i) const { return kbias_ == nullptr || kbias_[i] == 0.f; }

  // Padded keys get zero weight, but the products still multiply those zeros with the keys' and
  // values' stored elements (0 * NaN = NaN), and the symmetric schedule mirrors padded rows'
  // scores into real ones. So where a padded token of this head holds NaN or Inf, Y (or V) is
  // read from a copy of the head's rows with those elements zeroed; finite padding is read in
  // place (no copy), and a padded token keeps its own values as a query.
  void read_padding_as_finite(const bool* real) {
    auto finite = [&](const Rows& rows, int64_t width) {
      for (int64_t j = 0; j < L_; ++j) {
        if (!real[j] && !finite_row(rows.data + j * rows.ld, width)) return false;
      }
      return true;
    };
    const bool copy_y = !finite(y_rows_, D_);
    const bool copy_v = !shared_ && !finite(v_rows_, Dv_);
    if (!copy_y && !copy_v) return;
    clean_ = c10::GetCPUAllocator()->allocate(((copy_y ? D_ : 0) + (copy_v ? Dv_ : 0)) * L_ * sizeof(scalar_t));
    scalar_t* buf = static_cast<scalar_t*>(clean_.get());
    auto copy = [&](Rows& rows, int64_t width) {
      for (int64_t j = 0; j < L_; ++j) {
        const scalar_t* src = rows.data + j * rows.ld;
        scalar_t* dst = buf + j * width;
        for (int64_t d = 0; d < width; ++d) {
          dst[d] = real[j] || std::isfinite(static_cast<float>(src[d])) ? src[d] : scalar_t(0);
        }
      }
      rows = {buf, width};
      buf += L_ * width;
    };
    if (copy_y) copy(y_rows_, D_);
    if (copy_v) copy(v_rows_, Dv_);
  }

  // Operand panels, from one read of Y: Yf = Y in fp32 [L, D] (aliases q for fp32 input), and in
  // Dot's format Ya = Y as A rows, Yt = Y^T as B (keys along n), Yb = Y as B rows (keys along k;
  // when need_yb), Qa = Qm = Y M as A rows (Ya when M = I; Qm in fp32 is kept for the backward).
  // Qm and Qa hold query rows [q0, q1) only (at their own row index), so a task that owns a slice
  // of the head's queries pays M for that slice alone; q1 < 0 means every row. Likewise Yt holds
  // keys [k0, k1) only (at their own column index) when k1 >= 0, and then Yf, Ya, Yb (and
  // pack_values' Vb) hold only the rows [0, max(q1, k1)) the task reads: a causal task's rows and
  // keys end at its last query row.
  void pack_query_key(bool need_yb, int64_t q0 = 0, int64_t q1 = -1, int64_t k0 = 0, int64_t k1 = -1) {
    const scalar_t* y = y_rows_.data;
    const int64_t ldq = y_rows_.ld;
    const int64_t n_rows = q1 < 0 || k1 < 0 ? L_ : std::max(q1, k1);
    packed_rows_ = n_rows;
    if (needs_fp32_y(p_)) {
      if constexpr (kHalf) {
        float* yf = ws_.take<float>(L_ * D_);
        for (int64_t i = 0; i < n_rows; ++i) load_row(yf + i * D_, y + i * ldq, D_);
        yf_ = yf;
        ldyf_ = D_;
      } else {
        yf_ = y;
        ldyf_ = ldq;
      }
    }
    if constexpr (kPairs) {
      ya_ = a_rows(y, ldq, n_rows, D_, ws_.take<Word>(L_ * words(D_)));
      if (need_yb) yb_ = b_rows(y, ldq, n_rows, D_, ws_.take<Word>(words(L_) * D_), D_);
    } else {
      ya_ = {yf_, ldyf_};
      yb_ = ya_;
    }
    if (k1 < 0) k1 = L_;
    // A key range alone takes a row stride of its own width: a compact panel, which stays in L2
    // from one task to the next, where the head's stride would scatter it over L * D words.
    const int64_t ldt = k1 - k0 == L_ ? g_.ldk : key_stride(k1 - k0);
    Word* yt = ws_.take<Word>(words(D_) * ldt);
    yt_ = {b_transposed(a_from(ya_, k0), k1 - k0, D_, yt, ldt).data - k0, ldt};
    if (p_.coef_mode == CoefMode::kNone) {
      qa_ = ya_;
      return;
    }
    if (q1 < 0) q1 = L_;
    const int64_t n = q1 - q0;
    float* qm = ws_.take<float>(L_ * D_);
    if (p_.coef_mode == CoefMode::kFull) {
      gemm<FloatDot, false>(n, D_, D_, yf_ + q0 * ldyf_, ldyf_, p_.coef + h_ * D_ * D_, D_, qm + q0 * D_, D_, 1.f,
                            false);
    } else {
      const float* c = p_.coef + h_ * D_;
      for (int64_t i = q0; i < q1; ++i) {
        for (int64_t d = 0; d < D_; ++d) qm[i * D_ + d] = c[d] * yf_[i * ldyf_ + d];
      }
    }
    qm_ = qm;
    Word* qa_buf = kPairs ? ws_.take<Word>(L_ * words(D_)) : nullptr;
    qa_ = a_from(a_rows(qm_ + q0 * D_, D_, n, D_, kPairs ? qa_buf + q0 * words(D_) : nullptr), -q0);
  }

  // Values as B rows: Vb (Yb in shared mode), rows [0, packed_rows_).
  void pack_values() {
    if (shared_) {
      vb_ = yb_;
      return;
    }
    const scalar_t* v = v_rows_.data;
    const int64_t ldv = v_rows_.ld;
    if constexpr (kPairs) {
      vb_ = b_rows(v, ldv, packed_rows_, Dv_, ws_.take<Word>(words(L_) * Dv_), Dv_);
    } else if constexpr (kHalf) {
      float* vf = ws_.take<float>(L_ * Dv_);
      for (int64_t i = 0; i < packed_rows_; ++i) load_row(vf + i * Dv_, v + i * ldv, Dv_);
      vb_ = {vf, Dv_};
    } else {
      vb_ = {v, ldv};
    }
  }

  // Scores of query rows [i0, i0 + rows) against keys [0, kend) into s (row stride g_.ldk).
  void scores(float* s, int64_t i0, int64_t rows, int64_t kend) const {
    const float scale = static_cast<float>(p_.scale);
    if (symmetric_) {
      // Whole head: the lower tile triangle, then its mirror image.
      lower_scores(s);
      mirror_lower_tiles(s, g_.ldk, L_);
      return;
    }
    Band band;
    if (p_.causal) band.n_hi = i0;
    gemm<Dot, false>(rows, kend, D_, a_from(qa_, i0), yt_, s, g_.ldk, scale, false, band);
  }

  // The lower tile triangle of the whole head's scores (tiles (I, J), J <= I, diagonal tiles
  // whole) into s (row stride g_.ldk); the upper triangle is not written.
  void lower_scores(float* s) const {
    const float scale = static_cast<float>(p_.scale);
    for (int64_t t0 = 0; t0 < L_; t0 += kSymTile) {
      const int64_t tr = std::min(kSymTile, L_ - t0);
      gemm<Dot, false>(tr, t0 + tr, D_, a_from(qa_, t0), yt_, s + t0 * g_.ldk, g_.ldk, scale, false);
    }
  }

  // Query block [i0, i0 + rows): the key range its products touch.
  int64_t block_keys(int64_t i0, int64_t rows) const {
    if (symmetric_) return L_;
    return p_.causal ? std::min(key_end_, i0 + rows) : key_end_;
  }
  // Keys row i may attend to lie in [0, row_keys(i)).
  int64_t row_keys(int64_t i) const {
    if (symmetric_) return L_;
    return p_.causal ? std::min(key_end_, i + 1) : key_end_;
  }

  // Padding bias and exclude_self on keys [j0, n) of score row i; s points at key j0.
  void mask_row(float* s, int64_t i, int64_t n, int64_t j0 = 0) const {
    if (kbias_ != nullptr) add_inplace(s, kbias_ + j0, n - j0);
    if (i >= j0 && i < n && excludes_self(i)) s[i - j0] = kNegInf;
  }

  // Whether exclude_self masks row i's own key (only when the row may attend to another).
  bool excludes_self(int64_t i) const {
    if (!p_.exclude_self) return false;
    const int64_t self_real = prefix_ == nullptr ? 1 : prefix_[i + 1] - prefix_[i];
    const int64_t others = p_.causal ? (prefix_ == nullptr ? i : prefix_[i]) : n_real_ - self_real;
    return others > 0;
  }

  // keep[j] for keys [j0, j0 + n) of query row i, as 0 / keep_scale multipliers.
  void keep_row(float* keep, int64_t i, int64_t n, int64_t j0 = 0) const { keep_run(keep, i, j0, n); }

  // keep[j] = the multiplier of query row i on key j0 + j, for j in [0, n).
  void keep_run(float* keep, int64_t i, int64_t j0, int64_t n) const {
    draw_keep(keep_rule_, keep_offset(i, j0), n, keep);
  }

  // The same as keep bits (keep_bit_words(n) words at bits).
  KeepBits keep_bits(uint64_t* bits, int64_t i, int64_t j0, int64_t n) const {
    draw_keep_bits(keep_rule_, keep_offset(i, j0), n, bits);
    return {bits, keep_rule_.scale};
  }

  // The element offset of query row i on key j (see reference.dropout_keep_mask).
  uint64_t keep_offset(int64_t i, int64_t j) const {
    return static_cast<uint64_t>(h_ * p_.n_rows + row_id0_ + i) * static_cast<uint64_t>(p_.seqlen) +
           static_cast<uint64_t>(j);
  }

  bool dropout() const { return keep_rule_.threshold != 0; }

 protected:
  // src [m, k] (fp32, or scalar_t) as A rows; fp32 is its own A-rows form, bf16 is packed in buf
  // ([m, words(k)]).
  template <typename T>
  static Panel a_rows(const T* src, int64_t ld, int64_t m, int64_t k, Word* buf) {
    if constexpr (kPairs) {
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        // Rows of an even count of bf16 at an even stride already are A rows: read in place.
        if (k % 2 == 0 && ld % 2 == 0 && reinterpret_cast<uintptr_t>(src) % alignof(Word) == 0) {
          return {reinterpret_cast<const Word*>(src), ld / 2};
        }
      }
      pack_bf16_rows(src, ld, m, k, buf, words(k));
      return {buf, words(k)};
    } else {
      static_assert(std::is_same_v<T, float>, "fp32 operands come from fp32 rows");
      return {src, ld};
    }
  }
  // src [m, n] as B rows (m along k), which is also the kTransA form of src^T as A; fp32 is its
  // own form, bf16 row pairs are interleaved into buf ([words(m), ldd]).
  template <typename T>
  static Panel b_rows(const T* src, int64_t ld, int64_t m, int64_t n, Word* buf, int64_t ldd) {
    if constexpr (kPairs) {
      pack_bf16_pairs(src, ld, m, n, buf, ldd);
      return {buf, ldd};
    } else {
      static_assert(std::is_same_v<T, float>, "fp32 operands come from fp32 rows");
      return {src, ld};
    }
  }
  // The transpose of A rows a ([m, k]) as B [k, ldk] (m along n), word by word into buf.
  Panel b_transposed(const Panel& a, int64_t m, int64_t k, Word* buf, int64_t ld = 0) const {
    if (ld == 0) ld = g_.ldk;
    transpose(reinterpret_cast<const float*>(a.data), a.ld, reinterpret_cast<float*>(buf), ld, m, words(k));
    return {buf, ld};
  }
  // A rows from row i on; B rows (and kTransA A) from row i on, i even.
  static Panel a_from(const Panel& a, int64_t i) { return {a.data + i * a.ld, a.ld}; }
  static Panel b_from(const Panel& b, int64_t i) { return {b.data + i / Dot::kPack * b.ld, b.ld}; }

  const ForwardParams& p_;
  const Geometry& g_;
  Workspace& ws_;
  int64_t b_, h_;
  int64_t start_ = 0, L_ = 0, D_ = 0, Dv_ = 0;
  bool shared_ = true;

  float* kbias_ = nullptr;
  int32_t* prefix_ = nullptr;
  int64_t key_end_ = 0, n_real_ = 0;
  bool symmetric_ = false;  // this head takes the symmetric whole-head schedule

  KeepRule keep_rule_;  // threshold 0: no dropout
  int64_t row_id0_ = 0;

  // Where the products read Y and V (null in shared mode): the inputs, or the copy in clean_
  // (see read_padding_as_finite).
  struct Rows {
    const scalar_t* data = nullptr;
    int64_t ld = 0;
  };
  Rows y_rows_, v_rows_;
  c10::DataPtr clean_;

  const float* yf_ = nullptr;  // fp32 Y, or null where no product needs it
  int64_t ldyf_ = 0;
  const float* qm_ = nullptr;  // fp32 Y M, or null for M = I
  Panel ya_, yt_, yb_, qa_, vb_;
  int64_t packed_rows_ = 0;  // rows [0, packed_rows_) of Y (and V) in the panels
};


template <typename scalar_t>
class ForwardHead : public Head<scalar_t> {
  using Base = Head<scalar_t>;
  using typename Base::Dot, typename Base::Word, typename Base::Panel;
  using Base::kPairs, Base::kHalf, Base::D_, Base::Dv_, Base::L_, Base::g_, Base::p_, Base::ws_, Base::vb_,
      Base::shared_;

 public:
  using Base::Base;

  // Exactly what run() takes from the workspace.
  // The head's panels, with the contiguous fp32 values of pack_values_contiguous.
  static int64_t panel_floats(const ForwardParams& p, const Geometry& g) {
    return Base::panel_floats(p, g, false) + (!kPairs && !kHalf ? g.L * p.value_dim : 0);
  }

  static int64_t workspace_floats(const ForwardParams& p, const Geometry& g) {
    constexpr int64_t T = kMirrorTile;
    const int64_t mirrored = !g.mirrored ? 0
                             : panel_floats(p, g)
                                   + 2 * T * T                              // S / P, column P tiles
                                   + (kPairs ? T * T / 2 + T * T / 2 : 0)   // bf16 P, column P pairs
                                   + kStrip                                 // a column strip's maxima
                                   + (p.dropout_p > 0.0 ? 2 * (keep_bit_words(T) * (T + 1) + T * T / 64)
                                                        : 0);  // keep bits: a row, by query, by key
    if (g.tiled) {
      return std::max(mirrored, panel_floats(p, g)
             + g.block * kKeyTile                      // score tile
             + (kPairs ? g.block * kKeyTile / 2 : 0)   // P tile as bf16 A rows
             + g.block * p.value_dim                   // output block
             + 2 * g.block                             // running row max and sum
             + (p.dropout_p > 0.0 ? 2 * keep_bit_words(kKeyTile) : 0));  // keep bits of a tile row
    }
    return panel_floats(p, g)
           + g.block * g.ldk                      // score block
           + (g.symmetric && !kPairs ? g.L * kSymTile + 2 * kSymTile : 0)  // run_symmetric's P^T, sums
           + (kPairs ? g.block * g.ldk / 2 : 0)   // P block as bf16 A rows
           + g.block                              // 1 / row sums
           + (p.dropout_p > 0.0 ? 2 * keep_bit_words(g.ldk) : 0)  // keep bits of a row
           + (kHalf ? g.block * p.value_dim : 0);  // output block
  }

  void prefetch_inputs() const {
    this->prefetch(p_.q, D_);
    this->prefetch(p_.v, Dv_);
  }

  // Query rows [r0, r1) of the head: r0 is a multiple of the query block (so even), and a head
  // on the symmetric schedule is only ever run whole.
  void run(int64_t r0, int64_t r1) {
    AmxTileScope tiles;  // one tile configuration for the task's products
    if (g_.tiled) {
      run_tiled(r0, r1);
      return;
    }
    this->setup_keys();
    this->pack_query_key(shared_, r0, r1);
    pack_values_contiguous();
    if constexpr (!kPairs) {
      if (unmirrored_symmetric()) {
        run_symmetric();
        return;
      }
    }
    float* s = ws_.template take<float>(g_.block * g_.ldk);
    // exp(S - rowmax) as A rows: bf16 beside the scores, or the fp32 scores themselves.
    Word* probs = nullptr;
    int64_t ldp = g_.ldk;
    if constexpr (kPairs) {
      ldp = g_.ldk / 2;
      probs = ws_.template take<Word>(g_.block * ldp);
    } else {
      probs = s;
    }
    float* inv_sum = ws_.template take<float>(g_.block);
    uint64_t* keep = this->dropout() ? ws_.template take<uint64_t>(keep_bit_words(g_.ldk)) : nullptr;
    float* o = kHalf ? ws_.template take<float>(g_.block * Dv_) : nullptr;
    const int64_t block = g_.block;  // >= L_ for symmetric heads
    for (int64_t i0 = r0; i0 < r1; i0 += block) {
      const int64_t rows = std::min(block, r1 - i0);
      const int64_t kend = this->block_keys(i0, rows);
      if (kend > 0) this->scores(s, i0, rows, kend);
      for (int64_t r = 0; r < rows; ++r) {
        inv_sum[r] = softmax_row(s + r * g_.ldk, i0 + r, kend, keep, probs + r * ldp);
      }
      // out = P V / rowsum, written straight into the output for fp32.
      Band band;
      if (p_.causal) band.k_hi = i0;
      const auto [dst, ld] = product_rows(i0, o);
      gemm<Dot, false>(rows, Dv_, kend, Panel{probs, ldp}, vb_, dst, ld, 1.f, false, band);
      for (int64_t r = 0; r < rows; ++r) {
        scale_inplace(dst + r * ld, Dv_, inv_sum[r]);
        if constexpr (kHalf) store_row(this->row_ptr(p_.out, i0 + r), dst + r * ld, Dv_);
      }
    }
  }

 private:
  // Where the P V product of the query rows from i0 goes, and its row stride: the output itself
  // for fp32, else the fp32 block o, whose rows are then stored to the output.
  std::pair<float*, int64_t> product_rows(int64_t i0, float* o) const {
    if constexpr (kHalf) {
      return {o, Dv_};
    } else {
      return {this->row_ptr(p_.out, i0), p_.out.token};
    }
  }

  // pack_values, then fp32 values read in place copied to a contiguous [rows, Dv] block: a head's
  // rows sit H Dv floats apart in the input (3 KiB at H = 12, Dv = 64), a stride that puts the
  // [kDepth, kNR] values panel the P V micro-kernels reuse on 16 of the 64 L1 sets. The copy
  // holds the rows the task reads, at their own index: [r0, r1) (r1 < 0: every packed row) and a
  // mirrored task's other group [c0, c1).
  void pack_values_contiguous(int64_t r0 = 0, int64_t r1 = -1, int64_t c0 = 0, int64_t c1 = 0) {
    this->pack_values();
    if constexpr (!kPairs && !kHalf) {
      if (vb_.ld != Dv_) {
        float* packed = ws_.template take<float>(L_ * Dv_);
        auto copy = [&](int64_t j0, int64_t j1) {
          for (int64_t j = j0; j < j1; ++j) std::memcpy(packed + j * Dv_, vb_.data + j * vb_.ld, Dv_ * sizeof(float));
        };
        copy(r0, r1 < 0 ? this->packed_rows_ : r1);
        if (c0 != r0) copy(c0, c1);
        vb_ = {packed, Dv_};
      }
    }
  }

  // Whether this head (after setup_keys) takes run_symmetric: the whole-head symmetric schedule
  // on fp32 operands without dropout. bf16 operands would need P^T repacked as row pairs, and
  // dropout its keep bits drawn by query and transposed, so those heads mirror the scores.
  bool unmirrored_symmetric() const { return this->symmetric_ && !kPairs && !this->dropout(); }

  // A whole head on the symmetric schedule without a mirrored copy of the scores: only the lower
  // tile triangle is multiplied and stored, and each tile row I of queries reads its keys in two
  // parts. Keys up to the end of its diagonal tile are its own stored rows, exponentiated in
  // place; later keys J are the columns of the stored tiles (J, I), read down them: their maxima
  // join the rows' maxima, and their exponentials go into a scratch P^T [keys, queries], which the
  // P V product takes in its kTransA form. Row I's part of a tile (J, I) is read before tile row J
  // exponentiates it in place, as tile rows go in order.
  void run_symmetric() {
    constexpr int64_t T = kSymTile;
    const int64_t ld = g_.ldk;
    float* s = ws_.template take<float>(L_ * ld);
    float* pt = ws_.template take<float>(L_ * T);
    float* shift = ws_.template take<float>(T);
    float* sum = ws_.template take<float>(T);
    float* o = kHalf ? ws_.template take<float>(std::min(T, L_) * Dv_) : nullptr;
    const Panel v = vb_;
    this->lower_scores(s);
    for (int64_t i0 = 0; i0 < L_; i0 += T) {
      const int64_t rows = std::min(T, L_ - i0), iend = i0 + rows;
      const float* below = s + iend * ld + i0;  // tiles (J, I), J > I: [L - iend, rows]
      if (rows == T) {
        column_max<false>(below, ld, iend, rows, shift);
      } else {
        column_max<true>(below, ld, iend, rows, shift);
      }
      bool empty[T];
      for (int64_t r = 0; r < rows; ++r) {
        float* row = s + (i0 + r) * ld;
        this->mask_row(row, i0 + r, iend);
        const float m = max_nan(row_max(row, iend), shift[r]);
        // A row with no allowed key holds only -inf scores: a shift of 0 makes each P exactly 0.
        empty[r] = m == kNegInf;
        shift[r] = empty[r] ? 0.f : m;
        sum[r] = exp_sum_store(row, iend, shift[r], nullptr, row);
      }
      if (rows == T) {
        column_exp<false>(below, ld, iend, rows, shift, pt, sum);
      } else {
        column_exp<true>(below, ld, iend, rows, shift, pt, sum);
      }
      const auto [dst, ldo] = product_rows(i0, o);
      gemm<Dot, false>(rows, Dv_, iend, Panel{s + i0 * ld, ld}, v, dst, ldo, 1.f, false);
      if (iend < L_) gemm<Dot, true>(rows, Dv_, L_ - iend, Panel{pt, T}, Base::b_from(v, iend), dst, ldo, 1.f, true);
      for (int64_t r = 0; r < rows; ++r) {
        *this->lse_ptr(i0 + r) = empty[r] ? kNegInf : shift[r] + std::log(sum[r]);
        scale_inplace(dst + r * ldo, Dv_, empty[r] ? 0.f : 1.f / sum[r]);
        if constexpr (kHalf) store_row(this->row_ptr(p_.out, i0 + r), dst + r * ldo, Dv_);
      }
    }
  }

  // Lanes of a run of kSymTile columns, rows of them from its start: whole vectors, or (kTail)
  // as many as remain of rows in vector v.
  static constexpr int kTileVecs = static_cast<int>(kSymTile / kVec);
  template <bool kTail>
  static int64_t lanes(int64_t rows, int v) {
    return kTail ? std::clamp<int64_t>(rows - v * kVec, 0, kVec) : kVec;
  }

  // cmax[c] = the maximum of column c < cols of x ([L - j0, cols] at row stride ld: keys j0.. of
  // the queries of its columns) over its real keys: -inf for none, NaN where that is -inf but a
  // real key's score is NaN (row_max's rule).
  template <bool kTail>
  void column_max(const float* x, int64_t ld, int64_t j0, int64_t cols, float* cmax) const {
    Vec acc[kTileVecs];
    SYMATTN_UNROLL for (int v = 0; v < kTileVecs; ++v) acc[v] = Vec(kNegInf);
    for (int64_t j = j0; j < L_; ++j) {
      if (!this->real_key(j)) continue;
      const float* row = x + (j - j0) * ld;
      SYMATTN_UNROLL for (int v = 0; v < kTileVecs; ++v) {
        if (lanes<kTail>(cols, v) > 0) {
          acc[v] = max_running(acc[v], kTail ? Vec::loadu(row + v * kVec, lanes<kTail>(cols, v))
                                             : Vec::loadu(row + v * kVec));
        }
      }
    }
    SYMATTN_UNROLL for (int v = 0; v < kTileVecs; ++v) {
      if (lanes<kTail>(cols, v) > 0) acc[v].store(cmax + v * kVec, lanes<kTail>(cols, v));
    }
    for (int64_t c = 0; c < cols; ++c) {
      if (cmax[c] != kNegInf) continue;
      for (int64_t j = j0; j < L_; ++j) {
        if (this->real_key(j) && std::isnan(x[(j - j0) * ld + c])) cmax[c] = std::numeric_limits<float>::quiet_NaN();
      }
    }
  }

  // pt[(j - j0) * kSymTile + c] = exp(x[j - j0][c] - shift[c]) for the keys j >= j0 of the columns
  // c < cols of x (as column_max), 0 on padded keys; sum[c] += their sum, keys in order.
  template <bool kTail>
  void column_exp(const float* x, int64_t ld, int64_t j0, int64_t cols, const float* shift, float* pt,
                  float* sum) const {
    Vec m[kTileVecs], acc[kTileVecs];
    SYMATTN_UNROLL for (int v = 0; v < kTileVecs; ++v) {
      m[v] = lanes<kTail>(cols, v) > 0 ? Vec::loadu(shift + v * kVec, lanes<kTail>(cols, v)) : Vec(0.f);
      acc[v] = Vec(0.f);
    }
    for (int64_t j = j0; j < L_; ++j) {
      float* prow = pt + (j - j0) * kSymTile;
      if (!this->real_key(j)) {
        fill(prow, cols, 0.f);
        continue;
      }
      const float* row = x + (j - j0) * ld;
      SYMATTN_UNROLL for (int v = 0; v < kTileVecs; ++v) {
        const int64_t n = lanes<kTail>(cols, v);
        if (n == 0) continue;
        const Vec e = exp_vec((kTail ? Vec::loadu(row + v * kVec, n) : Vec::loadu(row + v * kVec)) - m[v]);
        if (kTail) {
          e.store(prow + v * kVec, n);
          acc[v] = acc[v] + Vec::set(Vec(0.f), e, n);
        } else {
          e.store(prow + v * kVec);
          acc[v] = acc[v] + e;
        }
      }
    }
    SYMATTN_UNROLL for (int v = 0; v < kTileVecs; ++v) {
      const int64_t n = lanes<kTail>(cols, v);
      if (n > 0) (Vec::loadu(sum + v * kVec, n) + acc[v]).store(sum + v * kVec, n);
    }
  }

  // Query blocks against key tiles: each tile's scores update the rows' running max m and sum l,
  // the output block is rescaled by exp(m_old - m_new) where a row's max grows, then gains P V.
  void run_tiled(int64_t r0, int64_t r1) {
    this->setup_keys();
    // Keys up to the last one any of the rows attends (a causal task's stop at its last row).
    this->pack_query_key(shared_, r0, r1, 0, this->block_keys(r0, r1 - r0));
    pack_values_contiguous();
    float* s = ws_.template take<float>(g_.block * kKeyTile);
    Word* probs = nullptr;
    int64_t ldp = kKeyTile;
    if constexpr (kPairs) {
      ldp = kKeyTile / 2;
      probs = ws_.template take<Word>(g_.block * ldp);
    } else {
      probs = s;
    }
    float* o = ws_.template take<float>(g_.block * Dv_);
    float* m = ws_.template take<float>(g_.block);
    float* l = ws_.template take<float>(g_.block);
    uint64_t* keep = this->dropout() ? ws_.template take<uint64_t>(keep_bit_words(kKeyTile)) : nullptr;
    const float scale = static_cast<float>(p_.scale);
    for (int64_t i0 = r0; i0 < r1; i0 += g_.block) {
      const int64_t rows = std::min(g_.block, r1 - i0);
      const int64_t kend = this->block_keys(i0, rows);
      fill(o, rows * Dv_, 0.f);
      fill(m, rows, kNegInf);
      fill(l, rows, 0.f);
      for (int64_t j0 = 0; j0 < kend; j0 += kKeyTile) {
        const int64_t cols = std::min(kKeyTile, kend - j0);
        Band score_band, pv_band;
        if (p_.causal) {
          score_band.n_hi = i0 - j0;
          pv_band.k_hi = i0 - j0;
        }
        gemm<Dot, false>(rows, cols, D_, Base::a_from(this->qa_, i0), Panel{this->yt_.data + j0, this->yt_.ld}, s,
                         kKeyTile, scale, false, score_band);
        for (int64_t r = 0; r < rows; ++r) {
          online_row(s + r * kKeyTile, i0 + r, j0, cols, m[r], l[r], o + r * Dv_, probs + r * ldp, keep);
        }
        gemm<Dot, false>(rows, Dv_, cols, Panel{probs, ldp}, Base::b_from(vb_, j0), o, Dv_, 1.f, true, pv_band);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const bool empty = m[r] == kNegInf;
        *this->lse_ptr(i0 + r) = empty ? kNegInf : m[r] + std::log(l[r]);
        scale_inplace(o + r * Dv_, Dv_, empty ? 0.f : 1.f / l[r]);
        store_row(this->row_ptr(p_.out, i0 + r), o + r * Dv_, Dv_);
      }
    }
  }

 public:
  // Mirrored schedule, one task: query rows [r0, r1) against keys [c0, c1), and when these are
  // other rows, also rows [c0, c1) against keys [r0, r1), from the same score tiles: S is
  // symmetric, so the tile S_IJ (rows I, keys J) read down its columns is S_JI. A group with
  // itself takes its tile triangle: tiles below the diagonal both ways, diagonal tiles one way.
  // Rows I keep their running state in side_a, rows J in side_b (side_a again for one group);
  // no other task writes either, and merge() joins a group's states in a fixed order.
  void run_mirrored(int64_t r0, int64_t r1, int64_t c0, int64_t c1, const RowState& side_a, const RowState& side_b) {
    constexpr int64_t T = kMirrorTile;
    const bool one_group = r0 == c0;
    this->setup_keys();
    this->pack_query_key(shared_, r0, r1, c0, c1);  // the tiles' keys are rows [c0, c1)
    pack_values_contiguous(r0, r1, c0, c1);
    start_states(side_a, r1 - r0);
    if (!one_group) start_states(side_b, c1 - c0);
    // The output rows of the states are not zeroed beforehand: the first product into a block of
    // T rows writes them (C =), later ones add (C +=). Until then a row's max is -inf, so no
    // rescale reads them.
    std::vector<char> written_a((r1 - r0 + T - 1) / T, 0), written_b(one_group ? 0 : (c1 - c0 + T - 1) / T, 0);
    auto first_write = [](std::vector<char>& written, int64_t block) {
      const bool first = written[block] == 0;
      written[block] = 1;
      return first;
    };
    float* s = ws_.template take<float>(T * T);
    Word* probs = nullptr;
    int64_t ldp = T;
    if constexpr (kPairs) {
      ldp = T / 2;
      probs = ws_.template take<Word>(T * ldp);
    } else {
      probs = s;
    }
    float* pt = ws_.template take<float>(T * T);
    Word* pt_words = kPairs ? ws_.template take<Word>(T * T / 2) : nullptr;
    float* cmax = ws_.template take<float>(kStrip);
    uint64_t *keep = nullptr, *keep_by_query = nullptr, *keep_by_key = nullptr;
    if (this->dropout()) {
      keep = ws_.template take<uint64_t>(keep_bit_words(T));
      keep_by_query = ws_.template take<uint64_t>(T * keep_bit_words(T));
      keep_by_key = ws_.template take<uint64_t>(T * T / 64);
    }
    const float scale = static_cast<float>(p_.scale);
    for (int64_t j0 = c0; j0 < c1; j0 += T) {
      const int64_t cols = std::min(T, c1 - j0);
      for (int64_t i0 = r0; i0 < (one_group ? j0 + 1 : r1); i0 += T) {
        const int64_t rows = std::min(T, r1 - i0);
        gemm<Dot, false>(rows, cols, D_, Base::a_from(this->qa_, i0), Panel{this->yt_.data + j0, this->yt_.ld}, s,
                         T, scale, false);
        if (i0 != j0) {
          // Rows J against keys I, before the row pass below masks and exponentiates s in place.
          const RowState b = (one_group ? side_a : side_b).from(j0 - (one_group ? r0 : c0), Dv_);
          if (keep != nullptr) column_keep(i0, rows, j0, cols, keep_by_query, keep_by_key);
          const bool first = first_write(one_group ? written_a : written_b, (j0 - c0) / T);
          if (column_pass(s, i0, rows, cols, b, pt, cmax, keep != nullptr ? keep_by_key : nullptr)) {
            Panel p_cols{reinterpret_cast<const Word*>(pt), T};
            if constexpr (kPairs) {
              pack_bf16_pairs(static_cast<const float*>(pt), T, rows, cols, pt_words, T);
              p_cols = Panel{pt_words, T};
            }
            gemm<Dot, true>(cols, Dv_, rows, p_cols, Base::b_from(vb_, i0), b.o, Dv_, 1.f, !first);
          } else if (first) {
            fill(b.o, cols * Dv_, 0.f);
          }
        }
        const RowState a = side_a.from(i0 - r0, Dv_);
        for (int64_t r = 0; r < rows; ++r) {
          online_row(s + r * T, i0 + r, j0, cols, a.m[r], a.l[r], a.o + r * Dv_, probs + r * ldp, keep);
        }
        gemm<Dot, false>(rows, Dv_, cols, Panel{probs, ldp}, Base::b_from(vb_, j0), a.o, Dv_, 1.f,
                         !first_write(written_a, (i0 - r0) / T));
      }
    }
  }

  // Rows [r0, r1): joins the running states of count tasks in their order, and writes out and lse.
  void merge(int64_t r0, int64_t r1, const RowState* parts, int64_t count) {
    float* o = ws_.template take<float>(Dv_);
    for (int64_t r = 0; r < r1 - r0; ++r) {
      float m = kNegInf;
      for (int64_t k = 0; k < count; ++k) m = max_nan(m, parts[k].m[r]);
      float l = 0.f;
      fill(o, Dv_, 0.f);
      if (m != kNegInf) {
        for (int64_t k = 0; k < count; ++k) {
          const float w = std::exp(parts[k].m[r] - m);
          l += w * parts[k].l[r];
          const Vec vw(w);
          const float* src = parts[k].o + r * Dv_;
          for (int64_t d = 0; d < Dv_; d += kVec) {
            const int64_t n = std::min(kVec, Dv_ - d);
            at::vec::fmadd(vw, Vec::loadu(src + d, n), Vec::loadu(o + d, n)).store(o + d, n);
          }
        }
        scale_inplace(o, Dv_, 1.f / l);
      }
      *this->lse_ptr(r0 + r) = m == kNegInf ? kNegInf : m + std::log(l);
      store_row(this->row_ptr(p_.out, r0 + r), o, Dv_);
    }
  }

 private:
  void start_states(const RowState& x, int64_t rows) {
    fill(x.m, rows, kNegInf);
    fill(x.l, rows, 0.f);
  }

  // The dropout keep bits of the column pass of tile (rows i0.., keys j0..): bit c % 64 of
  // keep_by_key[r * T / 64 + c / 64] for query j0 + c on key i0 + r, drawn by query (the counters
  // run along keys) into keep_by_query and transposed in 64 x 64 bit blocks.
  void column_keep(int64_t i0, int64_t rows, int64_t j0, int64_t cols, uint64_t* keep_by_query,
                   uint64_t* keep_by_key) const {
    constexpr int64_t kWords = kMirrorTile / 64, kQueryWords = keep_bit_words(kMirrorTile);
    for (int64_t c = 0; c < cols; ++c) this->keep_bits(keep_by_query + c * kQueryWords, j0 + c, i0, rows);
    uint64_t block[64];
    for (int64_t bc = 0; bc * 64 < cols; ++bc) {
      for (int64_t br = 0; br * 64 < rows; ++br) {
        for (int64_t k = 0; k < 64; ++k) block[k] = bc * 64 + k < cols ? keep_by_query[(bc * 64 + k) * kQueryWords + br] : 0;
        transpose_bits64(block);
        for (int64_t k = 0; k < 64 && br * 64 + k < rows; ++k) keep_by_key[(br * 64 + k) * kWords + bc] = block[k];
      }
    }
  }

  // The tile's rows i0 + r as keys of its columns' query rows (state b): their running max and sum
  // updated, outputs rescaled where a max grows, and pt[r][c] = exp(s[r][c] - m[c]) (0 on padded
  // keys), times the dropout multipliers of keep_by_key (column_keep) where it is given; the sums
  // take the exponentials before dropout. Returns false when every key of the tile is padding
  // (nothing to add).
  bool column_pass(const float* s, int64_t i0, int64_t rows, int64_t cols, const RowState& b, float* pt,
                   float* cmax, const uint64_t* keep_by_key) {
    bool any = false;
    for (int64_t r = 0; r < rows && !any; ++r) any = this->real_key(i0 + r);
    if (!any) return false;
    int64_t c0 = 0;
    for (; c0 + kStrip <= cols; c0 += kStrip)
      column_strip<false>(s + c0, i0, rows, kStrip, b.from(c0, Dv_), pt + c0, cmax, keep_by_key, c0);
    if (c0 < cols) column_strip<true>(s + c0, i0, rows, cols - c0, b.from(c0, Dv_), pt + c0, cmax, keep_by_key, c0);
    return true;
  }

  // Column pass of columns [0, width) of a tile (s and pt at the strip's first column, b at its
  // first column's state, keep_by_key's columns from c0), width <= kStrip: the strip's maxima and
  // sums stay in registers down the tile's rows.
  static constexpr int kStripVecs = 4;
  static constexpr int64_t kStrip = kStripVecs * kVec;
  template <bool kTail>
  void column_strip(const float* s, int64_t i0, int64_t rows, int64_t width, const RowState& b, float* pt,
                    float* cmax, const uint64_t* keep_by_key, int64_t c0) {
    constexpr int64_t T = kMirrorTile;
    auto count = [&](int v) { return kTail ? std::clamp<int64_t>(width - v * kVec, 0, kVec) : kVec; };
    auto load = [&](const float* x, int v) { return kTail ? Vec::loadu(x, count(v)) : Vec::loadu(x); };
    Vec acc[kStripVecs];
    for (int v = 0; v < kStripVecs; ++v) acc[v] = Vec(kNegInf);
    for (int64_t r = 0; r < rows; ++r) {
      if (!this->real_key(i0 + r)) continue;
      for (int v = 0; v < kStripVecs; ++v) acc[v] = max_running(acc[v], load(s + r * T + v * kVec, v));
    }
    for (int v = 0; v < kStripVecs; ++v) acc[v].store(cmax + v * kVec, count(v));
    for (int64_t c = 0; c < width; ++c) {
      const float m_new = max_nan(b.m[c], cmax[c]);
      if (m_new > b.m[c] && b.m[c] != kNegInf) {
        const float shrink = std::exp(b.m[c] - m_new);
        b.l[c] *= shrink;
        scale_inplace(b.o + c * Dv_, Dv_, shrink);
      }
      b.m[c] = m_new;
    }
    Vec m[kStripVecs];
    for (int v = 0; v < kStripVecs; ++v) {
      m[v] = load(b.m + v * kVec, v);
      acc[v] = Vec(0.f);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* prow = pt + r * T;
      if (!this->real_key(i0 + r)) {
        fill(prow, width, 0.f);
        continue;
      }
      for (int v = 0; v < kStripVecs; ++v) {
        const Vec e = exp_vec(load(s + r * T + v * kVec, v) - m[v]);
        Vec kept = e;
        if (keep_by_key != nullptr) {
          kept = apply_keep(e, KeepBits{keep_by_key + r * (T / 64), this->keep_rule_.scale}, c0 + v * kVec);
        }
        kept.store(prow + v * kVec, count(v));
        acc[v] = acc[v] + e;
      }
    }
    for (int v = 0; v < kStripVecs; ++v) (load(b.l + v * kVec, v) + acc[v]).store(b.l + v * kVec, count(v));
  }

  // Score row i over keys [j0, j0 + cols) into the row's running max m, sum l and output row o;
  // leaves exp(s - m) in prow (times the tile's dropout multipliers, drawn as bits into keep when
  // it is set), zero past the row's last key. The sum l takes the exponentials before dropout.
  void online_row(float* s, int64_t i, int64_t j0, int64_t cols, float& m, float& l, float* o, Word* prow,
                  uint64_t* keep) {
    const int64_t n = std::clamp<int64_t>(this->row_keys(i) - j0, 0, cols);
    if (n > 0) {
      this->mask_row(s, i, j0 + n, j0);
      const float m_new = max_nan(m, row_max(s, n));
      if (m_new != kNegInf) {
        if (m_new > m && m != kNegInf) {
          const float shrink = std::exp(m - m_new);
          l *= shrink;
          scale_inplace(o, Dv_, shrink);
        }
        m = m_new;
        l += exp_row(s, i, j0, n, m, keep, prow);
        zero_elems(prow, n, cols);
        return;
      }
    }
    zero_elems(prow, 0, cols);
  }

  // Score row -> exp(s - rowmax) (times the dropout multipliers) into prow, zero in [n, kend);
  // writes lse and returns 1 / the row sum (0 for a row with no allowed key: P = 0).
  float softmax_row(float* s, int64_t i, int64_t kend, uint64_t* keep, Word* prow) {
    const int64_t n = this->row_keys(i);
    this->mask_row(s, i, n);
    const float m = n > 0 ? row_max(s, n) : kNegInf;
    if (m == kNegInf) {
      zero_elems(prow, 0, kend);
      *this->lse_ptr(i) = kNegInf;
      return 0.f;
    }
    const float sum = exp_row(s, i, 0, n, m, keep, prow);
    *this->lse_ptr(i) = m + std::log(sum);
    zero_elems(prow, n, kend);
    return 1.f / sum;
  }

  // exp(s - m) of row i's keys [j0, j0 + n) into prow, times their dropout multipliers (drawn as
  // bits into keep) where keep is set; returns the sum of the exponentials before dropout.
  float exp_row(const float* s, int64_t i, int64_t j0, int64_t n, float m, uint64_t* keep, Word* prow) const {
    if (keep == nullptr) return exp_sum_store(s, n, m, nullptr, prow);
    const KeepBits bits = this->keep_bits(keep, i, j0, n);
    return exp_sum_store(s, n, m, &bits, prow);
  }
};


// One backward task's gradient contributions to its head: dY [L, D], dV [L, Dv] (dY itself in
// shared mode) and the dcoef partial ([D] or [D, D]).
struct BackwardSlice {
  float* dy = nullptr;
  float* dv = nullptr;
  double* dcoef = nullptr;
};

template <typename scalar_t>
class BackwardHead : public Head<scalar_t> {
  using Base = Head<scalar_t>;
  using typename Base::Dot, typename Base::Word, typename Base::Panel;
  using Base::kPairs, Base::kHalf, Base::words, Base::a_from, Base::b_from, Base::D_, Base::Dv_, Base::L_, Base::g_,
      Base::ws_, Base::shared_, Base::yf_, Base::ldyf_, Base::qm_, Base::yt_, Base::yb_, Base::qa_, Base::vb_,
      Base::h_, Base::b_, Base::kbias_;

 public:
  BackwardHead(const BackwardParams& p, const Geometry& g, Workspace& ws, int64_t b, int64_t h)
      : Base(p, g, ws, b, h), bp_(p) {}

  void prefetch_inputs() const {
    this->prefetch(bp_.q, D_);
    this->prefetch(bp_.v, Dv_);
    this->prefetch(bp_.dout, Dv_);
    this->prefetch(bp_.out, Dv_);
  }

  // Exactly what run() takes from the workspace.
  static int64_t workspace_floats(const BackwardParams& p, const Geometry& g) {
    const int64_t L = g.L, D = p.head_dim, Dv = p.value_dim;
    const bool shared = p.v.data == nullptr, coef = p.coef_mode != CoefMode::kNone;
    const bool full = p.coef_mode == CoefMode::kFull;
    return Base::panel_floats(p, g, true) + copy_floats(p, L)
           + (kPairs && coef ? words(L) * D : 0)                                // Qb
           + (shared ? 0 : (kPairs ? L * words(Dv) : 0) + words(Dv) * g.ldk)    // Va, Vt
           + (kPairs ? L * words(Dv) + words(L) * Dv : (kHalf ? L * Dv : 0))   // dO as A rows, B rows
           + L                                                                  // dlse
           + 2 * g.block * g.ldk                                  // P / Pd and dP / G blocks
           + (kPairs ? g.block * g.ldk / 2 + 2 * words(g.block) * g.ldk : 0)  // bf16 G, G^T, Pd^T
           + (p.dropout_p > 0.0 ? g.ldk : 0)                      // keep row
           + L * D + (shared ? 0 : L * Dv)                        // dY, dV accumulators
           + (g.symmetric ? kSymTile * kSymTile : 0)              // symmetrize scratch
           + (coef ? g.block * D : 0)                             // W block
           + (full ? 2 * D * D : 0);                              // scale C^T, a dC block
  }

  // Query rows [r0, r1) of a head off the symmetric schedule: their gradient contributions into
  // slice, which this zeroes first and the caller sums over the head's slices (reduce). With
  // slice == null: the whole head (r0 = 0, r1 = L), written to dq / dv / dcoef_partial.
  void run(int64_t r0, int64_t r1, const BackwardSlice* slice) {
    AmxTileScope tiles;
    const CoefMode mode = bp_.coef_mode;
    const bool want_dcoef = bp_.dcoef_partial != nullptr && mode != CoefMode::kNone;
    this->setup_keys();
    copy_inputs();
    this->pack_query_key(true);
    this->pack_values();
    pack_backward_inputs();

    float* s = ws_.template take<float>(g_.block * g_.ldk);
    float* dp = ws_.template take<float>(g_.block * g_.ldk);
    if constexpr (kPairs) {
      g_rows_ = ws_.template take<Word>(g_.block * g_.ldk / 2);
      g_cols_ = ws_.template take<Word>(words(g_.block) * g_.ldk);
      p_cols_ = ws_.template take<Word>(words(g_.block) * g_.ldk);
    }
    float* keep = this->dropout() ? ws_.template take<float>(g_.ldk) : nullptr;
    float* dy = slice != nullptr ? slice->dy : ws_.template take<float>(L_ * D_);
    float* dv = shared_ ? dy : (slice != nullptr ? slice->dv : ws_.template take<float>(L_ * Dv_));
    fill(dy, L_ * D_, 0.f);
    if (!shared_) fill(dv, L_ * Dv_, 0.f);
    const int64_t csize = mode == CoefMode::kFull ? D_ * D_ : D_;
    double* dcoef = want_dcoef ? bp_.dcoef_partial + (b_ * bp_.heads + h_) * csize : nullptr;
    if (slice != nullptr) {
      dcoef = want_dcoef ? slice->dcoef : nullptr;
      if (dcoef != nullptr) std::fill(dcoef, dcoef + csize, 0.0);
    }

    if (this->symmetric_) {
      symmetric_head(s, dp, keep, dy, dv, dcoef);
    } else {
      // Qm as B rows, for the key side G^T Qm.
      qb_ = yb_;
      if (qm_ != nullptr) {
        qb_ = Base::b_rows(qm_, D_, L_, D_, kPairs ? ws_.template take<Word>(words(L_) * D_) : nullptr, D_);
      }
      float* w = mode != CoefMode::kNone ? ws_.template take<float>(g_.block * D_) : nullptr;
      float* ct = mode == CoefMode::kFull ? ws_.template take<float>(2 * D_ * D_) : nullptr;
      if (ct != nullptr) {  // ct[e][d] = scale * C[d][e], the B panel of W (scale C^T)
        const float* c = bp_.coef + h_ * D_ * D_;
        for (int64_t d = 0; d < D_; ++d) {
          for (int64_t e = 0; e < D_; ++e) ct[e * D_ + d] = static_cast<float>(bp_.scale) * c[d * D_ + e];
        }
      }
      for (int64_t i0 = r0; i0 < r1; i0 += g_.block) {
        block_rows(i0, std::min(g_.block, r1 - i0), s, dp, keep, dy, dv, w, ct, dcoef);
      }
    }
    if (slice == nullptr) store(dy, dv);
  }

  // The sum of a head's slices in slice order, written to dq / dv / dcoef_partial.
  void reduce(const BackwardSlice* slices, int64_t count) {
    const int64_t csize = bp_.coef_mode == CoefMode::kFull ? D_ * D_ : D_;
    if (bp_.dcoef_partial != nullptr && bp_.coef_mode != CoefMode::kNone) {
      double* dcoef = bp_.dcoef_partial + (b_ * bp_.heads + h_) * csize;
      for (int64_t k = 0; k < count; ++k) {
        for (int64_t e = 0; e < csize; ++e) dcoef[e] += slices[k].dcoef[e];
      }
    }
    for (int64_t k = 1; k < count; ++k) {
      add_inplace(slices[0].dy, slices[k].dy, L_ * D_);
      if (!shared_) add_inplace(slices[0].dv, slices[k].dv, L_ * Dv_);
    }
    store(slices[0].dy, slices[0].dv);
  }

  // The tiled backward (heads longer than kWholeHead, M none or diagonal): a head is cut into
  // blocks of g.tile rows, and every score tile S_IJ (I >= J) is computed once, by one task that
  // takes both of its roles. M is symmetric, so S_JI = S_IJ^T: the tile gives P_IJ (rows I on keys
  // J, with lse_I) and, read down its columns, P_JI^T (rows J on keys I, with lse_J), and with
  // dP_IJ = dO_I V_J^T and dP_JI^T = V_I dO_J^T it gives Gs = G_IJ + G_JI^T. Then
  //   Z_I += Gs Y_J,   Z_J += Gs^T Y_I,   dV_I += Pd_JI^T dO_J,   dV_J += Pd_IJ^T dO_I,
  // with Z = (G + G^T) Y, dY = scale Z M (+ dV when V = Y), dM = scale / 2 diag(Y^T Z). That is
  // 7 tile products per pair of blocks, 3.5 L^2 D in all (5 L^2 D when each block's task gathers
  // its own rows from every tile). Causal heads take only the tiles I > J, where rows J see no
  // key of I: 5 products each (2.5 L^2 D). A tile's task writes the accumulators of blocks I and
  // J, so the driver (tiled_backward) runs the pairs in rounds in which no block meets two tiles.
  //
  // delta = rowsum(dO * O) - dlse comes from the saved output.

  // Per-head workspace of prepare_tiled, which lives from the first round to the last.
  static int64_t tiled_head_floats(const BackwardParams& p, const Geometry& g) {
    const int64_t L = g.L, D = p.head_dim, Dv = p.value_dim;
    const bool shared = p.v.data == nullptr;
    return Base::panel_floats(p, g, true) + copy_floats(p, L)
           + (shared ? 0 : (kPairs ? L * words(Dv) : 0) + words(Dv) * g.ldk)  // Va, Vt
           + (kPairs ? L * words(Dv) + words(L) * Dv : (kHalf ? L * Dv : 0))   // dO as A rows, B rows
           + words(Dv) * g.ldk                                                 // dO^T
           + 3 * L                                                             // dlse, delta, column lse
           + L * D + (separate_dv(p) ? L * Dv : 0);                           // Z, dV accumulators
  }

  // Per-worker workspace of pair_tile.
  static int64_t tiled_scratch_floats(const BackwardParams& p, const Geometry& g) {
    const int64_t tile = g.tile * g.tile;
    return (4 + (p.dropout_p > 0.0 ? 3 : 0)) * tile  // S / Pd, dP / Gs, dPt / Gt, Pdt; keep tiles
           + (kPairs ? 4 * words(g.tile) * g.tile : 0);  // bf16 Gs, Gs^T, Pd^T, Pdt
  }

  int64_t tiled_blocks() const { return (L_ + g_.tile - 1) / g_.tile; }

  // Panels, delta and zeroed accumulators for every round of this head.
  void prepare_tiled() {
    this->setup_keys();
    copy_inputs();
    this->pack_query_key(true);
    this->pack_values();
    pack_backward_inputs();
    dot_ = this->b_transposed(do_rows_, L_, Dv_, ws_.template take<Word>(words(Dv_) * g_.ldk));
    delta_ = ws_.template take<float>(L_);
    lse_col_ = ws_.template take<float>(L_);
    for (int64_t i = 0; i < L_; ++i) {
      const float lse = *this->lse_ptr(i);
      lse_col_[i] = lse == kNegInf ? std::numeric_limits<float>::infinity() : lse;  // exp(S - lse) = 0
      delta_[i] = dot_row(this->row_ptr(bp_.out, i), this->row_ptr(bp_.dout, i), Dv_) - dlse_[i];
    }
    zacc_ = ws_.template take<float>(L_ * D_);
    fill(zacc_, L_ * D_, 0.f);
    dvacc_ = zacc_;
    if (separate_dv(bp_)) {
      dvacc_ = ws_.template take<float>(L_ * Dv_);
      fill(dvacc_, L_ * Dv_, 0.f);
    }
  }

  // Score tile (bi, bj), bi >= bj, in both roles (see above); scratch holds tiled_scratch_floats.
  void pair_tile(int64_t bi, int64_t bj, float* scratch) {
    AmxTileScope tiles;
    const int64_t T = g_.tile;
    const int64_t i0 = bi * T, rows = std::min(T, L_ - i0), j0 = bj * T, cols = std::min(T, L_ - j0);
    const bool same = bi == bj;
    const bool mirror = !bp_.causal || same;  // rows J attend keys I
    float* s = scratch;
    float* dp = s + T * T;
    float* dpt = dp + T * T;
    float* pdt = dpt + T * T;
    float* keep = this->dropout() ? pdt + T * T : nullptr;
    float* keep_t = keep != nullptr ? keep + T * T : nullptr;
    const float scale = static_cast<float>(bp_.scale);
    gemm<Dot, false>(rows, cols, D_, a_from(qa_, i0), Panel{yt_.data + j0, yt_.ld}, s, T, scale, false);
    gemm<Dot, false>(rows, cols, Dv_, a_from(do_rows_, i0), Panel{vt_.data + j0, vt_.ld}, dp, T, 1.f, false);
    if (mirror) {
      gemm<Dot, false>(rows, cols, Dv_, a_from(va_, i0), Panel{dot_.data + j0, dot_.ld}, dpt, T, 1.f, false);
    }
    if (keep != nullptr) {
      for (int64_t r = 0; r < rows; ++r) this->keep_run(keep + r * T, i0 + r, j0, cols);
      if (mirror) {  // rows J on keys I, drawn by row, then laid out as the tile
        float* by_row = keep_t + T * T;
        for (int64_t c = 0; c < cols; ++c) this->keep_run(by_row + c * T, j0 + c, i0, rows);
        transpose(by_row, T, keep_t, T, cols, rows);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t o = r * T;
      if (mirror) {
        column_side(s + o, dpt + o, pdt + o, keep_t != nullptr ? keep_t + o : nullptr, i0 + r, j0, cols,
                    same && bp_.causal ? r : 0);
      }
      row_side(s + o, dp + o, mirror ? dpt + o : nullptr, keep != nullptr ? keep + o : nullptr, i0 + r, j0, cols);
    }
    // s: Pd_IJ, dp: Gs, pdt: Pd_JI^T.
    const float zalpha = bp_.coef_mode == CoefMode::kDiag ? 1.f : scale;
    Word* packs = reinterpret_cast<Word*>(keep != nullptr ? keep_t + 2 * T * T : pdt + T * T);
    const int64_t pack_words = words(T) * T;
    const Panel gs = Base::a_rows(static_cast<const float*>(dp), T, rows, cols, packs);
    gemm<Dot, false>(rows, D_, cols, gs, b_from(yb_, j0), zacc_ + i0 * D_, D_, zalpha, true);
    if (mirror) {
      const Panel pt = Base::a_rows(static_cast<const float*>(pdt), T, rows, cols, packs + pack_words);
      gemm<Dot, false>(rows, Dv_, cols, pt, b_from(do_pairs_, j0), dvacc_ + i0 * Dv_, Dv_, 1.f, true);
    }
    if (!same) {
      const Panel gs_t = Base::b_rows(static_cast<const float*>(dp), T, rows, cols, packs + 2 * pack_words, T);
      gemm<Dot, true>(cols, D_, rows, gs_t, b_from(yb_, i0), zacc_ + j0 * D_, D_, zalpha, true);
      const Panel pd_t = Base::b_rows(static_cast<const float*>(s), T, rows, cols, packs + 3 * pack_words, T);
      gemm<Dot, true>(cols, Dv_, rows, pd_t, b_from(do_pairs_, i0), dvacc_ + j0 * Dv_, Dv_, 1.f, true);
    }
  }

  // dY = scale Z M (+ dV when V = Y) and dV to dq / dv; the diagonal coefficient's
  // scale / 2 sum_i y_i * z_i, row by row, added to dcoef_partial.
  void finish_tiled() {
    const bool diag = bp_.coef_mode == CoefMode::kDiag;
    const float scale = static_cast<float>(bp_.scale);
    double* dcoef = diag && bp_.dcoef_partial != nullptr ? bp_.dcoef_partial + (b_ * bp_.heads + h_) * D_ : nullptr;
    if (dcoef != nullptr) diag_dcoef(dcoef, zacc_, D_, 0, L_, 0.5f * scale);
    for (int64_t i = 0; i < L_; ++i) {
      float* z = zacc_ + i * D_;
      if (diag) {
        const float* c = bp_.coef + h_ * D_;
        for (int64_t d = 0; d < D_; ++d) z[d] *= scale * c[d];
        if (shared_) add_inplace(z, dvacc_ + i * D_, D_);
      }
      store_row(this->row_ptr(bp_.dq, i), z, D_);
      if (!shared_) store_row(this->row_ptr(bp_.dv, i), dvacc_ + i * Dv_, Dv_);
    }
  }

 private:
  // Whether dV needs its own accumulator: separate values, or Z scaled by a diagonal M.
  static bool separate_dv(const BackwardParams& p) {
    return p.v.data != nullptr || p.coef_mode == CoefMode::kDiag;
  }

  // Row i of a tile over keys [j0, j0 + cols), read as rows J on key i: s holds S_IJ (unmasked),
  // dpt V_i dO_J^T. Leaves G_JI^T in dpt and Pd_JI^T in pdt; first > 0 zeroes the columns before
  // it (a causal diagonal tile: row j sees key i only when i <= j).
  void column_side(const float* s, float* dpt, float* pdt, const float* keep, int64_t i, int64_t j0, int64_t cols,
                   int64_t first) const {
    if (!this->real_key(i)) {
      fill(pdt, cols, 0.f);
      fill(dpt, cols, 0.f);
      return;
    }
    for (int64_t c = 0; c < cols; c += kVec) {
      const int64_t count = std::min(kVec, cols - c);
      const Vec p = exp_vec(Vec::loadu(s + c, count) - Vec::loadu(lse_col_ + j0 + c, count));
      Vec dpv = Vec::loadu(dpt + c, count);
      Vec pd = p;
      if (keep != nullptr) {
        const Vec k = Vec::loadu(keep + c, count);
        dpv = dpv * k;
        pd = p * k;
      }
      pd.store(pdt + c, count);
      (p * (dpv - Vec::loadu(delta_ + j0 + c, count))).store(dpt + c, count);
    }
    const int64_t zero_to = std::min(first, cols);
    fill(pdt, zero_to, 0.f);
    fill(dpt, zero_to, 0.f);
    if (i >= j0 && i < j0 + cols && this->excludes_self(i)) pdt[i - j0] = dpt[i - j0] = 0.f;
  }

  // Row i of a tile over keys [j0, j0 + cols), read as row i on keys J: s holds S_IJ, dp
  // dO_i V_J^T, gt (when the tile has the other role too) G_JI^T. Leaves Pd_IJ in s and
  // G_IJ (+ G_JI^T) in dp.
  void row_side(float* s, float* dp, const float* gt, const float* keep, int64_t i, int64_t j0, int64_t cols) {
    const int64_t n = std::clamp<int64_t>(this->row_keys(i) - j0, 0, cols);
    const float lse = *this->lse_ptr(i);
    if (n == 0 || lse == kNegInf) {
      fill(s, cols, 0.f);
      if (gt != nullptr) {
        std::memcpy(dp, gt, cols * sizeof(float));
      } else {
        fill(dp, cols, 0.f);
      }
      return;
    }
    this->mask_row(s, i, j0 + n, j0);
    const Vec vdelta(delta_[i]), vlse(lse);
    for (int64_t c = 0; c < cols; c += kVec) {
      const int64_t count = std::min(kVec, cols - c);
      Vec p = exp_vec(Vec::loadu(s + c, count) - vlse);
      if (c + count > n) p = Vec::set(Vec(0.f), p, std::max<int64_t>(0, n - c));
      Vec dpv = Vec::loadu(dp + c, count);
      if (keep != nullptr) {
        const Vec k = Vec::loadu(keep + c, count);
        dpv = dpv * k;
        (p * k).store(s + c, count);
      } else {
        p.store(s + c, count);
      }
      Vec g = p * (dpv - vdelta);
      if (gt != nullptr) g = g + Vec::loadu(gt + c, count);
      g.store(dp + c, count);
    }
  }

  Panel va_, dot_;
  float* delta_ = nullptr;
  float* lse_col_ = nullptr;
  float* zacc_ = nullptr;
  float* dvacc_ = nullptr;

 private:
  void store(const float* dy, const float* dv) {
    for (int64_t i = 0; i < L_; ++i) store_row(this->row_ptr(bp_.dq, i), dy + i * D_, D_);
    if (!shared_) {
      for (int64_t i = 0; i < L_; ++i) store_row(this->row_ptr(bp_.dv, i), dv + i * Dv_, Dv_);
    }
  }

  // fp32 inputs would be read in place as every operand, but a head's rows sit H D floats apart
  // (3 KiB at H = 12, D = 64): Y, V and dO, the B panels of G Y, Pd^T dO (and the tiled
  // backward's tile products), are copied once per head at panel_stride (see there).
  static int64_t copy_floats(const BackwardParams& p, int64_t L) {
    if constexpr (kPairs || kHalf) return 0;
    return L * (panel_stride(p.head_dim) + (p.v.data != nullptr ? 2 : 1) * panel_stride(p.value_dim));
  }

  // [L, width] rows at row stride ld to a workspace copy at panel_stride(width).
  const float* copy_rows(const float* src, int64_t ld, int64_t width) {
    const int64_t ldc = panel_stride(width);
    float* dst = ws_.template take<float>(L_ * ldc);
    for (int64_t i = 0; i < L_; ++i) std::memcpy(dst + i * ldc, src + i * ld, width * sizeof(float));
    return dst;
  }

  // Y and V (after setup_keys, which may have replaced them by a copy without non-finite padding)
  // read from copies at panel_stride, for fp32 operands.
  void copy_inputs() {
    if constexpr (!kPairs && !kHalf) {
      auto& y = this->y_rows_;
      y = {copy_rows(y.data, y.ld, D_), panel_stride(D_)};
      if (!shared_) {
        auto& v = this->v_rows_;
        v = {copy_rows(v.data, v.ld, Dv_), panel_stride(Dv_)};
      }
    }
  }

  // Vt = V^T as B [Dv, ldk] for dP = dO V^T, dO as A rows and as B rows, and dlse by row.
  void pack_backward_inputs() {
    if (shared_) {
      vt_ = yt_;
      va_ = this->ya_;
    } else if constexpr (kPairs) {
      va_ = Base::a_rows(this->v_rows_.data, this->v_rows_.ld, L_, Dv_, ws_.template take<Word>(L_ * words(Dv_)));
      vt_ = this->b_transposed(va_, L_, Dv_, ws_.template take<Word>(words(Dv_) * g_.ldk));
    } else {
      va_ = vb_;  // fp32 rows: the same array as A rows
      vt_ = this->b_transposed(vb_, L_, Dv_, ws_.template take<Word>(Dv_ * g_.ldk));
    }
    const scalar_t* dout = this->row_ptr(bp_.dout, 0);
    const int64_t ld = bp_.dout.token;
    if constexpr (kPairs) {
      do_rows_ = Base::a_rows(dout, ld, L_, Dv_, ws_.template take<Word>(L_ * words(Dv_)));
      do_pairs_ = Base::b_rows(dout, ld, L_, Dv_, ws_.template take<Word>(words(L_) * Dv_), Dv_);
    } else if constexpr (kHalf) {
      float* dof = ws_.template take<float>(L_ * Dv_);
      for (int64_t i = 0; i < L_; ++i) load_row(dof + i * Dv_, dout + i * ld, Dv_);
      do_rows_ = do_pairs_ = {dof, Dv_};
    } else {
      do_rows_ = do_pairs_ = {copy_rows(dout, ld, Dv_), panel_stride(Dv_)};
    }
    dlse_ = ws_.template take<float>(L_);
    for (int64_t i = 0; i < L_; ++i) {
      dlse_[i] = bp_.dlse.data == nullptr
                     ? 0.f
                     : bp_.dlse.data[b_ * bp_.dlse.batch + (this->start_ + i) * bp_.dlse.token + h_ * bp_.dlse.head];
    }
  }

  // Row i: s holds scores, dp holds dO V^T over [0, kend). Leaves Pd = dropout(P) in s and
  // G = P * (dP * keep - delta) in dp, both zero wherever row i attends to nothing.
  void grad_row(float* s, float* dp, int64_t i, int64_t kend, float* keep) {
    const int64_t n = this->row_keys(i);
    const float lse = *this->lse_ptr(i);
    if (n == 0 || lse == kNegInf) {
      fill(s, kend, 0.f);
      fill(dp, kend, 0.f);
      return;
    }
    this->mask_row(s, i, n);
    exp_inplace(s, n, lse);
    // delta = rowsum(Pd * dP) - dlse from the fp32 P and dP of the whole row: it equals
    // rowsum(dO * O) - dlse, without the rounding of O to the input dtype, which dominates G
    // where one key (the token itself, as q = k) takes most of the row's weight.
    if (keep != nullptr) {
      this->keep_row(keep, i, n);
      for (int64_t j = 0; j < n; ++j) dp[j] *= keep[j];
    }
    const float delta = dot_row(s, dp, n) - dlse_[i];
    if (keep != nullptr) {
      for (int64_t j = 0; j < n; ++j) {
        dp[j] = s[j] * (dp[j] - delta);
        s[j] *= keep[j];
      }
    } else {
      const Vec vdelta(delta);
      int64_t j = 0;
      for (; j + kVec <= n; j += kVec) (Vec::loadu(s + j) * (Vec::loadu(dp + j) - vdelta)).store(dp + j);
      if (j < n) (Vec::loadu(s + j, n - j) * (Vec::loadu(dp + j, n - j) - vdelta)).store(dp + j, n - j);
    }
    fill(s + n, kend - n, 0.f);
    fill(dp + n, kend - n, 0.f);
  }

  // Diagonal coefficient: dcoef += weight * sum_i y_i * z_i over rows [i0, i0 + rows), summed in
  // double because it adds up every row of every head.
  void diag_dcoef(double* dcoef, const float* z, int64_t ldz, int64_t i0, int64_t rows, float weight) const {
    for (int64_t r = 0; r < rows; ++r) {
      const float* y = yf_ + (i0 + r) * ldyf_;
      const float* zr = z + r * ldz;
      for (int64_t d = 0; d < D_; ++d) dcoef[d] += static_cast<double>(weight) * y[d] * zr[d];
    }
  }

  // Whole head, S symmetric: dY = scale (G + G^T) Y M (+ Pd^T dO), one product instead of two.
  void symmetric_head(float* s, float* dp, float* keep, float* dy, float* dv, double* dcoef) {
    const int64_t L = L_;
    const float scale = static_cast<float>(bp_.scale);
    this->scores(s, 0, L, L);
    gemm<Dot, false>(L, L, Dv_, do_rows_, vt_, dp, g_.ldk, 1.f, false);
    for (int64_t i = 0; i < L; ++i) grad_row(s + i * g_.ldk, dp + i * g_.ldk, i, L, keep);
    symmetrize(dp, g_.ldk, L, ws_.template take<float>(kSymTile * kSymTile));
    const Panel gs = Base::a_rows(static_cast<const float*>(dp), g_.ldk, L, L, g_rows_);
    if (bp_.coef_mode == CoefMode::kDiag) {
      // Z = (G + G^T) Y; dc = scale/2 * sum_i y_i * z_i; dY = scale * Z * c.
      gemm<Dot, false>(L, D_, L, gs, yb_, dy, D_, 1.f, false);
      if (dcoef != nullptr) diag_dcoef(dcoef, dy, D_, 0, L, 0.5f * scale);
      const float* c = bp_.coef + h_ * D_;
      for (int64_t i = 0; i < L; ++i) {
        for (int64_t d = 0; d < D_; ++d) dy[i * D_ + d] *= scale * c[d];
      }
    } else {
      gemm<Dot, false>(L, D_, L, gs, yb_, dy, D_, scale, false);
    }
    const Panel pd_t = Base::b_rows(static_cast<const float*>(s), g_.ldk, L, L, p_cols_, g_.ldk);
    gemm<Dot, true>(L, Dv_, L, pd_t, do_pairs_, dv, Dv_, 1.f, shared_);
  }

  // Query rows [i0, i0 + rows): their query-side gradient, and their contribution to the
  // key / value side of every key they attend to.
  void block_rows(int64_t i0, int64_t rows, float* s, float* dp, float* keep, float* dy, float* dv, float* w,
                  float* ct, double* dcoef) {
    const int64_t kend = this->block_keys(i0, rows);
    if (kend == 0) return;
    const CoefMode mode = bp_.coef_mode;
    const float scale = static_cast<float>(bp_.scale);
    Band out_band, k_upper, k_lower;
    if (bp_.causal) {
      out_band.n_hi = i0;
      k_upper.k_hi = i0;
      k_lower.k_lo = -i0;
    }
    this->scores(s, i0, rows, kend);
    gemm<Dot, false>(rows, kend, Dv_, a_from(do_rows_, i0), vt_, dp, g_.ldk, 1.f, false, out_band);
    for (int64_t r = 0; r < rows; ++r) grad_row(s + r * g_.ldk, dp + r * g_.ldk, i0 + r, kend, keep);

    // Query side: scale G Y M^T.
    const Panel grad = Base::a_rows(static_cast<const float*>(dp), g_.ldk, rows, kend, g_rows_);
    float* dy_block = dy + i0 * D_;
    if (w == nullptr) {  // M = I
      gemm<Dot, false>(rows, D_, kend, grad, yb_, dy_block, D_, scale, true, k_upper);
    } else {
      gemm<Dot, false>(rows, D_, kend, grad, yb_, w, D_, 1.f, false, k_upper);  // W = G Y
      if (mode == CoefMode::kFull) {
        if (dcoef != nullptr) {  // scale Y_I^T W, added in double
          float* block = ct + D_ * D_;
          gemm<FloatDot, true>(D_, D_, rows, yf_ + i0 * ldyf_, ldyf_, w, D_, block, D_, scale, false);
          for (int64_t e = 0; e < D_ * D_; ++e) dcoef[e] += block[e];
        }
        gemm<FloatDot, false>(rows, D_, D_, w, D_, ct, D_, dy_block, D_, 1.f, true);
      } else {
        if (dcoef != nullptr) diag_dcoef(dcoef, w, D_, i0, rows, scale);
        const float* c = bp_.coef + h_ * D_;
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t d = 0; d < D_; ++d) dy_block[r * D_ + d] += scale * c[d] * w[r * D_ + d];
        }
      }
    }
    // Key side scale G^T Qm, value side Pd^T dO, for keys [0, kend).
    const Panel grad_t = Base::b_rows(static_cast<const float*>(dp), g_.ldk, rows, kend, g_cols_, g_.ldk);
    gemm<Dot, true>(kend, D_, rows, grad_t, b_from(qb_, i0), dy, D_, scale, true, k_lower);
    const Panel pd_t = Base::b_rows(static_cast<const float*>(s), g_.ldk, rows, kend, p_cols_, g_.ldk);
    gemm<Dot, true>(kend, Dv_, rows, pd_t, b_from(do_pairs_, i0), dv, Dv_, 1.f, true, k_lower);
  }

  const BackwardParams& bp_;
  Panel vt_, do_rows_, do_pairs_, qb_;
  float* dlse_ = nullptr;
  Word* g_rows_ = nullptr;  // bf16 G as A rows, G^T and Pd^T as kTransA A (null for fp32 operands)
  Word* g_cols_ = nullptr;
  Word* p_cols_ = nullptr;
};

// One task: query rows [r0, r1) of head h of sequence b, with its estimated cost (score
// products it multiplies).
struct Piece {
  int64_t b, h, r0, r1;
  double cost;
  // Mirrored forward tasks: the other group's rows [c0, c1) (c1 = 0 for other tasks), and which
  // of the call's running states the two groups' rows keep (one state for a group with itself).
  int64_t c0 = 0, c1 = 0;
  int64_t state_a = -1, state_b = -1;
  int64_t merge_a = -1, merge_b = -1;  // the merges those states go to
};

// Rows [r0, r1) of head (b, h) on the mirrored schedule, whose running states are states
// [first, first + count) of the call, one per task that meets the rows, merged in that order.
struct MirrorMerge {
  int64_t b, h, r0, r1, first, count;
};

// Whether sequence b (L tokens) takes the mirrored forward: like the whole-head symmetric
// schedule, only when at most a quarter of its keys are trailing padding (the mirrored tiles
// cover every key; the row schedule stops at the last real one).
template <typename Params>
bool mirrors(const Params& p, const Geometry& g, int64_t b, int64_t L) {
  if (!g.mirrored || L <= kWholeHead) return false;
  if (p.key_padding_mask == nullptr) return true;
  const bool* real = p.key_padding_mask + b * p.seqlen;
  int64_t key_end = 0;
  for (int64_t j = 0; j < L; ++j) {
    if (real[j]) key_end = j + 1;
  }
  return 4 * key_end > 3 * L;
}

// Pieces of one mirrored head: a task per pair of groups (the larger, two-group ones first), and
// each group's merge of the states its tasks write; state_rows gets each new state's row count.
void plan_mirrored(int64_t b, int64_t h, int64_t L, int64_t heads, std::vector<Piece>& pieces,
                   std::vector<MirrorMerge>& merges, std::vector<int64_t>& state_rows) {
  const int64_t groups = mirror_groups(L, heads);
  const int64_t rows = mirror_group_rows(L, groups);
  const int64_t first = static_cast<int64_t>(state_rows.size());
  const int64_t merge0 = static_cast<int64_t>(merges.size());
  auto lo = [&](int64_t a) { return a * rows; };
  auto hi = [&](int64_t a) { return std::min(L, (a + 1) * rows); };
  for (int64_t a = 0; a < groups; ++a) {
    merges.push_back({b, h, lo(a), hi(a), first + a * groups, groups});
    for (int64_t k = 0; k < groups; ++k) state_rows.push_back(hi(a) - lo(a));
  }
  for (int64_t a = 0; a < groups; ++a) {
    for (int64_t c = a + 1; c < groups; ++c) {
      const double work = 1.5 * static_cast<double>((hi(a) - lo(a)) * (hi(c) - lo(c)));
      pieces.push_back({b, h, lo(a), hi(a), work, lo(c), hi(c), first + a * groups + c, first + c * groups + a,
                        merge0 + a, merge0 + c});
    }
  }
  for (int64_t a = 0; a < groups; ++a) {
    const double n = static_cast<double>(hi(a) - lo(a));
    pieces.push_back({b, h, lo(a), hi(a), 0.75 * n * n, lo(a), hi(a), first + a * groups + a, first + a * groups + a,
                      merge0 + a, merge0 + a});
  }
}

// Floats that the running states of a call's mirrored heads take.
template <typename Params>
int64_t mirror_state_floats(const Params& p, const Geometry& g) {
  int64_t total = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t L = p.cu_seqlens != nullptr ? p.cu_seqlens[b + 1] - p.cu_seqlens[b] : p.seqlen;
    if (!mirrors(p, g, b, L)) continue;
    total += p.heads * mirror_groups(L, p.batch * p.heads) * L * (p.value_dim + 2);
  }
  return total;
}

// The tasks of one call, longest sequences first (stable, so equal lengths keep batch order),
// then by head, then by query rows. The forward, and the backward on the tiled schedule, cut
// heads longer than g.task_rows into tasks of g.task_rows rows (causal forward heads into longer
// ones when the call has many heads, see kCausalTasks). The other backward, whose tasks
// each hold a head-sized gradient accumulator, cuts heads only as far as needed for about
// kBackwardTasks tasks in all. Nothing here depends on
// the thread count, so neither does any result.
template <typename Params>
std::vector<Piece> plan_tasks(const Params& p, const Geometry& g, bool backward,
                              std::vector<MirrorMerge>* merges = nullptr, std::vector<int64_t>* state_rows = nullptr) {
  const bool mirror = merges != nullptr && g.mirrored &&
                      mirror_state_floats(p, g) * int64_t{sizeof(float)} <= kMirrorStateBytes;
  std::vector<int64_t> order(p.batch);
  std::iota(order.begin(), order.end(), 0);
  auto length = [&p](int64_t b) -> int64_t {
    return p.cu_seqlens != nullptr ? p.cu_seqlens[b + 1] - p.cu_seqlens[b] : p.seqlen;
  };
  if (p.cu_seqlens != nullptr) {
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return length(x) > length(y); });
  }
  std::vector<Piece> pieces;
  for (const int64_t b : order) {
    const int64_t L = length(b);
    if (L == 0) continue;
    int64_t step = g.task_rows;
    if (backward && !g.tiled && L > g.task_rows) {
      const int64_t wanted = (kBackwardTasks + p.batch * p.heads - 1) / (p.batch * p.heads);
      const int64_t slices = std::min((L + g.task_rows - 1) / g.task_rows, wanted);
      step = round_up((L + slices - 1) / slices, g.block);
    }
    if (!backward && g.tiled && p.causal) {
      const int64_t slices = (kCausalTasks + p.batch * p.heads - 1) / (p.batch * p.heads);
      step = std::max(step, round_up((L + slices - 1) / slices, g.block));
    }
    const bool mirrored = mirror && mirrors(p, g, b, L);
    for (int64_t h = 0; h < p.heads; ++h) {
      if (mirrored) {
        plan_mirrored(b, h, L, p.batch * p.heads, pieces, *merges, *state_rows);
        continue;
      }
      for (int64_t r0 = 0; r0 < L; r0 += step) {
        const int64_t r1 = std::min(L, r0 + step);
        // Causal rows see keys [0, i]: the block's mean row sees about (r0 + r1) / 2 of them.
        const double keys = p.causal ? 0.5 * static_cast<double>(r0 + r1) : static_cast<double>(L);
        pieces.push_back({b, h, r0, r1, static_cast<double>(r1 - r0) * keys, 0, 0, -1, -1, -1, -1});
      }
    }
  }
  return pieces;
}

// The gradient accumulators of backward tasks that share their head with others, and which
// heads to sum them for (each in slice order, so the sum never depends on the thread count).
class SliceBuffers {
 public:
  struct Group {
    int64_t b, h, first, count;
  };

  SliceBuffers() = default;
  SliceBuffers(const BackwardParams& p, const std::vector<Piece>& pieces) : index_(pieces.size(), -1) {
    const int64_t D = p.head_dim, Dv = p.value_dim;
    const int64_t csize = p.coef_mode == CoefMode::kFull ? D * D : D;
    std::vector<int64_t> lengths;
    for (size_t t = 0; t < pieces.size();) {
      size_t e = t + 1;
      while (e < pieces.size() && pieces[e].b == pieces[t].b && pieces[e].h == pieces[t].h) ++e;
      if (e - t > 1) {
        const int64_t first = static_cast<int64_t>(lengths.size());
        groups_.push_back({pieces[t].b, pieces[t].h, first, static_cast<int64_t>(e - t)});
        for (size_t k = t; k < e; ++k) {
          index_[k] = static_cast<int64_t>(lengths.size());
          lengths.push_back(pieces[e - 1].r1);
        }
      }
      t = e;
    }
    const bool shared = p.v.data == nullptr;
    auto floats = [&](int64_t L) { return round_up(L * D + (shared ? 0 : L * Dv), 16); };
    int64_t total = 0;
    for (const int64_t L : lengths) total += floats(L);
    const int64_t total_coef = static_cast<int64_t>(lengths.size()) * csize;
    floats_ = c10::GetCPUAllocator()->allocate(static_cast<size_t>(total) * sizeof(float));
    coefs_ = c10::GetCPUAllocator()->allocate(static_cast<size_t>(total_coef) * sizeof(double));
    float* next = static_cast<float*>(floats_.get());
    for (size_t k = 0; k < lengths.size(); ++k) {
      BackwardSlice slice;
      slice.dy = next;
      slice.dv = shared ? next : next + lengths[k] * D;
      slice.dcoef = static_cast<double*>(coefs_.get()) + k * csize;
      slices_.push_back(slice);
      next += floats(lengths[k]);
    }
  }

  // Task t's accumulator, or null for a task that owns its whole head.
  const BackwardSlice* of(int64_t t) const { return index_.empty() || index_[t] < 0 ? nullptr : &slices_[index_[t]]; }
  const std::vector<Group>& groups() const { return groups_; }
  const BackwardSlice* first(const Group& group) const { return &slices_[group.first]; }

 private:
  std::vector<int64_t> index_;
  std::vector<Group> groups_;
  std::vector<BackwardSlice> slices_;
  c10::DataPtr floats_, coefs_;
};

// Deals the tasks, costliest first (plan order among equals), each to the worker with the least
// estimated work so far (lowest index on ties): longest-processing-time-first, round-robin for
// equal tasks. Each worker owns its list before any runs, so none ever holds work it will not
// run next. Returns per worker the indices of its tasks.
std::vector<std::vector<int64_t>> deal_tasks(const std::vector<Piece>& pieces, int64_t workers) {
  std::vector<std::vector<int64_t>> lists(workers);
  std::vector<double> load(workers, 0.0);
  std::vector<int64_t> order(pieces.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return pieces[x].cost > pieces[y].cost; });
  for (const int64_t t : order) {
    const int64_t w = std::min_element(load.begin(), load.end()) - load.begin();
    lists[w].push_back(t);
    load[w] += pieces[t].cost;
  }
  return lists;
}

// One task of a round of the tiled backward: tile (bi, bj) of the wave's head `head`, and with
// `diagonals` the tiles (bi, bi) and (bj, bj) after it; bi == bj is a diagonal tile alone.
struct TileTask {
  int64_t head, bi, bj;
  bool diagonals;
  double cost;  // tile products
};

// Rounds of the tiles of a head of nb blocks (the circle method over nb rounded up to even).
int64_t tile_rounds(int64_t nb) { return nb + nb % 2 - 1; }

// Round r's tasks of a head of nb blocks: each block sits in exactly one of them, each pair of
// blocks meets in exactly one round, and each diagonal tile is taken once (by the block paired
// with the extra one when nb is odd, by round 0's tasks when nb is even).
void round_tasks(int64_t head, int64_t nb, int64_t r, bool causal, std::vector<TileTask>& out) {
  const int64_t n = nb + nb % 2;
  const double pair = causal ? 5.0 : 7.0, diagonal = 5.0;
  auto add = [&](int64_t a, int64_t b) {
    if (a == nb || b == nb) {
      const int64_t x = a == nb ? b : a;
      out.push_back({head, x, x, false, diagonal});
      return;
    }
    const bool diagonals = nb % 2 == 0 && r == 0;
    out.push_back({head, std::max(a, b), std::min(a, b), diagonals, pair + (diagonals ? 2 * diagonal : 0.0)});
  };
  add(n - 1, r);
  for (int64_t k = 1; k < n / 2; ++k) add((r + k) % (n - 1), (r - k + n - 1) % (n - 1));
}

// A step of the tiled backward: a head's prepare_tiled, a task of tiles of one round, or a head's
// finish_tiled.
struct TiledJob {
  enum Kind { kPrepare, kTiles, kFinish } kind;
  int64_t head, round;
  TileTask tiles;
};

// Spins, then yields, until ready(): a worker waits for the tiles its task depends on, which run
// on another worker (or, when that worker lost its core, for it to get one back).
template <typename Ready>
void wait_until(const Ready& ready) {
  for (int spins = 0; !ready(); ++spins) {
    if (spins >= 64) std::this_thread::yield();
  }
}

// The backward of tiled heads (see BackwardHead::pair_tile). Heads go in waves, longest first,
// each wave just large enough that a round has about two tasks per thread. A head packs its
// panels (prepare_tiled), the rounds of tiles run, and the head writes its gradients
// (finish_tiled); every wave runs in one parallel region: each worker runs a list dealt before any
// runs, a wave's heads are prepared while the previous wave's last tiles run, and its finishes run
// beside the next wave's prepares (so one worker does not pack or write a head while the others
// wait), and a task waits only for its own two blocks to have finished the previous round
// (per-block counters), never for a barrier across all workers, so one descheduled thread delays
// only the tasks that need its tiles. Within a round no two tasks touch the same block, so tasks
// never share an accumulator, and every block's accumulator takes its tiles in round order: the
// results do not depend on the thread count, which only sets the wave size and the deal. A head's
// workspace lives from its prepare to its finish, so at most two waves hold one.
template <typename Task>
void tiled_backward(const BackwardParams& p, const Geometry& g) {
  struct HeadRef {
    int64_t b, h, blocks;
  };
  std::vector<int64_t> order(p.batch);
  std::iota(order.begin(), order.end(), 0);
  auto length = [&p](int64_t b) -> int64_t {
    return p.cu_seqlens != nullptr ? p.cu_seqlens[b + 1] - p.cu_seqlens[b] : p.seqlen;
  };
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return length(x) > length(y); });
  std::vector<HeadRef> heads;
  for (const int64_t b : order) {
    for (int64_t h = 0; h < p.heads && length(b) > 0; ++h) heads.push_back({b, h, (length(b) + g.tile - 1) / g.tile});
  }
  const int64_t n_heads = static_cast<int64_t>(heads.size());
  // Inside another parallel region at::parallel_for runs the whole range on one thread.
  const int64_t threads = at::in_parallel_region() ? 1 : std::max<int64_t>(1, at::get_num_threads());
  // Waves: heads [wave_first[w], wave_first[w + 1]).
  std::vector<int64_t> wave_first{0};
  int64_t workers = 1;
  while (wave_first.back() < n_heads) {
    int64_t last = wave_first.back();
    int64_t per_round = 0;
    while (last < n_heads && (last == wave_first.back() || per_round < 2 * threads)) {
      per_round += std::max<int64_t>(1, heads[last].blocks / 2);
      ++last;
    }
    workers = std::max(workers, std::min<int64_t>(threads, std::max<int64_t>(last - wave_first.back(), per_round)));
    wave_first.push_back(last);
  }
  std::vector<int64_t> block0(n_heads + 1, 0);  // the heads' blocks, numbered one after another
  for (int64_t k = 0; k < n_heads; ++k) block0[k + 1] = block0[k] + heads[k].blocks;

  // The jobs in an order that puts every job after those it waits for, and the deal: head k's
  // prepare and finish to worker k % workers (so a head's finish and the next head's prepare run
  // side by side); each round's tasks to the worker with the least work in that round, then in
  // the call so far.
  std::vector<TiledJob> jobs;
  std::vector<std::vector<int64_t>> lists(workers);
  std::vector<int64_t> ran(workers, 0), tiles(workers, 0), tiles_left(n_heads, 0);
  auto deal_heads = [&](TiledJob::Kind kind, int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      lists[k % workers].push_back(static_cast<int64_t>(jobs.size()));
      jobs.push_back({kind, k, 0, {}});
    }
  };
  deal_heads(TiledJob::kPrepare, 0, wave_first[1]);
  std::vector<TileTask> round;
  std::vector<double> load(workers);
  for (size_t w = 0; w + 1 < wave_first.size(); ++w) {
    const int64_t first = wave_first[w], last = wave_first[w + 1];
    int64_t rounds = 0;
    for (int64_t k = first; k < last; ++k) rounds = std::max(rounds, tile_rounds(heads[k].blocks));
    for (int64_t r = 0; r < rounds; ++r) {
      round.clear();
      for (int64_t k = first; k < last; ++k) {
        if (r < tile_rounds(heads[k].blocks)) round_tasks(k, heads[k].blocks, r, p.causal, round);
      }
      std::fill(load.begin(), load.end(), 0.0);
      for (const TileTask& task : round) {
        int64_t x = 0;
        for (int64_t y = 1; y < workers; ++y) {
          if (load[y] < load[x] || (load[y] == load[x] && tiles[y] < tiles[x])) x = y;
        }
        lists[x].push_back(static_cast<int64_t>(jobs.size()));
        jobs.push_back({TiledJob::kTiles, task.head, r, task});
        tiles_left[task.head] += 1;
        load[x] += task.cost;
        ran[x] += 1;
        tiles[x] += task.diagonals ? 3 : 1;
      }
    }
    if (w + 2 < wave_first.size()) deal_heads(TiledJob::kPrepare, last, wave_first[w + 2]);
    deal_heads(TiledJob::kFinish, first, last);
  }

  std::vector<std::unique_ptr<Workspace>> head_ws(n_heads);
  std::vector<std::unique_ptr<Task>> head_tasks(n_heads);
  std::vector<std::atomic<int64_t>> rounds_done(block0[n_heads]);  // per block
  std::vector<std::atomic<int64_t>> pending(n_heads);              // per head: prepare, then its tile tasks
  for (int64_t k = 0; k < n_heads; ++k) pending[k].store(1 + tiles_left[k], std::memory_order_relaxed);
  for (auto& x : rounds_done) x.store(0, std::memory_order_relaxed);
  auto run_job = [&](const TiledJob& job, float* tile) {
    const int64_t k = job.head;
    std::atomic<int64_t>& left = pending[k];
    if (job.kind == TiledJob::kPrepare) {
      head_ws[k] = std::make_unique<Workspace>(Workspace::bytes_for(Task::tiled_head_floats(p, g)));
      head_tasks[k] = std::make_unique<Task>(p, g, *head_ws[k], heads[k].b, heads[k].h);
      head_tasks[k]->prepare_tiled();
      left.fetch_sub(1, std::memory_order_release);
      return;
    }
    if (job.kind == TiledJob::kFinish) {
      wait_until([&] { return left.load(std::memory_order_acquire) == 0; });
      head_tasks[k]->finish_tiled();
      head_tasks[k].reset();
      head_ws[k].reset();
      return;
    }
    const TileTask& task = job.tiles;
    std::atomic<int64_t>& done_i = rounds_done[block0[k] + task.bi];
    std::atomic<int64_t>& done_j = rounds_done[block0[k] + task.bj];
    wait_until([&] {
      return left.load(std::memory_order_acquire) <= tiles_left[k] &&
             done_i.load(std::memory_order_acquire) == job.round && done_j.load(std::memory_order_acquire) == job.round;
    });
    Task& head = *head_tasks[k];
    head.pair_tile(task.bi, task.bj, tile);
    if (task.diagonals) {
      head.pair_tile(task.bi, task.bi, tile);
      head.pair_tile(task.bj, task.bj, tile);
    }
    done_i.store(job.round + 1, std::memory_order_release);
    if (task.bj != task.bi) done_j.store(job.round + 1, std::memory_order_release);
    left.fetch_sub(1, std::memory_order_release);
  };
  const int64_t scratch_floats = Task::tiled_scratch_floats(p, g);
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    // A thread given several workers' lists runs their jobs merged in job order.
    std::vector<int64_t> mine;
    for (int64_t w = w0; w < w1; ++w) mine.insert(mine.end(), lists[w].begin(), lists[w].end());
    std::sort(mine.begin(), mine.end());
    Workspace scratch(Workspace::bytes_for(scratch_floats));
    float* tile = scratch.take<float>(scratch_floats);
    for (const int64_t j : mine) run_job(jobs[j], tile);
  });
  if (p.schedule != nullptr) {
    int64_t used = workers;
    while (used > 1 && ran[used - 1] == 0) --used;
    p.schedule->tasks.assign(ran.begin(), ran.begin() + used);
    p.schedule->rows.assign(tiles.begin(), tiles.begin() + used);
  }
}

// Runs every task of the call: one worker per thread (never more than tasks) runs its dealt
// list in order, prefetching the inputs of its next task while it computes the current one.
// Which worker runs a task never changes what the task computes. When p.schedule is set, it
// receives the tasks and query rows each worker ran.
template <typename Task, typename Params>
void for_each_head(const Params& p) {
  constexpr bool kBackward = std::is_same_v<Params, BackwardParams>;
  const Geometry g(p, kBackward);
  if constexpr (kBackward) {
    if (g.tiled) {
      tiled_backward<Task>(p, g);
      return;
    }
  }
  std::vector<MirrorMerge> merges;
  std::vector<int64_t> state_rows;
  const std::vector<Piece> pieces = plan_tasks(p, g, kBackward, &merges, &state_rows);
  const int64_t tasks = static_cast<int64_t>(pieces.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  const auto lists = deal_tasks(pieces, workers);
  if (p.schedule != nullptr) {
    p.schedule->tasks.assign(workers, 0);
    p.schedule->rows.assign(workers, 0);
  }
  if (tasks == 0) return;
  SliceBuffers slices;
  if constexpr (kBackward) slices = SliceBuffers(p, pieces);
  // Running states of mirrored forward heads: o [rows, Dv], m [rows], l [rows] each.
  c10::DataPtr state_data;
  std::vector<RowState> states;
  if (!state_rows.empty()) {
    const int64_t Dv = p.value_dim;
    int64_t total = 0;
    for (const int64_t rows : state_rows) total += rows * (Dv + 2);
    state_data = c10::GetCPUAllocator()->allocate(static_cast<size_t>(total) * sizeof(float));
    float* next = static_cast<float*>(state_data.get());
    for (const int64_t rows : state_rows) {
      states.push_back({next, next + rows * Dv, next + rows * (Dv + 1)});
      next += rows * (Dv + 2);
    }
  }
  // Tasks still to write each merge's states: the worker that finishes the last one merges them,
  // inside the same parallel region (whichever worker it is, the merge order is fixed).
  std::unique_ptr<std::atomic<int64_t>[]> pending(new std::atomic<int64_t>[merges.size()]);
  for (size_t k = 0; k < merges.size(); ++k) pending[k].store(merges[k].count, std::memory_order_relaxed);
  auto finish = [&](Workspace& ws, int64_t k) {
    if constexpr (!kBackward) {
      if (pending[k].fetch_sub(1, std::memory_order_acq_rel) != 1) return;
      ws.reset();
      const MirrorMerge& m = merges[k];
      Task(p, g, ws, m.b, m.h).merge(m.r0, m.r1, states.data() + m.first, m.count);
    }
  };
  // Inside another parallel region at::parallel_for runs the whole range on one thread.
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    Workspace ws(Workspace::bytes_for(Task::workspace_floats(p, g)));
    for (int64_t w = w0; w < w1; ++w) {
      const std::vector<int64_t>& list = lists[w];
      auto task = [&](int64_t t) { return Task(p, g, ws, pieces[t].b, pieces[t].h); };
      if (!list.empty()) task(list[0]).prefetch_inputs();
      for (size_t k = 0; k < list.size(); ++k) {
        if (k + 1 < list.size()) task(list[k + 1]).prefetch_inputs();
        ws.reset();
        const Piece& piece = pieces[list[k]];
        Task head = task(list[k]);
        if constexpr (kBackward) {
          head.run(piece.r0, piece.r1, slices.of(list[k]));
        } else if (piece.c1 > 0) {
          head.run_mirrored(piece.r0, piece.r1, piece.c0, piece.c1, states[piece.state_a], states[piece.state_b]);
          finish(ws, piece.merge_a);
          if (piece.merge_b != piece.merge_a) finish(ws, piece.merge_b);
        } else {
          head.run(piece.r0, piece.r1);
        }
        if (p.schedule != nullptr) {
          p.schedule->tasks[w] += 1;
          p.schedule->rows[w] += piece.r1 - piece.r0 + (piece.c0 != piece.r0 ? piece.c1 - piece.c0 : 0);
        }
      }
    }
  });
  if constexpr (kBackward) {
    const auto& groups = slices.groups();
    at::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t k0, int64_t k1) {
      Workspace ws(Workspace::bytes_for(0));
      for (int64_t k = k0; k < k1; ++k) {
        Task(p, g, ws, groups[k].b, groups[k].h).reduce(slices.first(groups[k]), groups[k].count);
      }
    });
  }
}

}  // namespace

#if defined(SYMATTN_BF16_DOT)
// This build holds only the bfloat16 kernels (vdpbf16ps); attention_cpu.cpp sends the other
// dtypes to the AVX512 build.
void attention_forward(const ForwardParams& p) {
  TORCH_INTERNAL_ASSERT(p.dtype == DType::kBFloat16, "symattn: the AVX512_BF16 kernels take bfloat16 only");
  for_each_head<ForwardHead<c10::BFloat16>>(p);
}

void attention_backward(const BackwardParams& p) {
  TORCH_INTERNAL_ASSERT(p.dtype == DType::kBFloat16, "symattn: the AVX512_BF16 kernels take bfloat16 only");
  for_each_head<BackwardHead<c10::BFloat16>>(p);
}
#else
void attention_forward(const ForwardParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: for_each_head<ForwardHead<float>>(p); break;
    case DType::kBFloat16: for_each_head<ForwardHead<c10::BFloat16>>(p); break;
    case DType::kFloat16: for_each_head<ForwardHead<c10::Half>>(p); break;
  }
}

void attention_backward(const BackwardParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: for_each_head<BackwardHead<float>>(p); break;
    case DType::kBFloat16: for_each_head<BackwardHead<c10::BFloat16>>(p); break;
    case DType::kFloat16: for_each_head<BackwardHead<c10::Half>>(p); break;
  }
}
#endif

}  // namespace CPU_CAPABILITY
}  // namespace symattn::cpu
