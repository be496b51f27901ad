// Torch-free __host__ __device__ rules of the CUDA attention kernels: layout offsets (padded
// and varlen), classification of a (query block, key block) tile under causal / key padding /
// exclude_self, dropout keep decisions (Philox-4x32-10 from ../common/philox.h, shared with the
// CPU kernels), and the online-softmax step. Compiled as device code by nvcc and as plain host
// C++ by tests/test_cuda_attention_rules.py, which checks them against symattn_kernels.reference.
#pragma once

#include <stdint.h>

#if !defined(__CUDACC__)
#include <cmath>
#endif

#include "../common/philox.h"  // dropout_random16, dropout_threshold and the SYMATTN_HD macro

namespace symattn {

// log2(e): scores are scaled by scale * log2(e) so the kernels use exp2.
constexpr float kLog2e = 1.4426950408889634f;
// ln(2): converts a base-2 log-sum-exp back to the natural log that lse stores.
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -__builtin_huge_valf();

// ---- layouts -------------------------------------------------------------------------------

// A [B, S, H, X] (padded) or [total, H, X] (varlen) tensor, in element strides. Token t of
// sequence b, head h sits at b * batch + (start_b + t) * token + h * head, with start_b =
// cu_seqlens[b] for varlen (batch stride 0 there) and 0 for the padded layout.
struct RowStrides {
  int64_t batch;
  int64_t token;
  int64_t head;
};

// Start (first global row) and length of sequence b.
struct SeqInfo {
  int64_t start;
  int len;
};

SYMATTN_HD SeqInfo sequence_info(const int32_t* cu_seqlens, int b, int seqlen) {
  SeqInfo s;
  if (cu_seqlens != nullptr) {
    s.start = cu_seqlens[b];
    s.len = cu_seqlens[b + 1] - cu_seqlens[b];
  } else {
    s.start = 0;
    s.len = seqlen;
  }
  return s;
}

SYMATTN_HD int64_t row_offset(const RowStrides& st, int b, const SeqInfo& s, int t, int h) {
  return b * st.batch + (s.start + t) * st.token + h * st.head;
}

// Global row id of token t of sequence b (the dropout row counter): b * S + t padded,
// cu_seqlens[b] + t varlen.
SYMATTN_HD int64_t global_row(const int32_t* cu_seqlens, int b, int seqlen, int t) {
  return cu_seqlens != nullptr ? static_cast<int64_t>(cu_seqlens[b]) + t : static_cast<int64_t>(b) * seqlen + t;
}

SYMATTN_HD int cdiv(int a, int b) { return (a + b - 1) / b; }

// ---- masks ---------------------------------------------------------------------------------

// What the kernels know about the keys of one sequence: its length and, with a key padding
// mask, how many keys are real and the first real one (len and 0 without a mask).
struct KeyInfo {
  int len;
  int n_real;
  int first_real;
};

// reference.attention_mask's exclude_self rule: the diagonal (i, i) is removed unless it is
// the only allowed key of row i. This says whether row i has an allowed key other than i.
SYMATTN_HD bool row_has_other_key(int i, bool causal, const KeyInfo& k, bool real_i) {
  if (causal) return k.n_real > 0 && k.first_real < i;  // some real j < i
  return k.n_real - (real_i ? 1 : 0) > 0;
}

// Is key j allowed for query i (both < len)? real_j / real_i: key padding of j and i.
SYMATTN_HD bool element_allowed(int i, int j, bool causal, bool exclude_self, const KeyInfo& k, bool real_i,
                                bool real_j) {
  if (j >= k.len || i >= k.len) return false;
  if (causal && j > i) return false;
  if (!real_j) return false;
  if (exclude_self && i == j) return !row_has_other_key(i, causal, k, real_i);
  return true;
}

enum TileClass : int { kTileFull = 0, kTilePartial = 1, kTileMasked = 2 };

// Classifies the tile rows [m0, m0 + bm) x keys [n0, n0 + bn) of a sequence of length len.
// keys_all_real / keys_none_real: whether every / no key of [n0, min(n0 + bn, len)) is real
// (true / false without a key padding mask). kTileFull: every (i, j) with i < len is allowed
// and no key is out of range; kTileMasked: none is; kTilePartial: the kernel masks per element.
SYMATTN_HD int classify_tile(int m0, int bm, int n0, int bn, bool causal, bool exclude_self, int len,
                             bool keys_all_real, bool keys_none_real) {
  const int m_last = (m0 + bm < len ? m0 + bm : len) - 1;
  if (n0 >= len || m0 >= len || keys_none_real) return kTileMasked;
  if (causal && n0 > m_last) return kTileMasked;
  const bool in_range = n0 + bn <= len;
  const bool causal_clear = !causal || n0 + bn - 1 <= m0;
  const bool no_diagonal = !exclude_self || n0 + bn <= m0 || m_last < n0;
  return (in_range && keys_all_real && causal_clear && no_diagonal) ? kTileFull : kTilePartial;
}

// ---- dropout -------------------------------------------------------------------------------

// reference.dropout_keep_mask for element (h, row, key) at offset (h * n_rows + row) * key_stride + key.
SYMATTN_HD bool dropout_keep(uint64_t seed, uint32_t threshold, int h, int64_t n_rows, int64_t row,
                             int64_t key_stride, int key) {
  const uint64_t element = static_cast<uint64_t>((h * n_rows + row) * key_stride + key);
  return dropout_random16(seed, element) >= threshold;
}

// ---- online softmax (base 2) ---------------------------------------------------------------

SYMATTN_HD float fast_exp2(float x) {
#if defined(__CUDA_ARCH__)
  return exp2f(x);
#else
  return std::exp2(x);
#endif
}

SYMATTN_HD float fast_log2(float x) {
#if defined(__CUDA_ARCH__)
  return log2f(x);
#else
  return std::log2(x);
#endif
}

// Running row state: m = max of the base-2 scores seen, l = sum of exp2(s - m).
struct SoftmaxRow {
  float m;
  float l;
};

SYMATTN_HD SoftmaxRow softmax_init() { return SoftmaxRow{kNegInf, 0.0f}; }

// The value subtracted from scores: m, or 0 while the row has seen no allowed key (avoids
// -inf - -inf = NaN).
SYMATTN_HD float softmax_shift(float m) { return m == kNegInf ? 0.0f : m; }

// Folds a new tile with maximum tile_max in: updates m, rescales l, and returns the factor
// alpha by which the caller rescales its output accumulator. Then the caller adds
// exp2(s - softmax_shift(row.m)) of the tile's scores to row.l and to the accumulator.
SYMATTN_HD float softmax_rescale(SoftmaxRow& row, float tile_max) {
  const float m_new = row.m > tile_max ? row.m : tile_max;
  const float alpha = fast_exp2(softmax_shift(row.m) - softmax_shift(m_new));
  row.m = m_new;
  row.l *= alpha;
  return alpha;
}

// Natural-log log-sum-exp of a finished row: -inf when it had no allowed key.
SYMATTN_HD float softmax_lse(const SoftmaxRow& row) {
  return row.l > 0.0f ? (row.m + fast_log2(row.l)) * kLn2 : kNegInf;
}

// 1 / l for the final normalisation; 0 for an empty row (output 0, never NaN).
SYMATTN_HD float softmax_inv_sum(const SoftmaxRow& row) { return row.l > 0.0f ? 1.0f / row.l : 0.0f; }

}  // namespace symattn
