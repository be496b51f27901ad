// The bfloat16 CPU attention kernels on AVX-512 with AVX512-BF16 (vdpbf16ps; see isa.h).
#define SYMATTN_ISA_AVX512_BF16
#include "isa.h"

#ifdef SYMATTN_ISA_ENABLED
#include "attention_kernel.h"
#endif
