// Uninitialised CPU tensors whose large allocations sit on transparent huge pages.
#pragma once

#include <ATen/core/Tensor.h>

namespace symattn {

// A contiguous tensor shaped and typed like `like`, for a kernel to overwrite. A gradient buffer
// of several MiB is often fresh memory (the C library returns freed blocks of that size to the
// system), and the first write to each of its 4 KiB pages then costs a page fault: about 2048
// faults per 8 MiB, milliseconds per call. Allocations of at least one huge page (2 MiB) are
// therefore mapped here 2 MiB-aligned and advised MADV_HUGEPAGE, so that they fault in 2 MiB at
// a time; smaller ones, and every allocation where transparent huge pages are off or unknown,
// come from torch's CPU allocator. Allocations are reported to the profiler either way.
at::Tensor gradient_buffer_cpu(const at::Tensor& like);

}  // namespace symattn
