// Sizes of the fused CPU attention kernels' micro-tiles, query and key blocks, tasks and
// mirrored tiles, per instruction set; every block size depends on the sequence length alone,
// never on the thread count. Part of attention_kernel.h (see its comment for the design).
#pragma once


#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <numeric>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(SYMATTN_BF16_DOT)
#include <immintrin.h>
#endif
#if defined(SYMATTN_BF16_PAIRS_ON_AVX2)
#include "bf16_pairs_avx2.h"
#endif
#if defined(SYMATTN_AMX_EMULATED)
#include "amx_emulated.h"
#endif
#if defined(SYMATTN_AMX_DOT)
#include "amx_gemm.h"
#endif

#include "attention_params.h"
#include "philox_vec.h"

namespace symattn::cpu {
namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kVec = Vec::size();
#if !defined(SYMATTN_AMX_DOT)
// A task's products hold no tile state where they don't run on AMX tiles (see amx_gemm.h).
struct AmxTileScope {
  AmxTileScope() {}  // user-provided: a scope object is not an unused variable
};
#endif
// Micro-tile: kMR rows x kNV vectors. AVX-512: 6 x 64 keeps 24 of 32 registers as accumulators;
// AVX2: 6 x 16 keeps 12 of 16. kMR is even so that query blocks start on a bf16 pair.
constexpr int kMR = 6;
constexpr int kNV = kVec >= 16 ? 4 : 2;
constexpr int64_t kNR = kNV * kVec;
static_assert(kMR % 2 == 0, "query blocks must start on an even row");
// Words of k per pass of a product (see gemm): [kDepth, kNR] of B fills 32 KiB, within L1.
constexpr int64_t kDepth = 128;
// Heads up to this length keep their whole fp32 score matrix (1 MiB) in one task.
constexpr int64_t kWholeHead = 512;
// Longer heads take query blocks of about kBlockFloats score floats, in whole steps of
// kBlockRowStep rows: the micro-tile height, or the 32 rows of an AMX block where the products run
// on tiles (a 6-row multiple leaves tiles part empty, and the backward's key-side products take
// the block's rows as k, 32 to a tile). On AMX tiles the symmetric schedule
// (see the file comment) is off: the products it halves cost less than the transposes it adds
// (the mirrored forward of longer heads is off there too, see kMirrorTile); so short heads take
// query blocks too, and smaller ones, whose score passes stay in L2.
// There, heads of kTiledBackwardFrom tokens or more also take the tiled backward of longer heads
// (pair_tile: 3.5 L^2 D products, against 5 for query blocks): paired one-thread runs, bf16, read
// 1.03-1.20x less time for forward+backward at 256-512 tokens and 0.92x at 128. Where the
// symmetric schedule is on it stays (fp32 at 512 tokens: equal; vdpbf16ps: 0.91-0.94x).
#if defined(SYMATTN_AMX_DOT)
constexpr int64_t kBlockFloats = int64_t{1} << 15;
constexpr int64_t kBlockRowStep = 32;
constexpr bool kSymmetricSchedule = false;
constexpr int64_t kTiledBackwardFrom = 256;
#else
constexpr int64_t kBlockFloats = int64_t{1} << 17;
constexpr int64_t kBlockRowStep = kMR;
constexpr bool kSymmetricSchedule = true;
constexpr int64_t kTiledBackwardFrom = kWholeHead + 1;
#endif
// A forward task owns at least this many query rows of a longer head (whole query blocks): enough
// rows that repacking the head's keys per task costs little, few enough that one head of a few
// thousand tokens feeds a dozen or more cores.
constexpr int64_t kTaskRows = 128;
// Tiled heads of more than kTaskRows * kTasksPerHead tokens take proportionally longer tasks (up
// to kMaxTaskRows rows), so that the L·D keys each task repacks stay a small share of its
// 4·rows·L·D multiply-adds while a head still feeds kTasksPerHead cores.
constexpr int64_t kTasksPerHead = 32;
constexpr int64_t kMaxTaskRows = 512;
#if defined(SYMATTN_AMX_DOT)
constexpr int64_t kForwardTasks = 64;
#endif
// The backward cuts long heads into slices until a call has about this many tasks.
constexpr int64_t kBackwardTasks = 32;
// The forward of long causal heads takes slices of whole query blocks, as few as give the call
// about this many tasks (whole blocks when it has fewer heads): each task packs the keys up to
// its last row once for all its blocks, so longer slices pack fewer keys over the head.
constexpr int64_t kCausalTasks = 64;
// Square tile of the symmetric score product and of its mirror.
constexpr int64_t kSymTile = 64;
// Longer heads run the forward flash-style: query blocks of kQueryTile rows
// against key tiles of kKeyTile keys, the row max and sum updated online, a task's rows in chunks
// of up to kMaxTaskRows that pack each key tile once, so that a worker's scores, output rows and
// current key/value tile stay in a core's L2 at any length.
constexpr int64_t kQueryTile = 128;
constexpr int64_t kKeyTile = 256;
// Where their scores are symmetric (M none or diagonal, not causal; not on AMX tiles) the
// forward is mirrored: a head is cut into groups of whole kQueryTile blocks, walked in square
// score tiles of up to kMirrorTile, and a task takes one pair of groups, so each off-diagonal
// score tile is multiplied once for both of its query blocks (see run_mirrored). With dropout,
// the tile read down its columns takes its queries' masks drawn by query and bit-transposed.
// The head takes as many groups (at most kMirrorGroups) as make about kMirrorTasks tasks in the
// call; a group folds its tasks' running states in as they finish and a head's tasks are dealt
// together (MirrorFolds), so a call holds L * (Dv + 2) floats for each head being run, and at
// most, were every task to finish ahead of one before it, groups * L * (Dv + 2) per head: a call
// where that would pass kMirrorStateBytes runs unmirrored. On AMX tiles it does not pay: there the products are about half the forward's
// time, and merging those states and packing per task cost as much as the quarter of them the
// mirror saves, even with the column side's product taken transposed (O_J^T += V_I^T P_IJ, the
// probabilities the B operand as computed down the tile), which needs no transpose of them.
constexpr int64_t kMirrorTile = 256;
constexpr int64_t kMirrorGroups = 8;
constexpr int64_t kMirrorTasks = 32;
constexpr int64_t kMirrorStateBytes = int64_t{128} << 20;
// The tiled backward cuts a head into blocks of kPairTile rows, or of kPairTileMin rows for heads
// under kPairBlocks * kPairTile tokens: a round of tiles (see tiled_backward) then still holds
// kPairBlocks / 2 tasks per head. Block sizes depend on the length alone, never on threads.
constexpr int64_t kPairTile = 128;
constexpr int64_t kPairTileMin = 64;
constexpr int64_t kPairBlocks = 16;
constexpr int64_t kUnbounded = std::numeric_limits<int64_t>::max() / 4;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace symattn::cpu
