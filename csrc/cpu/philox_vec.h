// Dropout keep multipliers from Philox-4x32-10 drawn many counters per instruction, bit-equal
// to dropout_random16 (../common/philox.h, shared with the CUDA kernels) and so to
// symattn_kernels.reference.dropout_keep_mask: element offset e takes the 16-bit half e % 2 of
// output word (e / 2) % 4 of the counter e / 8, so every Philox call serves eight consecutive
// elements.
//
// Each counter sits in a 64-bit lane (AVX-512: 8 per register, AVX2: 4): _mm*_mul_epu32
// multiplies the low words into full 64-bit products, so one instruction gives both the high
// word (the next round's XOR input, after a shift) and the low word (the product kept as the
// lane itself). The upper half of every lane carries garbage that only XORs into other upper
// halves, which mul_epu32 ignores and the final compares drop. Per lane, the low words of two
// outputs side by side are the four 16-bit values of four consecutive elements, compared as
// 16-bit lanes. The keep decisions come out as bits, a register's 64 (32) in one word: the
// forward applies them as lane masks to its exponentials; draw_keep expands them into
// multipliers. The counter's high word starts as the second counter word, so a run of counters
// may cross a multiple of 2^32. The DEFAULT build draws with the scalar philox4x, one counter
// (eight elements) at a time.
//
// Compiled once per instruction set inside its CPU_CAPABILITY namespace (see isa.h), with
// internal linkage but for the dropout_keep entry point.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../common/philox.h"

#if defined(SYMATTN_ISA_LEVEL) && SYMATTN_ISA_LEVEL >= 1
#include <immintrin.h>
#endif

namespace symattn::cpu {

using symattn::dropout_scale;
using symattn::dropout_threshold;
using symattn::philox4x;

namespace CPU_CAPABILITY {
namespace {

// One call's constants: the keep rule and the seed's 10 round keys.
struct KeepRule {
  uint64_t seed = 0;
  uint32_t threshold = 0;  // keep where the 16-bit value >= threshold; 0: no dropout
  float scale = 1.f;       // the kept elements' multiplier, dropout_scale(threshold)
  uint32_t k0[kPhiloxRounds], k1[kPhiloxRounds];

  KeepRule() : KeepRule(0, 0.0) {}
  KeepRule(uint64_t seed_, double dropout_p)
      : seed(seed_), threshold(dropout_threshold(dropout_p)), scale(static_cast<float>(dropout_scale(threshold))) {
    uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < kPhiloxRounds; ++r, a += kPhiloxKeyA, b += kPhiloxKeyB) {
      k0[r] = a;
      k1[r] = b;
    }
  }
};

// Words of a bit array of the keep decisions of n elements (draw_keep_bits).
constexpr int64_t keep_bit_words(int64_t n) { return n / 64 + 2; }

// The 64 x 64 bit matrix a (bit c of a[r]: element (r, c)) transposed in place: six rounds that
// swap the off-diagonal halves of ever smaller blocks.
inline void transpose_bits64(uint64_t* a) {
  uint64_t low = 0x00000000FFFFFFFFull;  // the low half of each block of 2j bits
  for (int j = 32; j != 0; j >>= 1, low ^= low << j) {
    for (int k = 0; k < 64; k = ((k | j) + 1) & ~j) {
      const uint64_t t = ((a[k] >> j) ^ a[k | j]) & low;
      a[k] ^= t << j;
      a[k | j] ^= t;
    }
  }
}

// GCC's AVX-512 intrinsics start from _mm512_undefined_epi32 (a self-initialised variable), which
// -Wall reports as (maybe-)uninitialized at every inlined use.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#if defined(SYMATTN_ISA_LEVEL) && SYMATTN_ISA_LEVEL >= 2
using PhiloxReg = __m512i;
constexpr int kLanes64 = 8;
inline PhiloxReg lanes64_from(uint64_t first) {
  return _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(first)), _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0));
}
// The high word of each lane in its low half, by swapping the halves: vpshufd issues on the
// shuffle port, where a shift would compete with the multiplies for the other one (the upper half
// left holds garbage, see the file comment).
inline PhiloxReg high_words(const PhiloxReg& x) { return _mm512_shuffle_epi32(x, _MM_PERM_CDAB); }
inline PhiloxReg mul_wide(const PhiloxReg& x, uint32_t m) { return _mm512_mul_epu32(x, _mm512_set1_epi64(m)); }
inline PhiloxReg xor2(const PhiloxReg& a, uint32_t k) {
  return _mm512_xor_si512(a, _mm512_set1_epi32(static_cast<int>(k)));
}
// a ^ b ^ k in one vpternlogd.
inline PhiloxReg xor3(const PhiloxReg& a, const PhiloxReg& b, uint32_t k) {
  return _mm512_ternarylogic_epi32(a, b, _mm512_set1_epi32(static_cast<int>(k)), 0x96);
}
// Per lane: low word of x, then low word of y (the lane's two 32-bit halves), in one shuffle.
inline PhiloxReg pair_low_words(const PhiloxReg& x, const PhiloxReg& y) {
  return _mm512_mask_shuffle_epi32(x, 0xAAAA, y, _MM_PERM_CDAB);
}
// The keep bits of the 64 elements of one register of counters from its word pairs w01 (words 0, 1
// of counter t in lane t: the values of elements 8t + [0, 4) as 16-bit lanes 4t + [0, 4)) and w23
// (elements 8t + [4, 8)): bit 4t + k of each compare deposited at bit 8t + k (8t + 4 + k).
inline uint64_t kept_bits(const PhiloxReg& w01, const PhiloxReg& w23, uint32_t threshold) {
  const __m512i bound = _mm512_set1_epi16(static_cast<short>(threshold));
  return _pdep_u64(_mm512_cmpge_epu16_mask(w01, bound), 0x0F0F0F0F0F0F0F0Full) |
         _pdep_u64(_mm512_cmpge_epu16_mask(w23, bound), 0xF0F0F0F0F0F0F0F0ull);
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
  return _mm256_blend_epi32(x, _mm256_shuffle_epi32(y, 0xB1), 0xAA);
}
// The same for the 32 elements of 4 counters, interleaved as vectors (pdep is slow on some AVX2
// CPUs): value >= threshold as max(value, threshold) == value (AVX2 has no unsigned 16-bit
// compare); the compares packed to bytes hold, per 128-bit half, elements 8t + [0, 4) of counters
// t, t + 1, then their elements 8t + [4, 8), which one dword shuffle puts in element order.
inline uint32_t kept_bits(const PhiloxReg& w01, const PhiloxReg& w23, uint32_t threshold) {
  const __m256i bound = _mm256_set1_epi16(static_cast<short>(threshold));
  auto kept = [&](const __m256i& values) { return _mm256_cmpeq_epi16(_mm256_max_epu16(values, bound), values); };
  const __m256i bytes = _mm256_packs_epi16(kept(w01), kept(w23));
  return static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_shuffle_epi32(bytes, _MM_SHUFFLE(3, 1, 2, 0))));
}
#endif

