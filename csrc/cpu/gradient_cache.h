// Gradient buffers of the fused CPU backward passes (attention's dq and dv, LAMA's dh, dcontext,
// dp, dq and du), from blocks kept for the next call.
//
// Token gradients are megabytes each, freed by the caller between steps (optimizer.zero_grad()
// sets them to None) or as soon as the layer below has taken them, and allocated afresh by the
// next backward. glibc gives a freed block of that size back to the system whenever its heap's
// free top grows past the trim threshold (twice the largest block it has mmapped so far), which
// two such neighbours often do; the next backward's first write to every 4 KiB page of the new
// block is then a page fault in which the kernel zeroes the page: 2048 faults, about 1.7 ms of
// one core, per 8 MiB, more than the whole LAMA backward at B = 32, T = 128, m = 4, E = 256, and
// 3072 of them for attention's 12 MiB dq at (B, S, H, D) = (32, 128, 12, 64). Whether a call
// faults depends on what the process allocated before, so the same call ran at two speeds.
//
// Blocks handed out here go back to a small cache when their tensor dies, and a later buffer of
// about the same size takes one from it, its pages already mapped. The cache keeps at most
// kCacheBytes (least recently returned blocks leave first) and only blocks of at least kMinBytes;
// smaller buffers come from torch's allocator. Allocations are reported to the profiler when
// handed out and when returned, as torch's CPU allocator reports them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>
#include <cstdint>

namespace symattn {

constexpr size_t kGradientCacheMinBytes = size_t{1} << 20;
constexpr size_t kGradientCacheBytes = size_t{64} << 20;

// An uninitialised contiguous tensor shaped and typed like `like` (a CPU tensor), from the cache
// when a cached block of its size (up to 1/4 larger) is there; filled as torch.empty fills it
// under torch.utils.deterministic.fill_uninitialized_memory.
at::Tensor gradient_buffer_cpu(const at::Tensor& like);

// Bytes the cache holds now; with release = true it first frees them all.
int64_t cpu_gradient_cache(bool release);

}  // namespace symattn
