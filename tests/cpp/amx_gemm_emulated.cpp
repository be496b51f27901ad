// csrc/cpu/amx_gemm.h on an emulated tile unit, so that its tile bookkeeping (operand copies,
// padding, band trimming, which C blocks go straight to C and which through the scratch block,
// the tile configuration's lifetime) is checked on any x86-64 CPU, AMX or not; the AMX build's
// own tests (test_cpu_bf16_paths.py) skip where the CPU lacks AMX. Built and run by
// tests/test_amx_gemm_emulated.py, with AddressSanitizer so that a tile load or store outside
// the caller's buffers fails.
//
// The emulated tile unit is csrc/cpu/amx_emulated.h (the AVX2_AMX_EMULATED check build runs the
// attention kernels on it too).
//
// Prints one line per failed check and a closing line "N passed, N failed"; exit status 1 on a
// failure. With the argument "counts" it prints the tile instruction counts of a few products
// instead (see docs/design.md).
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../../csrc/cpu/amx_emulated.h"

namespace emu = symattn::amx_emu;

// The portable at::vec (no ISA macros), in the namespace the DEFAULT kernels use.
#define CPU_CAPABILITY DEFAULT
#include "../../csrc/cpu/amx_gemm.h"

using symattn::cpu::DEFAULT::amx_gemm;
using symattn::cpu::DEFAULT::amx_scratch;
using symattn::cpu::DEFAULT::AmxTileScope;

namespace {

uint64_t rng_state = 0x9E3779B97F4A7C15ull;
uint32_t next_u32() {
  rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
  return static_cast<uint32_t>(rng_state >> 33);
}
// A bf16 in about [-2, 2] with all 8 significant bits used.
uint16_t random_bf16() {
  const float x = (static_cast<float>(next_u32() % 65536) / 16384.f - 2.f);
  return static_cast<uint16_t>(emu::float_bits(x) >> 16);
}

struct Case {
  int64_t m, n, k;
  bool trans_a;
  float alpha;
  bool accumulate;
  int64_t k_lo, k_hi, n_hi;  // the band (kUnbounded-like values when none)
};

constexpr int64_t kNone = int64_t{1} << 40;
constexpr float kSentinel = -12345.f;

int passed = 0, failed = 0;

void fail(const Case& c, const std::string& what) {
  ++failed;
  std::printf("FAIL m=%lld n=%lld k=%lld trans_a=%d alpha=%g accumulate=%d band=(%lld,%lld,%lld): %s\n",
              static_cast<long long>(c.m), static_cast<long long>(c.n), static_cast<long long>(c.k), c.trans_a,
              c.alpha, c.accumulate, static_cast<long long>(c.k_lo == -kNone ? -1 : c.k_lo),
              static_cast<long long>(c.k_hi == kNone ? -1 : c.k_hi),
              static_cast<long long>(c.n_hi == kNone ? -1 : c.n_hi), what.c_str());
}

// Runs one product on fresh operands (exact-size buffers with a margin in C's rows and columns
// that must stay untouched) against an fp64 reference; returns the C it produced.
std::vector<float> run_case(const Case& c, bool in_scope, bool report = true, std::vector<float>* c_in = nullptr) {
  const int64_t kw = (c.k + 1) / 2;
  const int64_t lda = c.trans_a ? c.m + 3 : kw + 5, ldb = c.n + 7, ldc = c.n + 9, c_rows = c.m + 2;
  // Elements of op(A) [m, k] and B [k, n] as bf16 bits, zero outside the band and past k.
  std::vector<uint16_t> ae(c.m * 2 * kw, 0), be(2 * kw * c.n, 0);
  for (int64_t i = 0; i < c.m; ++i) {
    for (int64_t e = 0; e < c.k; ++e) {
      if (e >= i + c.k_lo && e <= i + c.k_hi) ae[i * 2 * kw + e] = random_bf16();
    }
  }
  for (int64_t e = 0; e < c.k; ++e) {
    for (int64_t j = 0; j < c.n; ++j) be[e * c.n + j] = random_bf16();
  }
  std::vector<uint32_t> a(c.trans_a ? kw * lda : c.m * lda), b(kw * ldb);
  for (int64_t i = 0; i < c.m; ++i) {
    for (int64_t w = 0; w < kw; ++w) {
      const uint32_t word = ae[i * 2 * kw + 2 * w] | uint32_t{ae[i * 2 * kw + 2 * w + 1]} << 16;
      (c.trans_a ? a[w * lda + i] : a[i * lda + w]) = word;
    }
  }
  for (int64_t w = 0; w < kw; ++w) {
    for (int64_t j = 0; j < c.n; ++j) b[w * ldb + j] = be[2 * w * c.n + j] | uint32_t{be[(2 * w + 1) * c.n + j]} << 16;
  }
  std::vector<float> out(c_rows * ldc, kSentinel);
  if (c_in != nullptr) {
    out = *c_in;
  } else if (c.accumulate) {
    for (int64_t i = 0; i < c.m; ++i) {
      for (int64_t j = 0; j < c.n; ++j) out[i * ldc + j] = static_cast<float>(next_u32() % 2001) / 100.f - 10.f;
    }
  }
  const std::vector<float> before = out;
  if (c.trans_a) {
    amx_gemm<true>(c.m, c.n, c.k, a.data(), lda, b.data(), ldb, out.data(), ldc, c.alpha, c.accumulate, c.k_lo,
                   c.k_hi, c.n_hi);
  } else {
    amx_gemm<false>(c.m, c.n, c.k, a.data(), lda, b.data(), ldb, out.data(), ldc, c.alpha, c.accumulate, c.k_lo,
                    c.k_hi, c.n_hi);
  }
  if (!in_scope && emu::unit().configured) fail(c, "tile configuration left loaded after the product");
  if (!report) return out;
  bool ok = true;
  for (int64_t i = 0; i < c_rows && ok; ++i) {
    for (int64_t j = 0; j < ldc && ok; ++j) {
      const bool inside = i < c.m && j < c.n;
      if (!inside) {
        if (emu::float_bits(out[i * ldc + j]) != emu::float_bits(before[i * ldc + j])) {
          fail(c, "wrote C outside [m, n] at " + std::to_string(i) + ", " + std::to_string(j));
          ok = false;
        }
        continue;
      }
      if (j > i + c.n_hi) continue;  // unneeded under the band
      double dot = 0, mag = 0;
      for (int64_t e = 0; e < c.k; ++e) {
        const double p = static_cast<double>(emu::bf16(ae[i * 2 * kw + e])) * emu::bf16(be[e * c.n + j]);
        dot += p;
        mag += std::fabs(p);
      }
      const double c0 = c.accumulate ? before[i * ldc + j] : 0.0;
      const double want = c0 + c.alpha * dot;
      // fp32 accumulation over k terms, then alpha and C0: a few ulps per term of the magnitude.
      const double bound = (c.k + 4) * std::ldexp(1.0, -23) * (std::fabs(c.alpha) * mag + std::fabs(c0)) + 1e-30;
      if (!(std::fabs(out[i * ldc + j] - want) <= bound)) {
        fail(c, "C(" + std::to_string(i) + ", " + std::to_string(j) + ") = " + std::to_string(out[i * ldc + j]) +
                    ", fp64 " + std::to_string(want));
        ok = false;
      }
    }
  }
  if (ok) ++passed;
  return out;
}

void expect(bool ok, const char* what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAIL %s\n", what);
  }
}

