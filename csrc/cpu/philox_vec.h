// Dropout keep multipliers from Philox-4x32-10 drawn many counters per instruction, bit-equal
// to dropout_word (../common/philox.h, shared with the CUDA kernels) and so to
// symattn_kernels.reference.dropout_keep_mask: element offset e takes output word e % 4 of the
// counter e / 4, so every Philox call serves four consecutive elements.
//
// Each counter sits in a 64-bit lane (AVX-512: 8 per register, AVX2: 4): _mm*_mul_epu32
// multiplies the low words into full 64-bit products, so one instruction gives both the high
// word (the next round's XOR input, after a shift) and the low word (the product kept as the
// lane itself). The upper half of every lane carries garbage that only XORs into other upper
// halves, which mul_epu32 ignores and the final interleave drops. The counter's high word starts
// as the second counter word, so a run of counters may cross a multiple of 2^32. The DEFAULT
// build draws with the scalar philox4x, one counter (four elements) at a time.
//
// Compiled once per instruction set inside its CPU_CAPABILITY namespace (see isa.h), with
// internal linkage but for the dropout_keep entry point.
#pragma once

#include <algorithm>
#include <cstdint>

#include "../common/philox.h"

#if defined(SYMATTN_ISA_LEVEL) && SYMATTN_ISA_LEVEL >= 1
#include <immintrin.h>
#endif

namespace symattn::cpu {

using symattn::dropout_threshold;
using symattn::philox4x;

namespace CPU_CAPABILITY {
namespace {

// One call's constants: the keep rule and the seed's 10 round keys.
struct KeepRule {
  uint64_t seed;
  uint32_t threshold;  // keep where (word >> 1) >= threshold
  float scale;         // the kept elements' multiplier, 1 / (1 - dropout_p)
  uint32_t k0[kPhiloxRounds], k1[kPhiloxRounds];

  KeepRule(uint64_t seed_, uint32_t threshold_, float scale_) : seed(seed_), threshold(threshold_), scale(scale_) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < kPhiloxRounds; ++r, a += kPhiloxKeyA, b += kPhiloxKeyB) {
      k0[r] = a;
      k1[r] = b;
    }
  }
};

// GCC's AVX-512 intrinsics start from _mm512_undefined_epi32 (a self-initialised variable), which
// -Wall reports as maybe-uninitialized at every inlined use.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#if defined(SYMATTN_ISA_LEVEL) && SYMATTN_ISA_LEVEL >= 2
using PhiloxReg = __m512i;
constexpr int kLanes64 = 8;
inline PhiloxReg lanes64_from(uint64_t first) {
  return _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(first)), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
}
inline PhiloxReg high_words(const PhiloxReg& x) { return _mm512_srli_epi64(x, 32); }
inline PhiloxReg mul_wide(const PhiloxReg& x, uint32_t m) { return _mm512_mul_epu32(x, _mm512_set1_epi64(m)); }
inline PhiloxReg xor2(const PhiloxReg& a, uint32_t k) {
  return _mm512_xor_si512(a, _mm512_set1_epi32(static_cast<int>(k)));
}
// a ^ b ^ k in one vpternlogd.
inline PhiloxReg xor3(const PhiloxReg& a, const PhiloxReg& b, uint32_t k) {
  return _mm512_ternarylogic_epi32(a, b, _mm512_set1_epi32(static_cast<int>(k)), 0x96);
}
// Per lane: low word of x, then low word of y (the lane's two 32-bit halves).
inline PhiloxReg pair_low_words(const PhiloxReg& x, const PhiloxReg& y) {
  return _mm512_mask_blend_epi32(0xAAAA, x, _mm512_slli_epi64(y, 32));
}
// The 64-bit lanes of a and b interleaved: a0 b0 a1 b1 ... from lane `from` on (0 or 4).
inline PhiloxReg interleave_lanes(const PhiloxReg& a, const PhiloxReg& b, int from) {
  const __m512i idx = from == 0 ? _mm512_set_epi64(11, 3, 10, 2, 9, 1, 8, 0) : _mm512_set_epi64(15, 7, 14, 6, 13, 5, 12, 4);
  return _mm512_permutex2var_epi64(a, idx, b);
}
#elif defined(SYMATTN_ISA_LEVEL) && SYMATTN_ISA_LEVEL == 1
using PhiloxReg = __m256i;
constexpr int kLanes64 = 4;
inline PhiloxReg lanes64_from(uint64_t first) {
  return _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(first)), _mm256_set_epi64x(3, 2, 1, 0));
}
inline PhiloxReg high_words(const PhiloxReg& x) { return _mm256_srli_epi64(x, 32); }
inline PhiloxReg mul_wide(const PhiloxReg& x, uint32_t m) { return _mm256_mul_epu32(x, _mm256_set1_epi64x(m)); }
inline PhiloxReg xor2(const PhiloxReg& a, uint32_t k) {
  return _mm256_xor_si256(a, _mm256_set1_epi32(static_cast<int>(k)));
}
inline PhiloxReg xor3(const PhiloxReg& a, const PhiloxReg& b, uint32_t k) {
  return _mm256_xor_si256(_mm256_xor_si256(a, b), _mm256_set1_epi32(static_cast<int>(k)));
}
inline PhiloxReg pair_low_words(const PhiloxReg& x, const PhiloxReg& y) {
  return _mm256_blend_epi32(x, _mm256_slli_epi64(y, 32), 0xAA);
}
inline PhiloxReg interleave_lanes(const PhiloxReg& a, const PhiloxReg& b, int from) {
  const __m256i lo = _mm256_unpacklo_epi64(a, b), hi = _mm256_unpackhi_epi64(a, b);  // lanes 0, 2 / 1, 3
  return from == 0 ? _mm256_permute2x128_si256(lo, hi, 0x20) : _mm256_permute2x128_si256(lo, hi, 0x31);
}
#endif

