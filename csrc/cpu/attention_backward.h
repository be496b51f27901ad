// BackwardHead: one backward task's gradients, for a head's query-row slice or, on the tiled
// schedule, for one score tile in both of its roles (pair_tile).
#pragma once

#include "attention_head.h"

namespace symattn::cpu {
namespace CPU_CAPABILITY {
namespace {

// One backward task's gradient contributions to its head: dY [L, D], dV [L, Dv] (dY itself in
// shared mode) and the dcoef partial ([D] or [D, D]).
struct BackwardSlice {
  float* dy = nullptr;
  float* dv = nullptr;
  double* dcoef = nullptr;
};

template <typename scalar_t>
class BackwardHead : public Head<scalar_t> {
  using Base = Head<scalar_t>;
  using typename Base::Dot, typename Base::Word, typename Base::Panel;
  using Base::kPairs, Base::kHalf, Base::words, Base::a_from, Base::b_from, Base::D_, Base::Dv_, Base::L_, Base::g_,
      Base::ws_, Base::shared_, Base::yf_, Base::ldyf_, Base::qm_, Base::yt_, Base::yb_, Base::qa_, Base::vb_,
      Base::h_, Base::b_, Base::kbias_;

 public:
  BackwardHead(const BackwardParams& p, const Geometry& g, Workspace& ws, int64_t b, int64_t h)
      : Base(p, g, ws, b, h), bp_(p) {}

  void prefetch_inputs() const {
    this->prefetch(bp_.q, D_);
    this->prefetch(bp_.v, Dv_);
    this->prefetch(bp_.dout, Dv_);
    this->prefetch(bp_.out, Dv_);
  }

  // Exactly what run() takes from the workspace.
  static int64_t workspace_floats(const BackwardParams& p, const Geometry& g) {
    const int64_t L = g.L, D = p.head_dim, Dv = p.value_dim;
    const bool shared = p.v.data == nullptr, coef = p.coef_mode != CoefMode::kNone;
    const bool full = p.coef_mode == CoefMode::kFull;
    return Base::panel_floats(p, g, true) + copy_floats(p, L)
           + (kPairs && coef ? words(L) * D : 0)                                // Qb
           + (shared ? 0 : (kPairs ? L * words(Dv) : 0) + words(Dv) * g.ldk)    // Va, Vt
           + (kPairs ? L * words(Dv) + words(L) * Dv : (kHalf ? L * Dv : 0))   // dO as A rows, B rows
           + L                                                                  // dlse
           + 2 * g.block * g.ldk                                  // P / Pd and dP / G blocks
           + (kPairs ? g.block * g.ldk / 2 + 2 * words(g.block) * g.ldk : 0)  // bf16 G, G^T, Pd^T
           + (p.dropout_p > 0.0 ? g.ldk : 0)                      // keep row
           + L * D + (shared ? 0 : L * Dv)                        // dY, dV accumulators
           + (g.symmetric ? kSymTile * kSymTile : 0)              // symmetrize scratch
           + (coef ? g.block * D : 0)                             // W block
           + (full ? 2 * D * D : 0);                              // scale C^T, a dC block
  }

