// Forward of symmetric attention, FlashAttention-2 structure, sm_80+ (WMMA m16n16k16 on
// fp16 / bf16 tiles, fp32 accumulation). Per (batch b, head h), Y = q[b, :, h]:
//
//   S   = scale * (Y M) Y^T + mask          M = I | diag(coef[h]) | coef[h]
//   P   = softmax_rows(S)  (online, base 2: log2(e) is folded into the score scale)
//   out = dropout(P) V,    V = Y (shared mode) or v[b, :, h]
//   lse = logsumexp_rows(S) (natural log; -inf and out = 0 for a row with no allowed key)
//
// One CTA per (query block, b * H + h). The query operand Y_I M is formed once per CTA. In
// shared mode the key tile Y_J loaded for S also serves as the value tile: one read of Y per
// key block instead of two. Tiles are classified (attention_rules.cuh) so that fully masked key
// blocks are skipped and only partially masked ones are masked per element.
#pragma once

#include "tile_common.cuh"

namespace symattn {
namespace dev {

template <int HD>
struct FwdConfig {
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = HD <= 128 ? 64 : 32;
  static constexpr int kWarps = 4;
};

template <typename T, int HD, bool SHARED>
struct FwdSmem {
  using C = FwdConfig<HD>;
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + align128(C::kBlockM * pitch_h<T>(HD) * sizeof(T));
  static constexpr int kV = kK + align128(C::kBlockN * pitch_h<T>(HD) * sizeof(T));
  static constexpr int kS = kV + (SHARED ? 0 : align128(C::kBlockN * pitch_h<T>(HD) * sizeof(T)));
  static constexpr int kP = kS + align128(C::kBlockM * pitch_f(C::kBlockN) * sizeof(float));
  static constexpr int kO = kP + align128(C::kBlockM * pitch_h<T>(C::kBlockN) * sizeof(T));
  static constexpr int kRealQ = kO + align128(C::kBlockM * pitch_f(HD) * sizeof(float));
  static constexpr int kRealK = kRealQ + align128(C::kBlockM);
  static constexpr int kScratch = kRealK + align128(C::kBlockN);
  static constexpr int kBytes = kScratch + 128;
};

template <typename T, int HD, bool SHARED>
__global__ void __launch_bounds__(FwdConfig<HD>::kWarps * 32, 1)
    attention_fwd_kernel(const CudaForwardParams p) {
  using C = FwdConfig<HD>;
  using L = FwdSmem<T, HD, SHARED>;
  constexpr int BM = C::kBlockM, BN = C::kBlockN, NW = C::kWarps;
  constexpr int PH = pitch_h<T>(HD), PS = pitch_f(BN), PP = pitch_h<T>(BN), PO = pitch_f(HD);
  constexpr int ROWS_PER_WARP = BM / NW;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem + L::kQ);
  T* sK = reinterpret_cast<T*>(smem + L::kK);
  T* sV = SHARED ? sK : reinterpret_cast<T*>(smem + L::kV);
  float* sS = reinterpret_cast<float*>(smem + L::kS);
  T* sP = reinterpret_cast<T*>(smem + L::kP);
  float* sO = reinterpret_cast<float*>(smem + L::kO);
  bool* sRealQ = reinterpret_cast<bool*>(smem + L::kRealQ);
  bool* sRealK = reinterpret_cast<bool*>(smem + L::kRealK);
  int* sScratch = reinterpret_cast<int*>(smem + L::kScratch);

  const int bh = p.bh_offset + blockIdx.y, b = bh / p.heads, h = bh % p.heads;
  const SeqInfo seq = sequence_info(p.cu_seqlens, b, p.seqlen);
  const int m0 = blockIdx.x * BM;
  if (m0 >= seq.len) return;  // varlen grids are sized by max_seqlen
  const KeyInfo keys = key_info(p.key_padding_mask, b, p.seqlen, seq.len, sScratch);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const float score_scale = p.scale * kLog2e;
  const bool dropout = p.keep_threshold != 0;
  const uint32_t threshold = p.keep_threshold;
  const float keep_scale = p.keep_scale;
  const int dv = SHARED ? p.head_dim : p.value_dim;

  const T* q = static_cast<const T*>(p.q);
  load_tile<T, BM, HD>(sQ, q, p.q_st, b, seq, h, m0, p.head_dim, p.key_padding_mask, p.seqlen);
  for (int r = threadIdx.x; r < BM; r += blockDim.x) {
    const int i = m0 + r;
    sRealQ[r] = i < seq.len && (p.key_padding_mask == nullptr || p.key_padding_mask[static_cast<int64_t>(b) * p.seqlen + i]);
  }
  for (int idx = threadIdx.x; idx < BM * PO; idx += blockDim.x) sO[idx] = 0.0f;
  __syncthreads();
  apply_coef<T, BM, HD>(sQ, sO, p.coef, p.coef_mode, h, p.head_dim);
  for (int idx = threadIdx.x; idx < BM * PO; idx += blockDim.x) sO[idx] = 0.0f;

