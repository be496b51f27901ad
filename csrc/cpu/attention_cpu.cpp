// CPU implementations of the symattn::*_cpu kernel ops: argument checks, output allocation,
// the pointer / stride bundle for the kernels, and the choice of instruction set at run time.
// This translation unit also compiles the portable (DEFAULT) kernels.
#include "isa.h"

#include "attention_kernel.h"

#include <ATen/Version.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#ifdef SYMATTN_X86_DISPATCH
#include <cpuid.h>
#endif
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <iterator>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>

#include "attention_cpu.h"

namespace symattn {
namespace {

using cpu::BackwardParams;
using cpu::CoefMode;
using cpu::DType;
using cpu::ForwardParams;
using cpu::Strided;

struct Kernels {
  void (*forward)(const ForwardParams&);
  void (*backward)(const BackwardParams&);
  void (*forward_bf16)(const ForwardParams&);  // bfloat16 inputs
  void (*backward_bf16)(const BackwardParams&);
  void (*dropout_keep)(uint64_t, double, uint64_t, int64_t, float*);  // the bf16 kernels' generator
  const char* isa;

  void run_forward(const ForwardParams& p) const { (p.dtype == DType::kBFloat16 ? forward_bf16 : forward)(p); }
  void run_backward(const BackwardParams& p) const { (p.dtype == DType::kBFloat16 ? backward_bf16 : backward)(p); }
};

// Kernel sets from the portable one (0) up: AVX2 (1), AVX512 (2), AVX512 with bfloat16 products
// on AVX512-BF16 (3; the other dtypes run the AVX512 kernels there), and the same with the
// bfloat16 products on AMX tiles (4).
constexpr const char* kIsaNames[] = {"DEFAULT", "AVX2", "AVX512", "AVX512_BF16", "AVX512_AMX"};
constexpr int kWidestIsa = 4;
// The check builds of isa.h, for an AVX2 CPU: bfloat16 through the AVX512_BF16 kernels' data path
// (1), or through the AVX512_AMX kernels on an emulated tile unit (2); AVX2 kernels otherwise.
constexpr const char* kCheckBuilds[] = {"AVX2_BF16_PAIRS", "AVX2_AMX_EMULATED"};

// 1 + the index in kCheckBuilds of the check build called name; 0 for any other name.
int check_build_named(const std::string& name) {
  for (std::size_t i = 0; i < std::size(kCheckBuilds); ++i) {
    if (name == kCheckBuilds[i]) return static_cast<int>(i) + 1;
  }
  return 0;
}

std::string isa_request() {
  const char* env = std::getenv("SYMATTN_CPU_ISA");
  std::string name(env == nullptr ? "" : env);
  for (char& ch : name) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  return name;
}

// SYMATTN_CPU_ISA=default|avx2|avx512|avx512_bf16|avx512_amx caps the choice (tests reach every
// build this way); avx2_bf16_pairs and avx2_amx_emulated cap it at AVX2 and ask for a check build
// (cpu_check_build). Anything else is ignored with a warning.
int isa_cap() {
  const std::string name = isa_request();
  if (name.empty()) return kWidestIsa;
  if (check_build_named(name) != 0) return 1;
  for (int level = 0; level <= kWidestIsa; ++level) {
    if (name == kIsaNames[level]) return level;
  }
  TORCH_WARN("symattn: ignoring SYMATTN_CPU_ISA=", name,
             " (expected default, avx2, avx512, avx512_bf16, avx512_amx, avx2_bf16_pairs or avx2_amx_emulated)");
  return kWidestIsa;
}

#ifdef SYMATTN_X86_DISPATCH
// AMX tiles with bfloat16 products, usable by this process: cpuid (leaf 7: AMX-BF16 is EDX bit
// 22, AMX-TILE bit 24), and on Linux the kernel's permission for the tile state, which a process
// must request before its first tile instruction (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA).
bool amx_usable() {
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  if ((edx & (1u << 22)) == 0 || (edx & (1u << 24)) == 0) return false;
#ifdef __linux__
  constexpr int kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}
#endif

}  // namespace

// The check build asked for, where the CPU runs AVX2 (isa_cap stops the level there): 0 none.
int cpu_check_build() {
  static const int build = cpu_isa_level() == 1 ? check_build_named(isa_request()) : 0;
  return build;
}

// The widest kernel set this CPU runs: ATen's judgement of AVX2 / AVX-512 (ATEN_CPU_CAPABILITY
// can lower it), cpuid for AVX512-BF16 and AMX, capped by SYMATTN_CPU_ISA (asked first, so that a
// cap below AMX never requests the tile state).
int cpu_isa_level() {
  static const int level = [] {
    const int cap = isa_cap();
    int widest = 0;
#ifdef SYMATTN_X86_DISPATCH
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") {
      __builtin_cpu_init();
      widest = __builtin_cpu_supports("avx512bf16") ? (cap >= 4 && amx_usable() ? 4 : 3) : 2;
    } else if (capability == "AVX2") {
      widest = 1;
    }
#endif
    return std::min(widest, cap);
  }();
  return level;
}