#if defined(SYMATTN_ISA_LEVEL) && SYMATTN_ISA_LEVEL >= 1
// Registers of counters drawn together: independent chains that hide the multiply latency.
constexpr int kChains = kLanes64 == 8 ? 4 : 2;
// 32-bit words (elements) of one register; one register of counters yields four of them.
constexpr int64_t kPacked = 2 * kLanes64;

// The four output words of the counters in c[v] (kLanes64 each, 64-bit lanes), left in the low
// halves of the lanes of c[v], c1[v], c2[v], c3[v]. Rounds 0 to 2 use that c2 = c3 = 0 at the
// start, and kSameHigh that every counter's high word is `high` (the common case: no multiple of
// 2^32 among them), which makes round 0's c0 and so round 1's A product one number for all lanes.
template <int N, bool kSameHigh>
inline void philox_rounds(const KeepRule& rule, PhiloxReg* c0, PhiloxReg* c1, PhiloxReg* c2, PhiloxReg* c3,
                          uint32_t high) {
  for (int v = 0; v < N; ++v) {
    c3[v] = mul_wide(c0[v], kPhiloxRoundA);
    c2[v] = xor2(high_words(c3[v]), rule.k1[0]);
    if (!kSameHigh) c0[v] = xor2(high_words(c0[v]), rule.k0[0]);
  }
  const uint64_t prod_a1 = static_cast<uint64_t>(kPhiloxRoundA) * (high ^ rule.k0[0]);  // kSameHigh
  for (int v = 0; v < N; ++v) {
    const PhiloxReg prod_b = mul_wide(c2[v], kPhiloxRoundB);
    if (kSameHigh) {
      c2[v] = xor2(c3[v], static_cast<uint32_t>(prod_a1 >> 32) ^ rule.k1[1]);
    } else {
      const PhiloxReg prod_a = mul_wide(c0[v], kPhiloxRoundA);
      c2[v] = xor3(high_words(prod_a), c3[v], rule.k1[1]);
      c3[v] = prod_a;
    }
    c0[v] = xor2(high_words(prod_b), rule.k0[1]);
    c1[v] = prod_b;
  }
  for (int r = 2; r < kPhiloxRounds; ++r) {
    for (int v = 0; v < N; ++v) {
      const PhiloxReg prod_b = mul_wide(c2[v], kPhiloxRoundB), prod_a = mul_wide(c0[v], kPhiloxRoundA);
      c0[v] = xor3(high_words(prod_b), c1[v], rule.k0[r]);
      c2[v] = kSameHigh && r == 2 ? xor2(high_words(prod_a), static_cast<uint32_t>(prod_a1) ^ rule.k1[r])
                                  : xor3(high_words(prod_a), c3[v], rule.k1[r]);
      c1[v] = prod_b;
      c3[v] = prod_a;
    }
  }
}

