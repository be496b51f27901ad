// ForwardHead: one forward task's query rows of a head, whole-head symmetric, flash-style
// tiled with an online softmax, or mirrored over a pair of row groups.
#pragma once

#include "attention_head.h"

namespace symattn::cpu {
namespace CPU_CAPABILITY {
namespace {

// Rows [0, rows) of a group's state `acc` take a task's running state `part`: both rescaled to
// the larger max. Folded in a fixed order (see MirrorFolds), so the result never depends on which
// worker ran which task.
void fold_state(const RowState& acc, const RowState& part, int64_t rows, int64_t Dv) {
  for (int64_t r = 0; r < rows; ++r) {
    const float m = max_nan(acc.m[r], part.m[r]);
    if (m == kNegInf) continue;  // neither has met a key yet
    const float wa = rescale_factor(acc.m[r], m), wp = rescale_factor(part.m[r], m);
    acc.l[r] = wa * acc.l[r] + wp * part.l[r];
    acc.m[r] = m;
    const Vec vwa(wa), vwp(wp);
    float* o = acc.o + r * Dv;
    const float* src = part.o + r * Dv;
    for (int64_t d = 0; d < Dv; d += kVec) {
      const int64_t n = std::min(kVec, Dv - d);
      at::vec::fmadd(vwa, Vec::loadu(o + d, n), vwp * Vec::loadu(src + d, n)).store(o + d, n);
    }
  }
}

template <typename scalar_t>
class ForwardHead : public Head<scalar_t> {
  using Base = Head<scalar_t>;
  using typename Base::Dot, typename Base::Word, typename Base::Panel;
  using Base::kPairs, Base::kHalf, Base::D_, Base::Dv_, Base::L_, Base::g_, Base::p_, Base::ws_, Base::vb_,
      Base::shared_;

 public:
  using Base::Base;

  // Exactly what run() takes from the workspace.
  // The head's panels, with the contiguous fp32 values of pack_values_contiguous.
  static int64_t panel_floats(const ForwardParams& p, const Geometry& g) {
    return Base::panel_floats(p, g, false) + (!kPairs && !kHalf ? g.L * p.value_dim : 0);
  }

  // What the row-range packers take (pack_query_rows, fp32_rows, pack_key_rows, contiguous_values
  // on fp32 operands; pair_query_rows, pair_key_rows, pair_values on bf16 pairs): q query rows,
  // k keys, and the values of v rows in at most two ranges.
  static int64_t row_panel_floats(const ForwardParams& p, const Geometry& g, int64_t q, int64_t k, int64_t v) {
    const int64_t D = p.head_dim, Dv = p.value_dim;
    const bool shared = p.v.data == nullptr;
    const int64_t masks = p.key_padding_mask != nullptr ? g.ldk + g.L + 1 : 0;  // key bias, prefix counts
    if constexpr (kPairs) {
      return masks
             + (p.coef_mode != CoefMode::kNone ? 2 * q * D : 0)  // fp32 rows of the queries, times M
             + q * Base::words(D)                                 // the queries as A rows
             + k * Base::words(D) + Base::words(D) * key_stride(k)  // the keys as A rows, transposed
             + (Base::words(v) + 1) * Dv;                         // values as B rows (a pad row per range)
    }
    return masks
           + (kHalf ? (q + k) * D : 0)                             // fp32 rows of queries and keys
           + D * (round_up(k, kVec) + kVec)                        // Yt of the keys
           + (p.coef_mode != CoefMode::kNone ? q * D : 0)          // Y M of the queries
           + (shared && kHalf ? 0 : v * Dv);                       // values, widened or contiguous
  }

  // What pack_mirrored takes: the panels of a task's two row groups only (of at most G rows
  // each, the longest group of the call's mirrored heads).
  static int64_t mirrored_panel_floats(const ForwardParams& p, const Geometry& g) {
    int64_t G = 0;
    for (int64_t b = 0; b < (p.cu_seqlens != nullptr ? p.batch : 1); ++b) {
      const int64_t L = p.length(b);
      if (L > 0) G = std::max(G, mirror_group_rows(L, mirror_groups(L, p.batch * p.heads)));
    }
    return row_panel_floats(p, g, G, G, 2 * G);
  }

  // Query rows per chunk of run_tiled: whole query blocks, at most kMaxTaskRows.
  static int64_t tiled_chunk_rows(const Geometry& g) {
    return std::min(round_up(kMaxTaskRows, g.block), round_up(g.L, g.block));
  }

  // What run_tiled takes: a chunk's query panels and states and one key tile's panels.
  static int64_t tiled_workspace_floats(const ForwardParams& p, const Geometry& g) {
    const int64_t chunk = tiled_chunk_rows(g);
    return row_panel_floats(p, g, chunk, kKeyTile, kKeyTile)
           + g.block * kKeyTile                      // score tile
           + (kPairs ? g.block * kKeyTile / 2 : 0)   // P tile as bf16 A rows
           + chunk * p.value_dim                     // the chunk's output rows
           + 2 * chunk                               // their running max and sum
           + (p.dropout_p > 0.0 ? 2 * keep_bit_words(kKeyTile) : 0);  // keep bits of a tile row
  }

  // What run_mirrored takes: enough for a call whose tasks are all mirrored.
  static int64_t mirrored_workspace_floats(const ForwardParams& p, const Geometry& g) {
    constexpr int64_t T = kMirrorTile;
    return mirrored_panel_floats(p, g)
           + 2 * T * T                                // S / P, column P tiles
           + (kPairs ? T * T / 2 + T * T / 2 : 0)     // bf16 P, column P pairs
           + 3 * T                                    // tile maxima / factors, column sums
           + (p.dropout_p > 0.0 ? 2 * (keep_bit_words(T) * (T + 1) + T * T / 64) : 0);  // keep bits: a
                                                      // row, by query, by key
  }

  static int64_t workspace_floats(const ForwardParams& p, const Geometry& g) {
    const int64_t mirrored = g.mirrored ? mirrored_workspace_floats(p, g) : 0;
    if (g.tiled) return std::max(mirrored, tiled_workspace_floats(p, g));
    return panel_floats(p, g)
           + g.block * g.ldk                      // score block
           + (g.symmetric && !kPairs ? g.L * kSymTile + 2 * g.L + 2 * sym_tiles(g.L) + 2 * kSymTile : 0)  // run_symmetric's
                                                  // P^T, shifts and sums, tile rows' shift ranges, a tile's factors
           + (g.symmetric && !kPairs && p.dropout_p > 0.0 ? 2 * (g.L * keep_bit_words(g.ldk) + kSymTile) : 0)  // and
                                                  // its keep bits of every row and one tile's transposed
           + (kPairs ? g.block * g.ldk / 2 : 0)   // P block as bf16 A rows
           + 2 * g.block                          // row maxima and sums
           + (p.dropout_p > 0.0 ? 2 * keep_bit_words(g.ldk) : 0)  // keep bits of a row
           + (kHalf ? g.block * p.value_dim : 0);  // output block
  }