namespace {

const Kernels& kernels() {
  static const Kernels chosen = [] {
    const int level = cpu_isa_level();
#ifdef SYMATTN_X86_DISPATCH
    const int check_build = cpu_check_build();
    if (check_build == 1) {
      return Kernels{cpu::AVX2::attention_forward, cpu::AVX2::attention_backward,
                     cpu::AVX2_BF16_PAIRS::attention_forward, cpu::AVX2_BF16_PAIRS::attention_backward,
                     cpu::AVX2_BF16_PAIRS::dropout_keep, kCheckBuilds[0]};
    }
    if (check_build == 2) {
      return Kernels{cpu::AVX2::attention_forward, cpu::AVX2::attention_backward,
                     cpu::AVX2_AMX_EMULATED::attention_forward, cpu::AVX2_AMX_EMULATED::attention_backward,
                     cpu::AVX2_AMX_EMULATED::dropout_keep, kCheckBuilds[1]};
    }
    if (level == 4) {
      return Kernels{cpu::AVX512::attention_forward, cpu::AVX512::attention_backward,
                     cpu::AVX512_AMX::attention_forward, cpu::AVX512_AMX::attention_backward,
                     cpu::AVX512_AMX::dropout_keep, kIsaNames[4]};
    }
    if (level == 3) {
      return Kernels{cpu::AVX512::attention_forward, cpu::AVX512::attention_backward,
                     cpu::AVX512_BF16::attention_forward, cpu::AVX512_BF16::attention_backward,
                     cpu::AVX512_BF16::dropout_keep, kIsaNames[3]};
    }
    if (level == 2) {
      return Kernels{cpu::AVX512::attention_forward, cpu::AVX512::attention_backward, cpu::AVX512::attention_forward,
                     cpu::AVX512::attention_backward, cpu::AVX512::dropout_keep, kIsaNames[2]};
    }
    if (level == 1) {
      return Kernels{cpu::AVX2::attention_forward, cpu::AVX2::attention_backward, cpu::AVX2::attention_forward,
                     cpu::AVX2::attention_backward, cpu::AVX2::dropout_keep, kIsaNames[1]};
    }
#endif
    return Kernels{cpu::DEFAULT::attention_forward, cpu::DEFAULT::attention_backward,
                   cpu::DEFAULT::attention_forward, cpu::DEFAULT::attention_backward, cpu::DEFAULT::dropout_keep,
                   kIsaNames[0]};
  }();
  return chosen;
}

// What each worker ran in the latest forward and backward call, for cpu_last_schedule.
struct LastSchedules {
  std::mutex mutex;
  cpu::ScheduleStats forward, backward;
};

LastSchedules& last_schedules() {
  static LastSchedules last;
  return last;
}

void keep_schedule(cpu::ScheduleStats&& stats, bool backward) {
  LastSchedules& last = last_schedules();
  const std::lock_guard<std::mutex> lock(last.mutex);
  (backward ? last.backward : last.forward) = std::move(stats);
}

DType kernel_dtype(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default:
      TORCH_CHECK(false, "symattn CPU kernels: ", name, " must be float32, bfloat16 or float16, got ",
                  t.scalar_type());
  }
}

