// The symattn_kernels._C_cuda extension: thin torch binding of the torch-free CUDA kernels
// (attention_fwd.cu / attention_bwd.cu). Declares and registers symattn::attention_fwd_cuda and
// symattn::attention_bwd_cuda (CUDA key); fake functions live in symattn_kernels/backends/cuda.py.
// Inputs: float16 / bfloat16, unit last stride, max(D, Dv) <= 256.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "attention_params.cuh"

extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace symattn {
namespace {

RowStrides rows_of(const at::Tensor& t, bool varlen) {
  TORCH_CHECK(t.stride(-1) == 1, "symattn CUDA kernels: tensors need a unit last stride");
  return varlen ? RowStrides{0, t.stride(0), t.stride(1)} : RowStrides{t.stride(0), t.stride(1), t.stride(2)};
}

RowStrides lse_of(const at::Tensor& t, bool varlen) {  // [B, H, S] or [H, total]
  return varlen ? RowStrides{0, t.stride(1), t.stride(0)} : RowStrides{t.stride(0), t.stride(2), t.stride(1)};
}

std::vector<at::Tensor> fill(CudaForwardParams& p, const at::Tensor& q, const std::optional<at::Tensor>& v,
                             const std::optional<at::Tensor>& coef, const std::optional<at::Tensor>& kpm,
                             const std::optional<at::Tensor>& cu_seqlens, std::optional<int64_t> seed, double scale,
                             bool causal, double dropout_p, bool exclude_self, int64_t max_seqlen) {
  std::vector<at::Tensor> keep;
  const bool varlen = cu_seqlens.has_value();
  TORCH_CHECK(q.is_cuda(), "symattn CUDA kernels: q must be a CUDA tensor");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "symattn CUDA kernels: q must be float16 or bfloat16, got ", q.scalar_type());
  p.dtype = q.scalar_type() == at::kBFloat16 ? CudaDType::kBFloat16 : CudaDType::kFloat16;
  p.heads = q.size(-2);
  p.head_dim = q.size(-1);
  p.value_dim = v.has_value() ? v->size(-1) : p.head_dim;
  TORCH_CHECK(std::max(p.head_dim, p.value_dim) <= kMaxHeadDim, "symattn CUDA kernels: head dims up to 256");
  p.q = q.data_ptr();
  p.q_st = rows_of(q, varlen);
  if (v.has_value()) {
    TORCH_CHECK(v->scalar_type() == q.scalar_type() && v->device() == q.device(), "symattn CUDA kernels: v must match q");
    p.v = v->data_ptr();
    p.v_st = rows_of(*v, varlen);
  }
  if (varlen) {
    const at::Tensor cu = cu_seqlens->to(at::kInt).contiguous();
    keep.push_back(cu);
    p.cu_seqlens = cu.data_ptr<int32_t>();
    p.batch = cu.numel() - 1;
    p.seqlen = max_seqlen;
    p.n_rows = q.size(0);
    p.key_stride = q.size(0);
  } else {
    p.batch = q.size(0);
    p.seqlen = q.size(1);
    p.n_rows = static_cast<int64_t>(p.batch) * p.seqlen;
    p.key_stride = p.seqlen;
  }
  if (coef.has_value()) {
    const at::Tensor c = coef->to(at::kFloat).contiguous();
    keep.push_back(c);
    p.coef = c.data_ptr<float>();
    p.coef_mode = c.dim() == 2 ? CudaCoef::kDiag : CudaCoef::kFull;
  }
  if (kpm.has_value()) {
    TORCH_CHECK(!varlen, "symattn CUDA kernels: key_padding_mask is not used with cu_seqlens");
    const at::Tensor m = kpm->to(at::kBool).contiguous();
    keep.push_back(m);
    p.key_padding_mask = m.data_ptr<bool>();
  }
  TORCH_CHECK(dropout_p == 0.0 || seed.has_value(), "symattn CUDA kernels: dropout needs a seed");
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.exclude_self = exclude_self;
  p.keep_threshold = dropout_threshold(dropout_p);
  p.keep_scale = p.keep_threshold != 0 ? static_cast<float>(dropout_scale(p.keep_threshold)) : 1.0f;
  p.seed = static_cast<uint64_t>(seed.value_or(0));
  return keep;
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda_impl(
    const at::Tensor& q, const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& coef,
    const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& cu_seqlens, std::optional<int64_t> seed,
    double scale, bool causal, double dropout_p, bool exclude_self, int64_t max_seqlen) {
  const c10::cuda::CUDAGuard guard(q.device());
  CudaForwardParams p;
  const auto keep = fill(p, q, v, coef, kpm, cu_seqlens, seed, scale, causal, dropout_p, exclude_self, max_seqlen);
  const bool varlen = cu_seqlens.has_value();
  auto out_shape = q.sizes().vec();
  out_shape.back() = p.value_dim;
  at::Tensor out = at::empty(out_shape, q.options());
  at::Tensor lse = varlen ? at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat))
                          : at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.out_st = rows_of(out, varlen);
  p.lse = lse.data_ptr<float>();
  p.lse_st = lse_of(lse, varlen);
  const cudaError_t err = attention_fwd_cuda(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "symattn attention_fwd_cuda: ", cudaGetErrorString(err));
  return {out, lse};
}

