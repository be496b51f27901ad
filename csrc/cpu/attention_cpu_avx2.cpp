// The fused CPU attention kernels compiled for AVX2 + FMA (see isa.h).
#define SYMATTN_ISA_AVX2
#include "isa.h"

#ifdef SYMATTN_ISA_ENABLED
#include "attention_kernel.h"
#endif
