// What every task of a call shares: its workspace, panel strides, the call's Geometry, and
// Head, one (b, h)'s inputs read once into the operand panels both directions multiply.
#pragma once

#include "attention_rows.h"

namespace symattn::cpu {
namespace CPU_CAPABILITY {
namespace {

// Bump allocator over one block from torch's CPU allocator (so profilers see it), per thread.
class Workspace {
 public:
  explicit Workspace(size_t bytes) : data_(c10::GetCPUAllocator()->allocate(bytes)), size_(bytes) {}
  void reset() { used_ = 0; }
  // What take() has handed out so far, and a return to that point: a loop that packs the same
  // panels for each tile takes them anew per tile and rewinds after it.
  size_t mark() const { return used_; }
  void rewind(size_t mark) { used_ = mark; }
  template <typename T>
  T* take(int64_t count) {
    constexpr size_t kAlign = 64;
    used_ = (used_ + kAlign - 1) / kAlign * kAlign;
    T* out = reinterpret_cast<T*>(static_cast<char*>(data_.get()) + used_);
    used_ += static_cast<size_t>(count) * sizeof(T);
    TORCH_INTERNAL_ASSERT(used_ <= size_, "symattn: CPU workspace overflow");
    return out;
  }
  // Room for the floats plus the alignment padding of up to 64 take() calls.
  static size_t bytes_for(int64_t floats) { return static_cast<size_t>(floats) * sizeof(float) + 64 * 64; }

 private:
  c10::DataPtr data_;
  size_t size_;
  size_t used_ = 0;
};

// Row stride of a key-indexed panel of n keys: n rounded up to a vector, and past it where that
// is a multiple of 1 KiB. The panels are read down their columns (a micro-tile's B rows, the
// transposes of the whole-head scores), and a stride of a multiple of 1 KiB would map those rows
// onto a few L1 sets: at 512 tokens the whole-head forward took about 5 % longer with it.
int64_t key_stride(int64_t n) {
  const int64_t ld = round_up(std::max<int64_t>(n, 1), kVec);
  return ld % 256 == 0 ? ld + kVec : ld;
}

// Row stride of a copied [rows, n] fp32 panel that products read as B (keys along k): n rounded up
// to an odd count of 64-byte lines. A micro-kernel reuses a [kDepth, kNR] window of it for every
// row block; at an odd count of lines per row the window's rows fall on every L1 set, where an
// even count (a head's 3 KiB input stride, or 64 floats) puts the kNR = 16 window of AVX2 on 4 or
// 16 of the 64 sets (the wider AVX-512 window covers whole rows either way).
int64_t panel_stride(int64_t n) {
  const int64_t ld = round_up(std::max<int64_t>(n, 1), 16);
  return (ld / 16) % 2 == 0 ? ld + 16 : ld;
}

// Sizes shared by every head of one call.
struct Geometry {
  int64_t L = 0;      // longest sequence
  int64_t ldk = 0;    // row stride of key-indexed fp32 panels (key_stride(L))
  int64_t block = 0;  // query rows per block
  int64_t task_rows = 0;  // query rows per forward task: whole blocks, never depends on threads
  bool symmetric = false;  // whole heads with symmetric scores (see the file comment)
  bool tiled = false;      // query blocks against key tiles (kQueryTile, kKeyTile)
  bool mirrored = false;   // tiled forward whose heads can take the mirrored schedule
  int64_t tile = 0;        // rows per block of the tiled backward (pair_tile)