// Same operands for two alphas (the generator restarted): C(0.125) must be C(1) / 8 exactly,
// whether C(1) went straight to C and C(0.125) through the scaled copy of A or otherwise.
void check_exact_scale(int64_t m, int64_t n, int64_t k, bool trans_a, bool accumulate) {
  const uint64_t seed = rng_state;
  Case one{m, n, k, trans_a, 1.f, false, -kNone, kNone, kNone};
  const std::vector<float> c1 = run_case(one, false, false);
  rng_state = seed;
  Case eighth = one;
  eighth.alpha = 0.125f;
  const std::vector<float> c8 = run_case(eighth, false, false);
  bool same = true;
  const int64_t ldc = n + 9;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) same = same && c8[i * ldc + j] == c1[i * ldc + j] * 0.125f;
  }
  const std::string what = "alpha = 1/8 is exactly C(alpha = 1) / 8 at m=" + std::to_string(m) +
                           " n=" + std::to_string(n) + " k=" + std::to_string(k) + (trans_a ? " trans_a" : "");
  expect(same, what.c_str());
  (void)accumulate;
}

// Tile instruction counts of one product (fresh operands, no scope).
emu::Counts counts_of(const Case& c) {
  emu::unit().counts = {};
  run_case(c, false, false);
  return emu::unit().counts;
}

}  // namespace

