// Bfloat16 products on AMX tiles (TDPBF16PS), for the AVX512_AMX kernel set: the same products,
// operand formats and rounding as Bf16Dot in attention_gemm.h (bf16 operands, exact pair
// products, fp32 accumulation), on the tile unit instead of vdpbf16ps.
//
// C[m, n] (=|+=) alpha * op(A)[m, k] * B[k, n] is computed in blocks of 2 x 2 tiles (32 x 32 fp32)
// over k steps of 32 elements. The operands arrive in Bf16Dot's word format (a word = a pair of
// bf16 along k), which is what the tile unit reads: an A tile is 16 rows of 16 words of the A-rows
// form; a B tile is 16 word rows of 16 columns of the B-rows (VNNI) form. So most products load
// their tiles straight from the caller's panels. What does not fit whole tiles is first copied
// into zero-padded per-thread scratch: the kTransA form of A (word-transposed), and operands whose
// row or column count or k is not a multiple of the tile (ragged lengths, head dims below 32).
// Whole C blocks go straight between the tiles and C (tilestored / tileloadd at C's row stride):
// the accumulators start from zero, or from C itself when accumulating. That takes alpha = 1;
// a power-of-two alpha below 1 is multiplied into a copy of A instead where A is the smaller
// operand (exact but for results within a few binades of fp32's underflow), as in the score
// products (scale = 1/8 at D = 64). Ragged C blocks, and other alphas, go through a small scratch
// block that amx_store copies to C applying alpha and the accumulate flag. (torch's
// at::native::cpublas::brgemm, which SDPA-flash uses, was measured no faster at these product
// sizes, and takes B only repacked into blocks of at most 64 columns.)
//
// Results do not depend on the thread count: every C block is one fixed sequence of tile
// products. The tile configuration is loaded by the first product on the thread and released
// (TILERELEASE) at the end of each product, or, inside an AmxTileScope (a task of the attention
// kernels), when the scope closes: no tile state is left for other code on the thread, nor taken
// from it.
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace symattn::cpu {
namespace CPU_CAPABILITY {
namespace {

// A and C tiles: 16 rows of 64 bytes (16 words of k, or 16 fp32 of n); B tiles: 16 word rows.
constexpr int64_t kTileRows = 16;
constexpr int64_t kTileWords = 16;
constexpr int64_t kTileBytes = kTileWords * 4;
// A C block is 2 x 2 tiles; tiles 0-3 hold it, 4-5 the two A tiles, 6-7 the two B tiles.
constexpr int64_t kAmxBlock = 2 * kTileRows;

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Eight tiles of 16 x 64 bytes.
const TileConfig& tile_config() {
  static const TileConfig config = [] {
    TileConfig c;
    for (int t = 0; t < 8; ++t) {
      c.colsb[t] = kTileBytes;
      c.rows[t] = kTileRows;
    }
    return c;
  }();
  return config;
}

// Per-thread scratch of the padded operand copies, grown to the largest product seen.
struct AmxScratch {
  std::vector<uint32_t> a, b;
  alignas(64) float c[kAmxBlock * kAmxBlock];
};

AmxScratch& amx_scratch() {
  thread_local AmxScratch scratch;
  return scratch;
}

// Whether this thread has tile_config() loaded, and how many AmxTileScopes it has open.
struct AmxThreadState {
  int scopes = 0;
  bool loaded = false;
};

AmxThreadState& amx_thread_state() {
  thread_local AmxThreadState state;
  return state;
}

// Keeps the tile configuration loaded across the products inside it on this thread (LDTILECFG
// and TILERELEASE once per scope, not per product) and releases it when the outermost scope
// closes. The code between the products of a scope must not use tiles itself: the attention
// kernels open one per task, whose only tile code is amx_gemm.
class AmxTileScope {
 public:
  AmxTileScope() { ++amx_thread_state().scopes; }
  ~AmxTileScope() {
    AmxThreadState& state = amx_thread_state();
    if (--state.scopes == 0 && state.loaded) {
      _tile_release();
      state.loaded = false;
    }
  }
  AmxTileScope(const AmxTileScope&) = delete;
  AmxTileScope& operator=(const AmxTileScope&) = delete;
};

int64_t round_up_tile(int64_t x) { return (x + kTileWords - 1) / kTileWords * kTileWords; }

// src [rows, cols] words (row stride ld) into buf as [rows_pad, cols_pad], zeros around it.
const uint32_t* copy_padded(const uint32_t* src, int64_t ld, int64_t rows, int64_t cols, int64_t rows_pad,
                            int64_t cols_pad, std::vector<uint32_t>& buf) {
  if (static_cast<int64_t>(buf.size()) < rows_pad * cols_pad) buf.resize(rows_pad * cols_pad);
  uint32_t* dst = buf.data();
  for (int64_t i = 0; i < rows; ++i) {
    std::memcpy(dst + i * cols_pad, src + i * ld, cols * sizeof(uint32_t));
    std::fill(dst + i * cols_pad + cols, dst + (i + 1) * cols_pad, 0u);
  }
  std::fill(dst + rows * cols_pad, dst + rows_pad * cols_pad, 0u);
  return dst;
}

// Whether alpha can be multiplied into the bf16 operand exactly: a power of two below 1 (so no
// bf16 overflows; only results below 2^-126 / alpha lose bits).
inline bool exact_operand_scale(float alpha) {
  int exponent = 0;
  return alpha != 1.f && std::fabs(std::frexp(alpha, &exponent)) == 0.5f && std::fabs(alpha) < 1.f &&
         exponent > -24;
}

// dst [rows, words] (row stride ldd) <- src (row stride lds), each bf16 times alpha (see
// exact_operand_scale): as fp32 the product keeps the bf16's 8 significant bits, so cutting it
// back to its upper half is exact, NaN, inf and zero included; results under fp32's normal range
// are cut toward zero. dst may be src.
inline void scale_words(const uint32_t* src, int64_t lds, int64_t rows, int64_t words, float alpha, uint32_t* dst,
                        int64_t ldd) {
  using Vec = at::vec::Vectorized<float>;
  using IVec = at::vec::Vectorized<int32_t>;
  const Vec valpha(alpha);
  const IVec upper(static_cast<int32_t>(0xFFFF0000u)), lower(0xFFFF), sixteen(16);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < words; j += IVec::size()) {
      const int64_t count = std::min<int64_t>(IVec::size(), words - j);
      const IVec w = IVec::loadu(src + i * lds + j, count);
      const Vec even = at::vec::cast<float>(w << sixteen) * valpha;  // the word's low bf16
      const Vec odd = at::vec::cast<float>(w & upper) * valpha;
      const IVec out = ((at::vec::cast<int32_t>(even) >> sixteen) & lower) | (at::vec::cast<int32_t>(odd) & upper);
      out.store(dst + i * ldd + j, count);
    }
  }
}

// MT x NT tiles of C (MT, NT in {1, 2}) over word rows [kw0, kw1) of k (a multiple of 16 apart)
// into c (row stride ldc floats): C starts from zero, or from c itself when kLoad. a: A rows at
// word kw0 = 0, row stride lda words; b: B at word row 0, row stride ldb words.
template <int MT, int NT, bool kLoad>
inline void amx_block(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t kw0, int64_t kw1,
                      float* c, int64_t ldc) {
  const int64_t c_stride = ldc * sizeof(float);
  float* const c1 = c + kTileWords;
  float* const c2 = c + kTileRows * ldc;
  float* const c3 = c2 + kTileWords;
  if constexpr (kLoad) {
    _tile_loadd(0, c, c_stride);
    if constexpr (NT > 1) _tile_loadd(1, c1, c_stride);
    if constexpr (MT > 1) _tile_loadd(2, c2, c_stride);
    if constexpr (MT > 1 && NT > 1) _tile_loadd(3, c3, c_stride);
  } else {
    _tile_zero(0);
    if constexpr (NT > 1) _tile_zero(1);
    if constexpr (MT > 1) _tile_zero(2);
    if constexpr (MT > 1 && NT > 1) _tile_zero(3);
  }
  const int64_t a_stride = lda * 4, b_stride = ldb * 4;
  for (int64_t kw = kw0; kw < kw1; kw += kTileWords) {
    _tile_loadd(4, a + kw, a_stride);
    if constexpr (MT > 1) _tile_loadd(5, a + kTileRows * lda + kw, a_stride);
    _tile_loadd(6, b + kw * ldb, b_stride);
    if constexpr (NT > 1) _tile_loadd(7, b + kw * ldb + kTileWords, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NT > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT > 1) _tile_dpbf16ps(2, 5, 6);
    if constexpr (MT > 1 && NT > 1) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, c_stride);
  if constexpr (NT > 1) _tile_stored(1, c1, c_stride);
  if constexpr (MT > 1) _tile_stored(2, c2, c_stride);
  if constexpr (MT > 1 && NT > 1) _tile_stored(3, c3, c_stride);
}

// amx_block for a block of rows x cols (each at most kAmxBlock; whole tiles are taken).
template <bool kLoad>
inline void amx_block_of(int64_t rows, int64_t cols, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
                         int64_t kw0, int64_t kw1, float* c, int64_t ldc) {
  if (rows > kTileRows) {
    if (cols > kTileWords) {
      amx_block<2, 2, kLoad>(a, lda, b, ldb, kw0, kw1, c, ldc);
    } else {
      amx_block<2, 1, kLoad>(a, lda, b, ldb, kw0, kw1, c, ldc);
    }
  } else if (cols > kTileWords) {
    amx_block<1, 2, kLoad>(a, lda, b, ldb, kw0, kw1, c, ldc);
  } else {
    amx_block<1, 1, kLoad>(a, lda, b, ldb, kw0, kw1, c, ldc);
  }
}

// C rows [0, rows), columns [0, cols) (=|+=) alpha * the block in acc.
inline void amx_store(const float* acc, int64_t rows, int64_t cols, float* c, int64_t ldc, float alpha,
                      bool accumulate) {
  using Vec = at::vec::Vectorized<float>;
  const Vec valpha(alpha);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; j += Vec::size()) {
      const int64_t count = std::min<int64_t>(Vec::size(), cols - j);
      Vec x = Vec::loadu(acc + r * kAmxBlock + j) * valpha;
      if (accumulate) x = x + Vec::loadu(c + r * ldc + j, count);
      x.store(c + r * ldc + j, static_cast<int>(count));
    }
  }
}