  // Query rows [r0, r1) of a head off the symmetric schedule: their gradient contributions into
  // slice, which this zeroes first and the caller sums over the head's slices (reduce). With
  // slice == null: the whole head (r0 = 0, r1 = L), written to dq / dv / dcoef_partial.
  void run(int64_t r0, int64_t r1, const BackwardSlice* slice) {
    AmxTileScope tiles;
    const CoefMode mode = bp_.coef_mode;
    const bool want_dcoef = bp_.dcoef_partial != nullptr && mode != CoefMode::kNone;
    prepare_inputs();

    float* s = ws_.template take<float>(g_.block * g_.ldk);
    float* dp = ws_.template take<float>(g_.block * g_.ldk);
    if constexpr (kPairs) {
      g_rows_ = ws_.template take<Word>(g_.block * g_.ldk / 2);
      g_cols_ = ws_.template take<Word>(words(g_.block) * g_.ldk);
      p_cols_ = ws_.template take<Word>(words(g_.block) * g_.ldk);
    }
    float* keep = this->dropout() ? ws_.template take<float>(g_.ldk) : nullptr;
    float* dy = slice != nullptr ? slice->dy : ws_.template take<float>(L_ * D_);
    float* dv = shared_ ? dy : (slice != nullptr ? slice->dv : ws_.template take<float>(L_ * Dv_));
    fill(dy, L_ * D_, 0.f);
    if (!shared_) fill(dv, L_ * Dv_, 0.f);
    const int64_t csize = mode == CoefMode::kFull ? D_ * D_ : D_;
    double* dcoef = want_dcoef ? bp_.dcoef_partial + (b_ * bp_.heads + h_) * csize : nullptr;
    if (slice != nullptr) {
      dcoef = want_dcoef ? slice->dcoef : nullptr;
      if (dcoef != nullptr) std::fill(dcoef, dcoef + csize, 0.0);
    }

    if (this->symmetric_) {
      symmetric_head(s, dp, keep, dy, dv, dcoef);
    } else {
      // Qm as B rows, for the key side G^T Qm.
      qb_ = yb_;
      if (qm_ != nullptr) {
        qb_ = Base::b_rows(qm_, D_, L_, D_, kPairs ? ws_.template take<Word>(words(L_) * D_) : nullptr, D_);
      }
      float* w = mode != CoefMode::kNone ? ws_.template take<float>(g_.block * D_) : nullptr;
      float* ct = mode == CoefMode::kFull ? ws_.template take<float>(2 * D_ * D_) : nullptr;
      if (ct != nullptr) {  // ct[e][d] = scale * C[d][e], the B panel of W (scale C^T)
        const float* c = bp_.coef + h_ * D_ * D_;
        for (int64_t d = 0; d < D_; ++d) {
          for (int64_t e = 0; e < D_; ++e) ct[e * D_ + d] = static_cast<float>(bp_.scale) * c[d * D_ + e];
        }
      }
      for (int64_t i0 = r0; i0 < r1; i0 += g_.block) {
        block_rows(i0, std::min(g_.block, r1 - i0), s, dp, keep, dy, dv, w, ct, dcoef);
      }
    }
    if (slice == nullptr) store(dy, dv);
  }

  // The sum of a head's slices in slice order, written to dq / dv / dcoef_partial.
  void reduce(const BackwardSlice* slices, int64_t count) {
    const int64_t csize = bp_.coef_mode == CoefMode::kFull ? D_ * D_ : D_;
    if (bp_.dcoef_partial != nullptr && bp_.coef_mode != CoefMode::kNone) {
      double* dcoef = bp_.dcoef_partial + (b_ * bp_.heads + h_) * csize;
      for (int64_t k = 0; k < count; ++k) {
        for (int64_t e = 0; e < csize; ++e) dcoef[e] += slices[k].dcoef[e];
      }
    }
    for (int64_t k = 1; k < count; ++k) {
      add_inplace(slices[0].dy, slices[k].dy, L_ * D_);
      if (!shared_) add_inplace(slices[0].dv, slices[k].dv, L_ * Dv_);
    }
    store(slices[0].dy, slices[0].dv);
  }

  // The tiled backward (heads longer than kWholeHead, M none or diagonal): a head is cut into
  // blocks of g.tile rows, and every score tile S_IJ (I >= J) is computed once, by one task that
  // takes both of its roles. M is symmetric, so S_JI = S_IJ^T: the tile gives P_IJ (rows I on keys
  // J, with lse_I) and, read down its columns, P_JI^T (rows J on keys I, with lse_J), and with
  // dP_IJ = dO_I V_J^T and dP_JI^T = V_I dO_J^T it gives Gs = G_IJ + G_JI^T. Then
  //   Z_I += Gs Y_J,   Z_J += Gs^T Y_I,   dV_I += Pd_JI^T dO_J,   dV_J += Pd_IJ^T dO_I,
  // with Z = (G + G^T) Y, dY = scale Z M (+ dV when V = Y), dM = scale / 2 diag(Y^T Z). That is
  // 7 tile products per pair of blocks, 3.5 L^2 D in all (5 L^2 D when each block's task gathers
  // its own rows from every tile). Causal heads take only the tiles I > J, where rows J see no
  // key of I: 5 products each (2.5 L^2 D). A tile's task writes the accumulators of blocks I and
  // J, so the driver (tiled_backward) runs the pairs in rounds in which no block meets two tiles.
  // Where both blocks' tokens are real keys with lse close enough (role_factors), one
  // exponential per score gives P_IJ and P_JI^T (both_sides); elsewhere each role takes its own.
  //
  // delta = rowsum(dO * O) - dlse comes from the saved output (product_order_dot).

