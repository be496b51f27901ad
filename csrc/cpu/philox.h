// philox_randint and dropout_threshold (bit-identical to triton.language.randint and to
// symattn_kernels.reference) come from ../common/philox.h, shared with the CUDA kernels;
// philox_block draws kPhiloxLanes consecutive counters at once. Torch-free.
#pragma once

#include <cstdint>

#include "../common/philox.h"

namespace symattn::cpu {

using symattn::dropout_threshold;
using symattn::philox_randint;

// Counters drawn per call of philox_block; a multiple of every vector width in use.
constexpr int kPhiloxLanes = 16;

// philox_randint for the kPhiloxLanes consecutive offsets first, first + 1, ...; written as
// independent lanes so the compiler vectorises each round across them (32x32->64 multiplies).
// GCC vectorises the lane loop only when it does not fully unroll it first.
#if defined(__GNUC__) && !defined(__clang__)
#define SYMATTN_LANE_LOOP _Pragma("GCC unroll 1")
#else
#define SYMATTN_LANE_LOOP
#endif
inline void philox_block(uint64_t seed, uint64_t first, uint32_t* out) {
  uint32_t c0[kPhiloxLanes], c1[kPhiloxLanes], c2[kPhiloxLanes], c3[kPhiloxLanes];
  for (int l = 0; l < kPhiloxLanes; ++l) {
    const uint64_t offset = first + static_cast<uint64_t>(l);
    c0[l] = static_cast<uint32_t>(offset);
    c1[l] = static_cast<uint32_t>(offset >> 32);
    c2[l] = 0;
    c3[l] = 0;
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < kPhiloxRounds; ++round) {
    SYMATTN_LANE_LOOP
    for (int l = 0; l < kPhiloxLanes; ++l) {
      const uint64_t prod_b = static_cast<uint64_t>(kPhiloxRoundB) * c2[l];
      const uint64_t prod_a = static_cast<uint64_t>(kPhiloxRoundA) * c0[l];
      const uint32_t next0 = static_cast<uint32_t>(prod_b >> 32) ^ c1[l] ^ k0;
      const uint32_t next2 = static_cast<uint32_t>(prod_a >> 32) ^ c3[l] ^ k1;
      c1[l] = static_cast<uint32_t>(prod_b);
      c3[l] = static_cast<uint32_t>(prod_a);
      c0[l] = next0;
      c2[l] = next2;
    }
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  for (int l = 0; l < kPhiloxLanes; ++l) out[l] = c0[l];
}

}  // namespace symattn::cpu