  Geometry(const ForwardParams& p, bool backward) {
    L = p.cu_seqlens != nullptr ? 0 : p.seqlen;
    if (p.cu_seqlens != nullptr) {
      for (int64_t b = 0; b < p.batch; ++b) L = std::max(L, p.length(b));
    }
    ldk = key_stride(L);
    // The tiled backward reads each score tile both ways, and the mirrored forward reads a row
    // group's tiles both ways. That is exact only without a coefficient: with a diagonal one,
    // (y_i c) . y_j and (y_j c) . y_i round differently in fp32, and a row whose backward
    // scores are off its forward's by a few ulp gets exp(s - lse) off by as much (1 % at
    // scores of 1e5, overflow at 1e9). Coefficient heads longer than kWholeHead multiply each
    // row's own scores (y_i M) . y_j in both directions, as a full M needs anyway. On AMX tiles
    // the backward of shorter heads is tiled too (kTiledBackwardFrom).
    tiled = (L > kWholeHead || (backward && L >= kTiledBackwardFrom)) && (!backward || p.coef_mode == CoefMode::kNone);
    tile = L >= kPairBlocks * kPairTile ? kPairTile : kPairTileMin;
    block = L <= kWholeHead && kSymmetricSchedule
                ? std::max<int64_t>(L, 1)
            : tiled ? kQueryTile
                    : std::clamp<int64_t>(kBlockFloats / ldk / kBlockRowStep * kBlockRowStep, kBlockRowStep,
                                          std::max<int64_t>(L, kBlockRowStep));
    task_rows = round_up(kTaskRows, block);  // >= L for heads of at most kWholeHead tokens, but on AMX
    if (tiled) {
      task_rows = std::clamp(round_up((L + kTasksPerHead - 1) / kTasksPerHead, block), task_rows, kMaxTaskRows);
    }
#if defined(SYMATTN_AMX_DOT)
    // On AMX tiles a forward task's products are cheap next to packing the head's keys, which
    // every task of the head repeats: tasks take up to whole heads while the call still has
    // about kForwardTasks of them.
    if (!backward) {
      const int64_t per_head = std::max<int64_t>(1, kForwardTasks / std::max<int64_t>(1, p.batch * p.heads));
      task_rows = std::clamp(round_up((L + per_head - 1) / per_head, block), task_rows,
                             std::max(task_rows, tiled ? kMaxTaskRows : round_up(L, block)));
    }
#endif
    symmetric = kSymmetricSchedule && L <= kWholeHead && !p.causal && p.coef_mode != CoefMode::kFull;
    mirrored = kSymmetricSchedule && tiled && !backward && !p.causal && p.coef_mode == CoefMode::kNone;
  }
};

// Rows per group of a mirrored head of L tokens cut into `groups`: whole query blocks.
int64_t mirror_group_rows(int64_t L, int64_t groups) {
  return round_up((L + groups - 1) / groups, kQueryTile);
}

// Groups of a mirrored head of L tokens in a call of `heads` (b, h) pairs: enough for about
// kMirrorTasks group-pair tasks in the call, at most kMirrorGroups, whole query blocks each (so
// the rounding may leave fewer; mirror_group_rows gives the same rows for either count).
int64_t mirror_groups(int64_t L, int64_t heads) {
  const int64_t blocks = (L + kQueryTile - 1) / kQueryTile;
  int64_t groups = 1;
  while (groups < std::min(kMirrorGroups, blocks) && groups * (groups + 1) / 2 * heads < kMirrorTasks) ++groups;
  return (L + mirror_group_rows(L, groups) - 1) / mirror_group_rows(L, groups);
}

// A query row's running softmax state over the keys seen so far: unnormalised output o [Dv],
// max m and sum l; rows of one block at o + r * Dv, m + r, l + r.
struct RowState {
  float* o = nullptr;
  float* m = nullptr;
  float* l = nullptr;
  RowState from(int64_t r, int64_t Dv) const { return {o + r * Dv, m + r, l + r}; }
};

// Everything one task needs to know about its (b, h), and the per-head panels it packs.
template <typename scalar_t>
class Head {
 public:
  using Dot = DotFor<scalar_t>;
  using Word = typename Dot::Word;
  using Panel = Operand<Word>;
  static constexpr bool kPairs = Dot::kPack == 2;  // bf16 operands, else fp32 ones
  static constexpr bool kHalf = !std::is_same_v<scalar_t, float>;

  Head(const ForwardParams& p, const Geometry& g, Workspace& ws, int64_t b, int64_t h)
      : p_(p), g_(g), ws_(ws), b_(b), h_(h) {
    start_ = p.cu_seqlens != nullptr ? p.cu_seqlens[b] : 0;
    L_ = p.length(b);
    D_ = p.head_dim;
    Dv_ = p.value_dim;
    shared_ = p.v.data == nullptr;
    if (p.dropout_p > 0.0) {
      keep_rule_ = KeepRule(p.seed, p.dropout_p);
      row_id0_ = p.cu_seqlens != nullptr ? start_ : b * p.seqlen;
    }
    y_rows_ = {row_ptr(p.q, 0), p.q.token};
    if (!shared_) v_rows_ = {row_ptr(p.v, 0), p.v.token};
  }