  // Per-head workspace of prepare_tiled, which lives from the first round to the last.
  static int64_t tiled_head_floats(const BackwardParams& p, const Geometry& g) {
    const int64_t L = g.L, D = p.head_dim, Dv = p.value_dim;
    const bool shared = p.v.data == nullptr;
    return Base::panel_floats(p, g, true) + copy_floats(p, L)
           + (shared ? 0 : (kPairs ? L * words(Dv) : 0) + words(Dv) * g.ldk)  // Va, Vt
           + (kPairs ? L * words(Dv) + words(L) * Dv : (kHalf ? L * Dv : 0))   // dO as A rows, B rows
           + words(Dv) * g.ldk                                                 // dO^T
           + 3 * L                                                             // dlse, delta, column lse
           + L * D + (separate_dv(p) ? L * Dv : 0);                           // Z, dV accumulators
  }

  // Per-worker workspace of pair_tile.
  static int64_t tiled_scratch_floats(const BackwardParams& p, const Geometry& g) {
    const int64_t tile = g.tile * g.tile;
    return (4 + (p.dropout_p > 0.0 ? 3 : 0)) * tile  // S / Pd, dP / Gs, dPt / Gt, Pdt; keep tiles
           + (kPairs ? 4 * words(g.tile) * g.tile : 0)   // bf16 Gs, Gs^T, Pd^T, Pdt
           + 2 * g.tile;                                 // role_factors
  }

  int64_t tiled_blocks() const { return (L_ + g_.tile - 1) / g_.tile; }

  // Panels, delta and zeroed accumulators for every round of this head.
  void prepare_tiled() {
    prepare_inputs();
    dot_ = this->b_transposed(do_rows_, L_, Dv_, ws_.template take<Word>(words(Dv_) * g_.ldk));
    delta_ = ws_.template take<float>(L_);
    lse_col_ = ws_.template take<float>(L_);
    for (int64_t i = 0; i < L_; ++i) {
      const float lse = *this->lse_ptr(i);
      lse_col_[i] = lse == kNegInf ? std::numeric_limits<float>::infinity() : lse;  // exp(S - lse) = 0
      const scalar_t* out = this->row_ptr(bp_.out, i);
      const scalar_t* dout = this->row_ptr(bp_.dout, i);
      // fp32 products (not bf16 pairs) sum dP in product_order_dot's order. A bf16 / fp16 output
      // loses its rounding (fp16 always; bf16 where dropout scales a saturated row's O = v_i / (1 - p)
      // off the input grid), which G_ii = P (dP - delta) would take whole: its residual puts it back.
      delta_[i] = (kPairs ? dot_row(out, dout, Dv_) : product_order_dot(out, dout, Dv_)) - dlse_[i];
      if (bp_.out_residual.data != nullptr) delta_[i] += dot_row(this->row_ptr(bp_.out_residual, i), dout, Dv_);
    }
    zacc_ = ws_.template take<float>(L_ * D_);
    fill(zacc_, L_ * D_, 0.f);
    dvacc_ = zacc_;
    if (separate_dv(bp_)) {
      dvacc_ = ws_.template take<float>(L_ * Dv_);
      fill(dvacc_, L_ * Dv_, 0.f);
    }
  }

