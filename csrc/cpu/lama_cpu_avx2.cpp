// The CPU LAMA kernels built for AVX2 (see isa.h).
#define SYMATTN_ISA_AVX2
#include "isa.h"

#ifdef SYMATTN_ISA_ENABLED
#include "lama_kernel.h"
#endif