  int64_t length() const { return L_; }

  // Row i of this (b, h) in a [B, S, H, X] or [total, H, X] tensor of scalar_t.
  template <typename T>
  auto row_ptr(const Strided<T>& t, int64_t i) const {
    using Elem = std::conditional_t<std::is_const_v<T>, const scalar_t, scalar_t>;
    return static_cast<Elem*>(t.data) + b_ * t.batch + (start_ + i) * t.token + h_ * t.head;
  }
  float* lse_ptr(int64_t i) const {
    return p_.lse.data + b_ * p_.lse.batch + (start_ + i) * p_.lse.token + h_ * p_.lse.head;
  }

  // Words that k elements take in Dot's format.
  static int64_t words(int64_t k) { return (k + Dot::kPack - 1) / Dot::kPack; }

  // fp32 rows of Y: the fp32 operands' source; bf16 operands need them only for M.
  static bool needs_fp32_y(const ForwardParams& p) { return !kPairs || p.coef_mode != CoefMode::kNone; }

  // Workspace of setup_keys, pack_query_key and pack_values.
  static int64_t panel_floats(const ForwardParams& p, const Geometry& g, bool backward) {
    const int64_t L = g.L, D = p.head_dim, Dv = p.value_dim;
    const bool shared = p.v.data == nullptr, coef = p.coef_mode != CoefMode::kNone;
    return (p.key_padding_mask != nullptr ? g.ldk + L + 1 : 0)            // key bias, prefix counts
           + (needs_fp32_y(p) && kHalf ? L * D : 0)                       // Yf
           + (kPairs ? L * words(D) : 0) + words(D) * g.ldk               // Ya, Yt
           + (kPairs && (backward || shared) ? words(L) * D : 0)          // Yb
           + (coef ? L * D + (kPairs ? L * words(D) : 0) : 0)             // Qm, Qa
           + (shared ? 0 : (kPairs ? words(L) * Dv : (kHalf ? L * Dv : 0)));  // Vb
  }

  // Prefetches this head's rows of a [B, S, H, X] / [total, H, X] input.
  template <typename T>
  void prefetch(const Strided<T>& t, int64_t width) const {
    if (t.data != nullptr) {
      prefetch_rows(row_ptr(t, 0), t.token * int64_t{sizeof(scalar_t)}, L_, width * int64_t{sizeof(scalar_t)});
    }
  }

  // Key-side masks: kbias_[j] in {0, -inf} over [0, L) (null when there is no padding),
  // key_end_ = one past the last real key, prefix_[j] = real keys in [0, j).
  void setup_keys() {
    key_end_ = L_;
    n_real_ = L_;
    symmetric_ = g_.symmetric;
    if (p_.key_padding_mask == nullptr) return;
    const bool* real = p_.key_padding_mask + b_ * p_.seqlen;
    kbias_ = ws_.take<float>(g_.ldk);
    prefix_ = ws_.take<int32_t>(L_ + 1);
    key_end_ = 0;
    prefix_[0] = 0;
    for (int64_t j = 0; j < L_; ++j) {
      kbias_[j] = real[j] ? 0.f : kNegInf;
      prefix_[j + 1] = prefix_[j] + (real[j] ? 1 : 0);
      if (real[j]) key_end_ = j + 1;
    }
    n_real_ = prefix_[L_];
    // The symmetric schedule multiplies all L^2 scores (1.5 L^2 D), the row schedule only the
    // keys up to the last real one (2 L key_end D): keep it only for lightly padded heads.
    symmetric_ = g_.symmetric && 4 * key_end_ > 3 * L_;
    read_padding_as_finite(real);
  }

  // Whether key i is a real token (kbias_ holds 0 there, -inf on padding).
  bool real_key(int64_t i) const { return kbias_ == nullptr || kbias_[i] == 0.f; }

