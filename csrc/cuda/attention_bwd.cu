// Launchers of the CUDA attention backward (kernels and math: attention_bwd_kernel.cuh):
// the delta preprocess, then the owner-block kernel. Torch-free.
#include "attention_bwd_kernel.cuh"
#include "attention_fwd_kernel.cuh"

namespace symattn {
namespace {

// Widest head dim whose delta reads the saved O, rounded to the input dtype. With q = k a token's
// self-score dominates its row, and G_ii = P_ii (dP_ii - delta_i) carries the rounding of O into
// the gradients: from head dim 224 in bf16 that fails flash-attn's error rule. Wider heads
// recompute the forward and take delta from its fp32 O (one more pass over the scores).
constexpr int kRoundedDeltaMaxHeadDim = 128;

template <typename T, int HD, bool SHARED>
cudaError_t launch_delta(const CudaBackwardParams& p, cudaStream_t stream) {
  if constexpr (HD > kRoundedDeltaMaxHeadDim) {
    using C = dev::FwdConfig<HD>;
    constexpr int kSmem = dev::FwdSmem<T, HD, SHARED>::kBytes;
    auto kernel = dev::attention_fwd_kernel<T, HD, SHARED>;
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
    if (err != cudaSuccess) return err;
    // p.delta is set, so the forward writes delta, not out and lse.
    return launch_row_chunks(p, [&](const CudaBackwardParams& chunk, int rows) {
      kernel<<<dim3(cdiv(p.seqlen, C::kBlockM), rows), C::kWarps * 32, kSmem, stream>>>(chunk);
    });
  } else {
    return launch_row_chunks(p, [&](const CudaBackwardParams& chunk, int rows) {
      dev::attention_bwd_delta_kernel<T><<<dim3(cdiv(p.seqlen, 4), rows), 128, 0, stream>>>(chunk);
    });
  }
}

template <typename T, int HD, bool SHARED>
cudaError_t launch_bwd(const CudaBackwardParams& p, cudaStream_t stream) {
  using C = dev::BwdConfig<HD>;
  constexpr int kSmem = dev::BwdSmem<T, HD, SHARED>::kBytes;
  if (p.batch * p.heads == 0 || p.seqlen == 0) return cudaSuccess;
  cudaError_t err = launch_delta<T, HD, SHARED>(p, stream);
  if (err != cudaSuccess) return err;
  auto kernel = dev::attention_bwd_kernel<T, HD, SHARED>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  return launch_row_chunks(p, [&](const CudaBackwardParams& chunk, int rows) {
    kernel<<<dim3(cdiv(p.seqlen, C::kBlock), rows), C::kWarps * 32, kSmem, stream>>>(chunk);
  });
}

template <typename T, bool SHARED>
cudaError_t dispatch_dim(const CudaBackwardParams& p, cudaStream_t stream) {
  const int d = p.head_dim > p.value_dim ? p.head_dim : p.value_dim;
  if (d <= 32) return launch_bwd<T, 32, SHARED>(p, stream);
  if (d <= 64) return launch_bwd<T, 64, SHARED>(p, stream);
  if (d <= 128) return launch_bwd<T, 128, SHARED>(p, stream);
  if (d <= kMaxHeadDim) return launch_bwd<T, 256, SHARED>(p, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t dispatch_mode(const CudaBackwardParams& p, cudaStream_t stream) {
  return p.v == nullptr ? dispatch_dim<T, true>(p, stream) : dispatch_dim<T, false>(p, stream);
}

}  // namespace

int attention_bwd_block_cuda(int head_dim) {
  if (head_dim <= 32) return dev::BwdConfig<32>::kBlock;
  if (head_dim <= 128) return dev::BwdConfig<128>::kBlock;
  return dev::BwdConfig<256>::kBlock;
}

cudaError_t attention_bwd_cuda(const CudaBackwardParams& p, cudaStream_t stream) {
  return p.dtype == CudaDType::kBFloat16 ? dispatch_mode<__nv_bfloat16>(p, stream) : dispatch_mode<__half>(p, stream);
}

}  // namespace symattn