  // Score tile (bi, bj), bi >= bj, in both roles (see above); scratch holds tiled_scratch_floats.
  void pair_tile(int64_t bi, int64_t bj, float* scratch) {
    AmxTileScope tiles;
    const int64_t T = g_.tile;
    const int64_t i0 = bi * T, rows = std::min(T, L_ - i0), j0 = bj * T, cols = std::min(T, L_ - j0);
    const bool same = bi == bj;
    const bool mirror = !bp_.causal || same;  // rows J attend keys I
    float* s = scratch;
    float* dp = s + T * T;
    float* dpt = dp + T * T;
    float* pdt = dpt + T * T;
    float* keep = this->dropout() ? pdt + T * T : nullptr;
    float* keep_t = keep != nullptr ? keep + T * T : nullptr;
    const float scale = static_cast<float>(bp_.scale);
    gemm<Dot, false>(rows, cols, D_, a_from(qa_, i0), Panel{yt_.data + j0, yt_.ld}, s, T, scale, false);
    gemm<Dot, false>(rows, cols, Dv_, a_from(do_rows_, i0), Panel{vt_.data + j0, vt_.ld}, dp, T, 1.f, false);
    if (mirror) {
      gemm<Dot, false>(rows, cols, Dv_, a_from(va_, i0), Panel{dot_.data + j0, dot_.ld}, dpt, T, 1.f, false);
    }
    if (keep != nullptr) {
      for (int64_t r = 0; r < rows; ++r) this->keep_run(keep + r * T, i0 + r, j0, cols);
      if (mirror) {  // rows J on keys I, drawn by row, then laid out as the tile
        float* by_row = keep_t + T * T;
        for (int64_t c = 0; c < cols; ++c) this->keep_run(by_row + c * T, j0 + c, i0, rows);
        transpose(by_row, T, keep_t, T, cols, rows);
      }
    }
    Word* packs = reinterpret_cast<Word*>(keep != nullptr ? keep_t + 2 * T * T : pdt + T * T);
    const int64_t pack_words = words(T) * T;
    float* row_factor = reinterpret_cast<float*>(packs + (kPairs ? 4 * pack_words : 0));
    float* col_factor = row_factor + T;
    if (mirror && !same && role_factors(i0, rows, j0, cols, row_factor, col_factor)) {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = r * T;
        both_sides(s + o, dp + o, dpt + o, pdt + o, keep != nullptr ? keep + o : nullptr,
                   keep_t != nullptr ? keep_t + o : nullptr, i0 + r, j0, cols, row_factor[r], col_factor);
      }
    } else {
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = r * T;
        if (mirror) {
          column_side(s + o, dpt + o, pdt + o, keep_t != nullptr ? keep_t + o : nullptr, i0 + r, j0, cols,
                      same && bp_.causal ? r : 0);
        }
        row_side(s + o, dp + o, mirror ? dpt + o : nullptr, keep != nullptr ? keep + o : nullptr, i0 + r, j0, cols);
      }
    }
    // s: Pd_IJ, dp: Gs, pdt: Pd_JI^T.
    const float zalpha = bp_.coef_mode == CoefMode::kDiag ? 1.f : scale;
    const Panel gs = Base::a_rows(static_cast<const float*>(dp), T, rows, cols, packs);
    gemm<Dot, false>(rows, D_, cols, gs, b_from(yb_, j0), zacc_ + i0 * D_, D_, zalpha, true);
    if (mirror) {
      const Panel pt = Base::a_rows(static_cast<const float*>(pdt), T, rows, cols, packs + pack_words);
      gemm<Dot, false>(rows, Dv_, cols, pt, b_from(do_pairs_, j0), dvacc_ + i0 * Dv_, Dv_, 1.f, true);
    }
    if (!same) {
      const Panel gs_t = Base::b_rows(static_cast<const float*>(dp), T, rows, cols, packs + 2 * pack_words, T);
      gemm<Dot, true>(cols, D_, rows, gs_t, b_from(yb_, i0), zacc_ + j0 * D_, D_, zalpha, true);
      const Panel pd_t = Base::b_rows(static_cast<const float*>(s), T, rows, cols, packs + 3 * pack_words, T);
      gemm<Dot, true>(cols, Dv_, rows, pd_t, b_from(do_pairs_, i0), dvacc_ + j0 * Dv_, Dv_, 1.f, true);
    }
  }

  // dY = scale Z M (+ dV when V = Y) and dV to dq / dv; the diagonal coefficient's
  // scale / 2 sum_i y_i * z_i, row by row, added to dcoef_partial.
  void finish_tiled() {
    const bool diag = bp_.coef_mode == CoefMode::kDiag;
    const float scale = static_cast<float>(bp_.scale);
    double* dcoef = diag && bp_.dcoef_partial != nullptr ? bp_.dcoef_partial + (b_ * bp_.heads + h_) * D_ : nullptr;
    if (dcoef != nullptr) diag_dcoef(dcoef, zacc_, D_, 0, L_, 0.5f * scale);
    for (int64_t i = 0; i < L_; ++i) {
      float* z = zacc_ + i * D_;
      if (diag) {
        const float* c = bp_.coef + h_ * D_;
        for (int64_t d = 0; d < D_; ++d) z[d] *= scale * c[d];
        if (shared_) add_inplace(z, dvacc_ + i * D_, D_);
      }
      store_row(this->row_ptr(bp_.dq, i), z, D_);
      if (!shared_) store_row(this->row_ptr(bp_.dv, i), dvacc_ + i * Dv_, Dv_);
    }
  }

 private:
  // Whether dV needs its own accumulator: separate values, or Z scaled by a diagonal M.
  static bool separate_dv(const BackwardParams& p) {
    return p.v.data != nullptr || p.coef_mode == CoefMode::kDiag;
  }