  // Padded keys get zero weight, but the products still multiply those zeros with the keys' and
  // values' stored elements (0 * NaN = NaN), and the symmetric schedule mirrors padded rows'
  // scores into real ones. So where a padded token of this head holds NaN or Inf, Y (or V) is
  // read from a copy of the head's rows with those elements zeroed; finite padding is read in
  // place (no copy), and a padded token keeps its own values as a query.
  void read_padding_as_finite(const bool* real) {
    auto finite = [&](const Rows& rows, int64_t width) {
      for (int64_t j = 0; j < L_; ++j) {
        if (!real[j] && !finite_row(rows.data + j * rows.ld, width)) return false;
      }
      return true;
    };
    const bool copy_y = !finite(y_rows_, D_);
    const bool copy_v = !shared_ && !finite(v_rows_, Dv_);
    if (!copy_y && !copy_v) return;
    clean_ = c10::GetCPUAllocator()->allocate(((copy_y ? D_ : 0) + (copy_v ? Dv_ : 0)) * L_ * sizeof(scalar_t));
    scalar_t* buf = static_cast<scalar_t*>(clean_.get());
    auto copy = [&](Rows& rows, int64_t width) {
      for (int64_t j = 0; j < L_; ++j) {
        const scalar_t* src = rows.data + j * rows.ld;
        scalar_t* dst = buf + j * width;
        for (int64_t d = 0; d < width; ++d) {
          dst[d] = real[j] || std::isfinite(static_cast<float>(src[d])) ? src[d] : scalar_t(0);
        }
      }
      rows = {buf, width};
      buf += L_ * width;
    };
    if (copy_y) copy(y_rows_, D_);
    if (copy_v) copy(v_rows_, Dv_);
  }

  // Operand panels, from one read of Y: Yf = Y in fp32 [L, D] (aliases q for fp32 input), and in
  // Dot's format Ya = Y as A rows, Yt = Y^T as B (keys along n), Yb = Y as B rows (keys along k;
  // when need_yb), Qa = Qm = Y M as A rows (Ya when M = I; Qm in fp32 is kept for the backward).
  // Qm and Qa hold query rows [q0, q1) only (at their own row index), so a task that owns a slice
  // of the head's queries pays M for that slice alone; q1 < 0 means every row. Likewise Yt holds
  // keys [k0, k1) only (at their own column index) when k1 >= 0, and then Yf, Ya, Yb (and
  // pack_values' Vb) hold only the rows [0, max(q1, k1)) the task reads: a causal task's rows and
  // keys end at its last query row.
  void pack_query_key(bool need_yb, int64_t q0 = 0, int64_t q1 = -1, int64_t k0 = 0, int64_t k1 = -1) {
    const scalar_t* y = y_rows_.data;
    const int64_t ldq = y_rows_.ld;
    const int64_t n_rows = q1 < 0 || k1 < 0 ? L_ : std::max(q1, k1);
    packed_rows_ = n_rows;
    if (needs_fp32_y(p_)) {
      if constexpr (kHalf) {
        float* yf = ws_.take<float>(L_ * D_);
        for (int64_t i = 0; i < n_rows; ++i) load_row(yf + i * D_, y + i * ldq, D_);
        yf_ = yf;
        ldyf_ = D_;
      } else {
        yf_ = y;
        ldyf_ = ldq;
      }
    }
    if constexpr (kPairs) {
      ya_ = a_rows(y, ldq, n_rows, D_, ws_.take<Word>(L_ * words(D_)));
      if (need_yb) yb_ = b_rows(y, ldq, n_rows, D_, ws_.take<Word>(words(L_) * D_), D_);
    } else {
      ya_ = {yf_, ldyf_};
      yb_ = ya_;
    }
    if (k1 < 0) k1 = L_;
    // A key range alone takes a row stride of its own width: a compact panel, which stays in L2
    // from one task to the next, where the head's stride would scatter it over L * D words.
    const int64_t ldt = k1 - k0 == L_ ? g_.ldk : key_stride(k1 - k0);
    Word* yt = ws_.take<Word>(words(D_) * ldt);
    yt_ = {b_transposed(a_from(ya_, k0), k1 - k0, D_, yt, ldt).data - k0, ldt};
    if (p_.coef_mode == CoefMode::kNone) {
      qa_ = ya_;
      return;
    }
    if (q1 < 0) q1 = L_;
    const int64_t n = q1 - q0;
    float* qm = ws_.take<float>(L_ * D_);
    times_coef(yf_, ldyf_, q0, q1, qm + q0 * D_);
    qm_ = qm;
    Word* qa_buf = kPairs ? ws_.take<Word>(L_ * words(D_)) : nullptr;
    qa_ = a_from(a_rows(qm_ + q0 * D_, D_, n, D_, kPairs ? qa_buf + q0 * words(D_) : nullptr), -q0);
  }

