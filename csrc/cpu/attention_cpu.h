// Host entry points of the CPU kernels that csrc/symattn.cpp refers to directly.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace symattn {

// Which kernel set runs here: "AVX512_AMX", "AVX512_BF16" (AVX-512, bfloat16 products on
// AVX512-BF16), "AVX512", "AVX2", "DEFAULT", or the check build "AVX2_BF16_PAIRS" (isa.h).
std::string cpu_kernel_isa();

// The kernel set's level, the same for every kernel family: 0 DEFAULT, 1 AVX2, 2 AVX512,
// 3 AVX512_BF16 (chosen once per process; see attention_cpu.cpp).
int cpu_isa_level();

// Whether bfloat16 inputs run the check build AVX2_BF16_PAIRS (isa.h): asked for by
// SYMATTN_CPU_ISA=avx2_bf16_pairs on a CPU whose level is AVX2.
bool cpu_pairs_check();

// What each worker ran in this process's latest CPU forward (backward = false) or backward call:
// int64 [workers, 2] of (tasks, query rows). A diagnostic for tests of the work distribution.
at::Tensor cpu_last_schedule(bool backward);

}  // namespace symattn
