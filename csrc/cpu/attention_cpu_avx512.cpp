// The fused CPU attention kernels compiled for AVX-512 (F, BW, VL, DQ; see isa.h).
#define SYMATTN_ISA_AVX512
#include "isa.h"

#ifdef SYMATTN_ISA_ENABLED
#include "attention_kernel.h"
#endif
