// The CPU LAMA kernels of the AVX512_BF16 build on AVX2, a check build that runs only on request
// (SYMATTN_CPU_ISA=avx2_bf16_pairs; see isa.h).
#define SYMATTN_ISA_AVX2_BF16_PAIRS
#include "isa.h"

#ifdef SYMATTN_ISA_ENABLED
#include "lama_kernel.h"
#endif