  // Factors for both_sides on the off-diagonal tile of rows I = [i0, i0 + rows) and keys
  // J = [j0, j0 + cols) of a non-causal head: exp(lse_i - hi) per row, 1 / exp(lse_j - hi) per
  // column (spread_factors), so that P_JI^T = P_IJ * row factor * column factor. Declines (false)
  // unless every token of both blocks is a real key with a finite lse, all within kSharedSpread
  // of each other (see there); a padded key or an empty row is masked on one side only.
  bool role_factors(int64_t i0, int64_t rows, int64_t j0, int64_t cols, float* row_factor, float* col_factor) const {
    if (this->row_keys(i0) < j0 + cols) return false;
    float hi = kNegInf, lo = std::numeric_limits<float>::infinity();
    auto take = [&](int64_t first, int64_t count) {
      for (int64_t k = first; k < first + count; ++k) {
        const float lse = lse_col_[k];  // +inf for a row without keys
        if (!this->real_key(k) || !std::isfinite(lse)) return false;
        hi = std::max(hi, lse);
        lo = std::min(lo, lse);
      }
      return true;
    };
    if (!take(i0, rows) || !take(j0, cols) || !(hi - lo <= kSharedSpread)) return false;
    spread_factors(lse_col_ + i0, rows, hi, false, row_factor);
    spread_factors(lse_col_ + j0, cols, hi, true, col_factor);
    return true;
  }

  // Row i of a tile that role_factors accepted, over keys [j0, j0 + cols), in both roles from one
  // exponential per score: P_IJ = exp(S - lse_i), and P_JI^T its product with the factors. Leaves
  // what column_side and row_side leave: Pd_IJ in s, G_IJ + G_JI^T in dp, Pd_JI^T in pdt.
  void both_sides(float* s, float* dp, const float* dpt, float* pdt, const float* keep, const float* keep_t,
                  int64_t i, int64_t j0, int64_t cols, float row_factor, const float* col_factor) const {
    const Vec vdelta(delta_[i]), vlse(lse_col_[i]), alpha(row_factor);
    for (int64_t c = 0; c < cols; c += kVec) {
      const int64_t count = std::min(kVec, cols - c);
      const Vec p = exp_vec(Vec::loadu(s + c, count) - vlse);
      const Vec pt = p * (alpha * Vec::loadu(col_factor + c, count));
      Vec dpv = Vec::loadu(dp + c, count), dptv = Vec::loadu(dpt + c, count), pd = p, pdt_v = pt;
      if (keep != nullptr) {
        const Vec k = Vec::loadu(keep + c, count), kt = Vec::loadu(keep_t + c, count);
        dpv = dpv * k;
        pd = p * k;
        dptv = dptv * kt;
        pdt_v = pt * kt;
      }
      pdt_v.store(pdt + c, count);
      pd.store(s + c, count);
      const Vec gt = pt * (dptv - Vec::loadu(delta_ + j0 + c, count));
      (p * (dpv - vdelta) + gt).store(dp + c, count);
    }
  }

  // Row i of a tile over keys [j0, j0 + cols), read as rows J on key i: s holds S_IJ (unmasked),
  // dpt V_i dO_J^T. Leaves G_JI^T in dpt and Pd_JI^T in pdt; first > 0 zeroes the columns before
  // it (a causal diagonal tile: row j sees key i only when i <= j).
  void column_side(const float* s, float* dpt, float* pdt, const float* keep, int64_t i, int64_t j0, int64_t cols,
                   int64_t first) const {
    if (!this->real_key(i)) {
      fill(pdt, cols, 0.f);
      fill(dpt, cols, 0.f);
      return;
    }
    for (int64_t c = 0; c < cols; c += kVec) {
      const int64_t count = std::min(kVec, cols - c);
      const Vec p = exp_vec(Vec::loadu(s + c, count) - Vec::loadu(lse_col_ + j0 + c, count));
      Vec dpv = Vec::loadu(dpt + c, count);
      Vec pd = p;
      if (keep != nullptr) {
        const Vec k = Vec::loadu(keep + c, count);
        dpv = dpv * k;
        pd = p * k;
      }
      pd.store(pdt + c, count);
      (p * (dpv - Vec::loadu(delta_ + j0 + c, count))).store(dpt + c, count);
    }
    const int64_t zero_to = std::min(first, cols);
    fill(pdt, zero_to, 0.f);
    fill(dpt, zero_to, 0.f);
    if (i >= j0 && i < j0 + cols && this->excludes_self(i)) pdt[i - j0] = dpt[i - j0] = 0.f;
  }

