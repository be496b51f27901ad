// Bfloat16 products on AMX tiles (TDPBF16PS), for the AVX512_AMX kernel set: the same products,
// operand formats and rounding as Bf16Dot in attention_kernel.h (bf16 operands, exact pair
// products, fp32 accumulation), on the tile unit instead of vdpbf16ps.
//
// C[m, n] (=|+=) alpha * op(A)[m, k] * B[k, n] is computed in blocks of 2 x 2 tiles (32 x 32 fp32)
// over k steps of 32 elements. The operands arrive in Bf16Dot's word format (a word = a pair of
// bf16 along k), which is what the tile unit reads: an A tile is 16 rows of 16 words of the A-rows
// form; a B tile is 16 word rows of 16 columns of the B-rows (VNNI) form. So most products load
// their tiles straight from the caller's panels. What does not fit whole tiles is first copied
// into zero-padded per-thread scratch: the kTransA form of A (word-transposed), and operands whose
// row or column count or k is not a multiple of the tile (ragged lengths, head dims below 32).
// The accumulators go through a small scratch block to apply alpha and the accumulate flag.
// (torch's at::native::cpublas::brgemm, which SDPA-flash uses, was measured no faster at these
// product sizes, and takes B only repacked into blocks of at most 64 columns.)
//
// Results do not depend on the thread count: every C block is one fixed sequence of tile
// products. The tile configuration is loaded at the start of each product and released at its
// end, so no state is left for other code on the thread (or taken from it).
#pragma once

#include <ATen/cpu/vec/vec.h>
#include <immintrin.h>

#include <algorithm>
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

// MT x NT tiles of C (MT, NT in {1, 2}) over word rows [kw0, kw1) of k (a multiple of 16 apart)
// into c (row stride kAmxBlock floats). a: A rows at word kw0 = 0, row stride lda words; b: B at
// word row 0, row stride ldb words.
template <int MT, int NT>
inline void amx_block(const uint32_t* a, int64_t lda, const uint32_t* b, int64_t ldb, int64_t kw0, int64_t kw1,
                      float* c) {
  _tile_zero(0);
  if constexpr (NT > 1) _tile_zero(1);
  if constexpr (MT > 1) _tile_zero(2);
  if constexpr (MT > 1 && NT > 1) _tile_zero(3);
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
  constexpr int64_t kStride = kAmxBlock * sizeof(float);
  _tile_stored(0, c, kStride);
  if constexpr (NT > 1) _tile_stored(1, c + kTileWords, kStride);
  if constexpr (MT > 1) _tile_stored(2, c + kTileRows * kAmxBlock, kStride);
  if constexpr (MT > 1 && NT > 1) _tile_stored(3, c + kTileRows * kAmxBlock + kTileWords, kStride);
}

// C rows [0, rows), columns [0, cols) (=|+=) alpha * the block in acc.
inline void amx_store(const float* acc, int64_t rows, int64_t cols, float* c, int64_t ldc, float alpha,
                      bool accumulate) {
  using Vec = at::vec::Vectorized<float>;
  static_assert(Vec::size() == kTileWords, "one vector per tile row");
  const Vec valpha(alpha);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < cols; j += kTileWords) {
      const int64_t count = std::min(kTileWords, cols - j);
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
  // A into whole tiles: [round_up(m, 16), kw_pad] words, zero-padded.
  if (kTransA || m % kTileRows != 0 || kw % kTileWords != 0) {
    const int64_t m_pad = round_up_tile(m);
    if constexpr (kTransA) {
      if (static_cast<int64_t>(scratch.a.size()) < m_pad * kw_pad) scratch.a.resize(m_pad * kw_pad);
      uint32_t* dst = scratch.a.data();
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
      a = dst;
    } else {
      a = copy_padded(a, lda, m, kw, m_pad, kw_pad, scratch.a);
    }
    lda = kw_pad;
  }
  // B into whole tiles: [kw_pad, round_up(n, 16)] words, zero-padded.
  if (n % kTileWords != 0 || kw % kTileWords != 0) {
    const int64_t n_pad = round_up_tile(n);
    b = copy_padded(b, ldb, kw, n, kw_pad, n_pad, scratch.b);
    ldb = n_pad;
  }

  _tile_loadconfig(&tile_config());
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
      if (rows > kTileRows) {
        if (cols > kTileWords) {
          amx_block<2, 2>(ap, lda, bp, ldb, kw0, kw1, acc);
        } else {
          amx_block<2, 1>(ap, lda, bp, ldb, kw0, kw1, acc);
        }
      } else if (cols > kTileWords) {
        amx_block<1, 2>(ap, lda, bp, ldb, kw0, kw1, acc);
      } else {
        amx_block<1, 1>(ap, lda, bp, ldb, kw0, kw1, acc);
      }
      amx_store(acc, rows, cols, c + r0 * ldc + n0, ldc, alpha, accumulate);
    }
  }
  _tile_release();
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace symattn::cpu
