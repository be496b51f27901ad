// Device-side pieces shared by the forward and backward CUDA kernels: dtype conversions,
// zero-padded tile loads from strided [tokens, X] rows into shared memory, per-sequence key
// information, and WMMA (m16n16k16, fp32 accumulate) tile products over shared memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "attention_params.cuh"

namespace symattn {
namespace dev {

namespace wmma = nvcuda::wmma;

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Row i's delta = rowsum(dO * O) - dlse from one warp's partial sums acc (each lane's share of
// the row), into the backward's [B, H, S] workspace.
__device__ __forceinline__ void write_delta(const CudaForwardParams& p, float acc, int bh, int b, const SeqInfo& seq,
                                            int i, int h) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (threadIdx.x % 32 == 0) {
    if (p.dlse != nullptr) acc -= p.dlse[row_offset(p.dlse_st, b, seq, i, h)];
    p.delta[static_cast<int64_t>(bh) * p.seqlen + i] = acc;
  }
}

// Shared-memory row pitches (elements): WMMA wants ldm a multiple of 16 bytes; the padding
// also staggers banks.
template <typename T>
__host__ __device__ constexpr int pitch_h(int cols) { return cols + 8; }
__host__ __device__ constexpr int pitch_f(int cols) { return cols + 4; }

// Rows [t0, t0 + ROWS) of one (sequence, head) into dst[ROWS][pitch]: elements outside
// t < len or c < cols are zero, so padded rows and columns add nothing to any product. With a
// key padding mask kpm ([B, seqlen]), NaN/Inf stored in a masked token reads as zero: its zero
// weights would still multiply it (0 * NaN = NaN), and a padded query row feeds key gradients.
template <typename T, int ROWS, int COLS>
__device__ __forceinline__ void load_tile(T* dst, const T* src, const RowStrides& st, int b, const SeqInfo& s,
                                          int h, int t0, int cols, const bool* kpm = nullptr, int seqlen = 0) {
  constexpr int P = pitch_h<T>(COLS);
  for (int idx = threadIdx.x; idx < ROWS * COLS; idx += blockDim.x) {
    const int r = idx / COLS, c = idx % COLS;
    const int t = t0 + r;
    T val = from_float<T>(0.0f);
    if (t < s.len && c < cols) {
      val = src[row_offset(st, b, s, t, h) + c];
      if (kpm != nullptr && !kpm[static_cast<int64_t>(b) * seqlen + t] && !isfinite(to_float(val))) {
        val = from_float<T>(0.0f);
      }
    }
    dst[r * P + c] = val;
  }
}

// Number of real keys and the first real key of sequence b (KeyInfo, see attention_rules.cuh).
// Every thread of the block must call it; counts use shared-memory integer atomics
// (order-independent results).
__device__ __forceinline__ KeyInfo key_info(const bool* kpm, int b, int seqlen, int len, int* scratch) {
  if (kpm == nullptr) return KeyInfo{len, len, 0};
  if (threadIdx.x == 0) {
    scratch[0] = 0;
    scratch[1] = len;
  }
  __syncthreads();
  int count = 0, first = len;
  for (int j = threadIdx.x; j < len; j += blockDim.x) {
    if (kpm[static_cast<int64_t>(b) * seqlen + j]) {
      ++count;
      first = min(first, j);
    }
  }
  atomicAdd(&scratch[0], count);
  atomicMin(&scratch[1], first);
  __syncthreads();
  KeyInfo k{len, scratch[0], scratch[1]};
  __syncthreads();
  return k;
}

// C[M][N] (float, pitch ldc) = A[M][K] * B, by WMMA tiles spread over the block's warps.
// A_T: A stored transposed (A[m][k] at a[k * lda + m]); B_T: B stored as B^T (B[k][n] at
// b[n * ldb + k]). ACCUM: add to C instead of overwriting it.
template <typename T, int M, int N, int K, bool A_T, bool B_T, bool ACCUM>
__device__ __forceinline__ void mma_tile(float* c, int ldc, const T* a, int lda, const T* b, int ldb) {
  using LayoutA = typename std::conditional<A_T, wmma::col_major, wmma::row_major>::type;
  using LayoutB = typename std::conditional<B_T, wmma::col_major, wmma::row_major>::type;
  const int warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  for (int tile = warp; tile < (M / 16) * (N / 16); tile += n_warps) {
    const int tm = (tile / (N / 16)) * 16, tn = (tile % (N / 16)) * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    if (ACCUM) {
      wmma::load_matrix_sync(acc, c + tm * ldc + tn, ldc, wmma::mem_row_major);
    } else {
      wmma::fill_fragment(acc, 0.0f);
    }
#pragma unroll 2
    for (int k = 0; k < K; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LayoutA> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LayoutB> fb;
      wmma::load_matrix_sync(fa, A_T ? a + k * lda + tm : a + tm * lda + k, lda);
      wmma::load_matrix_sync(fb, B_T ? b + tn * ldb + k : b + k * ldb + tn, ldb);
      wmma::mma_sync(acc, fa, fb, acc);
    }
    wmma::store_matrix_sync(c + tm * ldc + tn, acc, ldc, wmma::mem_row_major);
  }
}

// Y M for the rows of sy (ROWS x HD, zero-padded), written back into sy in T; scratch is a
// ROWS x pitch_f(HD) float buffer. coef: [H, D] or [H, D, D] float32. Done once per tile.
template <typename T, int ROWS, int HD>
__device__ __forceinline__ void apply_coef(T* sy, float* scratch, const float* coef, CudaCoef mode, int h, int d) {
  constexpr int P = pitch_h<T>(HD), PF = pitch_f(HD);
  if (mode == CudaCoef::kNone) return;
  if (mode == CudaCoef::kDiag) {
    for (int idx = threadIdx.x; idx < ROWS * HD; idx += blockDim.x) {
      const int r = idx / HD, c = idx % HD;
      const float cv = c < d ? coef[static_cast<int64_t>(h) * d + c] : 0.0f;
      sy[r * P + c] = from_float<T>(to_float(sy[r * P + c]) * cv);
    }
    __syncthreads();
    return;
  }
  const float* ch = coef + static_cast<int64_t>(h) * d * d;
  for (int idx = threadIdx.x; idx < ROWS * HD; idx += blockDim.x) {
    const int r = idx / HD, e = idx % HD;
    float acc = 0.0f;
    if (e < d) {
      for (int k = 0; k < d; ++k) acc += to_float(sy[r * P + k]) * ch[k * d + e];
    }
    scratch[r * PF + e] = acc;
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < ROWS * HD; idx += blockDim.x) {
    const int r = idx / HD, c = idx % HD;
    sy[r * P + c] = from_float<T>(scratch[r * PF + c]);
  }
  __syncthreads();
}

__host__ __device__ constexpr int align128(int bytes) { return (bytes + 127) / 128 * 128; }

}  // namespace dev
}  // namespace symattn