  // Values as B rows: Vb (Yb in shared mode), rows [0, packed_rows_).
  void pack_values() {
    if (shared_) {
      vb_ = yb_;
      return;
    }
    const scalar_t* v = v_rows_.data;
    const int64_t ldv = v_rows_.ld;
    if constexpr (kPairs) {
      vb_ = b_rows(v, ldv, packed_rows_, Dv_, ws_.take<Word>(words(L_) * Dv_), Dv_);
    } else if constexpr (kHalf) {
      float* vf = ws_.take<float>(L_ * Dv_);
      for (int64_t i = 0; i < packed_rows_; ++i) load_row(vf + i * Dv_, v + i * ldv, Dv_);
      vb_ = {vf, Dv_};
    } else {
      vb_ = {v, ldv};
    }
  }

  // Scores of query rows [i0, i0 + rows) against keys [0, kend) into s (row stride g_.ldk).
  void scores(float* s, int64_t i0, int64_t rows, int64_t kend) const {
    const float scale = static_cast<float>(p_.scale);
    if (symmetric_) {
      // Whole head: the lower tile triangle, then its mirror image.
      lower_scores(s);
      mirror_lower_tiles(s, g_.ldk, L_);
      return;
    }
    Band band;
    if (p_.causal) band.n_hi = i0;
    gemm<Dot, false>(rows, kend, D_, a_from(qa_, i0), yt_, s, g_.ldk, scale, false, band);
  }

  // The lower tile triangle of the whole head's scores (tiles (I, J), J <= I, diagonal tiles
  // whole) into s (row stride g_.ldk); the upper triangle is not written.
  void lower_scores(float* s) const {
    const float scale = static_cast<float>(p_.scale);
    for (int64_t t0 = 0; t0 < L_; t0 += kSymTile) {
      const int64_t tr = std::min(kSymTile, L_ - t0);
      gemm<Dot, false>(tr, t0 + tr, D_, a_from(qa_, t0), yt_, s + t0 * g_.ldk, g_.ldk, scale, false);
    }
  }

  // Query block [i0, i0 + rows): the key range its products touch.
  int64_t block_keys(int64_t i0, int64_t rows) const {
    if (symmetric_) return L_;
    return p_.causal ? std::min(key_end_, i0 + rows) : key_end_;
  }
  // Keys row i may attend to lie in [0, row_keys(i)).
  int64_t row_keys(int64_t i) const {
    if (symmetric_) return L_;
    return p_.causal ? std::min(key_end_, i + 1) : key_end_;
  }

  // Padded keys and exclude_self to -inf on keys [j0, n) of score row i; s points at key j0.
  void mask_row(float* s, int64_t i, int64_t n, int64_t j0 = 0) const {
    if (kbias_ != nullptr) mask_inplace(s, kbias_ + j0, n - j0);
    if (i >= j0 && i < n && excludes_self(i)) s[i - j0] = kNegInf;
  }

  // Whether exclude_self masks row i's own key (only when the row may attend to another).
  bool excludes_self(int64_t i) const {
    if (!p_.exclude_self) return false;
    const int64_t self_real = prefix_ == nullptr ? 1 : prefix_[i + 1] - prefix_[i];
    const int64_t others = p_.causal ? (prefix_ == nullptr ? i : prefix_[i]) : n_real_ - self_real;
    return others > 0;
  }

  // keep[j] for keys [j0, j0 + n) of query row i, as 0 / keep_scale multipliers.
  void keep_row(float* keep, int64_t i, int64_t n, int64_t j0 = 0) const { keep_run(keep, i, j0, n); }

  // keep[j] = the multiplier of query row i on key j0 + j, for j in [0, n).
  void keep_run(float* keep, int64_t i, int64_t j0, int64_t n) const {
    draw_keep(keep_rule_, keep_offset(i, j0), n, keep);
  }

  // The same as keep bits (keep_bit_words(n) words at bits).
  KeepBits keep_bits(uint64_t* bits, int64_t i, int64_t j0, int64_t n) const {
    draw_keep_bits(keep_rule_, keep_offset(i, j0), n, bits);
    return {bits, keep_rule_.scale};
  }

  // The element offset of query row i on key j (see reference.dropout_keep_mask).
  uint64_t keep_offset(int64_t i, int64_t j) const {
    return static_cast<uint64_t>(h_ * p_.n_rows + row_id0_ + i) * static_cast<uint64_t>(p_.seqlen) +
           static_cast<uint64_t>(j);
  }

