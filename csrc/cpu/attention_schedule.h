// How a call's tasks are planned, dealt to the workers and run: forward pieces and mirrored
// merges, the backward's slice sums, the tiled backward's rounds, for_each_head.
#pragma once

#include "attention_backward.h"
#include "attention_forward.h"
#include "in_order.h"

namespace symattn::cpu {
namespace CPU_CAPABILITY {
namespace {

// One task: query rows [r0, r1) of head h of sequence b, with its estimated cost (score
// products it multiplies).
struct Piece {
  int64_t b, h, r0, r1;
  double cost;
  // Mirrored forward tasks: the other group's rows [c0, c1) (c1 = 0 for other tasks), and the
  // call's mirrored groups of both (the same group for a group with itself).
  int64_t c0 = 0, c1 = 0;
  int64_t group_a = -1, group_b = -1;
  // A mirrored head's tasks: the plan index of its first, costliest task. The deal keeps a head's
  // tasks together, so that its groups' states live only while the head runs.
  int64_t head_first = -1;
};

// A group of rows [r0, r1) of head (b, h) on the mirrored schedule.
struct MirrorGroup {
  int64_t b, h, r0, r1;
};

// Whether sequence b (L tokens) takes the mirrored forward: like the whole-head symmetric
// schedule, only when at most a quarter of its keys are trailing padding (the mirrored tiles
// cover every key; the row schedule stops at the last real one).
template <typename Params>
bool mirrors(const Params& p, const Geometry& g, int64_t b, int64_t L) {
  if (!g.mirrored || L <= kWholeHead) return false;
  if (p.key_padding_mask == nullptr) return true;
  const bool* real = p.key_padding_mask + b * p.seqlen;
  int64_t key_end = 0;
  for (int64_t j = 0; j < L; ++j) {
    if (real[j]) key_end = j + 1;
  }
  return 4 * key_end > 3 * L;
}

// Pieces of one mirrored head: a task per pair of groups (the larger, two-group ones first),
// and the head's groups appended to the call's.
void plan_mirrored(int64_t b, int64_t h, int64_t L, int64_t heads, std::vector<Piece>& pieces,
                   std::vector<MirrorGroup>& mirror_groups_of_call) {
  const int64_t groups = mirror_groups(L, heads);
  const int64_t rows = mirror_group_rows(L, groups);
  const int64_t group0 = static_cast<int64_t>(mirror_groups_of_call.size());
  auto lo = [&](int64_t a) { return a * rows; };
  auto hi = [&](int64_t a) { return std::min(L, (a + 1) * rows); };
  for (int64_t a = 0; a < groups; ++a) mirror_groups_of_call.push_back({b, h, lo(a), hi(a)});
  const size_t first = pieces.size();
  for (int64_t a = 0; a < groups; ++a) {
    for (int64_t c = a + 1; c < groups; ++c) {
      const double work = 1.5 * static_cast<double>((hi(a) - lo(a)) * (hi(c) - lo(c)));
      pieces.push_back({b, h, lo(a), hi(a), work, lo(c), hi(c), group0 + a, group0 + c});
    }
  }
  for (int64_t a = 0; a < groups; ++a) {
    const double n = static_cast<double>(hi(a) - lo(a));
    pieces.push_back({b, h, lo(a), hi(a), 0.75 * n * n, lo(a), hi(a), group0 + a, group0 + a});
  }
  for (size_t t = first; t < pieces.size(); ++t) pieces[t].head_first = static_cast<int64_t>(first);
}

// Floats that the running states of a call's mirrored heads take.
template <typename Params>
int64_t mirror_state_floats(const Params& p, const Geometry& g) {
  int64_t total = 0;
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t L = p.length(b);
    if (!mirrors(p, g, b, L)) continue;
    total += p.heads * mirror_groups(L, p.batch * p.heads) * L * (p.value_dim + 2);
  }
  return total;
}

// The tasks of one call, longest sequences first (stable, so equal lengths keep batch order),
// then by head, then by query rows. The forward, and the backward on the tiled schedule, cut
// heads longer than g.task_rows into tasks of g.task_rows rows (causal forward heads into longer
// ones when the call has many heads, see kCausalTasks). The other backward, whose tasks
// each hold a head-sized gradient accumulator, cuts heads only as far as needed for about
// kBackwardTasks tasks in all. Nothing here depends on
// the thread count, so neither does any result.
template <typename Params>
std::vector<Piece> plan_tasks(const Params& p, const Geometry& g, bool backward,
                              std::vector<MirrorGroup>* mirror_groups_of_call = nullptr) {
  const bool mirror = mirror_groups_of_call != nullptr && g.mirrored &&
                      mirror_state_floats(p, g) * int64_t{sizeof(float)} <= kMirrorStateBytes;
  std::vector<int64_t> order(p.batch);
  std::iota(order.begin(), order.end(), 0);
  if (p.cu_seqlens != nullptr) {
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return p.length(x) > p.length(y); });
  }
  std::vector<Piece> pieces;
  for (const int64_t b : order) {
    const int64_t L = p.length(b);
    if (L == 0) continue;
    int64_t step = g.task_rows;
    if (backward && !g.tiled && L > g.task_rows) {
      const int64_t wanted = (kBackwardTasks + p.batch * p.heads - 1) / (p.batch * p.heads);
      const int64_t slices = std::min((L + g.task_rows - 1) / g.task_rows, wanted);
      step = round_up((L + slices - 1) / slices, g.block);
    }
    if (!backward && g.tiled && p.causal) {
      const int64_t slices = (kCausalTasks + p.batch * p.heads - 1) / (p.batch * p.heads);
      step = std::max(step, round_up((L + slices - 1) / slices, g.block));
    }
    const bool mirrored = mirror && mirrors(p, g, b, L);
    for (int64_t h = 0; h < p.heads; ++h) {
      if (mirrored) {
        plan_mirrored(b, h, L, p.batch * p.heads, pieces, *mirror_groups_of_call);
        continue;
      }
      for (int64_t r0 = 0; r0 < L; r0 += step) {
        const int64_t r1 = std::min(L, r0 + step);
        // Causal rows see keys [0, i]: the block's mean row sees about (r0 + r1) / 2 of them.
        const double keys = p.causal ? 0.5 * static_cast<double>(r0 + r1) : static_cast<double>(L);
        pieces.push_back({b, h, r0, r1, static_cast<double>(r1 - r0) * keys});
      }
    }
  }
  return pieces;
}

