// The CPU LAMA kernels built for AVX512_BF16, bfloat16 only: dot products on vdpbf16ps (see isa.h).
#define SYMATTN_ISA_AVX512_BF16
#include "isa.h"

#ifdef SYMATTN_ISA_ENABLED
#include "lama_kernel.h"
#endif