  SoftmaxRow rows[ROWS_PER_WARP];
#pragma unroll
  for (int k = 0; k < ROWS_PER_WARP; ++k) rows[k] = softmax_init();

  const int m_last = min(m0 + BM, seq.len) - 1;
  const int n_end = p.causal ? m_last + 1 : seq.len;
  for (int n0 = 0; n0 < n_end; n0 += BN) {
    __syncthreads();  // previous P V product done with sK / sV / sP
    bool real_j = false;
    if (threadIdx.x < BN) {
      const int j = n0 + threadIdx.x;
      real_j = j < seq.len && (p.key_padding_mask == nullptr || p.key_padding_mask[static_cast<int64_t>(b) * p.seqlen + j]);
      sRealK[threadIdx.x] = real_j;
    }
    const bool in_tile = threadIdx.x < BN && n0 + static_cast<int>(threadIdx.x) < seq.len;
    const bool all_real = __syncthreads_and(!in_tile || real_j);
    const bool any_real = __syncthreads_or(in_tile && real_j);
    const int cls = classify_tile(m0, BM, n0, BN, p.causal, p.exclude_self, seq.len, all_real, !any_real);
    if (cls == kTileMasked) continue;
    load_tile<T, BN, HD>(sK, q, p.q_st, b, seq, h, n0, p.head_dim, p.key_padding_mask, p.seqlen);
    if (!SHARED) {
      load_tile<T, BN, HD>(sV, static_cast<const T*>(p.v), p.v_st, b, seq, h, n0, p.value_dim, p.key_padding_mask,
                           p.seqlen);
    }
    __syncthreads();
    mma_tile<T, BM, BN, HD, false, true, false>(sS, PS, sQ, PH, sK, PH);  // [BM, BN] = (Y_I M) Y_J^T
    __syncthreads();
    // One warp per row: online-softmax update, P (dropped) into sP, rescale of the O row.
#pragma unroll
    for (int k = 0; k < ROWS_PER_WARP; ++k) {
      const int r = warp + k * NW, i = m0 + r;
      float s[BN / 32];
      float tile_max = kNegInf;
#pragma unroll
      for (int c = 0; c < BN / 32; ++c) {
        const int col = lane + 32 * c, j = n0 + col;
        float x = sS[r * PS + col] * score_scale;
        if (cls == kTilePartial &&
            !element_allowed(i, j, p.causal, p.exclude_self, keys, sRealQ[r], j < seq.len && sRealK[col])) {
          x = kNegInf;
        }
        s[c] = x;
        tile_max = fmaxf(tile_max, x);
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, off));
      const float alpha = softmax_rescale(rows[k], tile_max);
      const float shift = softmax_shift(rows[k].m);
      float sum = 0.0f;
#pragma unroll
      for (int c = 0; c < BN / 32; ++c) {
        const int col = lane + 32 * c;
        const float e = fast_exp2(s[c] - shift);  // exp2(-inf) = 0 for masked keys
        sum += e;
        float kept = e;
        if (dropout) {
          const int64_t row_id = global_row(p.cu_seqlens, b, p.seqlen, i);
          kept = dropout_keep(p.seed, threshold, h, p.n_rows, row_id, p.key_stride, n0 + col) ? e * keep_scale : 0.0f;
        }
        sP[r * PP + col] = from_float<T>(kept);
      }
#pragma unroll
      for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
      rows[k].l += sum;
      if (alpha != 1.0f) {
        for (int c = lane; c < HD; c += 32) sO[r * PO + c] *= alpha;
      }
    }
    __syncthreads();
    mma_tile<T, BM, HD, BN, false, false, true>(sO, PO, sP, PP, sV, PH);  // [BM, HD] += P V_J
  }
  __syncthreads();

  T* out = static_cast<T*>(p.out);
  const T* dout = static_cast<const T*>(p.dout);
#pragma unroll
  for (int k = 0; k < ROWS_PER_WARP; ++k) {
    const int r = warp + k * NW, i = m0 + r;
    if (i >= seq.len) continue;
    const float inv = softmax_inv_sum(rows[k]);
    if (p.delta != nullptr) {  // the backward's recompute: delta from the unrounded O
      const int64_t base = row_offset(p.dout_st, b, seq, i, h);
      float acc = 0.0f;
      for (int c = lane; c < dv; c += 32) acc += to_float(dout[base + c]) * (sO[r * PO + c] * inv);
      write_delta(p, acc, bh, b, seq, i, h);
      continue;
    }
    const int64_t base = row_offset(p.out_st, b, seq, i, h);
    for (int c = lane; c < dv; c += 32) out[base + c] = from_float<T>(sO[r * PO + c] * inv);
    if (lane == 0) p.lse[row_offset(p.lse_st, b, seq, i, h)] = softmax_lse(rows[k]);
  }
}

}  // namespace dev
}  // namespace symattn