  // Row i of a tile over keys [j0, j0 + cols), read as row i on keys J: s holds S_IJ, dp
  // dO_i V_J^T, gt (when the tile has the other role too) G_JI^T. Leaves Pd_IJ in s and
  // G_IJ (+ G_JI^T) in dp.
  void row_side(float* s, float* dp, const float* gt, const float* keep, int64_t i, int64_t j0, int64_t cols) {
    const int64_t n = std::clamp<int64_t>(this->row_keys(i) - j0, 0, cols);
    const float lse = *this->lse_ptr(i);
    if (n == 0 || lse == kNegInf) {
      fill(s, cols, 0.f);
      if (gt != nullptr) {
        std::memcpy(dp, gt, cols * sizeof(float));
      } else {
        fill(dp, cols, 0.f);
      }
      return;
    }
    this->mask_row(s, i, j0 + n, j0);
    const Vec vdelta(delta_[i]), vlse(lse);
    for (int64_t c = 0; c < cols; c += kVec) {
      const int64_t count = std::min(kVec, cols - c);
      Vec p = exp_vec(Vec::loadu(s + c, count) - vlse);
      if (c + count > n) p = Vec::set(Vec(0.f), p, std::max<int64_t>(0, n - c));
      Vec dpv = Vec::loadu(dp + c, count);
      if (keep != nullptr) {
        const Vec k = Vec::loadu(keep + c, count);
        dpv = dpv * k;
        (p * k).store(s + c, count);
      } else {
        p.store(s + c, count);
      }
      Vec g = p * (dpv - vdelta);
      if (gt != nullptr) g = g + Vec::loadu(gt + c, count);
      g.store(dp + c, count);
    }
  }

  Panel va_, dot_;
  float* delta_ = nullptr;
  float* lse_col_ = nullptr;
  float* zacc_ = nullptr;
  float* dvacc_ = nullptr;

 private:
  void store(const float* dy, const float* dv) {
    for (int64_t i = 0; i < L_; ++i) store_row(this->row_ptr(bp_.dq, i), dy + i * D_, D_);
    if (!shared_) {
      for (int64_t i = 0; i < L_; ++i) store_row(this->row_ptr(bp_.dv, i), dv + i * Dv_, Dv_);
    }
  }

  // fp32 inputs would be read in place as every operand, but a head's rows sit H D floats apart
  // (3 KiB at H = 12, D = 64): Y, V and dO, the B panels of G Y, Pd^T dO (and the tiled
  // backward's tile products), are copied once per head at panel_stride (see there).
  static int64_t copy_floats(const BackwardParams& p, int64_t L) {
    if constexpr (kPairs || kHalf) return 0;
    return L * (panel_stride(p.head_dim) + (p.v.data != nullptr ? 2 : 1) * panel_stride(p.value_dim));
  }

  // Every panel the head's backward products read: keys and queries, values, V^T, dO, dlse.
  void prepare_inputs() {
    this->setup_keys();
    copy_inputs();
    this->pack_query_key(true);
    this->pack_values();
    pack_backward_inputs();
  }

  // [L, width] rows at row stride ld to a workspace copy at panel_stride(width).
  const float* copy_rows(const float* src, int64_t ld, int64_t width) {
    const int64_t ldc = panel_stride(width);
    float* dst = ws_.template take<float>(L_ * ldc);
    load_rows(dst, ldc, src, ld, L_, width);
    return dst;
  }

  // Y and V (after setup_keys, which may have replaced them by a copy without non-finite padding)
  // read from copies at panel_stride, for fp32 operands.
  void copy_inputs() {
    if constexpr (!kPairs && !kHalf) {
      auto& y = this->y_rows_;
      y = {copy_rows(y.data, y.ld, D_), panel_stride(D_)};
      if (!shared_) {
        auto& v = this->v_rows_;
        v = {copy_rows(v.data, v.ld, Dv_), panel_stride(Dv_)};
      }
    }
  }

  // Vt = V^T as B [Dv, ldk] for dP = dO V^T, dO as A rows and as B rows, and dlse by row.
  void pack_backward_inputs() {
    if (shared_) {
      vt_ = yt_;
      va_ = this->ya_;
    } else if constexpr (kPairs) {
      va_ = Base::a_rows(this->v_rows_.data, this->v_rows_.ld, L_, Dv_, ws_.template take<Word>(L_ * words(Dv_)));
      vt_ = this->b_transposed(va_, L_, Dv_, ws_.template take<Word>(words(Dv_) * g_.ldk));
    } else {
      va_ = vb_;  // fp32 rows: the same array as A rows
      vt_ = this->b_transposed(vb_, L_, Dv_, ws_.template take<Word>(Dv_ * g_.ldk));
    }
    const scalar_t* dout = this->row_ptr(bp_.dout, 0);
    const int64_t ld = bp_.dout.token;
    if constexpr (kPairs) {
      do_rows_ = Base::a_rows(dout, ld, L_, Dv_, ws_.template take<Word>(L_ * words(Dv_)));
      do_pairs_ = Base::b_rows(dout, ld, L_, Dv_, ws_.template take<Word>(words(L_) * Dv_), Dv_);
    } else if constexpr (kHalf) {
      float* dof = ws_.template take<float>(L_ * Dv_);
      load_rows(dof, Dv_, dout, ld, L_, Dv_);
      do_rows_ = do_pairs_ = {dof, Dv_};
    } else {
      do_rows_ = do_pairs_ = {copy_rows(dout, ld, Dv_), panel_stride(Dv_)};
    }
    dlse_ = ws_.template take<float>(L_);
    for (int64_t i = 0; i < L_; ++i) {
      dlse_[i] = bp_.dlse.data == nullptr
                     ? 0.f
                     : bp_.dlse.data[b_ * bp_.dlse.batch + (this->start_ + i) * bp_.dlse.token + h_ * bp_.dlse.head];
    }
  }