void attention_bwd_cuda_impl(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                             const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& coef,
                             const std::optional<at::Tensor>& kpm, const std::optional<at::Tensor>& cu_seqlens,
                             std::optional<int64_t> seed, const at::Tensor& out, const at::Tensor& lse,
                             const at::Tensor& dq, const std::optional<at::Tensor>& dv,
                             const std::optional<at::Tensor>& dcoef, double scale, bool causal, double dropout_p,
                             bool exclude_self, int64_t max_seqlen) {
  const c10::cuda::CUDAGuard guard(q.device());
  CudaBackwardParams p;
  auto keep = fill(p, q, v, coef, kpm, cu_seqlens, seed, scale, causal, dropout_p, exclude_self, max_seqlen);
  const bool varlen = cu_seqlens.has_value();
  TORCH_CHECK(dout.scalar_type() == q.scalar_type() && dq.scalar_type() == q.scalar_type(),
              "symattn CUDA kernels: dout and dq must have q's dtype");
  TORCH_CHECK(lse.scalar_type() == at::kFloat, "symattn CUDA kernels: lse must be float32");
  p.out = out.data_ptr();
  p.out_st = rows_of(out, varlen);
  p.lse = lse.data_ptr<float>();
  p.lse_st = lse_of(lse, varlen);
  p.dout = dout.data_ptr();
  p.dout_st = rows_of(dout, varlen);
  if (dlse.has_value()) {
    const at::Tensor d = dlse->to(at::kFloat);
    keep.push_back(d);
    p.dlse = d.data_ptr<float>();
    p.dlse_st = lse_of(d, varlen);
  }
  const at::Tensor delta = at::empty({p.batch, p.heads, p.seqlen}, q.options().dtype(at::kFloat));
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dq_st = rows_of(dq, varlen);
  if (v.has_value()) {
    TORCH_CHECK(dv.has_value(), "symattn CUDA kernels: separate v needs dv");
    p.dv = dv->data_ptr();
    p.dv_st = rows_of(*dv, varlen);
  }
  const int block = attention_bwd_block_cuda(std::max(p.head_dim, p.value_dim));
  p.n_blocks = (p.seqlen + block - 1) / block;
  at::Tensor partial;
  if (dcoef.has_value()) {
    TORCH_CHECK(coef.has_value() && dcoef->sizes() == coef->sizes(), "symattn CUDA kernels: dcoef must have coef's shape");
    auto shape = std::vector<int64_t>{p.batch, p.heads, p.n_blocks};
    for (int64_t i = 1; i < coef->dim(); ++i) shape.push_back(coef->size(i));
    partial = at::zeros(shape, q.options().dtype(at::kFloat));
    p.dcoef_partial = partial.data_ptr<float>();
  }
  const cudaError_t err = attention_bwd_cuda(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "symattn attention_bwd_cuda: ", cudaGetErrorString(err));
  if (dcoef.has_value()) dcoef->copy_(partial.sum({0, 2}));  // fixed-order reduction, no atomics
}

}  // namespace
}  // namespace symattn

TORCH_LIBRARY_FRAGMENT(symattn, m) {
  m.def(
      "attention_fwd_cuda(Tensor q, Tensor? v, Tensor? coef, Tensor? key_padding_mask, Tensor? cu_seqlens, "
      "int? seed, float scale, bool causal, float dropout_p, bool exclude_self, int max_seqlen) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd_cuda(Tensor dout, Tensor? dlse, Tensor q, Tensor? v, Tensor? coef, Tensor? key_padding_mask, "
      "Tensor? cu_seqlens, int? seed, Tensor out, Tensor lse, Tensor(a!) dq, Tensor(b!)? dv, Tensor(c!)? dcoef, "
      "float scale, bool causal, float dropout_p, bool exclude_self, int max_seqlen) -> ()");
}

TORCH_LIBRARY_IMPL(symattn, CUDA, m) {
  m.impl("attention_fwd_cuda", &symattn::attention_fwd_cuda_impl);
  m.impl("attention_bwd_cuda", &symattn::attention_bwd_cuda_impl);
}