// The kernels step along the last dim with stride 1; a last dim of at most one element, or an
// empty tensor, never takes that step, whatever torch recorded as its stride.
bool unit_last_stride(const at::Tensor& t) { return t.size(-1) <= 1 || t.numel() == 0 || t.stride(-1) == 1; }

void check_rows(const at::Tensor& t, const char* name, const at::Tensor& q, int64_t last_dim = -1) {
  TORCH_CHECK(t.device().is_cpu(), "symattn CPU kernels: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == q.dim(), "symattn CPU kernels: ", name, " must have ", q.dim(), " dims, got ", t.sizes());
  TORCH_CHECK(t.sizes().slice(0, q.dim() - 1) == q.sizes().slice(0, q.dim() - 1), "symattn CPU kernels: ", name,
              " has shape ", t.sizes(), ", inconsistent with q ", q.sizes());
  if (last_dim >= 0) TORCH_CHECK(t.size(-1) == last_dim, "symattn CPU kernels: ", name, " has shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "symattn CPU kernels: ", name, " must have q's dtype ",
              q.scalar_type());
  TORCH_CHECK(unit_last_stride(t), "symattn CPU kernels: ", name, " needs a unit last stride");
}

// [B, S, H, X] (padded) or [total, H, X] (varlen) rows.
template <typename T>
Strided<T> rows_of(const at::Tensor& t, bool varlen) {
  Strided<T> s;
  s.data = t.data_ptr();
  s.batch = varlen ? 0 : t.stride(0);
  s.token = varlen ? t.stride(0) : t.stride(1);
  s.head = varlen ? t.stride(1) : t.stride(2);
  return s;
}

// [B, H, S] (padded) or [H, total] (varlen) float32 log-sum-exp layouts.
template <typename T>
Strided<T> lse_of(const at::Tensor& t, bool varlen) {
  Strided<T> s;
  s.data = t.data_ptr<float>();
  s.batch = varlen ? 0 : t.stride(0);
  s.head = varlen ? t.stride(0) : t.stride(1);
  s.token = varlen ? t.stride(1) : t.stride(2);
  return s;
}

// Fills everything but the output pointers; returns the tensors the pointers refer to, which
// must outlive the kernel call.
std::vector<at::Tensor> fill_common(ForwardParams& p, const at::Tensor& q, const std::optional<at::Tensor>& v,
                                    const std::optional<at::Tensor>& coef,
                                    const std::optional<at::Tensor>& key_padding_mask,
                                    const std::optional<at::Tensor>& cu_seqlens, std::optional<int64_t> seed,
                                    double scale, bool causal, double dropout_p, bool exclude_self,
                                    int64_t max_seqlen) {
  std::vector<at::Tensor> keep_alive;
  const bool varlen = cu_seqlens.has_value();
  TORCH_CHECK(q.device().is_cpu(), "symattn CPU kernels: q must be a CPU tensor");
  TORCH_CHECK(q.dim() == (varlen ? 3 : 4), "symattn CPU kernels: q must be ", varlen ? "[total, H, D]" : "[B, S, H, D]",
              ", got ", q.sizes());
  TORCH_CHECK(unit_last_stride(q), "symattn CPU kernels: q needs a unit last stride");
  p.dtype = kernel_dtype(q, "q");
  p.heads = q.size(-2);
  p.head_dim = q.size(-1);
  p.q = rows_of<const void>(q, varlen);
  if (v.has_value()) {
    check_rows(*v, "v", q);
    p.v = rows_of<const void>(*v, varlen);
    p.value_dim = v->size(-1);
  } else {
    p.value_dim = p.head_dim;
  }
  if (varlen) {
    const at::Tensor& cu = *cu_seqlens;
    TORCH_CHECK(cu.scalar_type() == at::kInt && cu.dim() == 1 && cu.numel() >= 1 && cu.device().is_cpu(),
                "symattn CPU kernels: cu_seqlens must be a 1-D int32 CPU tensor");
    at::Tensor cu_c = cu.contiguous();
    keep_alive.push_back(cu_c);
    p.cu_seqlens = cu_c.data_ptr<int32_t>();
    p.batch = cu_c.numel() - 1;
    TORCH_CHECK(p.cu_seqlens[0] == 0 && p.cu_seqlens[p.batch] == q.size(0),
                "symattn CPU kernels: cu_seqlens must run from 0 to total = ", q.size(0));
    for (int64_t b = 0; b < p.batch; ++b) {
      const int64_t len = int64_t{p.cu_seqlens[b + 1]} - p.cu_seqlens[b];  // int32 - int32 could overflow
      TORCH_CHECK(len >= 0 && len <= max_seqlen, "symattn CPU kernels: sequence ", b, " has length ", len,
                  ", outside [0, max_seqlen = ", max_seqlen, "]");
    }
    // The dropout key stride: total tokens, never the bound, so the mask depends on the real
    // positions only (the kernels size their work by the real lengths).
    p.seqlen = q.size(0);
    p.n_rows = q.size(0);
    TORCH_CHECK(!key_padding_mask.has_value(), "symattn CPU kernels: key_padding_mask is not used with cu_seqlens");
  } else {
    p.batch = q.size(0);
    p.seqlen = q.size(1);
    p.n_rows = p.batch * p.seqlen;
  }
  if (coef.has_value()) {
    const at::Tensor c32 = coef->to(at::kFloat).contiguous();
    keep_alive.push_back(c32);
    if (c32.dim() == 2) {
      TORCH_CHECK(c32.size(0) == p.heads && c32.size(1) == p.head_dim, "symattn CPU kernels: coef must be [H, D]");
      p.coef_mode = CoefMode::kDiag;
    } else {
      TORCH_CHECK(c32.dim() == 3 && c32.size(0) == p.heads && c32.size(1) == p.head_dim && c32.size(2) == p.head_dim,
                  "symattn CPU kernels: coef must be [H, D] or [H, D, D]");
      p.coef_mode = CoefMode::kFull;
    }
    p.coef = c32.data_ptr<float>();
  }
  if (key_padding_mask.has_value()) {
    const at::Tensor m = key_padding_mask->contiguous();
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == p.batch && m.size(1) == p.seqlen,
                "symattn CPU kernels: key_padding_mask must be bool [B, S]");
    keep_alive.push_back(m);
    p.key_padding_mask = m.data_ptr<bool>();
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "symattn CPU kernels: dropout_p must lie in [0, 1)");
  TORCH_CHECK(dropout_p == 0.0 || seed.has_value(), "symattn CPU kernels: dropout needs a seed");
  p.scale = scale;
  p.causal = causal;
  p.exclude_self = exclude_self;
  p.dropout_p = dropout_p;
  p.seed = static_cast<uint64_t>(seed.value_or(0));
  return keep_alive;
}