// The gradient accumulators of backward tasks that share their head with others, and which
// heads to sum them for (each in slice order, so the sum never depends on the thread count).
class SliceBuffers {
 public:
  struct Group {
    int64_t b, h, first, count;
  };

  SliceBuffers() = default;
  SliceBuffers(const BackwardParams& p, const std::vector<Piece>& pieces) : index_(pieces.size(), -1) {
    const int64_t D = p.head_dim, Dv = p.value_dim;
    const int64_t csize = p.coef_mode == CoefMode::kFull ? D * D : D;
    std::vector<int64_t> lengths;
    for (size_t t = 0; t < pieces.size();) {
      size_t e = t + 1;
      while (e < pieces.size() && pieces[e].b == pieces[t].b && pieces[e].h == pieces[t].h) ++e;
      if (e - t > 1) {
        const int64_t first = static_cast<int64_t>(lengths.size());
        groups_.push_back({pieces[t].b, pieces[t].h, first, static_cast<int64_t>(e - t)});
        for (size_t k = t; k < e; ++k) {
          index_[k] = static_cast<int64_t>(lengths.size());
          lengths.push_back(pieces[e - 1].r1);
        }
      }
      t = e;
    }
    const bool shared = p.v.data == nullptr;
    auto floats = [&](int64_t L) { return round_up(L * D + (shared ? 0 : L * Dv), 16); };
    int64_t total = 0;
    for (const int64_t L : lengths) total += floats(L);
    const int64_t total_coef = static_cast<int64_t>(lengths.size()) * csize;
    floats_ = c10::GetCPUAllocator()->allocate(static_cast<size_t>(total) * sizeof(float));
    coefs_ = c10::GetCPUAllocator()->allocate(static_cast<size_t>(total_coef) * sizeof(double));
    float* next = static_cast<float*>(floats_.get());
    for (size_t k = 0; k < lengths.size(); ++k) {
      BackwardSlice slice;
      slice.dy = next;
      slice.dv = shared ? next : next + lengths[k] * D;
      slice.dcoef = static_cast<double*>(coefs_.get()) + k * csize;
      slices_.push_back(slice);
      next += floats(lengths[k]);
    }
  }

