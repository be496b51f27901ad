// Host entry points of the CPU kernels that csrc/symattn.cpp refers to directly.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace symattn {

// Which kernel set runs here: "AVX512_AMX", "AVX512_BF16" (AVX-512, bfloat16 products on
// AVX512-BF16), "AVX512", "AVX2", "DEFAULT", or a check build of isa.h ("AVX2_BF16_PAIRS",
// "AVX2_AMX_EMULATED").
std::string cpu_kernel_isa();

// The kernel set's level, the same for every kernel family: 0 DEFAULT, 1 AVX2, 2 AVX512,
// 3 AVX512_BF16 (chosen once per process; see attention_cpu.cpp).
int cpu_isa_level();

// Which check build of isa.h bfloat16 inputs run: 0 none, 1 AVX2_BF16_PAIRS, 2 AVX2_AMX_EMULATED
// (asked for by SYMATTN_CPU_ISA on a CPU whose level is AVX2).
int cpu_check_build();

// What each worker ran in this process's latest CPU forward (backward = false) or backward call:
// int64 [workers, 2] of (tasks, query rows). A diagnostic for tests of the work distribution.
at::Tensor cpu_last_schedule(bool backward);

}  // namespace symattn