  // Row i: s holds scores, dp holds dO V^T over [0, kend). Leaves Pd = dropout(P) in s and
  // G = P * (dP * keep - delta) in dp, both zero wherever row i attends to nothing.
  void grad_row(float* s, float* dp, int64_t i, int64_t kend, float* keep) {
    const int64_t n = this->row_keys(i);
    const float lse = *this->lse_ptr(i);
    if (n == 0 || lse == kNegInf) {
      fill(s, kend, 0.f);
      fill(dp, kend, 0.f);
      return;
    }
    this->mask_row(s, i, n);
    if (keep != nullptr) this->keep_row(keep, i, n);
    // One pass takes P = exp(S - lse) in place, dP times the dropout multipliers, and
    // delta = rowsum(Pd * dP) - dlse in dot_row's order, from the fp32 P and dP of the whole row:
    // it equals rowsum(dO * O) - dlse without the rounding of O to the input dtype, which
    // dominates G where one key (the token itself, as q = k) takes most of the row's weight.
    // (The sum's one FMA chain hides under the exponentials here; alone it was latency-bound.)
    const Vec vlse(lse);
    Vec acc(0.f);
    for (int64_t j = 0; j < n; j += kVec) {
      const int64_t count = std::min(kVec, n - j);
      Vec p = exp_vec(Vec::loadu(s + j, count) - vlse);
      if (count < kVec) p = Vec::set(Vec(0.f), p, count);  // past the row: exp(-lse) may be inf
      p.store(s + j, count);
      Vec d = Vec::loadu(dp + j, count);
      if (keep != nullptr) {
        d = d * Vec::loadu(keep + j, count);
        d.store(dp + j, count);
      }
      acc = at::vec::fmadd(p, d, acc);
    }
    const Vec vdelta(at::vec::vec_reduce_all<float>([](Vec x, Vec y) { return x + y; }, acc) - dlse_[i]);
    for (int64_t j = 0; j < n; j += kVec) {
      const int64_t count = std::min(kVec, n - j);
      const Vec p = Vec::loadu(s + j, count);
      (p * (Vec::loadu(dp + j, count) - vdelta)).store(dp + j, count);
      if (keep != nullptr) (p * Vec::loadu(keep + j, count)).store(s + j, count);
    }
    fill(s + n, kend - n, 0.f);
    fill(dp + n, kend - n, 0.f);
  }

  // Diagonal coefficient: dcoef += weight * sum_i y_i * z_i over rows [i0, i0 + rows), summed in
  // double because it adds up every row of every head.
  void diag_dcoef(double* dcoef, const float* z, int64_t ldz, int64_t i0, int64_t rows, float weight) const {
    for (int64_t r = 0; r < rows; ++r) {
      const float* y = yf_ + (i0 + r) * ldyf_;
      const float* zr = z + r * ldz;
      for (int64_t d = 0; d < D_; ++d) dcoef[d] += static_cast<double>(weight) * y[d] * zr[d];
    }
  }

