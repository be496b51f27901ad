// Host entry points of the CPU kernels that csrc/symattn.cpp refers to directly.
#pragma once

#include <string>

namespace symattn {

// Which kernel set runs here: "AVX512_BF16" (AVX-512, bfloat16 products on AVX512-BF16),
// "AVX512", "AVX2" or "DEFAULT".
std::string cpu_kernel_isa();

}  // namespace symattn