int main(int argc, char** argv) {
  emu::scratch_c = reinterpret_cast<const char*>(amx_scratch().c);
  if (argc > 1 && std::strcmp(argv[1], "counts") == 0) {
    // The products of the tiled bf16 forward at D = 64 (a 128-row query block, 256-key tile):
    // scores (alpha = scale = 1/8) and P V (accumulating into the output block), and of the tiled
    // backward's 128 x 128 pair tile: scores, dP, and the kTransA gradient product.
    const Case cases[] = {
        {128, 256, 64, false, 0.125f, false, -kNone, kNone, kNone},
        {128, 64, 256, false, 1.f, true, -kNone, kNone, kNone},
        {128, 128, 64, false, 0.125f, false, -kNone, kNone, kNone},
        {128, 128, 64, false, 1.f, false, -kNone, kNone, kNone},
        {128, 64, 128, true, 0.125f, true, -kNone, kNone, kNone},
    };
    const char* names[] = {"fwd S = scale Q K^T 128x256x64", "fwd O += P V 128x64x256", "bwd S 128x128x64",
                           "bwd dP 128x128x64", "bwd dY^T += scale G^T Y 128x64x128"};
    for (int i = 0; i < 5; ++i) {
      const emu::Counts n = counts_of(cases[i]);
      std::printf("%-36s configs %lld releases %lld zeros %lld loads %lld stores %lld (to scratch %lld) products %lld\n",
                  names[i], static_cast<long long>(n.configs), static_cast<long long>(n.releases),
                  static_cast<long long>(n.zeros), static_cast<long long>(n.loads), static_cast<long long>(n.stores),
                  static_cast<long long>(n.scratch_stores), static_cast<long long>(n.products));
    }
    return 0;
  }

  // Whole tiles, ragged sizes (padded copies, scratch C blocks), head dims below a tile, odd k,
  // long k, each alpha kind (1, power of two below 1, other), both accumulate flags, kTransA.
  const int64_t ms[] = {16, 32, 64, 128, 17, 50, 100};
  const int64_t ns[] = {16, 32, 64, 256, 24, 40, 70};
  const int64_t ks[] = {64, 32, 128, 512, 30, 63, 100};
  const float alphas[] = {1.f, 0.125f, 0.3f, -0.5f};
  int64_t index = 0;
  for (const int64_t m : ms) {
    for (const int64_t n : ns) {
      for (const int64_t k : ks) {
        for (int trans = 0; trans < 2; ++trans) {
          for (int acc = 0; acc < 2; ++acc) {
            // One alpha per combination, cycling, keeps the run short while every pairing of
            // alpha with shape, transposition and flag occurs.
            const float alpha = alphas[index++ % 4];
            run_case({m, n, k, trans == 1, alpha, acc == 1, -kNone, kNone, kNone}, false);
          }
        }
      }
    }
  }
  // Causal bands: C blocks skipped (n_hi), k trimmed per row block (k_hi, k_lo), and a k range
  // that is empty for the first blocks (accumulating: C stays as it was there).
  for (const int64_t m : {64, 96, 128, 70}) {
    for (const float alpha : {1.f, 0.125f, 0.7f}) {
      for (int acc = 0; acc < 2; ++acc) {
        run_case({m, 256, 64, false, alpha, acc == 1, -kNone, kNone, 0}, false);
        run_case({m, 64, 256, false, alpha, acc == 1, -kNone, 32, kNone}, false);
        run_case({m, 64, 256, false, alpha, acc == 1, 96, kNone, kNone}, false);
        run_case({m, 64, 256, true, alpha, acc == 1, -kNone, 0, kNone}, false);
      }
    }
  }
  for (const int64_t k : {64, 128, 30}) {
    check_exact_scale(128, 256, k, false, false);
    check_exact_scale(64, 64, k, true, false);
    check_exact_scale(50, 70, k, false, false);
  }

  // The tile configuration: per product outside a scope; once per outermost scope inside one.
  {
    emu::unit().counts = {};
    const Case c{64, 64, 64, false, 1.f, false, -kNone, kNone, kNone};
    run_case(c, false);
    run_case(c, false);
    expect(emu::unit().counts.configs == 2 && emu::unit().counts.releases == 2, "one LDTILECFG per product outside scopes");
    emu::unit().counts = {};
    {
      AmxTileScope task;
      run_case(c, true);
      {
        AmxTileScope inner;
        run_case(c, true);
      }
      expect(emu::unit().configured, "an inner scope keeps the configuration of the outer one");
      run_case(c, true);
    }
    expect(!emu::unit().configured, "the outermost scope releases the tiles");
    expect(emu::unit().counts.configs == 1 && emu::unit().counts.releases == 1, "one LDTILECFG per scope");
    emu::unit().counts = {};
    { AmxTileScope unused; }
    expect(emu::unit().counts.configs == 0 && emu::unit().counts.releases == 0, "a scope without products touches no tiles");
  }

  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
