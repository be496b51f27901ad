// vdpbf16ps on AVX2, for the check build of isa.h (SYMATTN_BF16_PAIRS_ON_AVX2): words of two
// bf16 (the even element in the low half), eight words per register. A bf16 is the high half of
// its fp32, so each product is exact in fp32; the two are added to the accumulator by two FMAs
// (the instruction's own rounding of the sum differs only in the last bit).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace symattn::cpu {
namespace CPU_CAPABILITY {
namespace {

// words [0, count) from p, zero beyond (count may exceed 8).
inline __m256i load_pairs(const void* p, int64_t count) {
  if (count >= 8) return _mm256_loadu_si256(static_cast<const __m256i*>(p));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::max<int64_t>(count, 0))), lane);
  return _mm256_maskload_epi32(static_cast<const int*>(p), mask);
}

// acc + a.even * b.even + a.odd * b.odd, lane by lane.
inline __m256 dot_pairs(__m256 acc, __m256i a, __m256i b) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m256 a_even = _mm256_castsi256_ps(_mm256_slli_epi32(a, 16));
  const __m256 b_even = _mm256_castsi256_ps(_mm256_slli_epi32(b, 16));
  const __m256 a_odd = _mm256_castsi256_ps(_mm256_and_si256(a, high));
  const __m256 b_odd = _mm256_castsi256_ps(_mm256_and_si256(b, high));
  return _mm256_fmadd_ps(a_odd, b_odd, _mm256_fmadd_ps(a_even, b_even, acc));
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace symattn::cpu