  // Task t's accumulator, or null for a task that owns its whole head.
  const BackwardSlice* of(int64_t t) const { return index_.empty() || index_[t] < 0 ? nullptr : &slices_[index_[t]]; }
  const std::vector<Group>& groups() const { return groups_; }
  const BackwardSlice* first(const Group& group) const { return &slices_[group.first]; }

 private:
  std::vector<int64_t> index_;
  std::vector<Group> groups_;
  std::vector<BackwardSlice> slices_;
  c10::DataPtr floats_, coefs_;
};

// The order of the deal: costliest first (plan order among equals), except that a mirrored
// head's tasks go together, where its costliest would go, costliest first among them.
std::vector<int64_t> dealing_order(const std::vector<Piece>& pieces) {
  auto key = [&](int64_t t) {
    const int64_t first = pieces[t].head_first >= 0 ? pieces[t].head_first : t;
    return std::make_tuple(pieces[first].cost, -first, pieces[t].cost);
  };
  std::vector<int64_t> order(pieces.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return key(x) > key(y); });
  return order;
}

// Deals the tasks in dealing_order, each to the worker with the least estimated work so far
// (lowest index on ties): longest-processing-time-first, round-robin for equal tasks. Each worker
// owns its list before any runs, so none ever holds work it will not run next. Returns per
// worker the indices of its tasks.
std::vector<std::vector<int64_t>> deal_tasks(const std::vector<Piece>& pieces, const std::vector<int64_t>& order,
                                             int64_t workers) {
  std::vector<std::vector<int64_t>> lists(workers);
  std::vector<double> load(workers, 0.0);
  for (const int64_t t : order) {
    const int64_t w = std::min_element(load.begin(), load.end()) - load.begin();
    lists[w].push_back(t);
    load[w] += pieces[t].cost;
  }
  return lists;
}

// The running states of a call's mirrored groups. A task takes a fresh state for each of its two
// groups (one for a group with itself) when it starts; once it ends, each group folds the states
// its tasks handed in, in a fixed order (the dealing order, which the workers mostly run in),
// each as soon as all before it are in: the first becomes the group's state, the others are
// folded into it and freed. Whoever folds a group's last state writes the group's rows out and
// frees it. A head's tasks are dealt together, so a call holds the states of the groups of the
// heads being run, of running tasks and of the few that finished ahead of an earlier one, instead
// of one per group and task; and no sum depends on the thread count.
class MirrorFolds {
 public:
  MirrorFolds(const std::vector<Piece>& pieces, const std::vector<int64_t>& order,
              const std::vector<MirrorGroup>& groups, int64_t Dv)
      : groups_(new Group[groups.size()]), position_(pieces.size(), {-1, -1}), Dv_(Dv) {
    for (size_t k = 0; k < groups.size(); ++k) groups_[k].rows = groups[k].r1 - groups[k].r0;
    for (const int64_t t : order) {
      const Piece& piece = pieces[t];
      if (piece.c1 == 0) continue;
      for (const int side : {0, 1}) {
        if (side == 1 && piece.group_b == piece.group_a) break;
        Group& group = groups_[side == 0 ? piece.group_a : piece.group_b];
        (side == 0 ? position_[t].first : position_[t].second) = group.order.add();
        group.parts.emplace_back();
      }
    }
  }

  // Task t's fresh states of its two groups (the same one for a group with itself).
  std::pair<RowState, RowState> open(const Piece& piece, int64_t t) {
    const RowState a = take(piece.group_a, position_[t].first);
    return {a, piece.group_b == piece.group_a ? a : take(piece.group_b, position_[t].second)};
  }