#if defined(SYMATTN_ISA_LEVEL) && SYMATTN_ISA_LEVEL >= 1
// Registers of counters drawn together: independent chains that hide the multiply latency.
constexpr int kChains = kLanes64 == 8 ? 4 : 2;
// The keep bits of one register of counters (eight elements each).
using StreamWord = std::conditional_t<kLanes64 == 8, uint64_t, uint32_t>;

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

// Keep bits of the elements 8 * ctr + [0, 8 * N * kLanes64) of the stream that starts at element
// offset 8 * ctr0 (counters ctr0 + ctr + [0, N * kLanes64)), 8 * kLanes64 bits per register into
// stream[ctr / kLanes64 + v] (bit i: stream element 8 * ctr + 8 * kLanes64 * v + i).
template <int N, bool kSameHigh>
inline void draw_counters(const KeepRule& rule, uint64_t ctr0, int64_t ctr, StreamWord* stream) {
  PhiloxReg c0[N], c1[N], c2[N], c3[N];
  for (int v = 0; v < N; ++v) c0[v] = lanes64_from(ctr0 + ctr + v * kLanes64);
  philox_rounds<N, kSameHigh>(rule, c0, c1, c2, c3, static_cast<uint32_t>(ctr0 >> 32));
  for (int v = 0; v < N; ++v) {
    stream[ctr / kLanes64 + v] = kept_bits(pair_low_words(c0[v], c1[v]), pair_low_words(c2[v], c3[v]), rule.threshold);
  }
}

template <bool kSameHigh>
inline void draw_stream(const KeepRule& rule, uint64_t ctr0, int64_t counters, StreamWord* stream) {
  constexpr int64_t kStep = kChains * kLanes64;
  int64_t ctr = 0;
  for (; ctr + kStep <= counters; ctr += kStep) draw_counters<kChains, kSameHigh>(rule, ctr0, ctr, stream);
  for (; ctr < counters; ctr += kLanes64) draw_counters<1, kSameHigh>(rule, ctr0, ctr, stream);
}