  void prefetch_inputs() const {
    this->prefetch(p_.q, D_);
    this->prefetch(p_.v, Dv_);
  }

  // Query rows [r0, r1) of the head: r0 is a multiple of the query block (so even), and a head
  // on the symmetric schedule is only ever run whole.
  void run(int64_t r0, int64_t r1) {
    AmxTileScope tiles;  // one tile configuration for the task's products
    if (g_.tiled) {
      run_tiled(r0, r1);
      return;
    }
    this->setup_keys();
    if constexpr (!kPairs && !kHalf) {
      // Shared fp32 rows read in place sit H D floats apart: their contiguous copy (the values
      // panel) is made first, which streams them in, and the key transpose then reads it from cache.
      if (shared_) {
        const Panel y = contiguous_values({this->y_rows_.data, this->y_rows_.ld}, 0, L_);
        this->y_rows_ = {y.data, y.ld};
      }
    }
    this->pack_query_key(shared_, r0, r1);
    pack_values_contiguous();
    if constexpr (!kPairs) {
      if (unmirrored_symmetric()) {
        run_symmetric();
        return;
      }
    }
    float* s = ws_.template take<float>(g_.block * g_.ldk);
    // exp(S - rowmax) as A rows: bf16 beside the scores, or the fp32 scores themselves.
    Word* probs = nullptr;
    int64_t ldp = g_.ldk;
    if constexpr (kPairs) {
      ldp = g_.ldk / 2;
      probs = ws_.template take<Word>(g_.block * ldp);
    } else {
      probs = s;
    }
    float* row_m = ws_.template take<float>(g_.block);
    float* row_sum = ws_.template take<float>(g_.block);
    uint64_t* keep = this->dropout() ? ws_.template take<uint64_t>(keep_bit_words(g_.ldk)) : nullptr;
    float* o = kHalf ? ws_.template take<float>(g_.block * Dv_) : nullptr;
    const int64_t block = g_.block;  // >= L_ for symmetric heads
    for (int64_t i0 = r0; i0 < r1; i0 += block) {
      const int64_t rows = std::min(block, r1 - i0);
      const int64_t kend = this->block_keys(i0, rows);
      if (kend > 0) this->scores(s, i0, rows, kend);
      for (int64_t r = 0; r < rows; ++r) {
        softmax_row(s + r * g_.ldk, i0 + r, kend, keep, probs + r * ldp, row_m[r], row_sum[r]);
      }
      row_lses(row_m, row_sum, rows, this->lse_ptr(i0), p_.lse.token);
      // out = P V / rowsum, written straight into the output for fp32.
      Band band;
      if (p_.causal) band.k_hi = i0;
      const auto [dst, ld] = product_rows(i0, o);
      gemm<Dot, false>(rows, Dv_, kend, Panel{probs, ldp}, vb_, dst, ld, 1.f, false, band);
      for (int64_t r = 0; r < rows; ++r) {
        // 0 for a row with no allowed key (P = 0, sum 0).
        finish_product_row(i0 + r, dst + r * ld, row_m[r] == kNegInf ? 0.f : out_scale() * (1.f / row_sum[r]));
      }
    }
  }

 private:
  // Output row i from its fp32 values o times factor, scaled as they are stored; where the call
  // keeps a rounding residual, o is scaled in place first (the residual needs the fp32 row).
  void store_output(int64_t i, float* o, float factor) const {
    scalar_t* out = this->row_ptr(p_.out, i);
    if constexpr (kHalf) {
      if (p_.out_residual.data != nullptr) {
        scale_inplace(o, Dv_, factor);
        store_row(out, o, Dv_);
        store_residual(this->row_ptr(p_.out_residual, i), o, out, Dv_);
        return;
      }
    }
    store_row_scaled(out, o, Dv_, factor);
  }

  // Where the P V product of the query rows from i0 goes, and its row stride: the output itself
  // for fp32, else the fp32 block o, whose rows are then stored to the output.
  std::pair<float*, int64_t> product_rows(int64_t i0, float* o) const {
    if constexpr (kHalf) {
      return {o, Dv_};
    } else {
      return {this->row_ptr(p_.out, i0), p_.out.token};
    }
  }

  // Output row i from its row o of a product_rows block, times factor: scaled in place where o is
  // the fp32 output row itself, else stored (store_output).
  void finish_product_row(int64_t i, float* o, float factor) const {
    if constexpr (kHalf) {
      store_output(i, o, factor);
    } else {
      scale_inplace(o, Dv_, factor);
    }
  }

  // pack_values, then fp32 values read in place copied contiguous (contiguous_values), every
  // packed row.
  void pack_values_contiguous() {
    this->pack_values();
    if constexpr (!kPairs && !kHalf) vb_ = contiguous_values(this->ya_, 0, this->packed_rows_);
  }

  // A mirrored task's panels: query rows [r0, r1) as Qa (times M), keys [c0, c1) as Yt, and the
  // values of both groups (group_values_ of rows [r0, r1), vb_ of keys [c0, c1)), each addressed
  // by the rows' own index and holding those rows only (a task's two groups are 2 / groups of the
  // head's rows), fp32 values copied contiguous (contiguous_values).
  void pack_mirrored(int64_t r0, int64_t r1, int64_t c0, int64_t c1) {
    const bool one_group = r0 == c0;
    if constexpr (kPairs) {
      pair_query_rows(r0, r1);
      pair_key_rows(c0, c1);
      group_values_ = pair_values(r0, r1);
      vb_ = one_group ? group_values_ : pair_values(c0, c1);
    } else {
      const Panel ya = pack_query_rows(r0, r1);  // M is diagonal: the mirror needs a symmetric one
      const Panel yc = one_group ? ya : fp32_rows(this->y_rows_, D_, c0, c1);
      pack_key_rows(yc, c0, c1);
      group_values_ = contiguous_values(ya, r0, r1);
      vb_ = one_group ? group_values_ : contiguous_values(yc, c0, c1);
    }
  }

  // Packers of row ranges for fp32 operands (pack_mirrored, run_tiled); each panel is addressed
  // by the rows' own index and sized by row_panel_floats.

  // fp32 rows [i0, i1) of src (width n): the input itself, or widened into the workspace.
  Panel fp32_rows(const typename Base::Rows& src, int64_t n, int64_t i0, int64_t i1) {
    if constexpr (kHalf) {
      float* buf = ws_.template take<float>((i1 - i0) * n);
      load_rows(buf, n, src.data + i0 * src.ld, src.ld, i1 - i0, n);
      return {buf - i0 * n, n};
    } else {
      return {src.data, src.ld};
    }
  }

