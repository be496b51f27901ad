// Dropout keep multipliers from Philox-4x32-10 drawn many counters per instruction, bit-equal
// to philox_randint (../common/philox.h, shared with the CUDA kernels) and so to
// symattn_kernels.reference.dropout_keep_mask.
//
// Each counter sits in a 64-bit lane (AVX-512: 8 per register, AVX2: 4): _mm*_mul_epu32
// multiplies the low words into full 64-bit products, so one instruction gives both the high
// word (the next round's XOR input, after a shift) and the low word (the product kept as the
// lane itself). The upper half of every lane carries garbage that only XORs into other upper
// halves, which mul_epu32 ignores and the final pack drops. The offset's high word starts as
// the second counter word, so a run of counters may cross a multiple of 2^32. The DEFAULT build
// draws with the scalar philox_randint, one counter at a time.
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
using symattn::philox_randint;

namespace CPU_CAPABILITY {
namespace {

// One call's constants: the keep rule and the seed's 10 round keys.
struct KeepRule {
  uint64_t seed;
  uint32_t threshold;  // keep where (randint >> 1) >= threshold
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
#endif

#if defined(SYMATTN_ISA_LEVEL) && SYMATTN_ISA_LEVEL >= 1
// Registers of counters drawn together: independent chains that hide the multiply latency.
constexpr int kChains = kLanes64 == 8 ? 4 : 2;
// Counters per step of draw_keep (kChains registers, packed into 32-bit words two registers at a
// time) and per packed register.
constexpr int64_t kStep = kChains * kLanes64;
constexpr int64_t kPacked = 2 * kLanes64;

// c0[v] holds kLanes64 counters (64-bit offsets); leaves their first output words in the low
// halves of the lanes. Rounds 0 to 2 use that c2 = c3 = 0 at the start, and kSameHigh that every
// offset's high word is `high` (the common case: no multiple of 2^32 among them), which makes
// round 0's c0 and so round 1's A product one number for all lanes. Round 8 skips c0, which the
// last round, computing c0 alone, does not read.
template <int N, bool kSameHigh>
inline void philox_rounds(const KeepRule& rule, PhiloxReg* c0, uint32_t high) {
  PhiloxReg c1[N], c2[N], c3[N];
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
  for (int r = 2; r + 1 < kPhiloxRounds; ++r) {
    for (int v = 0; v < N; ++v) {
      const PhiloxReg prod_b = mul_wide(c2[v], kPhiloxRoundB), prod_a = mul_wide(c0[v], kPhiloxRoundA);
      if (r + 2 < kPhiloxRounds) c0[v] = xor3(high_words(prod_b), c1[v], rule.k0[r]);
      c2[v] = kSameHigh && r == 2 ? xor2(high_words(prod_a), static_cast<uint32_t>(prod_a1) ^ rule.k1[r])
                                  : xor3(high_words(prod_a), c3[v], rule.k1[r]);
      c1[v] = prod_b;
      c3[v] = prod_a;
    }
  }
  for (int v = 0; v < N; ++v) {
    c0[v] = xor3(high_words(mul_wide(c2[v], kPhiloxRoundB)), c1[v], rule.k0[kPhiloxRounds - 1]);
  }
}

// keep[0, count) from the low words of a and b (kPacked counters), count <= kPacked.
inline void store_keep(const KeepRule& rule, const PhiloxReg& a, const PhiloxReg& b, float* keep, int64_t count) {
#if SYMATTN_ISA_LEVEL >= 2
  const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  const __m512i bits = _mm512_permutex2var_epi32(a, even, b);
  const __mmask16 kept = _mm512_cmpge_epu32_mask(_mm512_srli_epi32(bits, 1), _mm512_set1_epi32(rule.threshold));
  const __m512 x = _mm512_maskz_mov_ps(kept, _mm512_set1_ps(rule.scale));
  if (count == kPacked) {
    _mm512_storeu_ps(keep, x);
  } else {
    _mm512_mask_storeu_ps(keep, static_cast<__mmask16>((1u << count) - 1), x);
  }
#else
  // Low words of a then b, in counter order; (bits >> 1) < 2^31, so a signed compare serves.
  const __m256 words = _mm256_shuffle_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), 0x88);
  const __m256i bits = _mm256_permute4x64_epi64(_mm256_castps_si256(words), 0xD8);
  const __m256i kept = _mm256_cmpgt_epi32(_mm256_srli_epi32(bits, 1),
                                          _mm256_set1_epi32(static_cast<int>(rule.threshold - 1)));
  const __m256 x = _mm256_and_ps(_mm256_castsi256_ps(kept), _mm256_set1_ps(rule.scale));
  if (count == kPacked) {
    _mm256_storeu_ps(keep, x);
  } else {
    alignas(32) float tmp[kPacked];
    _mm256_store_ps(tmp, x);
    std::copy(tmp, tmp + count, keep);
  }
#endif
}

template <bool kSameHigh>
inline void draw_keep_run(const KeepRule& rule, uint64_t first, int64_t n, float* keep) {
  const uint32_t high = static_cast<uint32_t>(first >> 32);
  int64_t j = 0;
  for (; j + kStep <= n; j += kStep) {
    PhiloxReg c[kChains];
    for (int v = 0; v < kChains; ++v) c[v] = lanes64_from(first + j + v * kLanes64);
    philox_rounds<kChains, kSameHigh>(rule, c, high);
    for (int v = 0; v < kChains; v += 2) store_keep(rule, c[v], c[v + 1], keep + j + v * kLanes64, kPacked);
  }
  for (; j < n; j += kPacked) {
    PhiloxReg c[2] = {lanes64_from(first + j), lanes64_from(first + j + kLanes64)};
    philox_rounds<2, kSameHigh>(rule, c, high);
    store_keep(rule, c[0], c[1], keep + j, std::min(kPacked, n - j));
  }
}

// Dropout multipliers keep[j] in {0, rule.scale} of the counters first + j, j in [0, n): one
// query row's keys (row r of a head starts at counter (h * rows + r) * key_stride).
inline void draw_keep(const KeepRule& rule, uint64_t first, int64_t n, float* keep) {
  if (n > 0 && (first >> 32) == ((first + n - 1) >> 32)) {
    draw_keep_run<true>(rule, first, n, keep);
  } else {
    draw_keep_run<false>(rule, first, n, keep);
  }
}
#else
// The same, one counter at a time.
inline void draw_keep(const KeepRule& rule, uint64_t first, int64_t n, float* keep) {
  for (int64_t j = 0; j < n; ++j) {
    keep[j] = (philox_randint(rule.seed, first + j) >> 1) >= rule.threshold ? rule.scale : 0.f;
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
