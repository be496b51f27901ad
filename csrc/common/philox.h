// Philox-4x32-10 (Salmon et al. 2011), bit-identical to triton.language.randint4x and to
// symattn_kernels.reference.philox_randint4x: counter (offset low word, offset high word, 0, 0),
// key (seed low word, seed high word); and the dropout rule of reference.dropout_keep_mask: the
// 16-bit value of an element offset e (half e % 2 of word (e / 2) % 4 at counter e / 8,
// reference.dropout_random16), kept when >= dropout_threshold, scaled by dropout_scale.
// Torch-free and shared by the CPU kernels (plain C++) and the CUDA kernels (host and device):
// SYMATTN_HD marks functions as __host__ __device__ under nvcc, inline otherwise.
#pragma once

#include <stdint.h>

#if !defined(SYMATTN_HD)
#if defined(__CUDACC__)
#define SYMATTN_HD __host__ __device__ __forceinline__
#else
#define SYMATTN_HD inline
#endif
#endif

namespace symattn {

constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr int kPhiloxRounds = 10;

// The four output words of one counter into out[0..3].
SYMATTN_HD void philox4x(uint64_t seed, uint64_t offset, uint32_t out[4]) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kPhiloxRounds; ++round) {
    const uint64_t prod_b = static_cast<uint64_t>(kPhiloxRoundB) * c2;
    const uint64_t prod_a = static_cast<uint64_t>(kPhiloxRoundA) * c0;
    const uint32_t next0 = static_cast<uint32_t>(prod_b >> 32) ^ c1 ^ k0;
    const uint32_t next2 = static_cast<uint32_t>(prod_a >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(prod_b);
    c3 = static_cast<uint32_t>(prod_a);
    c0 = next0;
    c2 = next2;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  out[0] = c0;
  out[1] = c1;
  out[2] = c2;
  out[3] = c3;
}

// The first output word (triton.language.randint).
SYMATTN_HD uint32_t philox_randint(uint64_t seed, uint64_t offset) {
  uint32_t words[4];
  philox4x(seed, offset, words);
  return words[0];
}

// The 16-bit dropout value of element offset e: the low (e even) or high half of word (e / 2) % 4
// of the counter e / 8 (selected, not indexed, so that the words stay in registers on a GPU).
SYMATTN_HD uint32_t dropout_random16(uint64_t seed, uint64_t element) {
  uint32_t w[4];
  philox4x(seed, element >> 3, w);
  const uint32_t i = static_cast<uint32_t>(element >> 1) & 3u;
  const uint32_t word = i < 2 ? (i == 0 ? w[0] : w[1]) : (i == 2 ? w[2] : w[3]);
  return (element & 1) != 0 ? word >> 16 : word & 0xFFFFu;
}

// reference.dropout_threshold: keep where the 16-bit value >= threshold; dropout_p in steps of
// 2^-16, rounded to nearest (ties up) and clamped into [1, 65535] for dropout_p > 0, so that no
// probability becomes "no dropout" or "drop everything"; 0 (keep all) for dropout_p = 0. The
// callers reject dropout_p >= 1 before.
SYMATTN_HD uint32_t dropout_threshold(double dropout_p) {
  if (!(dropout_p > 0.0)) return 0u;
  const double t = dropout_p * 65536.0 + 0.5;  // the scaling is exact; truncation floors (t > 0)
  return t < 1.0 ? 1u : (t >= 65535.0 ? 65535u : static_cast<uint32_t>(t));
}

// reference.dropout_scale: the kept elements' multiplier, 1 / keep probability (2^16 - threshold) / 2^16.
SYMATTN_HD double dropout_scale(uint32_t threshold) { return 65536.0 / (65536.0 - static_cast<double>(threshold)); }

}  // namespace symattn