  // Query rows [r0, r1) as the score products' A rows qa_ (times M); returns their fp32 rows.
  Panel pack_query_rows(int64_t r0, int64_t r1) {
    const Panel y = fp32_rows(this->y_rows_, D_, r0, r1);
    this->qa_ = y;
    if (p_.coef_mode != CoefMode::kNone) {
      float* qm = ws_.template take<float>((r1 - r0) * D_);
      this->times_coef(y.data, y.ld, r0, r1, qm);
      this->qa_ = {qm - r0 * D_, D_};
    }
    return y;
  }

  // Keys [c0, c1) of the A rows y (fp32 rows, or bf16 pairs) as the score products' B panel yt_
  // (Y^T of its own width).
  void pack_key_rows(const Panel& y, int64_t c0, int64_t c1) {
    const int64_t ldt = key_stride(c1 - c0);
    const Panel yt = this->b_transposed(Base::a_from(y, c0), c1 - c0, D_,
                                        ws_.template take<Word>(Base::words(D_) * ldt), ldt);
    this->yt_ = {yt.data - c0, ldt};
  }

  // Values of rows [i0, i1) (y's fp32 rows in shared mode) as a contiguous [rows, Dv] panel, copied
  // where they are read in place: a head's rows sit H Dv floats apart in the input (3 KiB at
  // H = 12, Dv = 64), a stride that puts the [kDepth, kNR] values panel the P V micro-kernels
  // reuse on 16 of the 64 L1 sets.
  Panel contiguous_values(const Panel& y, int64_t i0, int64_t i1) {
    const Panel v = shared_ ? y : fp32_rows(this->v_rows_, Dv_, i0, i1);
    if (v.ld == Dv_) return v;
    float* buf = ws_.template take<float>((i1 - i0) * Dv_);
    load_rows(buf, Dv_, v.data + i0 * v.ld, v.ld, i1 - i0, Dv_);
    return {buf - i0 * Dv_, Dv_};
  }

  // The same packers for bf16 operand pairs, from the input rows (y_rows_, v_rows_).

  // Query rows [r0, r1) as the score products' A rows qa_ (times M, from their fp32 rows).
  void pair_query_rows(int64_t r0, int64_t r1) {
    const typename Base::Rows& y = this->y_rows_;
    const int64_t n = r1 - r0;
    Word* buf = ws_.template take<Word>(n * Base::words(D_));
    if (p_.coef_mode == CoefMode::kNone) {
      this->qa_ = Base::a_from(Base::a_rows(y.data + r0 * y.ld, y.ld, n, D_, buf), -r0);
      return;
    }
    float* yf = ws_.template take<float>(n * D_);
    load_rows(yf, D_, y.data + r0 * y.ld, y.ld, n, D_);
    float* qm = ws_.template take<float>(n * D_);
    this->times_coef(yf - r0 * D_, D_, r0, r1, qm);
    this->qa_ = Base::a_from(Base::a_rows(static_cast<const float*>(qm), D_, n, D_, buf), -r0);
  }

  // Keys [c0, c1) as the score products' B panel yt_: their A rows, then pack_key_rows.
  void pair_key_rows(int64_t c0, int64_t c1) {
    const typename Base::Rows& y = this->y_rows_;
    const int64_t n = c1 - c0;
    const Panel ya = Base::a_rows(y.data + c0 * y.ld, y.ld, n, D_, ws_.template take<Word>(n * Base::words(D_)));
    pack_key_rows(Base::a_from(ya, -c0), c0, c1);
  }

  // Values of rows [i0, i1), i0 even, as B rows (row pairs interleaved; Y's rows in shared mode).
  Panel pair_values(int64_t i0, int64_t i1) {
    const typename Base::Rows& v = shared_ ? this->y_rows_ : this->v_rows_;
    Word* buf = ws_.template take<Word>(Base::words(i1 - i0) * Dv_);
    const Panel vb = Base::b_rows(v.data + i0 * v.ld, v.ld, i1 - i0, Dv_, buf, Dv_);
    return Base::b_from(vb, -i0);
  }

  // Dropout's keep bits on the symmetric schedule: every row's over all keys (words per row),
  // and room for one tile's bits transposed (tile_exponentials).
  struct SymmetricKeep {
    const uint64_t* rows = nullptr;
    int64_t words = 0;
    uint64_t* transposed = nullptr;
  };

  // Whether this head (after setup_keys) takes run_symmetric: the whole-head symmetric schedule
  // on fp32 operands. bf16 operands would need P^T repacked as row pairs, so those heads mirror
  // the scores.
  bool unmirrored_symmetric() const { return this->symmetric_ && !kPairs; }

