// Instruction-set selection for one kernel translation unit. Include it first, after defining
// SYMATTN_ISA_AVX2 or SYMATTN_ISA_AVX512 (or neither, for the portable DEFAULT build).
//
// setup.py compiles every source with the same flags and no -march, so the AVX2 / AVX-512
// translation units switch the instruction set themselves with `#pragma GCC target` and define
// the feature macros that ATen's at::vec and Sleef headers test (the pragma changes code
// generation only, not the predefined macros); attention_cpu.cpp calls them only when
// at::get_cpu_capability() reports that ISA (ATEN_CPU_CAPABILITY=avx2 / default lowers it).
// All kernel code has internal linkage in its own CPU_CAPABILITY namespace; the translation
// unit compiled without extra ISA (attention_cpu.cpp) comes first in the link, so any inline
// header function that several of them emit is taken from the portable one (checked with
// objdump: no VEX instruction outside the AVX2 / AVX512 namespaces). Other compilers and
// architectures build the portable kernels only.
#pragma once

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define SYMATTN_X86_DISPATCH 1
#endif

#if defined(SYMATTN_ISA_AVX512) && defined(SYMATTN_X86_DISPATCH)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#ifndef __AVX512F__
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#endif
#ifndef __AVX2__
#define __SSE3__ 1
#define __SSSE3__ 1
#define __SSE4_1__ 1
#define __SSE4_2__ 1
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#endif
#define SYMATTN_ISA_ENABLED 1
#elif defined(SYMATTN_ISA_AVX2) && defined(SYMATTN_X86_DISPATCH)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#ifndef __AVX2__
#define __SSE3__ 1
#define __SSSE3__ 1
#define __SSE4_1__ 1
#define __SSE4_2__ 1
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#endif
#define SYMATTN_ISA_ENABLED 1
#elif !defined(SYMATTN_ISA_AVX2) && !defined(SYMATTN_ISA_AVX512)
#define CPU_CAPABILITY DEFAULT
#define SYMATTN_ISA_ENABLED 1
#endif
