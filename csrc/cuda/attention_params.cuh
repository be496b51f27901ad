// Arguments of the CUDA attention kernels as raw pointers, element strides and sizes (no torch
// types), filled by binding.cpp. Layouts follow csrc/cpu/attention_params.h: q / v / out / dout /
// dq / dv are [B, S, H, X] (padded) or [total, H, X] (varlen, batch stride 0); lse, delta and
// dlse are float32 [B, H, S] or [H, total].
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include "attention_rules.cuh"

namespace symattn {

enum class CudaDType : int { kFloat16 = 0, kBFloat16 = 1 };
enum class CudaCoef : int { kNone = 0, kDiag = 1, kFull = 2 };

struct CudaForwardParams {
  CudaDType dtype = CudaDType::kFloat16;
  int batch = 0;      // B, or number of sequences (varlen)
  int heads = 0;      // H
  int head_dim = 0;   // D
  int value_dim = 0;  // Dv (= D in shared mode)
  int seqlen = 0;     // S, or max_seqlen (varlen): the grid's rows
  int bh_offset = 0;  // first (sequence, head) of this launch: blockIdx.y is b * H + h - bh_offset
  int64_t n_rows = 0; // B * S, or total tokens: the dropout row count
  int64_t key_stride = 0;  // S, or total tokens (varlen, never the bound): the dropout key stride
  const int32_t* cu_seqlens = nullptr;  // [B + 1], or null for the padded layout

  const void* q = nullptr;
  RowStrides q_st{};
  const void* v = nullptr;  // null: shared mode, the values are q itself
  RowStrides v_st{};
  const float* coef = nullptr;  // float32 contiguous [H, D] (diag) or [H, D, D] (full)
  CudaCoef coef_mode = CudaCoef::kNone;
  const bool* key_padding_mask = nullptr;  // [B, S] contiguous, true = real token (padded only)

  float scale = 1.0f;
  bool causal = false;
  bool exclude_self = false;
  uint32_t keep_threshold = 0;  // dropout_threshold(dropout_p): 0 = no dropout
  float keep_scale = 1.0f;      // dropout_scale(keep_threshold)
  uint64_t seed = 0;

  void* out = nullptr;  // forward: written; backward: the saved output
  RowStrides out_st{};
  float* lse = nullptr;  // forward: written; backward: read
  RowStrides lse_st{};   // batch, token, head strides of lse

  // The backward's inputs of delta = rowsum(dO * O) - dlse. A forward launched with delta set
  // (the backward's recompute for wide heads) writes delta from its fp32 O instead of out / lse.
  const void* dout = nullptr;
  RowStrides dout_st{};
  const float* dlse = nullptr;  // null: no lse cotangent
  RowStrides dlse_st{};
  float* delta = nullptr;  // workspace, float32 contiguous [B, H, S] (S = seqlen, padded or max_seqlen)
};

struct CudaBackwardParams : CudaForwardParams {
  void* dq = nullptr;      // dY: written once, every role summed
  RowStrides dq_st{};
  void* dv = nullptr;      // separate-V mode only
  RowStrides dv_st{};
  // Workspace for dcoef: float32 [B, H, n_blocks, D] (diag) or [B, H, n_blocks, D, D] (full),
  // one partial per owner block, summed by the caller in a fixed order (no atomics).
  float* dcoef_partial = nullptr;
  int n_blocks = 0;  // cdiv(seqlen, attention_bwd_block_cuda(head dim))
};

// CUDA's grid axis y holds at most 65535 blocks, and the kernels put one (sequence, head) there
// each: a call with more (4096 packed sequences of 16 heads) launches in chunks of that many,
// each told its first row in bh_offset. Axis x keeps the token blocks, so the blocks that run
// together share a head's keys in L2. launch(params, rows) launches one chunk of `rows` rows.
constexpr int kMaxGridRows = 65535;

template <typename Params, typename Launch>
cudaError_t launch_row_chunks(Params p, Launch launch) {
  const int rows = p.batch * p.heads;
  for (int first = 0; first < rows; first += kMaxGridRows) {
    p.bh_offset = first;
    launch(p, rows - first < kMaxGridRows ? rows - first : kMaxGridRows);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// Kernel launchers (attention_fwd.cu / attention_bwd.cu). They return the launch error, if any.
// Supported: fp16 / bf16, max(D, Dv) <= 256, any sequence length.
cudaError_t attention_fwd_cuda(const CudaForwardParams& p, cudaStream_t stream);
cudaError_t attention_bwd_cuda(const CudaBackwardParams& p, cudaStream_t stream);
// Owner-block size of the backward for this max(D, Dv): sizes the dcoef workspace.
int attention_bwd_block_cuda(int head_dim);
constexpr int kMaxHeadDim = 256;

}  // namespace symattn