  // A whole head on the symmetric schedule without a mirrored copy of the scores: only the lower
  // tile triangle is multiplied and stored. Every row's max over all its keys comes first, in one
  // pass over the stored tiles (symmetric_maxima). Then each tile row I, in order, takes its
  // probabilities: those of its keys up to its diagonal tile in place (the tiles before it were
  // left so by earlier tile rows), and those of its later keys J, the columns of the stored tiles
  // (J, I) below it, into a scratch P^T [keys, queries], which the P V product takes in its kTransA
  // form. The pass over a tile (J, I) leaves both: row J's probabilities in place and row I's in P^T
  // (tile_exponentials). With dropout, every row's keep bits over all keys are drawn first (by
  // query, as everywhere), and a tile's column side takes its queries' bits transposed.
  void run_symmetric() {
    constexpr int64_t T = kSymTile;
    const int64_t ld = g_.ldk;
    float* s = ws_.template take<float>(L_ * ld);
    float* pt = ws_.template take<float>(L_ * T);
    float* shift = ws_.template take<float>(L_);
    float* sum = ws_.template take<float>(L_);
    float* shift_range = ws_.template take<float>(2 * sym_tiles(L_));
    float* factors = ws_.template take<float>(2 * T);  // a tile's row and column factors
    float* o = kHalf ? ws_.template take<float>(std::min(T, L_) * Dv_) : nullptr;
    const int64_t keep_words = keep_bit_words(g_.ldk);
    uint64_t* keep = this->dropout() ? ws_.template take<uint64_t>(L_ * keep_words) : nullptr;
    uint64_t* keep_t = this->dropout() ? ws_.template take<uint64_t>(T) : nullptr;  // a tile's, transposed
    for (int64_t i = 0; keep != nullptr && i < L_; ++i) this->keep_bits(keep + i * keep_words, i, 0, L_);
    const Panel v = vb_;
    this->lower_scores(s);
    symmetric_maxima(s, shift);
    tile_shift_ranges(shift, shift_range);
    fill(sum, L_, 0.f);
    for (int64_t i0 = 0; i0 < L_; i0 += T) {
      const int64_t rows = std::min(T, L_ - i0), iend = i0 + rows;
      for (int64_t r = 0; r < rows; ++r) {
        float* x = s + (i0 + r) * ld + i0;  // the diagonal tile, masked by symmetric_maxima
        const KeepBits row_keep{keep != nullptr ? keep + (i0 + r) * keep_words + i0 / 64 : nullptr, kept_scale()};
        sum[i0 + r] += exp_sum_store(x, rows, shift[i0 + r], keep != nullptr ? &row_keep : nullptr, x);
      }
      for (int64_t j0 = iend; j0 < L_; j0 += T) {
        const int64_t rows_j = std::min(T, L_ - j0);
        float* pt_j = pt + (j0 - iend) * T;
        if (keep != nullptr) {
          tile_exponentials<true>(s, i0, j0, rows_j, shift, shift_range, factors, pt_j, sum, {keep, keep_words, keep_t});
        } else {
          tile_exponentials<false>(s, i0, j0, rows_j, shift, shift_range, factors, pt_j, sum, {});
        }
      }
      const auto [dst, ldo] = product_rows(i0, o);
      gemm<Dot, false>(rows, Dv_, iend, Panel{s + i0 * ld, ld}, v, dst, ldo, 1.f, false);
      if (iend < L_) gemm<Dot, true>(rows, Dv_, L_ - iend, Panel{pt, T}, Base::b_from(v, iend), dst, ldo, 1.f, true);
      row_lses(shift + i0, sum + i0, rows, this->lse_ptr(i0), p_.lse.token);
      for (int64_t r = 0; r < rows; ++r) {
        // Only a row with no allowed key sums to 0 (its max gives an exponential of 1 elsewhere).
        const float l = sum[i0 + r];
        finish_product_row(i0 + r, dst + r * ldo, l == 0.f ? 0.f : 1.f / l);
      }
    }
  }

  static int64_t sym_tiles(int64_t L) { return (L + kSymTile - 1) / kSymTile; }
  static constexpr int kTileVecs = static_cast<int>(kSymTile / kVec);

  // shift[i] = the max of score row i over the keys it attends, read across its stored row up to
  // the end of its diagonal tile and down column i of the stored tiles below: 0 where it attends
  // none (each of its P is then exactly 0), NaN where that max is -inf but an attended score is NaN
  // (row_max's rule). One read of each stored score; the diagonal tiles are masked in place (only
  // their own rows read them), the other tiles, whose scores serve two rows, are not.
  void symmetric_maxima(float* s, float* shift) const {
    constexpr int64_t T = kSymTile;
    const int64_t ld = g_.ldk;
    const float* kbias = this->kbias_;
    fill(shift, L_, kNegInf);
    for (int64_t j0 = 0; j0 < L_; j0 += T) {
      const int64_t jend = std::min(j0 + T, L_);
      for (int64_t j = j0; j < jend; ++j) {
        float* row = s + j * ld;
        this->mask_row(row + j0, j, jend, j0);
        // Across keys [0, j0) (whole vectors: j0 is a multiple of kSymTile), and down: row j is key
        // j of the queries of those columns, where it is real.
        const bool down = this->real_key(j);
        Vec acc(kNegInf);
        for (int64_t k = 0; k < j0; k += kVec) {
          const Vec x = Vec::loadu(row + k);
          if (down) max_running(Vec::loadu(shift + k), x).store(shift + k);
          acc = max_running(acc, kbias == nullptr ? x : Vec::blendv(x, Vec(kNegInf), Vec::loadu(kbias + k) != Vec(0.f)));
        }
        const float across = at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return max_running(a, b); }, acc);
        shift[j] = max_nan(row_max(row + j0, jend - j0), across);
      }
    }
    for (int64_t j = 0; j < L_; ++j) {
      if (shift[j] != kNegInf) continue;
      const int64_t jend = std::min(j / T * T + T, L_);
      bool nan = false;
      for (int64_t k = 0; k < jend && !nan; ++k) nan = this->real_key(k) && std::isnan(s[j * ld + k]);
      for (int64_t k = jend; k < L_ && !nan; ++k) nan = this->real_key(k) && std::isnan(s[k * ld + j]);
      shift[j] = nan ? std::numeric_limits<float>::quiet_NaN() : 0.f;
    }
  }
  // range[2t], range[2t + 1]: the least and greatest shift of tile row t's rows, or -inf and inf
  // where one of its keys is padding or a shift is not finite, so that no tile of t shares.
  void tile_shift_ranges(const float* shift, float* range) const {
    constexpr float kInf = std::numeric_limits<float>::infinity();
    for (int64_t t = 0; t < sym_tiles(L_); ++t) {
      float lo = kInf, hi = -kInf;
      for (int64_t i = t * kSymTile; i < std::min((t + 1) * kSymTile, L_); ++i) {
        if (!this->real_key(i) || !std::isfinite(shift[i])) {
          lo = -kInf;
          hi = kInf;
          break;
        }
        lo = std::min(lo, shift[i]);
        hi = std::max(hi, shift[i]);
      }
      range[2 * t] = lo;
      range[2 * t + 1] = hi;
    }
  }