std::vector<int64_t> lse_shape(const at::Tensor& q, bool varlen) {
  if (varlen) return {q.size(1), q.size(0)};
  return {q.size(0), q.size(2), q.size(1)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& coef,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens,
    std::optional<int64_t> seed, double scale, bool causal, double dropout_p, bool exclude_self, int64_t max_seqlen,
    bool keep_residual) {
  ForwardParams p;
  const auto keep_alive = fill_common(p, q, v, coef, key_padding_mask, cu_seqlens, seed, scale, causal, dropout_p,
                                      exclude_self, max_seqlen);
  const bool varlen = cu_seqlens.has_value();
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end());
  out_shape.back() = p.value_dim;
  at::Tensor out = at::empty(out_shape, q.options());
  at::Tensor lse = at::empty(lse_shape(q, varlen), q.options().dtype(at::kFloat));
  p.out = rows_of<void>(out, varlen);
  p.lse = lse_of<float>(lse, varlen);
  TORCH_CHECK(!keep_residual || q.scalar_type() != at::kFloat,
              "symattn CPU kernels: keep_residual is for bfloat16 / float16 outputs");
  at::Tensor residual = keep_residual ? at::empty(out_shape, q.options()) : at::empty({0}, q.options());
  if (keep_residual) p.out_residual = rows_of<void>(residual, varlen);
  cpu::ScheduleStats schedule;
  p.schedule = &schedule;
  kernels().run_forward(p);
  keep_schedule(std::move(schedule), false);
  return {out, lse, residual};
}

