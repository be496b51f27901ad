// The CPU LAMA kernels built for AVX512 (see isa.h).
#define SYMATTN_ISA_AVX512
#include "isa.h"

#ifdef SYMATTN_ISA_ENABLED
#include "lama_kernel.h"
#endif
