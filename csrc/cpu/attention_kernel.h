// Fused CPU forward and backward of symmetric / shared-weight attention.
//
// Per sequence b and head h, with Y = q[b, :, h] ([L, D]) and M = I | diag(c_h) | C_h:
//
//   Qm = Y M                        S = scale Qm Y^T (+ mask)  P = softmax_rows(S)
//   out = dropout(P) V              lse = logsumexp_rows(S)    V = Y (shared) or v[b, :, h]
//   G  = P * (dP - delta),  dP = dout V^T * keep * keep_scale, delta = rowsum(P * dP) - dlse
//   dY = scale (G Y M^T + G^T Qm)  (+ Pd^T dout when V = Y)    dV = Pd^T dout
//   dM = scale Y^T G Y             (its diagonal for a diagonal M)
//
// A task reads its (b, h)'s Y once into operand panels (Y^T for the score products, Qm for the
// query side; in shared mode the same panels serve as keys and values) and walks query rows in
// blocks. A forward task owns a fixed slice of a head's query rows (a whole head up to a few
// hundred tokens), so one long head runs on many cores. Heads up to kWholeHead tokens keep whole
// score rows [block, L] in cache; longer ones run flash-style: a query block meets the keys one
// tile at a time (dropout drawn per tile), its row max and sum updated online and its output
// block rescaled, so the working set stays in L2 at any length. Where their scores are
// symmetric, the forward is mirrored instead: a task owns a pair of row groups of the head and
// multiplies each score tile between them once, for the rows of both groups (one read across,
// one down its columns); each group folds its tasks' running states in a fixed order as they
// finish (run_mirrored, MirrorFolds; not on AMX tiles, where that merge and the per-task packing cost
// what the products save, see kMirrorTile). Their backward, wherever M is symmetric (none or
// diagonal; any dtype, causal or not, with or without dropout), cuts a head into row blocks and
// computes each score tile S_IJ (I >= J) once, in one task that takes both of its roles: S_JI =
// S_IJ^T, so the tile gives the gradients of rows I and of rows J (pair_tile). Such a task writes
// two blocks' accumulators, so the tasks run in rounds in which no block meets two of them
// (tiled_backward), and every block takes its tiles in round order. Other backward tasks (a full
// M) own a whole head, or, when a call has few heads, a slice of a long head's query rows; they
// accumulate their gradients in fp32 buffers, and a head's slices are summed in slice order
// afterwards.
// Results are independent of the thread count: the tasks are cut without regard to it, and each
// output element is produced by one task, or one fixed-order sum of tasks. The tasks are dealt
// to the workers before any runs, and a worker that has nothing of its own to run takes what
// another has not reached (for_each_head, tiled_backward): which worker runs a task never changes
// what it computes.
//
// For heads of at most kWholeHead tokens, non-causal, with M symmetric (none / diagonal) and
// at most a quarter of trailing padded keys, the score matrix is symmetric: only its lower tile
// triangle is multiplied, and the backward's two Y-gradient products G (Y M) + G^T (Y M) collapse
// into one (G + G^T) Y M. That is 1.5 instead of 2 L^2 D products forward, 3.5 instead of 5
// backward; the mirrored forward of longer heads does the same 1.5. The backward, and the forward
// on bf16 operands, mirror the lower triangle into the upper one (transposed copies); the fp32
// forward reads a row's keys beyond its diagonal tile down the stored tiles' columns instead, and
// feeds those probabilities to P V as P^T (run_symmetric), with dropout their keep bits
// transposed.
// Other heads take query blocks against keys up to the last real one, with causal blocks (and
// the diagonal tiles of causal heads) trimmed at micro-tile granularity.
//
// Every product is a register-tiled micro-kernel on at::vec (no BLAS call inside the parallel
// region, so nothing depends on a BLAS library's threading), accumulating in fp32. Its operand
// format is a template parameter (FloatDot, Bf16Dot in attention_gemm.h): fp32 operands with one
// FMA per element, or, for bfloat16 inputs where the CPU has AVX512-BF16, bf16 pairs on vdpbf16ps
// with P and G rounded to bf16 as flash-attn does on GPUs. fp16 inputs are widened to fp32.
// Where the CPU has AMX-BF16, the AVX512_AMX build runs the same bf16 products on AMX tiles
// (amx_gemm.h).
//
// This header is compiled once per instruction set (attention_cpu.cpp for DEFAULT,
// attention_cpu_avx2.cpp, attention_cpu_avx512.cpp, and attention_cpu_avx512_bf16.cpp and
// attention_cpu_avx512_amx.cpp for bfloat16 only), each time in its own CPU_CAPABILITY
// namespace; everything but the two entry points has internal linkage. Its parts, each including
// the one before it, follow the data path: attention_tiling.h (tile, block and task sizes),
// attention_gemm.h (operand formats and the micro-kernel), attention_rows.h (exponentials,
// maxima, dropout bits, transposes), attention_head.h (workspace, Geometry, Head: a head's
// packed panels), attention_forward.h and attention_backward.h (the two task classes), and
// attention_schedule.h (planning, dealing and running a call's tasks, with in_order.h, the
// fixed-order fold it shares with the LAMA kernel); this file holds the
// entry points.
#pragma once

#include "attention_schedule.h"

namespace symattn::cpu {
namespace CPU_CAPABILITY {

#if defined(SYMATTN_BF16_DOT)
// This build holds only the bfloat16 kernels (vdpbf16ps); attention_cpu.cpp sends the other
// dtypes to the AVX512 build.
void attention_forward(const ForwardParams& p) {
  TORCH_INTERNAL_ASSERT(p.dtype == DType::kBFloat16, "symattn: the AVX512_BF16 kernels take bfloat16 only");
  for_each_head<ForwardHead<c10::BFloat16>>(p);
}

void attention_backward(const BackwardParams& p) {
  TORCH_INTERNAL_ASSERT(p.dtype == DType::kBFloat16, "symattn: the AVX512_BF16 kernels take bfloat16 only");
  for_each_head<BackwardHead<c10::BFloat16>>(p);
}
#else
void attention_forward(const ForwardParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: for_each_head<ForwardHead<float>>(p); break;
    case DType::kBFloat16: for_each_head<ForwardHead<c10::BFloat16>>(p); break;
    case DType::kFloat16: for_each_head<ForwardHead<c10::Half>>(p); break;
  }
}

void attention_backward(const BackwardParams& p) {
  switch (p.dtype) {
    case DType::kFloat32: for_each_head<BackwardHead<float>>(p); break;
    case DType::kBFloat16: for_each_head<BackwardHead<c10::BFloat16>>(p); break;
    case DType::kFloat16: for_each_head<BackwardHead<c10::Half>>(p); break;
  }
}
#endif

}  // namespace CPU_CAPABILITY
}  // namespace symattn::cpu
