// Arguments of the fused CPU LAMA kernels as plain pointers and element strides, so the
// per-instruction-set kernel translation units need no tensor headers. Filled by lama_cpu.cpp.
#pragma once

#include <cstdint>

namespace symattn::cpu {

enum class LamaDType : int { kFloat32, kFloat64, kBFloat16, kFloat16 };

// A [B, T, E] tensor with a unit last stride: element (b, t, e) at data + b * batch + t * token + e.
template <typename T>
struct Rows {
  T* data = nullptr;
  int64_t batch = 0;
  int64_t token = 0;
};

struct LamaParams {
  LamaDType dtype = LamaDType::kFloat32;
  int64_t batch = 0;    // B
  int64_t seqlen = 0;   // T
  int64_t dim = 0;      // E
  int64_t heads = 0;    // m

  Rows<const void> h;
  Rows<const void> u;              // data == null: the keys come from h
  const void* context = nullptr;   // contiguous [E] or [B, E]
  bool context_batched = false;    // context is [B, E]
  const void* p = nullptr;         // contiguous [E, m]
  const void* q = nullptr;         // contiguous [E, m]
  const bool* key_padding_mask = nullptr;  // contiguous [B, T], True = real token; null: all real

  bool head_norm = true;     // l2 over the heads
  bool token_softmax = true;
  double eps = 1e-12;

  // Forward: written. Backward: the forward's results, read.
  void* pooled = nullptr;  // contiguous [B, m, E]
  void* attn = nullptr;    // contiguous [B, m, T]
};

struct LamaBackwardParams : LamaParams {
  const void* dpooled = nullptr;  // contiguous [B, m, E]
  const void* dattn = nullptr;    // contiguous [B, m, T], or null
  Rows<void> dh;                  // null: not wanted
  Rows<void> du;                  // null: not wanted (always null without u)
  void* dcontext = nullptr;       // contiguous, context's shape, or null
  void* dp = nullptr;             // contiguous [E, m], or null
  void* dq = nullptr;             // contiguous [E, m], or null
};

// One implementation per instruction set (namespace = ATen's CPU_CAPABILITY name).
namespace DEFAULT {
void lama_forward(const LamaParams& p);
void lama_backward(const LamaBackwardParams& p);
}  // namespace DEFAULT
namespace AVX2 {
void lama_forward(const LamaParams& p);
void lama_backward(const LamaBackwardParams& p);
}  // namespace AVX2
namespace AVX512 {
void lama_forward(const LamaParams& p);
void lama_backward(const LamaBackwardParams& p);
}  // namespace AVX512
namespace AVX512_BF16 {  // bfloat16 only
void lama_forward(const LamaParams& p);
void lama_backward(const LamaBackwardParams& p);
}  // namespace AVX512_BF16
namespace AVX2_BF16_PAIRS {  // bfloat16 only; a check build (isa.h)
void lama_forward(const LamaParams& p);
void lama_backward(const LamaBackwardParams& p);
}  // namespace AVX2_BF16_PAIRS

}  // namespace symattn::cpu