// Multipliers of kPacked consecutive elements from their words: element i goes to keep[d + i],
// for i in [lo, hi) only (0 <= lo < hi <= kPacked; d may be negative).
inline void store_keep(const KeepRule& rule, const PhiloxReg& words, float* keep, int64_t d, int64_t lo, int64_t hi) {
  alignas(64) float tmp[kPacked];
  const bool whole = lo == 0 && hi == kPacked;
  float* dst = whole ? keep + d : tmp;
#if SYMATTN_ISA_LEVEL >= 2
  // (words >> 1) >= threshold as words >= 2 threshold, which fits: threshold < 2^31 for p < 1.
  const __mmask16 kept = _mm512_cmpge_epu32_mask(words, _mm512_set1_epi32(2 * rule.threshold));
  _mm512_storeu_ps(dst, _mm512_maskz_mov_ps(kept, _mm512_set1_ps(rule.scale)));
#else
  // (words >> 1) < 2^31, so a signed compare serves.
  const __m256i kept = _mm256_cmpgt_epi32(_mm256_srli_epi32(words, 1),
                                          _mm256_set1_epi32(static_cast<int>(rule.threshold - 1)));
  _mm256_storeu_ps(dst, _mm256_and_ps(_mm256_castsi256_ps(kept), _mm256_set1_ps(rule.scale)));
#endif
  if (!whole) std::copy(tmp + lo, tmp + hi, keep + (d + lo));
}

// Counters ctr0 + ctr + [0, N * kLanes64), elements 4 * ctr + [0, 4 * N * kLanes64) of the
// stream that starts at element offset 4 * ctr0: stream element t goes to keep[t - lead] where
// that lies in [0, n).
template <int N, bool kSameHigh>
inline void draw_counters(const KeepRule& rule, uint64_t ctr0, int64_t ctr, int64_t lead, int64_t n, float* keep) {
  PhiloxReg c0[N], c1[N], c2[N], c3[N];
  for (int v = 0; v < N; ++v) c0[v] = lanes64_from(ctr0 + ctr + v * kLanes64);
  philox_rounds<N, kSameHigh>(rule, c0, c1, c2, c3, static_cast<uint32_t>(ctr0 >> 32));
  for (int v = 0; v < N; ++v) {
    const PhiloxReg w01 = pair_low_words(c0[v], c1[v]), w23 = pair_low_words(c2[v], c3[v]);
    for (int half = 0; half < 2; ++half) {
      const int64_t d = 4 * (ctr + v * kLanes64) + half * kPacked - lead;
      const int64_t lo = std::max<int64_t>(0, -d), hi = std::min<int64_t>(kPacked, n - d);
      if (lo < hi) store_keep(rule, interleave_lanes(w01, w23, half * kLanes64 / 2), keep, d, lo, hi);
    }
  }
}

template <bool kSameHigh>
inline void draw_keep_run(const KeepRule& rule, uint64_t first, int64_t n, float* keep) {
  const uint64_t ctr0 = first >> 2;
  const int64_t lead = static_cast<int64_t>(first & 3);
  const int64_t counters = (lead + n + 3) / 4;
  constexpr int64_t kStep = kChains * kLanes64;
  int64_t ctr = 0;
  for (; ctr + kStep <= counters; ctr += kStep) draw_counters<kChains, kSameHigh>(rule, ctr0, ctr, lead, n, keep);
  for (; ctr < counters; ctr += kLanes64) draw_counters<1, kSameHigh>(rule, ctr0, ctr, lead, n, keep);
}

// Dropout multipliers keep[j] in {0, rule.scale} of the element offsets first + j, j in [0, n):
// one query row's keys (row r of a head starts at offset (h * rows + r) * key_stride).
inline void draw_keep(const KeepRule& rule, uint64_t first, int64_t n, float* keep) {
  if (n <= 0) return;
  // Lanes are independent, so the words of counters past the last one (drawn and dropped) do not
  // matter here.
  if ((first >> 34) == ((first + n - 1) >> 34)) {
    draw_keep_run<true>(rule, first, n, keep);
  } else {
    draw_keep_run<false>(rule, first, n, keep);
  }
}
#else
// The same, one counter (four elements) at a time.
inline void draw_keep(const KeepRule& rule, uint64_t first, int64_t n, float* keep) {
  for (int64_t j = 0; j < n;) {
    const uint64_t element = first + static_cast<uint64_t>(j);
    uint32_t words[4];
    philox4x(rule.seed, element >> 2, words);
    for (uint64_t w = element & 3; w < 4 && j < n; ++w, ++j) {
      keep[j] = (words[w] >> 1) >= rule.threshold ? rule.scale : 0.f;
    }
  }
}
#endif

#pragma GCC diagnostic pop

}  // namespace

// draw_keep behind the symattn::dropout_keep_cpu test op (attention_cpu.cpp picks the build).
void dropout_keep(uint64_t seed, double dropout_p, uint64_t first, int64_t n, float* keep) {
  draw_keep(KeepRule(seed, dropout_threshold(dropout_p), static_cast<float>(1.0 / (1.0 - dropout_p))), first, n, keep);
}

}  // namespace CPU_CAPABILITY
}  // namespace symattn::cpu