  // Task t has written its states: each of its groups folds what is now in order, and
  // write(group index, state) writes a group out once its last state is folded.
  template <typename Write>
  void close(const Piece& piece, int64_t t, const Write& write) {
    hand_in(piece.group_a, position_[t].first, write);
    if (piece.group_b != piece.group_a) hand_in(piece.group_b, position_[t].second, write);
  }

 private:
  struct Part {
    c10::DataPtr data;
    RowState state;
  };
  struct Group {
    InOrder order;
    std::vector<Part> parts;  // in folding order; each written by its own task alone
    int64_t rows = 0;
  };

  RowState take(int64_t k, int64_t position) {
    Part& part = groups_[k].parts[position];
    const int64_t n = groups_[k].rows;
    part.data = c10::GetCPUAllocator()->allocate(static_cast<size_t>(n * (Dv_ + 2)) * sizeof(float));
    float* x = static_cast<float*>(part.data.get());
    part.state = {x, x + n * Dv_, x + n * (Dv_ + 1)};
    return part.state;
  }

  // The first part becomes the group's state; the others fold into it.
  template <typename Write>
  void hand_in(int64_t k, int64_t position, const Write& write) {
    Group& group = groups_[k];
    Part& acc = group.parts[0];
    group.order.hand_in(position, [&](int64_t j) {
      if (j > 0) {
        fold_state(acc.state, group.parts[j].state, group.rows, Dv_);
        group.parts[j].data.clear();
      }
      if (j == group.order.count() - 1) {
        write(k, acc.state);
        acc.data.clear();
      }
    });
  }

  std::unique_ptr<Group[]> groups_;
  std::vector<std::pair<int64_t, int64_t>> position_;  // task's place in its groups' folding orders
  int64_t Dv_;
};

// One task of a round of the tiled backward: tile (bi, bj) of the wave's head `head`, and with
// `diagonals` the tiles (bi, bi) and (bj, bj) after it; bi == bj is a diagonal tile alone.
struct TileTask {
  int64_t head, bi, bj;
  bool diagonals;
  double cost;  // tile products
};

// Rounds of the tiles of a head of nb blocks (the circle method over nb rounded up to even).
int64_t tile_rounds(int64_t nb) { return nb + nb % 2 - 1; }

// Round r's tasks of a head of nb blocks: each block sits in exactly one of them, each pair of
// blocks meets in exactly one round, and each diagonal tile is taken once (by the block paired
// with the extra one when nb is odd, by round 0's tasks when nb is even).
void round_tasks(int64_t head, int64_t nb, int64_t r, bool causal, std::vector<TileTask>& out) {
  const int64_t n = nb + nb % 2;
  const double pair = causal ? 5.0 : 7.0, diagonal = 5.0;
  auto add = [&](int64_t a, int64_t b) {
    if (a == nb || b == nb) {
      const int64_t x = a == nb ? b : a;
      out.push_back({head, x, x, false, diagonal});
      return;
    }
    const bool diagonals = nb % 2 == 0 && r == 0;
    out.push_back({head, std::max(a, b), std::min(a, b), diagonals, pair + (diagonals ? 2 * diagonal : 0.0)});
  };
  add(n - 1, r);
  for (int64_t k = 1; k < n / 2; ++k) add((r + k) % (n - 1), (r - k + n - 1) % (n - 1));
}

// A step of the tiled backward: a head's prepare_tiled, a task of tiles of one round, or a head's
// finish_tiled.
struct TiledJob {
  enum Kind { kPrepare, kTiles, kFinish } kind;
  int64_t head, round;
  TileTask tiles;
};