  // Both roles of the stored tile (J, I), rows [j0, j0 + rows) by keys [i0, i0 + kSymTile): row
  // j's probabilities exp(s - shift[j]) in place (padded keys 0), their sums into sum[j], and those
  // of column i, exp(s - shift[i]), into pt [rows, kSymTile] (0 on padded keys j), their sums into
  // sum[i]. Where every key of both tile rows is real and their shifts lie within kSharedSpread
  // of each other, one exponential serves both (as in shared_exponentials): the column's is the
  // row's times exp(shift[j] - hi) / exp(shift[i] - hi), hi the greatest of those shifts (see
  // kSharedSpread). With dropout (kKeep) the stored probabilities (not the sums) take their
  // multipliers: row j's from its own bits, column i's from the tile's bits of queries I
  // transposed into tile_keep.transposed.
  template <bool kKeep>
  void tile_exponentials(float* s, int64_t i0, int64_t j0, int64_t rows, const float* shift, const float* range,
                         float* factors, float* pt, float* sum, const SymmetricKeep& tile_keep) const {
    constexpr int64_t T = kSymTile;
    float *row_factor = factors, *col_factor = factors + T;
    static_assert(T == 64, "a tile's keep bits are one 64 x 64 bit block");
    const int64_t ld = g_.ldk, ti = i0 / T, tj = j0 / T;
    const uint64_t* keep = tile_keep.rows;
    const int64_t keep_words = tile_keep.words;
    uint64_t* keep_t = tile_keep.transposed;
    if constexpr (kKeep) {
      for (int64_t r = 0; r < T; ++r) keep_t[r] = i0 + r < L_ ? keep[(i0 + r) * keep_words + j0 / 64] : 0;
      transpose_bits64(keep_t);  // keep_t[c]: bit r for query i0 + r on key j0 + c
    }
    const float kept = kept_scale();
    auto kept_lanes = [](const Vec& e, const KeepBits& bits, int v) { return kKeep ? apply_keep(e, bits, v * kVec) : e; };
    const float lo = std::min(range[2 * ti], range[2 * tj]), hi = std::max(range[2 * ti + 1], range[2 * tj + 1]);
    const bool shared = hi - lo <= kSharedSpread;  // false where a range is (-inf, inf)
    if (shared) {
      spread_factors(shift + j0, rows, hi, false, row_factor);
      spread_factors(shift + i0, T, hi, true, col_factor);
    }
    Vec col[kTileVecs], col_sum[kTileVecs];  // the columns' shifts, or factors 1 / exp(shift[i] - hi)
    SYMATTN_UNROLL for (int v = 0; v < kTileVecs; ++v) {
      col[v] = Vec::loadu((shared ? col_factor : shift + i0) + v * kVec);
      col_sum[v] = Vec(0.f);
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t j = j0 + r;
      float* x = s + j * ld + i0;
      float* prow = pt + r * T;
      const KeepBits row_keep{kKeep ? keep + j * keep_words + i0 / 64 : nullptr, kept};
      const KeepBits col_keep{kKeep ? keep_t + r : nullptr, kept};
      if (shared) {
        const Vec m(shift[j]), alpha(row_factor[r]);
        Vec acc(0.f);
        SYMATTN_UNROLL for (int v = 0; v < kTileVecs; ++v) {
          const Vec e = exp2_vec(exp2_arg(Vec::loadu(x + v * kVec), m));
          acc = acc + e;
          kept_lanes(e, row_keep, v).store(x + v * kVec);
          const Vec e_col = e * (alpha * col[v]);
          col_sum[v] = col_sum[v] + e_col;
          kept_lanes(e_col, col_keep, v).store(prow + v * kVec);
        }
        sum[j] += at::vec::vec_reduce_all<float>([](Vec a, Vec b) { return a + b; }, acc);
        continue;
      }
      // Column i's side first: the row's side then masks and overwrites the scores.
      if (this->real_key(j)) {
        SYMATTN_UNROLL for (int v = 0; v < kTileVecs; ++v) {
          const Vec e = exp2_vec(exp2_arg(Vec::loadu(x + v * kVec), col[v]));
          col_sum[v] = col_sum[v] + e;
          kept_lanes(e, col_keep, v).store(prow + v * kVec);
        }
      } else {
        fill(prow, T, 0.f);
      }
      this->mask_row(x, j, i0 + T, i0);
      sum[j] += exp_sum_store(x, T, shift[j], kKeep ? &row_keep : nullptr, x);
    }
    SYMATTN_UNROLL for (int v = 0; v < kTileVecs; ++v) {
      (Vec::loadu(sum + i0 + v * kVec) + col_sum[v]).store(sum + i0 + v * kVec);
    }
  }

  // Query blocks against key tiles: each tile's scores update the rows' running max m and sum l,
  // the output rows are rescaled by exp(m_old - m_new) where a row's max grows, then gain P V.
  // The task's rows go in chunks of up to tiled_chunk_rows, and within a chunk key tiles go outer
  // and query blocks inner: on fp32 operands a chunk packs each key tile (Y^T and contiguous
  // values) once for all its blocks, so a worker holds one tile's panels and one chunk's states,
  // never the head's keys. Each row still meets its key tiles in order.
  void run_tiled(int64_t r0, int64_t r1) {
    this->setup_keys();
    const int64_t chunk = tiled_chunk_rows(g_);
    float* s = ws_.template take<float>(g_.block * kKeyTile);
    Word* probs = nullptr;
    int64_t ldp = kKeyTile;
    if constexpr (kPairs) {
      ldp = kKeyTile / 2;
      probs = ws_.template take<Word>(g_.block * ldp);
    } else {
      probs = s;
    }
    float* o = ws_.template take<float>(chunk * Dv_);
    float* m = ws_.template take<float>(chunk);
    float* l = ws_.template take<float>(chunk);
    uint64_t* keep = this->dropout() ? ws_.template take<uint64_t>(keep_bit_words(kKeyTile)) : nullptr;
    const float scale = static_cast<float>(p_.scale);
    for (int64_t q0 = r0; q0 < r1; q0 += chunk) {
      const int64_t q1 = std::min(r1, q0 + chunk), kend = this->block_keys(q0, q1 - q0);
      const size_t chunk_panels = ws_.mark();
      if constexpr (kPairs) {
        pair_query_rows(q0, q1);
      } else {
        pack_query_rows(q0, q1);
      }
      fill(o, (q1 - q0) * Dv_, 0.f);
      fill(m, q1 - q0, kNegInf);
      fill(l, q1 - q0, 0.f);
      for (int64_t j0 = 0; j0 < kend; j0 += kKeyTile) {
        const int64_t j1 = std::min(kend, j0 + kKeyTile);
        const size_t tile_panels = ws_.mark();
        if constexpr (kPairs) {
          pair_key_rows(j0, j1);
          vb_ = pair_values(j0, j1);
        } else {
          const Panel yk = fp32_rows(this->y_rows_, D_, j0, j1);
          pack_key_rows(yk, j0, j1);
          vb_ = contiguous_values(yk, j0, j1);
        }
        for (int64_t i0 = q0; i0 < q1; i0 += g_.block) {
          const int64_t rows = std::min(g_.block, q1 - i0);
          const int64_t cols = std::min(j1, this->block_keys(i0, rows)) - j0;
          if (cols <= 0) continue;  // a causal block whose keys end before the tile
          Band score_band, pv_band;
          if (p_.causal) {
            score_band.n_hi = i0 - j0;
            pv_band.k_hi = i0 - j0;
          }
          gemm<Dot, false>(rows, cols, D_, Base::a_from(this->qa_, i0), Panel{this->yt_.data + j0, this->yt_.ld}, s,
                           kKeyTile, scale, false, score_band);
          const RowState x = RowState{o, m, l}.from(i0 - q0, Dv_);
          for (int64_t r = 0; r < rows; ++r) {
            online_row(s + r * kKeyTile, i0 + r, j0, cols, x.m[r], x.l[r], x.o + r * Dv_, probs + r * ldp, keep);
          }
          gemm<Dot, false>(rows, Dv_, cols, Panel{probs, ldp}, Base::b_from(vb_, j0), x.o, Dv_, 1.f, true, pv_band);
        }
        ws_.rewind(tile_panels);
      }
      row_lses(m, l, q1 - q0, this->lse_ptr(q0), p_.lse.token);  // an empty row: l = 0
      for (int64_t r = 0; r < q1 - q0; ++r) {
        const bool empty = m[r] == kNegInf;
        store_output(q0 + r, o + r * Dv_, empty ? 0.f : out_scale() / l[r]);
      }
      ws_.rewind(chunk_panels);
    }
  }

