// CPU implementations of symattn::lowrank_fwd_cpu / lowrank_bwd_cpu (fused LAMA): argument
// checks, output allocation, the pointer / stride bundle for the kernels, and the instruction set
// (the one the attention kernels use, cpu_isa_level). This translation unit also compiles the
// portable (DEFAULT) kernels.
#include "isa.h"

#include "lama_kernel.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "attention_cpu.h"

namespace symattn {
namespace {

using cpu::LamaBackwardParams;
using cpu::LamaDType;
using cpu::LamaParams;
using cpu::Rows;

LamaDType lama_dtype(const at::Tensor& h) {
  switch (h.scalar_type()) {
    case at::kFloat: return LamaDType::kFloat32;
    case at::kDouble: return LamaDType::kFloat64;
    case at::kBFloat16: return LamaDType::kBFloat16;
    case at::kHalf: return LamaDType::kFloat16;
    default:
      TORCH_CHECK(false, "symattn LAMA CPU kernels: h must be float32, float64, bfloat16 or float16, got ",
                  h.scalar_type());
  }
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& h, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "symattn LAMA CPU kernels: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == h.scalar_type(), "symattn LAMA CPU kernels: ", name, " must have h's dtype ",
              h.scalar_type(), ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "symattn LAMA CPU kernels: ", name, " must be ", shape, ", got ", t.sizes());
}

// [B, T, E] rows with a unit last stride (E <= 1 or no elements: any stride).
template <typename T>
Rows<T> rows_of(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.size(2) <= 1 || t.numel() == 0 || t.stride(2) == 1, "symattn LAMA CPU kernels: ", name,
              " needs a unit last stride");
  return Rows<T>{t.data_ptr(), t.stride(0), t.stride(1)};
}

// Fills the inputs of p; returns the contiguous copies the pointers refer to (kept alive by the caller).
std::vector<at::Tensor> fill_inputs(LamaParams& p, const at::Tensor& h, const at::Tensor& context,
                                    const at::Tensor& pf, const at::Tensor& q, const std::optional<at::Tensor>& u,
                                    const std::optional<at::Tensor>& key_padding_mask, bool head_norm,
                                    bool token_softmax, double eps) {
  TORCH_CHECK(h.device().is_cpu() && h.dim() == 3, "symattn LAMA CPU kernels: h must be a [B, T, E] CPU tensor");
  p.dtype = lama_dtype(h);
  p.batch = h.size(0);
  p.seqlen = h.size(1);
  p.dim = h.size(2);
  p.heads = q.size(-1);
  check_same(pf, "p", h, {p.dim, p.heads});
  check_same(q, "q", h, {p.dim, p.heads});
  TORCH_CHECK(context.dim() == 1 || context.dim() == 2, "symattn LAMA CPU kernels: context must be [E] or [B, E]");
  check_same(context, "context", h, context.dim() == 1 ? at::IntArrayRef{p.dim} : at::IntArrayRef{p.batch, p.dim});
  std::vector<at::Tensor> keep{context.contiguous(), pf.contiguous(), q.contiguous()};
  p.h = rows_of<const void>(h, "h");
  if (u.has_value()) {
    check_same(*u, "u", h, h.sizes());
    p.u = rows_of<const void>(*u, "u");
  }
  p.context = keep[0].data_ptr();
  p.context_batched = context.dim() == 2;
  p.p = keep[1].data_ptr();
  p.q = keep[2].data_ptr();
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.sizes() == at::IntArrayRef({p.batch, p.seqlen}),
                "symattn LAMA CPU kernels: key_padding_mask must be bool [B, T]");
    keep.push_back(m.contiguous());
    p.key_padding_mask = keep.back().data_ptr<bool>();
  }
  p.head_norm = head_norm;
  p.token_softmax = token_softmax;
  p.eps = eps;
  return keep;
}

// The build for this CPU (cpu_isa_level); bfloat16 takes the AVX512-BF16 one where it runs
// (also on AMX CPUs: LAMA's products are matrix-vector, too narrow for tiles), or its check
// build where a check build was asked for (cpu_check_build; AMX CPUs run the AVX512-BF16 one).
void (*forward_kernel(LamaDType dtype))(const LamaParams&) {
#ifdef SYMATTN_X86_DISPATCH
  if (cpu_check_build() != 0 && dtype == LamaDType::kBFloat16) return cpu::AVX2_BF16_PAIRS::lama_forward;
  switch (cpu_isa_level()) {
    case 4:
    case 3: if (dtype == LamaDType::kBFloat16) return cpu::AVX512_BF16::lama_forward; [[fallthrough]];
    case 2: return cpu::AVX512::lama_forward;
    case 1: return cpu::AVX2::lama_forward;
    default: break;
  }
#endif
  (void)dtype;
  return cpu::DEFAULT::lama_forward;
}

