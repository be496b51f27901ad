// Arguments of the fused CPU attention kernels as plain pointers and element strides, so the
// per-instruction-set kernel translation units need no tensor headers. Filled by attention_cpu.cpp.
#pragma once

#include <cstdint>
#include <vector>

namespace symattn::cpu {

enum class DType : int { kFloat32, kBFloat16, kFloat16 };
enum class CoefMode : int { kNone, kDiag, kFull };

// A [B, S, H, X] (padded) or [total, H, X] (varlen) tensor: element (b, t, h, x) sits at
// data + b * batch + (start_b + t) * token + h * head + x, where start_b = cu_seqlens[b] in the
// varlen layout (batch = 0 there) and 0 in the padded one.
template <typename T>
struct Strided {
  T* data = nullptr;
  int64_t batch = 0;
  int64_t token = 0;
  int64_t head = 0;
};

// How one kernel call spread over its workers (a diagnostic for tests): the tasks and query rows
// dealt to each, and the tasks each took from other workers' lists when its own ran out.
struct ScheduleStats {
  std::vector<int64_t> tasks;
  std::vector<int64_t> rows;
  std::vector<int64_t> taken;
};

struct ForwardParams {
  DType dtype = DType::kFloat32;
  int64_t batch = 0;      // B, or number of sequences
  int64_t heads = 0;      // H
  int64_t head_dim = 0;   // D
  int64_t value_dim = 0;  // Dv (= D in shared mode)
  int64_t seqlen = 0;     // S, or total tokens (the dropout key stride) for varlen
  int64_t n_rows = 0;     // B * S, or total tokens: the dropout row count
  const int32_t* cu_seqlens = nullptr;  // [B + 1]; null for the padded layout

  Strided<const void> q;
  Strided<const void> v;  // data == null: the values are q itself
  const float* coef = nullptr;  // float32 contiguous [H, D] or [H, D, D]
  CoefMode coef_mode = CoefMode::kNone;
  const bool* key_padding_mask = nullptr;  // [B, S] contiguous, True = real token

  double scale = 1.0;
  bool causal = false;
  bool exclude_self = false;
  double dropout_p = 0.0;
  uint64_t seed = 0;

  Strided<void> out;  // forward: written; backward: the saved output, read
  // data == null: none. Else, for bf16 / fp16 outputs, the rounding error of out: the fp32 output
  // minus out, rounded to the output's dtype (the forward writes it, the backward reads it), so
  // that out + out_residual holds the output to about 16 bits more than out alone (see
  // keeps_output_residual in backends/registry.py).
  Strided<void> out_residual;
  Strided<float> lse; // [B, H, S] or [H, total]: forward writes it, backward reads it

  ScheduleStats* schedule = nullptr;  // filled by the kernel when set

  // Tokens of sequence b: its span of cu_seqlens, or S.
  int64_t length(int64_t b) const { return cu_seqlens != nullptr ? cu_seqlens[b + 1] - cu_seqlens[b] : seqlen; }
};

struct BackwardParams : ForwardParams {
  Strided<const void> dout;
  Strided<const float> dlse;  // data == null: no lse cotangent
  Strided<void> dq;
  Strided<void> dv;           // null in shared mode
  double* dcoef_partial = nullptr;  // zeroed [B, H, D] or [B, H, D, D] per-(b, h) partial sums, or null
};

// One implementation per instruction set (namespace = ATen's CPU_CAPABILITY name).
namespace DEFAULT {
void attention_forward(const ForwardParams& p);
void attention_backward(const BackwardParams& p);
void dropout_keep(uint64_t seed, double dropout_p, uint64_t first, int64_t n, float* keep);
}  // namespace DEFAULT
namespace AVX2 {
void attention_forward(const ForwardParams& p);
void attention_backward(const BackwardParams& p);
void dropout_keep(uint64_t seed, double dropout_p, uint64_t first, int64_t n, float* keep);
}  // namespace AVX2
namespace AVX512 {
void attention_forward(const ForwardParams& p);
void attention_backward(const BackwardParams& p);
void dropout_keep(uint64_t seed, double dropout_p, uint64_t first, int64_t n, float* keep);
}  // namespace AVX512
namespace AVX512_BF16 {  // bfloat16 only
void attention_forward(const ForwardParams& p);
void attention_backward(const BackwardParams& p);
void dropout_keep(uint64_t seed, double dropout_p, uint64_t first, int64_t n, float* keep);
}  // namespace AVX512_BF16
namespace AVX512_AMX {  // bfloat16 only
void attention_forward(const ForwardParams& p);
void attention_backward(const BackwardParams& p);
void dropout_keep(uint64_t seed, double dropout_p, uint64_t first, int64_t n, float* keep);
}  // namespace AVX512_AMX
namespace AVX2_BF16_PAIRS {  // bfloat16 only; a check build (isa.h)
void attention_forward(const ForwardParams& p);
void attention_backward(const BackwardParams& p);
void dropout_keep(uint64_t seed, double dropout_p, uint64_t first, int64_t n, float* keep);
}  // namespace AVX2_BF16_PAIRS
namespace AVX2_AMX_EMULATED {  // bfloat16 only; a check build (isa.h)
void attention_forward(const ForwardParams& p);
void attention_backward(const BackwardParams& p);
void dropout_keep(uint64_t seed, double dropout_p, uint64_t first, int64_t n, float* keep);
}  // namespace AVX2_AMX_EMULATED

}  // namespace symattn::cpu
