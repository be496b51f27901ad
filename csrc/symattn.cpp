// The symattn_kernels._C extension: the schemas of the compiled kernel ops, each declared once.
// CPU implementations register in csrc/cpu/attention_cpu.cpp, csrc/cpu/lama_cpu.cpp and
// csrc/cpu/gradient_cache.cpp. The public ops (symattn::attention_fwd and friends, with their
// autograd and fake functions) are defined in Python; these *_cpu ops are the kernels they call,
// and symattn_kernels/backends/cpu.py registers their fake functions.
#include <Python.h>

#include <torch/library.h>

#include "cpu/attention_cpu.h"
#include "cpu/gradient_cache.h"

// Importing symattn_kernels._C runs the registrations below; the module itself is empty.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

// A fragment: torch.library.custom_op defines Python ops in the same namespace.
TORCH_LIBRARY_FRAGMENT(symattn, m) {
  m.def(
      "attention_fwd_cpu(Tensor q, Tensor? v, Tensor? coef, Tensor? key_padding_mask, Tensor? cu_seqlens, "
      "int? seed, float scale, bool causal, float dropout_p, bool exclude_self, int max_seqlen, bool keep_residual) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "attention_bwd_cpu(Tensor dout, Tensor? dlse, Tensor q, Tensor? v, Tensor? coef, Tensor? key_padding_mask, "
      "Tensor? cu_seqlens, int? seed, Tensor out, Tensor? out_residual, Tensor lse, Tensor(a!) dq, Tensor(b!)? dv, Tensor(c!)? dcoef, "
      "float scale, bool causal, float dropout_p, bool exclude_self, int max_seqlen) -> ()");
  m.def(
      "lowrank_fwd_cpu(Tensor h, Tensor context, Tensor p, Tensor q, Tensor? u, Tensor? key_padding_mask, "
      "bool head_norm, bool token_softmax, float eps) -> (Tensor, Tensor)");
  m.def(
      "lowrank_bwd_cpu(Tensor dpooled, Tensor? dattn, Tensor h, Tensor context, Tensor p, Tensor q, Tensor? u, "
      "Tensor? key_padding_mask, Tensor pooled, Tensor attn, Tensor(a!)? dh, Tensor(b!)? dcontext, "
      "Tensor(c!)? dp, Tensor(d!)? dq, Tensor(e!)? du, bool head_norm, bool token_softmax, float eps) -> ()");
  m.def("gradient_buffer_cpu(Tensor like) -> Tensor");
  m.def("philox4x_cpu(Tensor offsets, int seed) -> Tensor");
  m.def("dropout_keep_cpu(int seed, float dropout_p, int first, int n) -> Tensor");
  m.def("cpu_kernel_isa() -> str", &symattn::cpu_kernel_isa);
  m.def("cpu_last_schedule(bool backward) -> Tensor", &symattn::cpu_last_schedule);
  m.def("cpu_gradient_cache(bool release) -> int", &symattn::cpu_gradient_cache);
}