// Whether amx_gemm takes a product of this size: the tiles must be mostly filled to beat the
// register micro-kernel.
inline bool amx_worthwhile(int64_t m, int64_t n, int64_t k_words) {
  return m >= kTileRows && n >= kTileWords && k_words >= kTileWords / 2;
}

// The product of gemm<Bf16Dot, kTransA> (see there for the operand forms and the band: row i of
// op(A) is zero outside elements [i + k_lo, i + k_hi], C(i, j) unneeded for j > i + n_hi); k counts
// bf16 elements. The band trims k and skips C blocks at block granularity (the zeros it widens
// over add nothing).
template <bool kTransA>
void amx_gemm(int64_t m, int64_t n, int64_t k, const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb,
              float* c, int64_t ldc, float alpha, bool accumulate, int64_t k_lo, int64_t k_hi, int64_t n_hi) {
  const int64_t kw = (k + 1) / 2;
  const int64_t kw_pad = round_up_tile(kw);
  AmxScratch& scratch = amx_scratch();
  // alpha into a copy of A where that pass costs less than the scratch pass over C it saves,
  // so that whole C blocks go straight to C: k no more than n words (the score products), or half
  // of that where A would not be copied otherwise.
  const bool copy_a = kTransA || m % kTileRows != 0 || kw % kTileWords != 0;
  const bool scale_a = exact_operand_scale(alpha) && (copy_a ? 1 : 2) * kw_pad <= n;
  // A into whole tiles: [round_up(m, 16), kw_pad] words, zero-padded.
  if (copy_a || scale_a) {
    const int64_t m_pad = round_up_tile(m);
    if (static_cast<int64_t>(scratch.a.size()) < m_pad * kw_pad) scratch.a.resize(m_pad * kw_pad);
    uint32_t* dst = scratch.a.data();
    if constexpr (kTransA) {
      std::fill(dst, dst + m_pad * kw_pad, 0u);
      // kTransA: word w of row i sits at a[w * lda + i]; transpose 16 x 16 word blocks.
      for (int64_t w0 = 0; w0 < kw; w0 += kTileWords) {
        for (int64_t i0 = 0; i0 < m; i0 += kTileRows) {
          at::vec::transpose_mxn<float>(reinterpret_cast<const float*>(a + w0 * lda + i0), lda,
                                        reinterpret_cast<float*>(dst + i0 * kw_pad + w0), kw_pad,
                                        static_cast<int>(std::min(kTileWords, kw - w0)),
                                        static_cast<int>(std::min(kTileRows, m - i0)));
        }
      }
      if (scale_a) scale_words(dst, kw_pad, m, kw, alpha, dst, kw_pad);
    } else if (m % kTileRows != 0 || kw % kTileWords != 0) {
      copy_padded(a, lda, m, kw, m_pad, kw_pad, scratch.a);
      if (scale_a) scale_words(dst, kw_pad, m, kw, alpha, dst, kw_pad);
    } else {
      scale_words(a, lda, m, kw, alpha, dst, kw_pad);  // whole tiles: no padding to write
    }
    a = dst;
    lda = kw_pad;
  }
  // B into whole tiles: [kw_pad, round_up(n, 16)] words, zero-padded.
  if (n % kTileWords != 0 || kw % kTileWords != 0) {
    const int64_t n_pad = round_up_tile(n);
    b = copy_padded(b, ldb, kw, n, kw_pad, n_pad, scratch.b);
    ldb = n_pad;
  }
  const float alpha_left = scale_a ? 1.f : alpha;  // what C's blocks still take

  AmxThreadState& state = amx_thread_state();
  if (!state.loaded) {
    _tile_loadconfig(&tile_config());
    state.loaded = true;
  }
  float* acc = scratch.c;
  for (int64_t n0 = 0; n0 < n; n0 += kAmxBlock) {
    const int64_t cols = std::min(kAmxBlock, n - n0);
    for (int64_t r0 = 0; r0 < m; r0 += kAmxBlock) {
      const int64_t rows = std::min(kAmxBlock, m - r0);
      const int64_t last_row = r0 + rows - 1;
      if (n0 > last_row + n_hi) continue;
      // The band's word range, widened to whole tiles inside [0, kw_pad).
      const int64_t e0 = std::max<int64_t>(0, r0 + k_lo);
      const int64_t e1 = std::max<int64_t>(0, std::min<int64_t>(k, last_row + k_hi + 1));
      const int64_t kw0 = e0 / 2 / kTileWords * kTileWords;
      const int64_t kw1 = std::max(kw0, std::min(kw_pad, round_up_tile((e1 + 1) / 2)));
      const uint32_t* ap = a + r0 * lda;
      const uint32_t* bp = b + n0;
      float* cp = c + r0 * ldc + n0;
      if (alpha_left == 1.f && rows % kTileRows == 0 && cols % kTileWords == 0) {
        // Whole tiles: straight to C, accumulating from C itself (an empty k range leaves it).
        if (!accumulate) {
          amx_block_of<false>(rows, cols, ap, lda, bp, ldb, kw0, kw1, cp, ldc);
        } else if (kw0 < kw1) {
          amx_block_of<true>(rows, cols, ap, lda, bp, ldb, kw0, kw1, cp, ldc);
        }
      } else {
        amx_block_of<false>(rows, cols, ap, lda, bp, ldb, kw0, kw1, acc, kAmxBlock);
        amx_store(acc, rows, cols, cp, ldc, alpha_left, accumulate);
      }
    }
  }
  if (state.scopes == 0) {
    _tile_release();
    state.loaded = false;
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace symattn::cpu