 public:
  // Mirrored schedule, one task: query rows [r0, r1) against keys [c0, c1), and when these are
  // other rows, also rows [c0, c1) against keys [r0, r1), from the same score tiles: S is
  // symmetric, so the tile S_IJ (rows I, keys J) read down its columns is S_JI. A group with
  // itself takes its tile triangle: tiles below the diagonal both ways, diagonal tiles one way.
  // Rows I keep their running state in side_a, rows J in side_b (side_a again for one group);
  // no other task writes either, and MirrorFolds folds a group's states in a fixed order.
  void run_mirrored(int64_t r0, int64_t r1, int64_t c0, int64_t c1, const RowState& side_a, const RowState& side_b) {
    constexpr int64_t T = kMirrorTile;
    const bool one_group = r0 == c0;
    this->setup_keys();
    pack_mirrored(r0, r1, c0, c1);  // the tiles' keys are rows [c0, c1)
    start_states(side_a, r1 - r0);
    if (!one_group) start_states(side_b, c1 - c0);
    // The output rows of the states are not zeroed beforehand: the first product into a block of
    // T rows writes them (C =), later ones add (C +=). Until then a row's max is -inf, so no
    // rescale reads them.
    std::vector<char> written_a((r1 - r0 + T - 1) / T, 0), written_b(one_group ? 0 : (c1 - c0 + T - 1) / T, 0);
    auto first_write = [](std::vector<char>& written, int64_t block) {
      const bool first = written[block] == 0;
      written[block] = 1;
      return first;
    };
    float* s = ws_.template take<float>(T * T);
    Word* probs = nullptr;
    int64_t ldp = T;
    if constexpr (kPairs) {
      ldp = T / 2;
      probs = ws_.template take<Word>(T * ldp);
    } else {
      probs = s;
    }
    float* pt = ws_.template take<float>(T * T);
    Word* pt_words = kPairs ? ws_.template take<Word>(T * T / 2) : nullptr;
    float* tile_scratch = ws_.template take<float>(3 * T);  // column_pass's cmax, or shared_exponentials'
    uint64_t *keep = nullptr, *keep_by_query = nullptr, *keep_by_key = nullptr;
    if (this->dropout()) {
      keep = ws_.template take<uint64_t>(keep_bit_words(T));
      keep_by_query = ws_.template take<uint64_t>(T * keep_bit_words(T));
      keep_by_key = ws_.template take<uint64_t>(T * T / 64);
    }
    const float scale = static_cast<float>(p_.scale);
    for (int64_t j0 = c0; j0 < c1; j0 += T) {
      const int64_t cols = std::min(T, c1 - j0);
      for (int64_t i0 = r0; i0 < (one_group ? j0 + 1 : r1); i0 += T) {
        const int64_t rows = std::min(T, r1 - i0);
        gemm<Dot, false>(rows, cols, D_, Base::a_from(this->qa_, i0), Panel{this->yt_.data + j0, this->yt_.ld}, s,
                         T, scale, false);
        const RowState a = side_a.from(i0 - r0, Dv_);
        bool rows_done = false;
        if (i0 != j0) {
          // Rows J against keys I: with the rows' own probabilities from one exponential per
          // score (rows_done), or before the row pass below masks and exponentiates s in place.
          const RowState b = (one_group ? side_a : side_b).from(j0 - (one_group ? r0 : c0), Dv_);
          if (keep != nullptr) column_keep(i0, rows, j0, cols, keep_by_query, keep_by_key);
          const bool first = first_write(one_group ? written_a : written_b, (j0 - c0) / T);
          rows_done = shared_exponentials(s, i0, rows, j0, cols, a, b, probs, ldp, pt, tile_scratch, keep, keep_by_key);
          if (rows_done || column_pass(s, i0, rows, cols, b, pt, tile_scratch, keep_by_key)) {
            Panel p_cols{reinterpret_cast<const Word*>(pt), T};
            if constexpr (kPairs) {
              pack_bf16_pairs(static_cast<const float*>(pt), T, rows, cols, pt_words, T);
              p_cols = Panel{pt_words, T};
            }
            gemm<Dot, true>(cols, Dv_, rows, p_cols, Base::b_from(group_values_, i0), b.o, Dv_, 1.f, !first);
          } else if (first) {
            fill(b.o, cols * Dv_, 0.f);
          }
        }
        for (int64_t r = 0; r < rows && !rows_done; ++r) {
          online_row(s + r * T, i0 + r, j0, cols, a.m[r], a.l[r], a.o + r * Dv_, probs + r * ldp, keep);
        }
        gemm<Dot, false>(rows, Dv_, cols, Panel{probs, ldp}, Base::b_from(vb_, j0), a.o, Dv_, 1.f,
                         !first_write(written_a, (i0 - r0) / T));
      }
    }
  }

  // Rows [r0, r1) from their group's state once every task has been folded into it: out and lse.
  void write_mirrored(int64_t r0, int64_t r1, const RowState& acc) {
    row_lses(acc.m, acc.l, r1 - r0, this->lse_ptr(r0), p_.lse.token);  // an empty row: l = 0
    for (int64_t r = 0; r < r1 - r0; ++r) {
      float* o = acc.o + r * Dv_;
      const bool empty = acc.m[r] == kNegInf;
      if (empty) fill(o, Dv_, 0.f);
      store_output(r0 + r, o, empty ? 1.f : out_scale() / acc.l[r]);
    }
  }

 private:
  void start_states(const RowState& x, int64_t rows) {
    fill(x.m, rows, kNegInf);
    fill(x.l, rows, 0.f);
  }