void attention_bwd_cpu(const at::Tensor& dout, const std::optional<at::Tensor>& dlse, const at::Tensor& q,
                       const std::optional<at::Tensor>& v, const std::optional<at::Tensor>& coef,
                       const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& cu_seqlens,
                       std::optional<int64_t> seed, const at::Tensor& out,
                       const std::optional<at::Tensor>& out_residual, const at::Tensor& lse, const at::Tensor& dq,
                       const std::optional<at::Tensor>& dv, const std::optional<at::Tensor>& dcoef, double scale,
                       bool causal, double dropout_p, bool exclude_self, int64_t max_seqlen) {
  BackwardParams p;
  auto keep_alive = fill_common(p, q, v, coef, key_padding_mask, cu_seqlens, seed, scale, causal, dropout_p,
                                exclude_self, max_seqlen);
  const bool varlen = cu_seqlens.has_value();
  check_rows(dout, "dout", q, p.value_dim);
  check_rows(out, "out", q, p.value_dim);
  TORCH_CHECK(v.has_value() == dv.has_value(), "symattn CPU kernels: dv must be given exactly when v is");
  TORCH_CHECK(!dcoef.has_value() || coef.has_value(), "symattn CPU kernels: dcoef needs coef");
  const auto expected_lse = lse_shape(q, varlen);
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(expected_lse) && lse.scalar_type() == at::kFloat,
              "symattn CPU kernels: lse must be float32 ", at::IntArrayRef(expected_lse));
  const at::Tensor lse_c = lse.contiguous();
  keep_alive.push_back(lse_c);
  p.out = rows_of<void>(out, varlen);
  if (out_residual.has_value()) {
    check_rows(*out_residual, "out_residual", q, p.value_dim);
    p.out_residual = rows_of<void>(*out_residual, varlen);
  }
  p.lse = lse_of<float>(lse_c, varlen);
  p.dout = rows_of<const void>(dout, varlen);
  if (dlse.has_value()) {
    TORCH_CHECK(dlse->sizes() == at::IntArrayRef(expected_lse), "symattn CPU kernels: dlse must have lse's shape");
    const at::Tensor dlse_c = dlse->to(at::kFloat).contiguous();
    keep_alive.push_back(dlse_c);
    const auto s = lse_of<float>(dlse_c, varlen);
    p.dlse = Strided<const float>{s.data, s.batch, s.token, s.head};
  }

  // Gradients land in the caller's buffers, through a unit-last-stride stand-in if needed.
  check_rows(dq, "dq", q, p.head_dim);
  const at::Tensor dq_work = unit_last_stride(dq) ? dq : at::empty(dq.sizes(), dq.options());
  p.dq = rows_of<void>(dq_work, varlen);
  at::Tensor dv_work;
  if (dv.has_value()) {
    check_rows(*dv, "dv", q, p.value_dim);
    dv_work = unit_last_stride(*dv) ? *dv : at::empty(dv->sizes(), dv->options());
    p.dv = rows_of<void>(dv_work, varlen);
  }
  at::Tensor partial;
  if (dcoef.has_value()) {
    TORCH_CHECK(dcoef->sizes() == coef->sizes(), "symattn CPU kernels: dcoef must have coef's shape");
    const int64_t csize = coef->dim() == 3 ? coef->size(1) * coef->size(2) : coef->size(1);  // H may be 0
    // Zeroed: a head of an empty varlen sequence contributes nothing and never touches its slot.
    partial = at::zeros({p.batch, p.heads, csize}, q.options().dtype(at::kDouble));
    p.dcoef_partial = partial.data_ptr<double>();
  }

  cpu::ScheduleStats schedule;
  p.schedule = &schedule;
  kernels().run_backward(p);
  keep_schedule(std::move(schedule), true);

  if (!dq_work.is_same(dq)) dq.copy_(dq_work);
  if (dv.has_value() && !dv_work.is_same(*dv)) dv->copy_(dv_work);
  if (dcoef.has_value()) {
    // Sum the per-(b, h) partials over b in a fixed order.
    at::Tensor total = at::empty({p.heads, partial.size(2)}, partial.options());
    const double* src = partial.data_ptr<double>();
    double* dst = total.data_ptr<double>();
    const int64_t per_batch = total.numel();
    for (int64_t e = 0; e < per_batch; ++e) dst[e] = 0.0;
    for (int64_t b = 0; b < p.batch; ++b) {
      for (int64_t e = 0; e < per_batch; ++e) dst[e] += src[b * per_batch + e];
    }
    dcoef->copy_(total.view(coef->sizes()));
  }
}

