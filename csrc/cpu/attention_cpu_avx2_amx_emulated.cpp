// The bfloat16 CPU attention kernels of the AVX512_AMX build on AVX2 and an emulated tile unit, a
// check build that runs only on request (SYMATTN_CPU_ISA=avx2_amx_emulated; see isa.h).
#define SYMATTN_ISA_AVX2_AMX_EMULATED
#include "isa.h"

#ifdef SYMATTN_ISA_ENABLED
#include "attention_kernel.h"
#endif
