// Instruction-set selection for one kernel translation unit. Include it first, after defining
// SYMATTN_ISA_AVX2, SYMATTN_ISA_AVX512, SYMATTN_ISA_AVX512_BF16 or SYMATTN_ISA_AVX512_AMX (or
// none, for the portable DEFAULT build).
//
// setup.py compiles every source with the same flags and no -march, so each ISA translation
// unit switches the instruction set itself with `#pragma GCC target` (the same code generation
// as -mavx2 ... / -mavx512bf16 for that file alone) and defines the feature macros that ATen's
// at::vec and Sleef headers test; attention_cpu.cpp calls a build only when the CPU has its ISA
// (at::get_cpu_capability(), which ATEN_CPU_CAPABILITY=avx2 / default lowers; cpuid for
// AVX512-BF16). All kernel code has internal linkage in its own CPU_CAPABILITY namespace; the
// translation unit compiled without extra ISA (attention_cpu.cpp) comes first in the link, so any
// inline header function that several of them emit is taken from the portable one (checked with
// objdump: no VEX / EVEX instruction outside the ISA namespaces). Other compilers and
// architectures build the portable kernels only.
#pragma once

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define SYMATTN_X86_DISPATCH 1
#endif

// SYMATTN_ISA_LEVEL: 0 portable, 1 AVX2 + FMA, 2 AVX-512 (F, BW, VL, DQ), 3 AVX-512 + BF16,
// 4 AVX-512 + BF16 + AMX (tile unit with AMX-BF16).
#if defined(SYMATTN_ISA_AVX512_AMX) && defined(SYMATTN_X86_DISPATCH)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX512_AMX
#define SYMATTN_ISA_LEVEL 4
#elif defined(SYMATTN_ISA_AVX512_BF16) && defined(SYMATTN_X86_DISPATCH)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX512_BF16
#define SYMATTN_ISA_LEVEL 3
#elif defined(SYMATTN_ISA_AVX512) && defined(SYMATTN_X86_DISPATCH)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX512
#define SYMATTN_ISA_LEVEL 2
#elif defined(SYMATTN_ISA_AVX2) && defined(SYMATTN_X86_DISPATCH)
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX2
#define SYMATTN_ISA_LEVEL 1
#elif defined(SYMATTN_ISA_AVX2_BF16_PAIRS) && defined(SYMATTN_X86_DISPATCH)
// A check build, not a level: the AVX512_BF16 kernels' bfloat16 data path (operands as bf16
// pairs, their panels and workspace) on AVX2, vdpbf16ps done as two FMAs of the exact bf16
// products. It runs only where SYMATTN_CPU_ISA=avx2_bf16_pairs asks for it, so that every x86-64
// machine with AVX2 tests the code the AVX512-BF16 and AMX CPUs run (attention_gemm.h).
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX2_BF16_PAIRS
#define SYMATTN_ISA_LEVEL 1
#define SYMATTN_BF16_DOT 1
#define SYMATTN_BF16_PAIRS_ON_AVX2 1
#elif defined(SYMATTN_ISA_AVX2_AMX_EMULATED) && defined(SYMATTN_X86_DISPATCH)
// The second check build: the AVX512_AMX kernels (their task plan and tile products) on AVX2,
// the tile unit emulated in software (amx_emulated.h), on SYMATTN_CPU_ISA=avx2_amx_emulated.
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define CPU_CAPABILITY AVX2_AMX_EMULATED
#define SYMATTN_ISA_LEVEL 1
#define SYMATTN_BF16_DOT 1
#define SYMATTN_BF16_PAIRS_ON_AVX2 1
#define SYMATTN_AMX_DOT 1
#define SYMATTN_AMX_EMULATED 1
#elif !defined(SYMATTN_ISA_AVX2) && !defined(SYMATTN_ISA_AVX512) && !defined(SYMATTN_ISA_AVX512_BF16) && \
    !defined(SYMATTN_ISA_AVX512_AMX) && !defined(SYMATTN_ISA_AVX2_BF16_PAIRS) && !defined(SYMATTN_ISA_AVX2_AMX_EMULATED)
#define CPU_CAPABILITY DEFAULT
#define SYMATTN_ISA_LEVEL 0
#endif

// The feature macros of each level, cumulatively (the pragma alone does not define them).
#if defined(SYMATTN_ISA_LEVEL) && SYMATTN_ISA_LEVEL >= 1
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
#endif
#if defined(SYMATTN_ISA_LEVEL) && SYMATTN_ISA_LEVEL >= 2
#ifndef __AVX512F__
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#endif
#endif
#if defined(SYMATTN_ISA_LEVEL) && SYMATTN_ISA_LEVEL >= 3
#ifndef __AVX512BF16__
#define __AVX512BF16__ 1
#endif
#define SYMATTN_BF16_DOT 1  // attention_kernel.h: bfloat16 products on vdpbf16ps
#endif
#if defined(SYMATTN_ISA_LEVEL) && SYMATTN_ISA_LEVEL >= 4
#define SYMATTN_AMX_DOT 1  // attention_kernel.h: the bfloat16 products on AMX tiles (amx_gemm.h)
#endif

// at::vec's per-ISA code paths: the AVX-512 ones serve the BF16 build too.
#if defined(SYMATTN_ISA_LEVEL) && SYMATTN_ISA_LEVEL >= 2
#define CPU_CAPABILITY_AVX512
#elif defined(SYMATTN_ISA_LEVEL) && SYMATTN_ISA_LEVEL == 1
#define CPU_CAPABILITY_AVX2
#endif

#ifdef SYMATTN_ISA_LEVEL
#define SYMATTN_ISA_ENABLED 1
#endif
