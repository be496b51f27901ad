// The bfloat16 CPU attention kernels with their products on AMX tiles (TDPBF16PS; amx_gemm.h),
// the rest as in the AVX512_BF16 build. attention_cpu.cpp runs it only where the CPU has AMX-BF16
// and Linux grants the process the tile state.
#define SYMATTN_ISA_AVX512_AMX
#include "isa.h"

#ifdef SYMATTN_ISA_ENABLED
#include "attention_kernel.h"
#endif