// Which of n tasks a worker has claimed: each task is claimed once, by whichever worker gets it
// first, whatever list it was dealt to (a relaxed load first, so that polling a claimed task
// keeps its cache line shared).
class Claims {
 public:
  explicit Claims(int64_t n) : flags_(new std::atomic<bool>[n]), left_(n) {
    for (int64_t i = 0; i < n; ++i) flags_[i].store(false, std::memory_order_relaxed);
  }
  bool claimed(int64_t i) const { return flags_[i].load(std::memory_order_relaxed); }
  bool claim(int64_t i) {
    if (claimed(i) || flags_[i].exchange(true, std::memory_order_acq_rel)) return false;
    left_.fetch_sub(1, std::memory_order_relaxed);
    return true;
  }
  int64_t unclaimed() const { return left_.load(std::memory_order_relaxed); }
  // The first position from k of list whose task is unclaimed (list.size() when none is).
  size_t next_unclaimed(const std::vector<int64_t>& list, size_t k) const {
    while (k < list.size() && claimed(list[k])) ++k;
    return k;
  }

 private:
  std::unique_ptr<std::atomic<bool>[]> flags_;
  std::atomic<int64_t> left_;
};

// The backward of tiled heads (see BackwardHead::pair_tile). Heads go in waves, longest first,
// each wave just large enough that a round has about two tasks per thread. A head packs its
// panels (prepare_tiled), the rounds of tiles run, and the head writes its gradients
// (finish_tiled); every wave runs in one parallel region: each worker runs a list dealt before any
// runs (and ready jobs of other lists while its own next one is not ready), a wave's heads are
// prepared while the previous wave's last tiles run, and its finishes run beside the next wave's
// prepares (so one worker does not pack or write a head while the others
// wait), and a task waits only for its own two blocks to have finished the previous round
// (per-block counters), never for a barrier across all workers, so one descheduled thread delays
// only the tasks that need its tiles. Within a round no two tasks touch the same block, so tasks
// never share an accumulator, and every block's accumulator takes its tiles in round order: the
// results do not depend on the thread count, which only sets the wave size and the deal. A head's
// workspace lives from its prepare to its finish, so at most two waves hold one.
template <typename Task>
void tiled_backward(const BackwardParams& p, const Geometry& g) {
  struct HeadRef {
    int64_t b, h, blocks;
  };
  std::vector<int64_t> order(p.batch);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return p.length(x) > p.length(y); });
  std::vector<HeadRef> heads;
  for (const int64_t b : order) {
    for (int64_t h = 0; h < p.heads && p.length(b) > 0; ++h) heads.push_back({b, h, (p.length(b) + g.tile - 1) / g.tile});
  }
  const int64_t n_heads = static_cast<int64_t>(heads.size());
  // Inside another parallel region at::parallel_for runs the whole range on one thread.
  const int64_t threads = at::in_parallel_region() ? 1 : std::max<int64_t>(1, at::get_num_threads());
  // Waves: heads [wave_first[w], wave_first[w + 1]).
  std::vector<int64_t> wave_first{0};
  int64_t workers = 1;
  while (wave_first.back() < n_heads) {
    int64_t last = wave_first.back();
    int64_t per_round = 0;
    while (last < n_heads && (last == wave_first.back() || per_round < 2 * threads)) {
      per_round += std::max<int64_t>(1, heads[last].blocks / 2);
      ++last;
    }
    workers = std::max(workers, std::min<int64_t>(threads, std::max<int64_t>(last - wave_first.back(), per_round)));
    wave_first.push_back(last);
  }
  std::vector<int64_t> block0(n_heads + 1, 0);  // the heads' blocks, numbered one after another
  for (int64_t k = 0; k < n_heads; ++k) block0[k + 1] = block0[k] + heads[k].blocks;

  // The jobs in an order that puts every job after those it waits for, and the deal: head k's
  // prepare and finish to worker k % workers (so a head's finish and the next head's prepare run
  // side by side); each round's tasks to the worker with the least work in that round, then in
  // the call so far.
  std::vector<TiledJob> jobs;
  std::vector<std::vector<int64_t>> lists(workers);
  std::vector<int64_t> ran(workers, 0), tiles(workers, 0), tiles_left(n_heads, 0);
  auto deal_heads = [&](TiledJob::Kind kind, int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      lists[k % workers].push_back(static_cast<int64_t>(jobs.size()));
      jobs.push_back({kind, k, 0, {}});
    }
  };
  deal_heads(TiledJob::kPrepare, 0, wave_first[1]);
  std::vector<TileTask> round;
  std::vector<double> load(workers);
  for (size_t w = 0; w + 1 < wave_first.size(); ++w) {
    const int64_t first = wave_first[w], last = wave_first[w + 1];
    int64_t rounds = 0;
    for (int64_t k = first; k < last; ++k) rounds = std::max(rounds, tile_rounds(heads[k].blocks));
    for (int64_t r = 0; r < rounds; ++r) {
      round.clear();
      for (int64_t k = first; k < last; ++k) {
        if (r < tile_rounds(heads[k].blocks)) round_tasks(k, heads[k].blocks, r, p.causal, round);
      }
      std::fill(load.begin(), load.end(), 0.0);
      for (const TileTask& task : round) {
        int64_t x = 0;
        for (int64_t y = 1; y < workers; ++y) {
          if (load[y] < load[x] || (load[y] == load[x] && tiles[y] < tiles[x])) x = y;
        }
        lists[x].push_back(static_cast<int64_t>(jobs.size()));
        jobs.push_back({TiledJob::kTiles, task.head, r, task});
        tiles_left[task.head] += 1;
        load[x] += task.cost;
        ran[x] += 1;
        tiles[x] += task.diagonals ? 3 : 1;
      }
    }
    if (w + 2 < wave_first.size()) deal_heads(TiledJob::kPrepare, last, wave_first[w + 2]);
    deal_heads(TiledJob::kFinish, first, last);
  }

  std::vector<std::unique_ptr<Workspace>> head_ws(n_heads);
  std::vector<std::unique_ptr<Task>> head_tasks(n_heads);
  std::vector<std::atomic<int64_t>> rounds_done(block0[n_heads]);  // per block
  std::vector<std::atomic<int64_t>> pending(n_heads);              // per head: prepare, then its tile tasks
  for (int64_t k = 0; k < n_heads; ++k) pending[k].store(1 + tiles_left[k], std::memory_order_relaxed);
  for (auto& x : rounds_done) x.store(0, std::memory_order_relaxed);
  // A job may start once what it reads is written: a head's tiles after its prepare and after
  // their two blocks' previous round, its finish after all its tiles.
  auto ready = [&](const TiledJob& job) {
    const int64_t left = pending[job.head].load(std::memory_order_acquire);
    if (job.kind == TiledJob::kPrepare) return true;
    if (job.kind == TiledJob::kFinish) return left == 0;
    return left <= tiles_left[job.head] &&
           rounds_done[block0[job.head] + job.tiles.bi].load(std::memory_order_acquire) == job.round &&
           rounds_done[block0[job.head] + job.tiles.bj].load(std::memory_order_acquire) == job.round;
  };
  auto run_job = [&](const TiledJob& job, float* tile) {
    const int64_t k = job.head;
    std::atomic<int64_t>& left = pending[k];
    if (job.kind == TiledJob::kPrepare) {
      head_ws[k] = std::make_unique<Workspace>(Workspace::bytes_for(Task::tiled_head_floats(p, g)));
      head_tasks[k] = std::make_unique<Task>(p, g, *head_ws[k], heads[k].b, heads[k].h);
      head_tasks[k]->prepare_tiled();
      left.fetch_sub(1, std::memory_order_release);
      return;
    }
    if (job.kind == TiledJob::kFinish) {
      head_tasks[k]->finish_tiled();
      head_tasks[k].reset();
      head_ws[k].reset();
      return;
    }
    const TileTask& task = job.tiles;
    Task& head = *head_tasks[k];
    head.pair_tile(task.bi, task.bj, tile);
    if (task.diagonals) {
      head.pair_tile(task.bi, task.bi, tile);
      head.pair_tile(task.bj, task.bj, tile);
    }
    rounds_done[block0[k] + task.bi].store(job.round + 1, std::memory_order_release);
    if (task.bj != task.bi) rounds_done[block0[k] + task.bj].store(job.round + 1, std::memory_order_release);
    left.fetch_sub(1, std::memory_order_release);
  };
  // A job runs on the worker that claims it, and only once it is ready, so no claimed job ever
  // waits and the earliest unclaimed job always becomes ready. A worker whose next job is not
  // ready yet runs a ready tile task or finish of another worker's list instead (never a prepare,
  // whose workspace would then live longer); so does a worker whose list is done, until every job
  // is claimed. A thread that loses its core then holds up only the job it is in.
  const int64_t n_jobs = static_cast<int64_t>(jobs.size());
  Claims claims(n_jobs);
  std::atomic<int64_t> first_unclaimed{0};
  std::vector<int64_t> taken(workers, 0);
  // A ready job of another worker's list (of none of `mine`), claimed; -1 when there is none among
  // the first kLookahead unclaimed jobs (the later ones wait on those).
  constexpr int64_t kLookahead = 256;
  auto take_ready = [&](const std::vector<bool>& mine) -> int64_t {
    const int64_t first = first_unclaimed.load(std::memory_order_relaxed);
    int64_t j = first;
    while (j < n_jobs && claims.claimed(j)) ++j;
    // A hint (owners run their lists anyway), stored only when it moves: workers poll here.
    if (j != first) first_unclaimed.store(j, std::memory_order_relaxed);
    for (int64_t seen = 0; j < n_jobs && seen < kLookahead; ++j) {
      if (claims.claimed(j)) continue;
      ++seen;
      if (mine[j] || jobs[j].kind == TiledJob::kPrepare || !ready(jobs[j])) continue;
      if (claims.claim(j)) return j;
    }
    return -1;
  };
  const int64_t scratch_floats = Task::tiled_scratch_floats(p, g);
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    // A thread given several workers' lists runs their jobs merged in job order.
    std::vector<int64_t> list;
    std::vector<bool> mine(n_jobs, false);
    for (int64_t w = w0; w < w1; ++w) list.insert(list.end(), lists[w].begin(), lists[w].end());
    std::sort(list.begin(), list.end());
    for (const int64_t j : list) mine[j] = true;
    Workspace scratch(Workspace::bytes_for(scratch_floats));
    float* tile = scratch.take<float>(scratch_floats);
    size_t next = 0;
    for (int spins = 0;;) {
      next = claims.next_unclaimed(list, next);
      if (next == list.size() && claims.unclaimed() == 0) break;
      if (next < list.size() && ready(jobs[list[next]])) {
        if (claims.claim(list[next])) run_job(jobs[list[next]], tile);
        spins = 0;
        continue;
      }
      const int64_t j = take_ready(mine);
      if (j >= 0) {
        run_job(jobs[j], tile);
        taken[w0] += 1;
        spins = 0;
      } else if (++spins >= 64) {
        std::this_thread::yield();
      }
    }
  });
  if (p.schedule != nullptr) {
    int64_t used = workers;
    while (used > 1 && ran[used - 1] == 0) --used;
    p.schedule->tasks.assign(ran.begin(), ran.begin() + used);
    p.schedule->rows.assign(tiles.begin(), tiles.begin() + used);
    p.schedule->taken.assign(taken.begin(), taken.begin() + used);
  }
}