// Keep bits of the element offsets first + [0, n): bit j % 64 of bits[j / 64] is set where
// element first + j is kept. bits holds keep_bit_words(n) words; the bits past n are unspecified.
inline void draw_keep_bits(const KeepRule& rule, uint64_t first, int64_t n, uint64_t* bits) {
  if (n <= 0) return;
  const uint64_t ctr0 = first >> 3;
  const int lead = static_cast<int>(first & 7);
  const int64_t counters = (lead + n + 7) / 8;
  // The stream's last register may end in the middle of a word of bits.
  bits[n / 64] = bits[n / 64 + 1] = 0;
  // x86 is little-endian: stream word k holds bits [k, k + 1) * 8 * kLanes64 of the array.
  StreamWord* stream = reinterpret_cast<StreamWord*>(bits);
  // Lanes are independent, so the words of counters past the last one (drawn and dropped) do not
  // matter here.
  if ((first >> 35) == ((first + n - 1) >> 35)) {
    draw_stream<true>(rule, ctr0, counters, stream);
  } else {
    draw_stream<false>(rule, ctr0, counters, stream);
  }
  if (lead != 0) {
    for (int64_t q = 0; q * 64 < n; ++q) bits[q] = (bits[q] >> lead) | (bits[q + 1] << (64 - lead));
  }
}
#else
// The same, one counter (eight elements) at a time.
inline void draw_keep_bits(const KeepRule& rule, uint64_t first, int64_t n, uint64_t* bits) {
  if (n <= 0) return;
  std::fill(bits, bits + (n + 63) / 64, uint64_t{0});
  for (int64_t j = 0; j < n;) {
    const uint64_t element = first + static_cast<uint64_t>(j);
    uint32_t words[4];
    philox4x(rule.seed, element >> 3, words);
    for (uint64_t k = element & 7; k < 8 && j < n; ++k, ++j) {
      const uint32_t value = (words[k / 2] >> (16 * (k % 2))) & 0xFFFFu;
      if (value >= rule.threshold) bits[j / 64] |= uint64_t{1} << (j % 64);
    }
  }
}
#endif

#if defined(SYMATTN_ISA_LEVEL) && SYMATTN_ISA_LEVEL == 1
// All ones in 32-bit lane k where bit k of the low byte of bits is set: AVX2 has no mask
// registers to select lanes with.
inline __m256 keep_lanes(uint64_t bits) {
  const __m256i lane_bits = _mm256_set_epi32(128, 64, 32, 16, 8, 4, 2, 1);
  const __m256i byte = _mm256_set1_epi32(static_cast<int>(bits & 0xFF));
  return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(byte, lane_bits), lane_bits));
}
#endif

// keep[j] = scale where bit j of bits is set, else 0, for j in [0, n).
inline void expand_keep(const uint64_t* bits, int64_t n, float scale, float* keep) {
  int64_t j = 0;
#if defined(SYMATTN_ISA_LEVEL) && SYMATTN_ISA_LEVEL >= 2
  const __m512 vscale = _mm512_set1_ps(scale);
  for (; j < n; j += 16) {
    const __mmask16 kept = static_cast<__mmask16>(bits[j / 64] >> (j % 64));
    const __mmask16 lanes = static_cast<__mmask16>(n - j >= 16 ? 0xFFFF : (1u << (n - j)) - 1);
    _mm512_mask_storeu_ps(keep + j, lanes, _mm512_maskz_mov_ps(kept, vscale));
  }
#elif defined(SYMATTN_ISA_LEVEL) && SYMATTN_ISA_LEVEL == 1
  const __m256 vscale = _mm256_set1_ps(scale);
  for (; j + 8 <= n; j += 8) _mm256_storeu_ps(keep + j, _mm256_and_ps(keep_lanes(bits[j / 64] >> (j % 64)), vscale));
#endif
  for (; j < n; ++j) keep[j] = (bits[j / 64] >> (j % 64)) & 1 ? scale : 0.f;
}

// Dropout multipliers keep[j] in {0, rule.scale} of the element offsets first + j, j in [0, n):
// one query row's keys (row r of a head starts at offset (h * rows + r) * key_stride).
inline void draw_keep(const KeepRule& rule, uint64_t first, int64_t n, float* keep) {
  constexpr int64_t kRun = 1024;
  uint64_t bits[keep_bit_words(kRun)];
  for (int64_t j0 = 0; j0 < n; j0 += kRun) {
    const int64_t m = std::min(kRun, n - j0);
    draw_keep_bits(rule, first + static_cast<uint64_t>(j0), m, bits);
    expand_keep(bits, m, rule.scale, keep + j0);
  }
}

#pragma GCC diagnostic pop

}  // namespace

// draw_keep behind the symattn::dropout_keep_cpu test op (attention_cpu.cpp picks the build).
void dropout_keep(uint64_t seed, double dropout_p, uint64_t first, int64_t n, float* keep) {
  draw_keep(KeepRule(seed, dropout_p), first, n, keep);
}

}  // namespace CPU_CAPABILITY
}  // namespace symattn::cpu