// The four 32-bit Philox-4x32-10 words of each int64 counter, as reference.philox_randint4x
// stacked on a last axis of 4 (for tests).
at::Tensor philox4x_cpu(const at::Tensor& offsets, int64_t seed) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.device().is_cpu(),
              "philox4x_cpu: offsets must be an int64 CPU tensor");
  const at::Tensor in = offsets.contiguous();
  std::vector<int64_t> sizes = in.sizes().vec();
  sizes.push_back(4);
  at::Tensor result = at::empty(sizes, in.options());
  const int64_t* src = in.data_ptr<int64_t>();
  int64_t* dst = result.data_ptr<int64_t>();
  for (int64_t i = 0; i < in.numel(); ++i) {
    uint32_t words[4];
    cpu::philox4x(static_cast<uint64_t>(seed), static_cast<uint64_t>(src[i]), words);
    for (int w = 0; w < 4; ++w) dst[4 * i + w] = words[w];
  }
  return result;
}

// The dropout multipliers (0 or dropout_scale) of the n element offsets first, first + 1, ... as
// the selected kernel build draws them (for tests).
at::Tensor dropout_keep_cpu(int64_t seed, double dropout_p, int64_t first, int64_t n) {
  TORCH_CHECK(n >= 0, "dropout_keep_cpu: n must be >= 0, got ", n);
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_keep_cpu: dropout_p must be in [0, 1), got ", dropout_p);
  at::Tensor keep = at::empty({n}, at::TensorOptions().dtype(at::kFloat));
  kernels().dropout_keep(static_cast<uint64_t>(seed), dropout_p, static_cast<uint64_t>(first), n,
                         keep.data_ptr<float>());
  return keep;
}

std::string cpu_kernel_isa() { return kernels().isa; }

at::Tensor cpu_last_schedule(bool backward) {
  LastSchedules& last = last_schedules();
  const std::lock_guard<std::mutex> lock(last.mutex);
  const cpu::ScheduleStats& stats = backward ? last.backward : last.forward;
  const int64_t workers = static_cast<int64_t>(stats.tasks.size());
  at::Tensor result = at::empty({workers, 3}, at::TensorOptions().dtype(at::kLong));
  int64_t* dst = result.data_ptr<int64_t>();
  for (int64_t w = 0; w < workers; ++w) {
    dst[3 * w] = stats.tasks[w];
    dst[3 * w + 1] = stats.rows[w];
    dst[3 * w + 2] = stats.taken[w];
  }
  return result;
}

TORCH_LIBRARY_IMPL(symattn, CPU, m) {
  m.impl("attention_fwd_cpu", &attention_fwd_cpu);
  m.impl("attention_bwd_cpu", &attention_bwd_cpu);
  m.impl("philox4x_cpu", &philox4x_cpu);
}

// No tensor argument to dispatch on: one kernel for every key.
TORCH_LIBRARY_IMPL(symattn, CompositeExplicitAutograd, m) {
  m.impl("dropout_keep_cpu", &dropout_keep_cpu);
}

}  // namespace symattn
