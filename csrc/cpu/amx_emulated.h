// An emulated AMX tile unit: LDTILECFG (zeroes the tiles), TILERELEASE, TILEZERO, TILELOADD,
// TILESTORED and TDPBF16PS as the Intel SDM describes them (per output element, the two exact
// pair products added in turn to the fp32 accumulator, round to nearest even, bf16 denormals read
// as zero, denormal results flushed), one unit per thread, and the _tile_* names amx_gemm.h uses
// redefined onto it. Using a tile while none is configured aborts, as the hardware's #UD.
// Include it before amx_gemm.h. Two users: tests/cpp/amx_gemm_emulated.cpp (amx_gemm alone, on
// any x86-64 CPU) and the AVX2_AMX_EMULATED check build (isa.h: the AMX kernels on AVX2).
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace symattn::amx_emu {

struct Counts {
  int64_t configs = 0, releases = 0, zeros = 0, loads = 0, stores = 0, products = 0;
  int64_t scratch_stores = 0;  // of the stores: to amx_gemm's scratch C block, copied on by amx_store
};

// amx_gemm's scratch C block on this thread (set once amx_gemm.h is included).
inline const char* scratch_c = nullptr;

struct TileUnit {
  bool configured = false;
  uint32_t tile[8][16][16] = {};
  Counts counts;
};

inline TileUnit& unit() {
  thread_local TileUnit u;
  return u;
}

[[noreturn]] inline void fault(const char* what) {
  std::fprintf(stderr, "emulated #UD: %s\n", what);
  std::abort();
}

inline void check(int t) {
  if (!unit().configured) fault("tile instruction without a tile configuration");
  if (t < 0 || t >= 8) fault("tile number");
}

inline void loadconfig(const void* config) {
  const auto* bytes = static_cast<const uint8_t*>(config);
  if (bytes[0] != 1) fault("palette");
  for (int t = 0; t < 8; ++t) {
    uint16_t colsb = 0;
    std::memcpy(&colsb, bytes + 16 + 2 * t, 2);
    if (colsb != 64 || bytes[48 + t] != 16) fault("amx_gemm takes 8 tiles of 16 x 64 bytes");
  }
  TileUnit& u = unit();
  u.configured = true;
  std::memset(u.tile, 0, sizeof(u.tile));
  ++u.counts.configs;
}

inline void release() {
  unit().configured = false;
  ++unit().counts.releases;
}

inline void zero(int t) {
  check(t);
  std::memset(unit().tile[t], 0, sizeof(unit().tile[t]));
  ++unit().counts.zeros;
}

inline void load(int t, const void* base, int64_t stride) {
  check(t);
  for (int r = 0; r < 16; ++r) std::memcpy(unit().tile[t][r], static_cast<const char*>(base) + r * stride, 64);
  ++unit().counts.loads;
}

inline void store(int t, void* base, int64_t stride) {
  check(t);
  for (int r = 0; r < 16; ++r) std::memcpy(static_cast<char*>(base) + r * stride, unit().tile[t][r], 64);
  ++unit().counts.stores;
  const char* p = static_cast<const char*>(base);
  if (scratch_c != nullptr && p >= scratch_c && p < scratch_c + 32 * 32 * sizeof(float)) ++unit().counts.scratch_stores;
}

inline float bits_float(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

inline uint32_t float_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  return bits;
}

// A bf16 as fp32, denormals as zero (DAZ).
inline float bf16(uint32_t half_bits) {
  const uint32_t bits = half_bits << 16;
  if ((bits & 0x7F800000u) == 0) return bits_float(bits & 0x80000000u);
  return bits_float(bits);
}

inline float flush(float x) { return std::fpclassify(x) == FP_SUBNORMAL ? std::copysign(0.f, x) : x; }

inline void dpbf16ps(int c, int a, int b) {
  check(c);
  check(a);
  check(b);
  TileUnit& u = unit();
  for (int m = 0; m < 16; ++m) {
    for (int n = 0; n < 16; ++n) {
      float acc = bits_float(u.tile[c][m][n]);
      for (int k = 0; k < 16; ++k) {
        const uint32_t aw = u.tile[a][m][k], bw = u.tile[b][k][n];
        acc = flush(acc + bf16(aw & 0xFFFF) * bf16(bw & 0xFFFF));
        acc = flush(acc + bf16(aw >> 16) * bf16(bw >> 16));
      }
      u.tile[c][m][n] = float_bits(acc);
    }
  }
  ++u.counts.products;
}

}  // namespace symattn::amx_emu

#undef _tile_loadd
#undef _tile_stored
#undef _tile_zero
#undef _tile_dpbf16ps
#define _tile_loadconfig(config) symattn::amx_emu::loadconfig(config)
#define _tile_release() symattn::amx_emu::release()
#define _tile_zero(t) symattn::amx_emu::zero(t)
#define _tile_loadd(t, base, stride) symattn::amx_emu::load(t, base, stride)
#define _tile_stored(t, base, stride) symattn::amx_emu::store(t, base, stride)
#define _tile_dpbf16ps(c, a, b) symattn::amx_emu::dpbf16ps(c, a, b)
