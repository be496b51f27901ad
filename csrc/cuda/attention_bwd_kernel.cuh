// Backward of symmetric attention (math: attention_fwd_kernel.cuh), sm_80+, WMMA, fp32
// accumulation. With Q = Y M, P recomputed from the saved lse, keep-scaled Pd = P * keep * keep_scale:
//
//   dP = (dO V^T) * keep * keep_scale,  G = P * (dP - delta),  delta = rowsum(dO * O) - dlse
//   dY = scale * (G Y M^T + G^T Y M)  (+ Pd^T dO when V = Y),   dV = Pd^T dO
//   dM = scale * Y^T G Y  (diagonal only for a diagonal M)
//
// Owner-block layout, no atomics: CTA (J, b * H + h) owns token block J in all its roles. One
// loop over the blocks K visits, per K, the tile (rows J, keys K) for the query role of J and
// the tile (rows K, keys J) for its key and value roles; both tiles use the Y_K, dO_K (and V_K)
// loaded once. The roles sum in shared memory and dY is written once. dcoef goes out as one
// partial per owner block, summed by the caller in a fixed order.
#pragma once

#include "tile_common.cuh"

namespace symattn {
namespace dev {

template <int HD>
struct BwdConfig {
  static constexpr int kBlock = HD <= 32 ? 64 : (HD <= 128 ? 32 : 16);
  static constexpr int kWarps = 4;
};

template <typename T, int HD, bool SHARED>
struct BwdSmem {
  static constexpr int B = BwdConfig<HD>::kBlock;
  static constexpr int kTile = align128(B * pitch_h<T>(HD) * sizeof(T));
  static constexpr int kAcc = align128(B * pitch_f(HD) * sizeof(float));
  // Y_J, Q_J, dO_J, V_J, Y_K, Q_K, dO_K, V_K (V tiles only with a separate V)
  static constexpr int kTiles = 0;
  static constexpr int kS = kTiles + (SHARED ? 6 : 8) * kTile;
  static constexpr int kDP = kS + align128(B * pitch_f(B) * sizeof(float));
  static constexpr int kG = kDP + align128(B * pitch_f(B) * sizeof(float));
  static constexpr int kPd = kG + align128(B * pitch_h<T>(B) * sizeof(T));
  static constexpr int kDQ = kPd + align128(B * pitch_h<T>(B) * sizeof(T));
  static constexpr int kDK = kDQ + kAcc;
  static constexpr int kDV = kDK + kAcc;
  static constexpr int kRows = kDV + (SHARED ? 0 : kAcc);  // lse2 / delta / real of J and K
  static constexpr int kScratch = kRows + align128(6 * B * sizeof(float));
  static constexpr int kBytes = kScratch + 128;
};

// delta[b, h, i] = rowsum(dO * O) - dlse, float32 [B, H, seqlen]: one warp per row.
template <typename T>
__global__ void attention_bwd_delta_kernel(const CudaBackwardParams p) {
  const int bh = p.bh_offset + blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const SeqInfo seq = sequence_info(p.cu_seqlens, b, p.seqlen);
  const int i = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (i >= seq.len) return;
  const T* dout = static_cast<const T*>(p.dout) + row_offset(p.dout_st, b, seq, i, h);
  const T* out = static_cast<const T*>(p.out) + row_offset(p.out_st, b, seq, i, h);
  const int dv = p.v == nullptr ? p.head_dim : p.value_dim;
  float acc = 0.0f;
  for (int c = lane; c < dv; c += 32) acc += to_float(dout[c]) * to_float(out[c]);
  write_delta(p, acc, bh, b, seq, i, h);
}

// Per-element pass of one tile (rows r0.., keys c0..): sS = scores, sDP = dO V^T in, writes
// sG = scale * G and sPd = Pd (T). rows_*: lse2 (base-2 lse) / delta / real of the tile's rows
// and real of its keys.
template <typename T, int B>
__device__ __forceinline__ void grad_tile(const CudaBackwardParams& p, int cls, int b, int h, int r0, int c0,
                                          const SeqInfo& seq, const KeyInfo& keys, const float* sS, const float* sDP,
                                          T* sG, T* sPd, const float* row_lse2, const float* row_delta,
                                          const float* row_real, const float* key_real) {
  constexpr int PS = pitch_f(B), PG = pitch_h<T>(B);
  const float score_scale = p.scale * kLog2e;
  const bool dropout = p.keep_threshold != 0;
  const uint32_t threshold = p.keep_threshold;
  const float keep_scale = p.keep_scale;
  for (int idx = threadIdx.x; idx < B * B; idx += blockDim.x) {
    const int r = idx / B, c = idx % B, i = r0 + r, j = c0 + c;
    float prob = 0.0f, g = 0.0f, pd = 0.0f;
    const bool live = row_lse2[r] != kNegInf &&
                      (cls == kTileFull ||
                       element_allowed(i, j, p.causal, p.exclude_self, keys, row_real[r] != 0.0f, key_real[c] != 0.0f));
    if (live) {
      prob = fast_exp2(sS[r * PS + c] * score_scale - row_lse2[r]);
      float ks = keep_scale;
      if (dropout &&
          !dropout_keep(p.seed, threshold, h, p.n_rows, global_row(p.cu_seqlens, b, p.seqlen, i), p.key_stride, j)) {
        ks = 0.0f;
      }
      pd = prob * ks;
      g = prob * (sDP[r * PS + c] * ks - row_delta[r]);
    }
    sG[r * PG + c] = from_float<T>(p.scale * g);
    sPd[r * PG + c] = from_float<T>(pd);
  }
}

template <typename T, int HD, bool SHARED>
__global__ void __launch_bounds__(BwdConfig<HD>::kWarps * 32, 1)
    attention_bwd_kernel(const CudaBackwardParams p) {
  using L = BwdSmem<T, HD, SHARED>;
  constexpr int B = BwdConfig<HD>::kBlock;
  constexpr int PH = pitch_h<T>(HD), PS = pitch_f(B), PG = pitch_h<T>(B), PA = pitch_f(HD);
  extern __shared__ __align__(128) unsigned char smem[];
  auto tile = [&](int k) { return reinterpret_cast<T*>(smem + L::kTiles + k * L::kTile); };
  T* sYJ = tile(0);
  T* sQJ = tile(1);
  T* sdOJ = tile(2);
  T* sYK = tile(3);
  T* sQK = tile(4);
  T* sdOK = tile(5);
  T* sVJ = SHARED ? sYJ : tile(6);
  T* sVK = SHARED ? sYK : tile(7);
  float* sS = reinterpret_cast<float*>(smem + L::kS);
  float* sDP = reinterpret_cast<float*>(smem + L::kDP);
  T* sG = reinterpret_cast<T*>(smem + L::kG);
  T* sPd = reinterpret_cast<T*>(smem + L::kPd);
  float* sDQ = reinterpret_cast<float*>(smem + L::kDQ);  // dQ = scale * G Y, query operand grad
  float* sDK = reinterpret_cast<float*>(smem + L::kDK);  // key role (+ value role in shared mode)
  float* sDV = SHARED ? sDK : reinterpret_cast<float*>(smem + L::kDV);
  float* sRows = reinterpret_cast<float*>(smem + L::kRows);
  float *lseJ = sRows, *deltaJ = sRows + B, *realJ = sRows + 2 * B;
  float *lseK = sRows + 3 * B, *deltaK = sRows + 4 * B, *realK = sRows + 5 * B;
  int* sScratch = reinterpret_cast<int*>(smem + L::kScratch);

  const int bh = p.bh_offset + blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const SeqInfo seq = sequence_info(p.cu_seqlens, b, p.seqlen);
  const int j0 = blockIdx.x * B;
  if (j0 >= seq.len) return;  // its dcoef partial stays zero (the caller zero-fills)
  const KeyInfo keys = key_info(p.key_padding_mask, b, p.seqlen, seq.len, sScratch);
  const T* q = static_cast<const T*>(p.q);
  const T* v = SHARED ? q : static_cast<const T*>(p.v);
  const T* dout = static_cast<const T*>(p.dout);
  const int dv = SHARED ? p.head_dim : p.value_dim;

  auto load_rows = [&](int t0, float* lse2, float* delta, float* real) {
    for (int r = threadIdx.x; r < B; r += blockDim.x) {
      const int t = t0 + r;
      const bool in = t < seq.len;
      lse2[r] = in ? p.lse[row_offset(p.lse_st, b, seq, t, h)] * kLog2e : kNegInf;
      delta[r] = in ? p.delta[static_cast<int64_t>(bh) * p.seqlen + t] : 0.0f;
      real[r] = in && (p.key_padding_mask == nullptr || p.key_padding_mask[static_cast<int64_t>(b) * p.seqlen + t]);
    }
  };
  auto load_block = [&](int t0, T* sy, T* sq, T* sdo, T* sv, float* scratch) {
    load_tile<T, B, HD>(sy, q, p.q_st, b, seq, h, t0, p.head_dim, p.key_padding_mask, p.seqlen);
    load_tile<T, B, HD>(sq, q, p.q_st, b, seq, h, t0, p.head_dim, p.key_padding_mask, p.seqlen);
    load_tile<T, B, HD>(sdo, dout, p.dout_st, b, seq, h, t0, dv);
    if (!SHARED) load_tile<T, B, HD>(sv, v, p.v_st, b, seq, h, t0, p.value_dim, p.key_padding_mask, p.seqlen);
    __syncthreads();
    apply_coef<T, B, HD>(sq, scratch, p.coef, p.coef_mode, h, p.head_dim);
  };

  load_rows(j0, lseJ, deltaJ, realJ);
  load_block(j0, sYJ, sQJ, sdOJ, sVJ, sDQ);
  __syncthreads();
  for (int idx = threadIdx.x; idx < B * PA; idx += blockDim.x) {
    sDQ[idx] = 0.0f;
    sDK[idx] = 0.0f;
    if (!SHARED) sDV[idx] = 0.0f;
  }

  const int n_blocks = cdiv(seq.len, B);
  for (int kb = 0; kb < n_blocks; ++kb) {
    const int k0 = kb * B;
    __syncthreads();
    // Real-key flags of the two key ranges: K for tile A, J for tile B.
    bool realk = false, realj = false;
    if (threadIdx.x < B) {
      const int tk = k0 + threadIdx.x, tj = j0 + threadIdx.x;
      realk = tk < seq.len && (p.key_padding_mask == nullptr || p.key_padding_mask[static_cast<int64_t>(b) * p.seqlen + tk]);
      realj = tj < seq.len && (p.key_padding_mask == nullptr || p.key_padding_mask[static_cast<int64_t>(b) * p.seqlen + tj]);
    }
    const bool ink = threadIdx.x < B && k0 + static_cast<int>(threadIdx.x) < seq.len;
    const bool inj = threadIdx.x < B && j0 + static_cast<int>(threadIdx.x) < seq.len;
    const bool k_all = __syncthreads_and(!ink || realk), k_any = __syncthreads_or(ink && realk);
    const bool j_all = __syncthreads_and(!inj || realj), j_any = __syncthreads_or(inj && realj);
    const int cls_a = classify_tile(j0, B, k0, B, p.causal, p.exclude_self, seq.len, k_all, !k_any);
    const int cls_b = classify_tile(k0, B, j0, B, p.causal, p.exclude_self, seq.len, j_all, !j_any);
    if (cls_a == kTileMasked && cls_b == kTileMasked) continue;
    load_rows(k0, lseK, deltaK, realK);
    load_block(k0, sYK, sQK, sdOK, sVK, sS);  // sS is free: scratch for a full coef
    __syncthreads();
    if (cls_a != kTileMasked) {  // rows J, keys K: query role of J
      mma_tile<T, B, B, HD, false, true, false>(sS, PS, sQJ, PH, sYK, PH);    // Q_J Y_K^T
      mma_tile<T, B, B, HD, false, true, false>(sDP, PS, sdOJ, PH, sVK, PH);  // dO_J V_K^T
      __syncthreads();
      grad_tile<T, B>(p, cls_a, b, h, j0, k0, seq, keys, sS, sDP, sG, sPd, lseJ, deltaJ, realJ, realK);
      __syncthreads();
      mma_tile<T, B, HD, B, false, false, true>(sDQ, PA, sG, PG, sYK, PH);  // dQ_J += scale G Y_K
      __syncthreads();
    }
    if (cls_b != kTileMasked) {  // rows K, keys J: key and value roles of J
      mma_tile<T, B, B, HD, false, true, false>(sS, PS, sQK, PH, sYJ, PH);    // Q_K Y_J^T
      mma_tile<T, B, B, HD, false, true, false>(sDP, PS, sdOK, PH, sVJ, PH);  // dO_K V_J^T
      __syncthreads();
      grad_tile<T, B>(p, cls_b, b, h, k0, j0, seq, keys, sS, sDP, sG, sPd, lseK, deltaK, realK, realJ);
      __syncthreads();
      mma_tile<T, B, HD, B, true, false, true>(sDK, PA, sG, PG, sQK, PH);   // += scale G^T Q_K
      __syncthreads();
      mma_tile<T, B, HD, B, true, false, true>(sDV, PA, sPd, PG, sdOK, PH);  // += Pd^T dO_K
    }
  }
  __syncthreads();

  // dY_J = dQ_J M^T + dK_J (+ dV_J in shared mode, already in sDK); dcoef partial from dQ_J.
  const int d = p.head_dim;
  const int64_t block_id = static_cast<int64_t>(bh) * p.n_blocks + blockIdx.x;
  T* dq = static_cast<T*>(p.dq);
  for (int idx = threadIdx.x; idx < B * HD; idx += blockDim.x) {
    const int r = idx / HD, c = idx % HD, t = j0 + r;
    if (t >= seq.len || c >= d) continue;
    float g = sDK[r * PA + c];
    if (p.coef_mode == CudaCoef::kNone) {
      g += sDQ[r * PA + c];
    } else if (p.coef_mode == CudaCoef::kDiag) {
      g += sDQ[r * PA + c] * p.coef[static_cast<int64_t>(h) * d + c];
    } else {
      const float* ch = p.coef + static_cast<int64_t>(h) * d * d + static_cast<int64_t>(c) * d;
      for (int e = 0; e < d; ++e) g += sDQ[r * PA + e] * ch[e];
    }
    dq[row_offset(p.dq_st, b, seq, t, h) + c] = from_float<T>(g);
  }
  if (!SHARED) {
    T* dvp = static_cast<T*>(p.dv);
    for (int idx = threadIdx.x; idx < B * HD; idx += blockDim.x) {
      const int r = idx / HD, c = idx % HD, t = j0 + r;
      if (t < seq.len && c < p.value_dim) dvp[row_offset(p.dv_st, b, seq, t, h) + c] = from_float<T>(sDV[r * PA + c]);
    }
  }
  if (p.dcoef_partial != nullptr && p.coef_mode == CudaCoef::kDiag) {
    for (int c = threadIdx.x; c < d; c += blockDim.x) {
      float acc = 0.0f;
      for (int r = 0; r < B; ++r) acc += to_float(sYJ[r * PH + c]) * sDQ[r * PA + c];
      p.dcoef_partial[block_id * d + c] = acc;
    }
  } else if (p.dcoef_partial != nullptr && p.coef_mode == CudaCoef::kFull) {
    for (int idx = threadIdx.x; idx < d * d; idx += blockDim.x) {
      const int c = idx / d, e = idx % d;
      float acc = 0.0f;
      for (int r = 0; r < B; ++r) acc += to_float(sYJ[r * PH + c]) * sDQ[r * PA + e];
      p.dcoef_partial[block_id * d * d + idx] = acc;
    }
  }
}

}  // namespace dev
}  // namespace symattn