// Runs every task of the call: one worker per thread (never more than tasks) runs its dealt
// list in order, prefetching the inputs of its next task while it computes the current one, and
// then takes what other workers have not reached. Which worker runs a task never changes what
// the task computes. When p.schedule is set, it receives the deal (tasks and query rows per
// worker) and how many tasks each worker took from others.
template <typename Task, typename Params>
void for_each_head(const Params& p) {
  constexpr bool kBackward = std::is_same_v<Params, BackwardParams>;
  const Geometry g(p, kBackward);
  if constexpr (kBackward) {
    if (g.tiled) {
      tiled_backward<Task>(p, g);
      return;
    }
  }
  std::vector<MirrorGroup> mirror_groups_of_call;
  const std::vector<Piece> pieces = plan_tasks(p, g, kBackward, &mirror_groups_of_call);
  const int64_t tasks = static_cast<int64_t>(pieces.size());
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  const std::vector<int64_t> order = dealing_order(pieces);  // the deal's, and the folds'
  const auto lists = deal_tasks(pieces, order, workers);
  if (p.schedule != nullptr) {
    p.schedule->tasks.assign(workers, 0);
    p.schedule->rows.assign(workers, 0);
    p.schedule->taken.assign(workers, 0);
    for (int64_t w = 0; w < workers; ++w) {
      for (const int64_t t : lists[w]) {
        const Piece& piece = pieces[t];
        p.schedule->tasks[w] += 1;
        p.schedule->rows[w] += piece.r1 - piece.r0 + (piece.c0 != piece.r0 ? piece.c1 - piece.c0 : 0);
      }
    }
  }
  if (tasks == 0) return;
  SliceBuffers slices;
  if constexpr (kBackward) slices = SliceBuffers(p, pieces);
  MirrorFolds folds(pieces, order, mirror_groups_of_call, p.value_dim);
  // Each task runs on the worker that claims it first: its own worker in dealt order, or, once
  // a worker has run out of its own, any other whose worker has not reached it yet (taken from
  // the end of that list, where the smallest tasks are). A worker whose thread loses its core
  // then delays the call by the task it is in, not by its whole list. A worker prefetches the
  // inputs of its next unclaimed task without claiming it.
  Claims claims(tasks);
  auto steal = [&](int64_t w) -> int64_t {
    for (int64_t d = 1; d < workers; ++d) {
      const std::vector<int64_t>& other = lists[(w + d) % workers];
      for (size_t k = other.size(); k-- > 0;) {
        if (claims.claim(other[k])) return other[k];
      }
    }
    return -1;
  };
  // Inside another parallel region at::parallel_for runs the whole range on one thread.
  // A call whose tasks are all mirrored sizes each worker's workspace for two row groups alone.
  int64_t workspace_floats = Task::workspace_floats(p, g);
  if constexpr (!kBackward) {
    const bool all_mirrored = std::all_of(pieces.begin(), pieces.end(), [](const Piece& x) { return x.c1 > 0; });
    if (all_mirrored) workspace_floats = Task::mirrored_workspace_floats(p, g);
  }
  at::parallel_for(0, workers, 1, [&](int64_t w0, int64_t w1) {
    Workspace ws(Workspace::bytes_for(workspace_floats));
    for (int64_t w = w0; w < w1; ++w) {
      const std::vector<int64_t>& list = lists[w];
      auto task = [&](int64_t t) { return Task(p, g, ws, pieces[t].b, pieces[t].h); };
      size_t next = claims.next_unclaimed(list, 0);
      if (next < list.size()) task(list[next]).prefetch_inputs();
      for (;;) {
        int64_t t = -1;
        while (next < list.size() && t < 0) {
          if (claims.claim(list[next])) t = list[next];
          next = claims.next_unclaimed(list, next + 1);
        }
        if (t < 0) {
          if ((t = steal(w)) < 0) break;
          if (p.schedule != nullptr) p.schedule->taken[w] += 1;
        }
        if (next < list.size()) task(list[next]).prefetch_inputs();
        ws.reset();
        const Piece& piece = pieces[t];
        Task head = task(t);
        if constexpr (kBackward) {
          head.run(piece.r0, piece.r1, slices.of(t));
        } else if (piece.c1 > 0) {
          const auto [side_a, side_b] = folds.open(piece, t);
          head.run_mirrored(piece.r0, piece.r1, piece.c0, piece.c1, side_a, side_b);
          folds.close(piece, t, [&](int64_t k, const RowState& acc) {
            const MirrorGroup& group = mirror_groups_of_call[k];
            ws.reset();
            Task(p, g, ws, group.b, group.h).write_mirrored(group.r0, group.r1, acc);
          });
        } else {
          head.run(piece.r0, piece.r1);
        }
      }
    }
  });
  if constexpr (kBackward) {
    const auto& groups = slices.groups();
    at::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t k0, int64_t k1) {
      Workspace ws(Workspace::bytes_for(0));
      for (int64_t k = k0; k < k1; ++k) {
        Task(p, g, ws, groups[k].b, groups[k].h).reduce(slices.first(groups[k]), groups[k].count);
      }
    });
  }
}

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace symattn::cpu