  bool dropout() const { return keep_rule_.threshold != 0; }

 protected:
  // dst [i1 - i0, D] = rows [i0, i1) of the fp32 rows y (row stride ldy) times this head's M.
  void times_coef(const float* y, int64_t ldy, int64_t i0, int64_t i1, float* dst) const {
    if (p_.coef_mode == CoefMode::kFull) {
      gemm<FloatDot, false>(i1 - i0, D_, D_, y + i0 * ldy, ldy, p_.coef + h_ * D_ * D_, D_, dst, D_, 1.f, false);
      return;
    }
    const float* c = p_.coef + h_ * D_;
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t d = 0; d < D_; ++d) dst[(i - i0) * D_ + d] = c[d] * y[i * ldy + d];
    }
  }

  // src [m, k] (fp32, or scalar_t) as A rows; fp32 is its own A-rows form, bf16 is packed in buf
  // ([m, words(k)]).
  template <typename T>
  static Panel a_rows(const T* src, int64_t ld, int64_t m, int64_t k, Word* buf) {
    if constexpr (kPairs) {
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        // Rows of an even count of bf16 at an even stride already are A rows: read in place.
        if (k % 2 == 0 && ld % 2 == 0 && reinterpret_cast<uintptr_t>(src) % alignof(Word) == 0) {
          return {reinterpret_cast<const Word*>(src), ld / 2};
        }
      }
      pack_bf16_rows(src, ld, m, k, buf, words(k));
      return {buf, words(k)};
    } else {
      static_assert(std::is_same_v<T, float>, "fp32 operands come from fp32 rows");
      return {src, ld};
    }
  }
  // src [m, n] as B rows (m along k), which is also the kTransA form of src^T as A; fp32 is its
  // own form, bf16 row pairs are interleaved into buf ([words(m), ldd]).
  template <typename T>
  static Panel b_rows(const T* src, int64_t ld, int64_t m, int64_t n, Word* buf, int64_t ldd) {
    if constexpr (kPairs) {
      pack_bf16_pairs(src, ld, m, n, buf, ldd);
      return {buf, ldd};
    } else {
      static_assert(std::is_same_v<T, float>, "fp32 operands come from fp32 rows");
      return {src, ld};
    }
  }
  // The transpose of A rows a ([m, k]) as B [k, ldk] (m along n), word by word into buf.
  Panel b_transposed(const Panel& a, int64_t m, int64_t k, Word* buf, int64_t ld = 0) const {
    if (ld == 0) ld = g_.ldk;
    transpose(reinterpret_cast<const float*>(a.data), a.ld, reinterpret_cast<float*>(buf), ld, m, words(k));
    return {buf, ld};
  }
  // A rows from row i on; B rows (and kTransA A) from row i on, i even.
  static Panel a_from(const Panel& a, int64_t i) { return {a.data + i * a.ld, a.ld}; }
  static Panel b_from(const Panel& b, int64_t i) { return {b.data + i / Dot::kPack * b.ld, b.ld}; }

  const ForwardParams& p_;
  const Geometry& g_;
  Workspace& ws_;
  int64_t b_, h_;
  int64_t start_ = 0, L_ = 0, D_ = 0, Dv_ = 0;
  bool shared_ = true;

  float* kbias_ = nullptr;
  int32_t* prefix_ = nullptr;
  int64_t key_end_ = 0, n_real_ = 0;
  bool symmetric_ = false;  // this head takes the symmetric whole-head schedule

  KeepRule keep_rule_;  // threshold 0: no dropout
  int64_t row_id0_ = 0;

  // Where the products read Y and V (null in shared mode): the inputs, or the copy in clean_
  // (see read_padding_as_finite).
  struct Rows {
    const scalar_t* data = nullptr;
    int64_t ld = 0;
  };
  Rows y_rows_, v_rows_;
  c10::DataPtr clean_;

  const float* yf_ = nullptr;  // fp32 Y, or null where no product needs it
  int64_t ldyf_ = 0;
  const float* qm_ = nullptr;  // fp32 Y M, or null for M = I
  Panel ya_, yt_, yb_, qa_, vb_;
  int64_t packed_rows_ = 0;  // rows [0, packed_rows_) of Y (and V) in the panels
};

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace symattn::cpu