  // The dropout keep bits of the column pass of tile (rows i0.., keys j0..): bit c % 64 of
  // keep_by_key[r * T / 64 + c / 64] for query j0 + c on key i0 + r, drawn by query (the counters
  // run along keys) into keep_by_query and transposed in 64 x 64 bit blocks.
  void column_keep(int64_t i0, int64_t rows, int64_t j0, int64_t cols, uint64_t* keep_by_query,
                   uint64_t* keep_by_key) const {
    constexpr int64_t kWords = kMirrorTile / 64, kQueryWords = keep_bit_words(kMirrorTile);
    for (int64_t c = 0; c < cols; ++c) this->keep_bits(keep_by_query + c * kQueryWords, j0 + c, i0, rows);
    uint64_t block[64];
    for (int64_t bc = 0; bc * 64 < cols; ++bc) {
      for (int64_t br = 0; br * 64 < rows; ++br) {
        for (int64_t k = 0; k < 64; ++k) block[k] = bc * 64 + k < cols ? keep_by_query[(bc * 64 + k) * kQueryWords + br] : 0;
        transpose_bits64(block);
        for (int64_t k = 0; k < 64 && br * 64 + k < rows; ++k) keep_by_key[(br * 64 + k) * kWords + bc] = block[k];
      }
    }
  }

