// Launcher of the CUDA attention forward (kernel and math: attention_fwd_kernel.cuh). Torch-free:
// pointers, strides, sizes and a stream in, a cudaError_t out.
#include "attention_fwd_kernel.cuh"

namespace symattn {
namespace {

template <typename T, int HD, bool SHARED>
cudaError_t launch_fwd(const CudaForwardParams& p, cudaStream_t stream) {
  using C = dev::FwdConfig<HD>;
  constexpr int kSmem = dev::FwdSmem<T, HD, SHARED>::kBytes;
  auto kernel = dev::attention_fwd_kernel<T, HD, SHARED>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  if (err != cudaSuccess) return err;
  const int blocks = cdiv(p.seqlen, C::kBlockM);
  if (blocks == 0) return cudaSuccess;
  return launch_row_chunks(p, [&](const CudaForwardParams& chunk, int rows) {
    kernel<<<dim3(blocks, rows), C::kWarps * 32, kSmem, stream>>>(chunk);
  });
}

template <typename T, bool SHARED>
cudaError_t dispatch_dim(const CudaForwardParams& p, cudaStream_t stream) {
  const int d = p.head_dim > p.value_dim ? p.head_dim : p.value_dim;
  if (d <= 32) return launch_fwd<T, 32, SHARED>(p, stream);
  if (d <= 64) return launch_fwd<T, 64, SHARED>(p, stream);
  if (d <= 128) return launch_fwd<T, 128, SHARED>(p, stream);
  if (d <= kMaxHeadDim) return launch_fwd<T, 256, SHARED>(p, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t dispatch_mode(const CudaForwardParams& p, cudaStream_t stream) {
  return p.v == nullptr ? dispatch_dim<T, true>(p, stream) : dispatch_dim<T, false>(p, stream);
}

}  // namespace

cudaError_t attention_fwd_cuda(const CudaForwardParams& p, cudaStream_t stream) {
  return p.dtype == CudaDType::kBFloat16 ? dispatch_mode<__nv_bfloat16>(p, stream) : dispatch_mode<__half>(p, stream);
}

}  // namespace symattn