  // Whole head, S symmetric: dY = scale (G + G^T) Y M (+ Pd^T dO), one product instead of two.
  void symmetric_head(float* s, float* dp, float* keep, float* dy, float* dv, double* dcoef) {
    const int64_t L = L_;
    const float scale = static_cast<float>(bp_.scale);
    this->scores(s, 0, L, L);
    gemm<Dot, false>(L, L, Dv_, do_rows_, vt_, dp, g_.ldk, 1.f, false);
    for (int64_t i = 0; i < L; ++i) grad_row(s + i * g_.ldk, dp + i * g_.ldk, i, L, keep);
    symmetrize(dp, g_.ldk, L, ws_.template take<float>(kSymTile * kSymTile));
    const Panel gs = Base::a_rows(static_cast<const float*>(dp), g_.ldk, L, L, g_rows_);
    if (bp_.coef_mode == CoefMode::kDiag) {
      // Z = (G + G^T) Y; dc = scale/2 * sum_i y_i * z_i; dY = scale * Z * c.
      gemm<Dot, false>(L, D_, L, gs, yb_, dy, D_, 1.f, false);
      if (dcoef != nullptr) diag_dcoef(dcoef, dy, D_, 0, L, 0.5f * scale);
      const float* c = bp_.coef + h_ * D_;
      for (int64_t i = 0; i < L; ++i) {
        for (int64_t d = 0; d < D_; ++d) dy[i * D_ + d] *= scale * c[d];
      }
    } else {
      gemm<Dot, false>(L, D_, L, gs, yb_, dy, D_, scale, false);
    }
    const Panel pd_t = Base::b_rows(static_cast<const float*>(s), g_.ldk, L, L, p_cols_, g_.ldk);
    gemm<Dot, true>(L, Dv_, L, pd_t, do_pairs_, dv, Dv_, 1.f, shared_);
  }

  // Query rows [i0, i0 + rows): their query-side gradient, and their contribution to the
  // key / value side of every key they attend to.
  void block_rows(int64_t i0, int64_t rows, float* s, float* dp, float* keep, float* dy, float* dv, float* w,
                  float* ct, double* dcoef) {
    const int64_t kend = this->block_keys(i0, rows);
    if (kend == 0) return;
    const CoefMode mode = bp_.coef_mode;
    const float scale = static_cast<float>(bp_.scale);
    Band out_band, k_upper, k_lower;
    if (bp_.causal) {
      out_band.n_hi = i0;
      k_upper.k_hi = i0;
      k_lower.k_lo = -i0;
    }
    this->scores(s, i0, rows, kend);
    gemm<Dot, false>(rows, kend, Dv_, a_from(do_rows_, i0), vt_, dp, g_.ldk, 1.f, false, out_band);
    for (int64_t r = 0; r < rows; ++r) grad_row(s + r * g_.ldk, dp + r * g_.ldk, i0 + r, kend, keep);

    // Query side: scale G Y M^T.
    const Panel grad = Base::a_rows(static_cast<const float*>(dp), g_.ldk, rows, kend, g_rows_);
    float* dy_block = dy + i0 * D_;
    if (w == nullptr) {  // M = I
      gemm<Dot, false>(rows, D_, kend, grad, yb_, dy_block, D_, scale, true, k_upper);
    } else {
      gemm<Dot, false>(rows, D_, kend, grad, yb_, w, D_, 1.f, false, k_upper);  // W = G Y
      if (mode == CoefMode::kFull) {
        if (dcoef != nullptr) {  // scale Y_I^T W, added in double
          float* block = ct + D_ * D_;
          gemm<FloatDot, true>(D_, D_, rows, yf_ + i0 * ldyf_, ldyf_, w, D_, block, D_, scale, false);
          for (int64_t e = 0; e < D_ * D_; ++e) dcoef[e] += block[e];
        }
        gemm<FloatDot, false>(rows, D_, D_, w, D_, ct, D_, dy_block, D_, 1.f, true);
      } else {
        if (dcoef != nullptr) diag_dcoef(dcoef, w, D_, i0, rows, scale);
        const float* c = bp_.coef + h_ * D_;
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t d = 0; d < D_; ++d) dy_block[r * D_ + d] += scale * c[d] * w[r * D_ + d];
        }
      }
    }
    // Key side scale G^T Qm, value side Pd^T dO, for keys [0, kend).
    const Panel grad_t = Base::b_rows(static_cast<const float*>(dp), g_.ldk, rows, kend, g_cols_, g_.ldk);
    gemm<Dot, true>(kend, D_, rows, grad_t, b_from(qb_, i0), dy, D_, scale, true, k_lower);
    const Panel pd_t = Base::b_rows(static_cast<const float*>(s), g_.ldk, rows, kend, p_cols_, g_.ldk);
    gemm<Dot, true>(kend, Dv_, rows, pd_t, b_from(do_pairs_, i0), dv, Dv_, 1.f, true, k_lower);
  }

  const BackwardParams& bp_;
  Panel vt_, do_rows_, do_pairs_, qb_;
  float* dlse_ = nullptr;
  Word* g_rows_ = nullptr;  // bf16 G as A rows, G^T and Pd^T as kTransA A (null for fp32 operands)
  Word* g_cols_ = nullptr;
  Word* p_cols_ = nullptr;
};

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace symattn::cpu
