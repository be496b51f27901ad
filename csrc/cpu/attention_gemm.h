// The products of the fused CPU attention kernels: operand formats (fp32 words, bf16 pairs),
// operand packing and the register-tiled micro-kernel with its causal trimming (Band).
#pragma once

#include "attention_tiling.h"

namespace symattn::cpu {
namespace CPU_CAPABILITY {
namespace {

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

#if defined(SYMATTN_BF16_PAIRS_ON_AVX2)
// The check build's pairs (isa.h, bf16_pairs_avx2.h). The helpers that vdpbf16ps's build writes
// with AVX-512 conversions round to nearest even through c10::BFloat16 here.
struct Bf16Dot {
  using Word = uint32_t;
  using Reg = __m256i;
  static constexpr int64_t kPack = 2;
  static __m256i load(const uint32_t* p) { return load_pairs(p, 8); }
  static __m256i load(const uint32_t* p, int64_t count) { return load_pairs(p, count); }
  static __m256i broadcast(const uint32_t* p) {
    uint32_t word;
    std::memcpy(&word, p, sizeof(word));
    return _mm256_set1_epi32(static_cast<int>(word));
  }
  static Vec fma(const __m256i& a, const __m256i& b, const Vec& acc) {
    return Vec(dot_pairs(static_cast<__m256>(acc), a, b));
  }
};

inline uint16_t bf16_bits(float x) { return c10::BFloat16(x).x; }
inline uint16_t bf16_bits(c10::BFloat16 x) { return x.x; }

// Stores the bf16 bits of x to dst[0, count).
inline void store_bf16_lanes(uint16_t* dst, const Vec& x, int64_t count) {
  alignas(32) float lanes[kVec];
  x.store(lanes);
  for (int64_t i = 0; i < std::min<int64_t>(count, kVec); ++i) dst[i] = bf16_bits(lanes[i]);
}

// "B rows": dst [ceil(m / 2), n] words (row stride ldd) <- rows 2t and 2t + 1 of src [m, n].
template <typename T>
void pack_bf16_pairs(const T* src, int64_t ld, int64_t m, int64_t n, uint32_t* dst, int64_t ldd) {
  for (int64_t t = 0; 2 * t < m; ++t) {
    const T* even = src + 2 * t * ld;
    const bool has_odd = 2 * t + 1 < m;
    for (int64_t j = 0; j < n; ++j) {
      const uint32_t odd = has_odd ? bf16_bits(even[ld + j]) : 0u;
      dst[t * ldd + j] = bf16_bits(even[j]) | odd << 16;
    }
  }
}
#elif defined(SYMATTN_BF16_DOT)
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
inline void store_bf16_lanes(uint16_t* dst, const Vec& x, int64_t count) {
  const __m256i bits = (__m256i)_mm512_cvtneps_pbh(x);
  if (count >= 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), bits);
  } else {
    _mm256_mask_storeu_epi16(dst, Bf16Dot::lanes(count), bits);
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

#if defined(SYMATTN_BF16_DOT)
void store_elems(uint32_t* row, int64_t j, const Vec& x, int64_t count) {
  store_bf16_lanes(reinterpret_cast<uint16_t*>(row) + j, x, count);
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
      for (int64_t j = 0; j < k; j += kVec) {
        store_bf16_lanes(row + j, Vec::loadu(in + j, std::min<int64_t>(kVec, k - j)), k - j);
      }
    } else {
      std::memcpy(row, in, k * sizeof(uint16_t));
    }
    if (k % 2 != 0) row[k] = 0;
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
      // One explicit FMA where C accumulates: left to the compiler, a * alpha + C is contracted
      // in some instantiations and not others, so one score would round differently in a ragged
      // micro-tile than in a whole one, and a backward's recomputed score differ from the forward's.
      const Vec result = accumulate ? at::vec::fmadd(acc[r][v], valpha, Vec::loadu(crow + v * kVec, count))
                                    : acc[r][v] * valpha;
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

// a[0, n) . b[0, n) summed as gemm sums one output of an fp32 product over k = n: one FMA chain
// from 0 per kDepth block of k, each block's sum added to the blocks before it. A softmax
// backward's delta = O . dO taken this way equals its product's dP = dO . V^T entry bit for bit
// where the row's O is one value row (a saturated, one-hot row), so G = P (dP - delta) is 0 there
// as it should be; a vectorised sum's different order leaves an ulp that the score scale
// magnifies into dq. The chain steps are FloatDot::fma's, every lane alike: fused where the
// build's vectors are (std::fma there), a product and then a sum in the portable build, whose
// at::vec::fmadd is a * b + c.
template <typename T>
float product_order_dot(const T* a, const T* b, int64_t n) {
  float total = 0.f;
  for (int64_t k0 = 0; k0 < n; k0 += kDepth) {
    Vec chain(0.f);
    for (int64_t k = k0; k < std::min(n, k0 + kDepth); ++k) {
      chain = FloatDot::fma(Vec(static_cast<float>(a[k])), Vec(static_cast<float>(b[k])), chain);
    }
    float lanes[kVec];
    chain.store(lanes);
    total = k0 == 0 ? lanes[0] : lanes[0] + total;
  }
  return total;
}

template <typename Dot, bool kTransA>
void gemm(int64_t m, int64_t n, int64_t k, const Operand<typename Dot::Word>& a,
          const Operand<typename Dot::Word>& b, float* c, int64_t ldc, float alpha, bool accumulate,
          const Band& band = Band{}) {
  gemm<Dot, kTransA>(m, n, k, a.data, a.ld, b.data, b.ld, c, ldc, alpha, accumulate, band);
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace symattn::cpu