void (*backward_kernel(LamaDType dtype))(const LamaBackwardParams&) {
#ifdef SYMATTN_X86_DISPATCH
  if (cpu_check_build() != 0 && dtype == LamaDType::kBFloat16) return cpu::AVX2_BF16_PAIRS::lama_backward;
  switch (cpu_isa_level()) {
    case 4:
    case 3: if (dtype == LamaDType::kBFloat16) return cpu::AVX512_BF16::lama_backward; [[fallthrough]];
    case 2: return cpu::AVX512::lama_backward;
    case 1: return cpu::AVX2::lama_backward;
    default: break;
  }
#endif
  (void)dtype;
  return cpu::DEFAULT::lama_backward;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> lowrank_fwd_cpu(const at::Tensor& h, const at::Tensor& context,
                                                   const at::Tensor& p, const at::Tensor& q,
                                                   const std::optional<at::Tensor>& u,
                                                   const std::optional<at::Tensor>& key_padding_mask, bool head_norm,
                                                   bool token_softmax, double eps) {
  LamaParams params;
  const auto keep = fill_inputs(params, h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps);
  at::Tensor pooled = at::empty({params.batch, params.heads, params.dim}, h.options());
  at::Tensor attn = at::empty({params.batch, params.heads, params.seqlen}, h.options());
  params.pooled = pooled.data_ptr();
  params.attn = attn.data_ptr();
  forward_kernel(params.dtype)(params);
  return {pooled, attn};
}

void lowrank_bwd_cpu(const at::Tensor& dpooled, const std::optional<at::Tensor>& dattn, const at::Tensor& h,
                     const at::Tensor& context, const at::Tensor& p, const at::Tensor& q,
                     const std::optional<at::Tensor>& u, const std::optional<at::Tensor>& key_padding_mask,
                     const at::Tensor& pooled, const at::Tensor& attn, const std::optional<at::Tensor>& dh,
                     const std::optional<at::Tensor>& dcontext, const std::optional<at::Tensor>& dp,
                     const std::optional<at::Tensor>& dq, const std::optional<at::Tensor>& du, bool head_norm,
                     bool token_softmax, double eps) {
  LamaBackwardParams params;
  auto keep = fill_inputs(params, h, context, p, q, u, key_padding_mask, head_norm, token_softmax, eps);
  const std::vector<int64_t> pooled_shape{params.batch, params.heads, params.dim};
  const std::vector<int64_t> attn_shape{params.batch, params.heads, params.seqlen};
  check_same(dpooled, "dpooled", h, pooled_shape);
  check_same(pooled, "pooled", h, pooled_shape);
  check_same(attn, "attn", h, attn_shape);
  keep.push_back(dpooled.contiguous());
  params.dpooled = keep.back().data_ptr();
  keep.push_back(pooled.contiguous());
  params.pooled = keep.back().data_ptr();
  keep.push_back(attn.contiguous());
  params.attn = keep.back().data_ptr();
  if (dattn.has_value()) {
    check_same(*dattn, "dattn", h, attn_shape);
    keep.push_back(dattn->contiguous());
    params.dattn = keep.back().data_ptr();
  }
  // Gradients land in the caller's buffers, through a stand-in where the layout differs.
  std::vector<std::pair<at::Tensor, at::Tensor>> copy_back;
  auto target = [&](const std::optional<at::Tensor>& grad, const at::Tensor& like, const char* name,
                    bool rows) -> std::optional<at::Tensor> {
    if (!grad.has_value()) return std::nullopt;
    check_same(*grad, name, h, like.sizes());
    const bool direct = rows ? (grad->size(2) <= 1 || grad->numel() == 0 || grad->stride(2) == 1) : grad->is_contiguous();
    if (direct) return *grad;
    at::Tensor work = at::empty(grad->sizes(), grad->options());
    copy_back.emplace_back(work, *grad);
    return work;
  };
  TORCH_CHECK(!du.has_value() || u.has_value(), "symattn LAMA CPU kernels: du needs u");
  if (const auto t = target(dh, h, "dh", true)) params.dh = rows_of<void>(*t, "dh");
  if (const auto t = target(du, h, "du", true)) params.du = rows_of<void>(*t, "du");
  if (const auto t = target(dcontext, context, "dcontext", false)) params.dcontext = t->data_ptr();
  if (const auto t = target(dp, p, "dp", false)) params.dp = t->data_ptr();
  if (const auto t = target(dq, q, "dq", false)) params.dq = t->data_ptr();
  backward_kernel(params.dtype)(params);
  for (auto& [work, grad] : copy_back) grad.copy_(work);
}

TORCH_LIBRARY_IMPL(symattn, CPU, m) {
  m.impl("lowrank_fwd_cpu", &lowrank_fwd_cpu);
  m.impl("lowrank_bwd_cpu", &lowrank_bwd_cpu);
}

}  // namespace symattn