  // Both passes of an off-diagonal tile from one exponential per score: exp(s - m_c) of the column
  // pass is exp(s - m_r) of the row pass times exp(m_r - m_c), a factor per row and one per column.
  // Taken only where every key of both groups is real (a padded key is masked on one side only)
  // and the new maxima of the tile's rows and columns lie within kSharedSpread of each other (see
  // there). NaN or infinite maxima fail the test and take the two passes.
  // Fills probs (row pass, times the row's dropout multipliers) and pt (column pass, times
  // keep_by_key's), updates both states; returns false, having changed nothing, where it declines.
  bool shared_exponentials(float* s, int64_t i0, int64_t rows, int64_t j0, int64_t cols, const RowState& a,
                           const RowState& b, Word* probs, int64_t ldp, float* pt, float* scratch, uint64_t* keep,
                           const uint64_t* keep_by_key) {
    constexpr int64_t T = kMirrorTile;
    if (this->row_keys(i0) < j0 + cols) return false;
    for (int64_t r = 0; r < rows; ++r)
      if (!this->real_key(i0 + r)) return false;
    for (int64_t c = 0; c < cols; ++c)
      if (!this->real_key(j0 + c)) return false;
    float *row_factor = scratch, *col_factor = scratch + T, *col_sum = scratch + 2 * T;
    const int64_t full = cols / kVec * kVec;
    // The tile's maxima by row (into row_factor) and by column (into col_factor).
    fill(col_factor, cols, kNegInf);
    for (int64_t r = 0; r < rows; ++r) {
      const float* x = s + r * T;
      Vec row_acc(kNegInf);
      int64_t v = 0;
      for (; v < full; v += kVec) {
        const Vec xv = Vec::loadu(x + v);
        row_acc = max_running(row_acc, xv);
        max_running(Vec::loadu(col_factor + v), xv).store(col_factor + v);
      }
      if (v < cols) {
        const int64_t n = cols - v;
        const Vec xv = Vec::set(Vec(kNegInf), Vec::loadu(x + v, n), n);
        row_acc = max_running(row_acc, xv);
        max_running(Vec::loadu(col_factor + v, n), xv).store(col_factor + v, n);
      }
      row_factor[r] = at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return max_running(x, y); }, row_acc);
    }
    float hi = kNegInf, lo = std::numeric_limits<float>::infinity();
    for (int64_t r = 0; r < rows; ++r) {
      row_factor[r] = max_nan(a.m[r], row_factor[r]);
      if (std::isnan(row_factor[r])) return false;
      hi = std::max(hi, row_factor[r]);
      lo = std::min(lo, row_factor[r]);
    }
    for (int64_t c = 0; c < cols; ++c) {
      col_factor[c] = max_nan(b.m[c], col_factor[c]);
      if (std::isnan(col_factor[c])) return false;
      hi = std::max(hi, col_factor[c]);
      lo = std::min(lo, col_factor[c]);
    }
    if (!(hi - lo <= kSharedSpread)) return false;  // also where hi or lo is infinite
    // The running states take the new maxima; the factors are exp(m_r - hi) and 1 / exp(m_c - hi).
    for (int64_t r = 0; r < rows; ++r) raise_max(a.m[r], a.l[r], a.o + r * Dv_, row_factor[r]);
    for (int64_t c = 0; c < cols; ++c) raise_max(b.m[c], b.l[c], b.o + c * Dv_, col_factor[c]);
    spread_factors(row_factor, rows, hi, false, row_factor);
    spread_factors(col_factor, cols, hi, true, col_factor);
    fill(col_sum, cols, 0.f);
    for (int64_t r = 0; r < rows; ++r) {
      const Vec m(a.m[r]), alpha(row_factor[r]);
      KeepBits row_keep{nullptr, kept_scale()};
      if (keep != nullptr) row_keep.bits = this->keep_bits(keep, i0 + r, j0, cols).bits;
      const KeepBits col_keep{keep_by_key != nullptr ? keep_by_key + r * (T / 64) : nullptr, kept_scale()};
      const float* x = s + r * T;
      float* pt_row = pt + r * T;
      Word* prow = probs + r * ldp;
      Vec row_acc(0.f);
      // One vector of the row: its exponentials (the row side's), times the factors (the column side's).
      auto step = [&](auto tail, int64_t v) {
        constexpr bool kTail = decltype(tail)::value;
        const int64_t n = kTail ? cols - v : kVec;
        auto load = [&](const float* p) { return kTail ? Vec::loadu(p, n) : Vec::loadu(p); };
        auto store = [&](const Vec& y, float* p) { kTail ? y.store(p, n) : y.store(p); };
        Vec e = exp2_vec(exp2_arg(load(x + v), m));
        if constexpr (kTail) e = Vec::set(Vec(0.f), e, n);
        row_acc = row_acc + e;
        const Vec e_col = e * alpha * load(col_factor + v);
        store(load(col_sum + v) + e_col, col_sum + v);
        store(col_keep.bits != nullptr ? apply_keep(e_col, col_keep, v) : e_col, pt_row + v);
        store_elems(prow, v, row_keep.bits != nullptr ? apply_keep(e, row_keep, v) : e, n);
      };
      int64_t v = 0;
      for (; v < full; v += kVec) step(std::false_type{}, v);
      if (v < cols) step(std::true_type{}, v);
      zero_elems(prow, cols, cols);  // an odd tile's last bf16 pair: its other half
      a.l[r] += at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, row_acc);
    }
    for (int64_t c = 0; c < cols; ++c) b.l[c] += col_sum[c];
    return true;
  }

  // The tile's rows i0 + r as keys of its columns' query rows (state b): their running max and sum
  // updated, outputs rescaled where a max grows, and pt[r][c] = exp(s[r][c] - m[c]) (0 on padded
  // keys), times the dropout multipliers of keep_by_key (column_keep) where it is given; the sums
  // take the exponentials before dropout. Returns false when every key of the tile is padding
  // (nothing to add).
  bool column_pass(const float* s, int64_t i0, int64_t rows, int64_t cols, const RowState& b, float* pt,
                   float* cmax, const uint64_t* keep_by_key) {
    bool any = false;
    for (int64_t r = 0; r < rows && !any; ++r) any = this->real_key(i0 + r);
    if (!any) return false;
    int64_t c0 = 0;
    for (; c0 + kStrip <= cols; c0 += kStrip)
      column_strip<false>(s + c0, i0, rows, kStrip, b.from(c0, Dv_), pt + c0, cmax, keep_by_key, c0);
    if (c0 < cols) column_strip<true>(s + c0, i0, rows, cols - c0, b.from(c0, Dv_), pt + c0, cmax, keep_by_key, c0);
    return true;
  }

  // Column pass of columns [0, width) of a tile (s and pt at the strip's first column, b at its
  // first column's state, keep_by_key's columns from c0), width <= kStrip: the strip's maxima and
  // sums stay in registers down the tile's rows.
  static constexpr int kStripVecs = 4;
  static constexpr int64_t kStrip = kStripVecs * kVec;
  template <bool kTail>
  void column_strip(const float* s, int64_t i0, int64_t rows, int64_t width, const RowState& b, float* pt,
                    float* cmax, const uint64_t* keep_by_key, int64_t c0) {
    constexpr int64_t T = kMirrorTile;
    auto count = [&](int v) { return kTail ? std::clamp<int64_t>(width - v * kVec, 0, kVec) : kVec; };
    auto load = [&](const float* x, int v) { return kTail ? Vec::loadu(x, count(v)) : Vec::loadu(x); };
    Vec acc[kStripVecs];
    for (int v = 0; v < kStripVecs; ++v) acc[v] = Vec(kNegInf);
    for (int64_t r = 0; r < rows; ++r) {
      if (!this->real_key(i0 + r)) continue;
      for (int v = 0; v < kStripVecs; ++v) acc[v] = max_running(acc[v], load(s + r * T + v * kVec, v));
    }
    for (int v = 0; v < kStripVecs; ++v) acc[v].store(cmax + v * kVec, count(v));
    for (int64_t c = 0; c < width; ++c) raise_max(b.m[c], b.l[c], b.o + c * Dv_, max_nan(b.m[c], cmax[c]));
    Vec m[kStripVecs];
    for (int v = 0; v < kStripVecs; ++v) {
      m[v] = load(b.m + v * kVec, v);
      acc[v] = Vec(0.f);
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* prow = pt + r * T;
      if (!this->real_key(i0 + r)) {
        fill(prow, width, 0.f);
        continue;
      }
      for (int v = 0; v < kStripVecs; ++v) {
        const Vec e = exp2_vec(exp2_arg(load(s + r * T + v * kVec, v), m[v]));
        Vec kept = e;
        if (keep_by_key != nullptr) {
          kept = apply_keep(e, KeepBits{keep_by_key + r * (T / 64), kept_scale()}, c0 + v * kVec);
        }
        kept.store(prow + v * kVec, count(v));
        acc[v] = acc[v] + e;
      }
    }
    for (int v = 0; v < kStripVecs; ++v) (load(b.l + v * kVec, v) + acc[v]).store(b.l + v * kVec, count(v));
  }

  // A running state's max m raised to m_new (>= m, or NaN): its sum l and output row o rescaled
  // where a max it had already met grows (until then o is unwritten, and nothing reads it).
  void raise_max(float& m, float& l, float* o, float m_new) const {
    if (m_new > m && m != kNegInf) {
      const float shrink = rescale_factor(m, m_new);
      l *= shrink;
      scale_inplace(o, Dv_, shrink);
    }
    m = m_new;
  }

  // Score row i over keys [j0, j0 + cols) into the row's running max m, sum l and output row o;
  // leaves exp(s - m) in prow (times the tile's dropout multipliers, drawn as bits into keep when
  // it is set), zero past the row's last key. The sum l takes the exponentials before dropout.
  void online_row(float* s, int64_t i, int64_t j0, int64_t cols, float& m, float& l, float* o, Word* prow,
                  uint64_t* keep) {
    const int64_t n = std::clamp<int64_t>(this->row_keys(i) - j0, 0, cols);
    if (n > 0) {
      this->mask_row(s, i, j0 + n, j0);
      const float m_new = max_nan(m, row_max(s, n));
      if (m_new != kNegInf) {
        raise_max(m, l, o, m_new);
        l += exp_row(s, i, j0, n, m, keep, prow);
        zero_elems(prow, n, cols);
        return;
      }
    }
    zero_elems(prow, 0, cols);
  }

  // Score row -> exp(s - rowmax) (times the dropout multipliers) into prow, zero in [n, kend);
  // leaves the row's max and sum in m and sum (for row_lses; -inf and 0 for a row with no
  // allowed key, whose P is 0).
  void softmax_row(float* s, int64_t i, int64_t kend, uint64_t* keep, Word* prow, float& m, float& sum) {
    const int64_t n = this->row_keys(i);
    this->mask_row(s, i, n);
    m = n > 0 ? row_max(s, n) : kNegInf;
    if (m == kNegInf) {
      zero_elems(prow, 0, kend);
      sum = 0.f;
      return;
    }
    sum = exp_row(s, i, 0, n, m, keep, prow);
    zero_elems(prow, n, kend);
  }

  // exp(s - m) of row i's keys [j0, j0 + n) into prow, times their dropout multipliers (drawn as
  // bits into keep) where keep is set; returns the sum of the exponentials before dropout.
  float exp_row(const float* s, int64_t i, int64_t j0, int64_t n, float m, uint64_t* keep, Word* prow) const {
    if (keep == nullptr) return exp_sum_store(s, n, m, nullptr, prow);
    const KeepBits bits{this->keep_bits(keep, i, j0, n).bits, kept_scale()};
    return exp_sum_store(s, n, m, &bits, prow);
  }

  // The multiplier of a kept probability in the P V products: bf16 operand pairs take the keep
  // mask alone, and the output its dropout multiplier after them (out_scale). A probability of 1
  // then stays exact in bf16, where 1 / (1 - p) would round: the saturated row's output is
  // exactly v_i / (1 - p) before its own rounding, which out_residual holds, so the backward's
  // delta from the output agrees with its fp32 dP (see attention_backward.h prepare_tiled).
  float kept_scale() const { return kPairs ? 1.f : this->keep_rule_.scale; }

  // A finished output row's multiplier beside 1 / its sum: the dropout multiplier that
  // kept_scale left out of the products.
  float out_scale() const { return kPairs && this->dropout() ? this->keep_rule_.scale : 1.f; }

  Panel group_values_;  // a mirrored task's values of its query rows (pack_mirrored)
};

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace symattn::cpu
