// gradient_buffer_cpu (see huge_pages.h): an allocator that maps large blocks 2 MiB-aligned on
// transparent huge pages.
#include "huge_pages.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <cstdint>
#include <fstream>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace symattn {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
constexpr size_t kPage = size_t{4} << 10;

// Whether madvise(MADV_HUGEPAGE) can take effect: the system's setting is "always" or "madvise".
bool huge_pages_available() {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  static const bool available = [] {
    std::ifstream setting("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string text;
    std::getline(setting, text);
    return text.find("[always]") != std::string::npos || text.find("[madvise]") != std::string::npos;
  }();
  return available;
#else
  return false;
#endif
}

struct Mapping {
  void* data;
  size_t bytes;  // mapped length, a whole number of 4 KiB pages
};

void unmap(void* ctx) {
  auto* mapping = static_cast<Mapping*>(ctx);
  c10::profiledCPUMemoryReporter().Delete(mapping->data);
#if defined(__linux__)
  munmap(mapping->data, mapping->bytes);
#endif
  delete mapping;
}

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (nbytes >= kHugePage && huge_pages_available()) {
      // Map a huge page more than needed, then unmap the misaligned head and what lies past the
      // last 4 KiB page: the block starts on a 2 MiB boundary and takes no more than it needs.
      const size_t bytes = (nbytes + kPage - 1) / kPage * kPage;
      void* raw = mmap(nullptr, bytes + kHugePage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (raw != MAP_FAILED) {
        const auto start = reinterpret_cast<uintptr_t>(raw);
        const uintptr_t aligned = (start + kHugePage - 1) & ~(kHugePage - 1);
        if (aligned > start) munmap(raw, aligned - start);
        const uintptr_t end = start + bytes + kHugePage;
        if (end > aligned + bytes) munmap(reinterpret_cast<void*>(aligned + bytes), end - aligned - bytes);
        auto* data = reinterpret_cast<void*>(aligned);
        // Whole huge pages only: a partial last one would take 2 MiB of memory for less.
        madvise(data, bytes / kHugePage * kHugePage, MADV_HUGEPAGE);
        c10::profiledCPUMemoryReporter().New(data, nbytes);
        return {data, new Mapping{data, bytes}, &unmap, c10::Device(c10::DeviceType::CPU)};
      }
    }
#endif
    return c10::GetDefaultCPUAllocator()->allocate(nbytes);
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }
};

HugePageAllocator huge_page_allocator;

}  // namespace

at::Tensor gradient_buffer_cpu(const at::Tensor& like) {
  TORCH_CHECK(like.device().is_cpu(), "gradient_buffer_cpu: like must be a CPU tensor");
  return at::detail::empty_generic(like.sizes(), &huge_page_allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   like.scalar_type(), std::nullopt);
}

TORCH_LIBRARY_IMPL(symattn, CPU, m) { m.impl("gradient_buffer_cpu", &gradient_buffer_cpu); }

}  // namespace symattn
