// Host entry points of the CPU kernels that csrc/symattn.cpp refers to directly.
#pragma once

#include <string>

namespace symattn {

// Which instruction set the CPU kernels run with here: "AVX512", "AVX2" or "DEFAULT".
std::string cpu_kernel_isa();

}  // namespace symattn
