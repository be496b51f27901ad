// gradient_buffer_cpu and its block cache (see gradient_cache.h).
#include "gradient_cache.h"

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/native/TensorFactories.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <deque>
#include <mutex>
#include <vector>

#if !defined(_WIN32)
#include <pthread.h>
#endif

namespace symattn {
namespace {

struct Block {
  void* data;
  size_t bytes;
};

class GradientCache final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kGradientCacheMinBytes) return c10::GetCPUAllocator()->allocate(nbytes);
    Block* block = take(nbytes);
    if (block == nullptr) block = new Block{c10::alloc_cpu(nbytes), nbytes};
    c10::profiledCPUMemoryReporter().New(block->data, nbytes);
    return {block->data, block, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  int64_t cached(bool release) {
    std::vector<Block*> freed;
    int64_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (release) {
        freed.assign(blocks_.begin(), blocks_.end());
        blocks_.clear();
        cached_ = 0;
      }
      bytes = static_cast<int64_t>(cached_);
    }
    free_blocks(freed);
    return bytes;
  }

 private:
  // The smallest cached block that holds nbytes with at most a quarter to spare, taken out of the
  // cache; null when there is none.
  Block* take(size_t nbytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    auto best = blocks_.end();
    for (auto it = blocks_.begin(); it != blocks_.end(); ++it) {
      const size_t bytes = (*it)->bytes;
      if (bytes >= nbytes && bytes - nbytes <= nbytes / 4 && (best == blocks_.end() || bytes < (*best)->bytes)) {
        best = it;
      }
    }
    if (best == blocks_.end()) return nullptr;
    Block* block = *best;
    blocks_.erase(best);
    cached_ -= block->bytes;
    return block;
  }

  // A tensor's block comes back: cached, the oldest cached blocks freed while the cache is over
  // its bound.
  void put(Block* block) {
    std::vector<Block*> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks_.push_back(block);
      cached_ += block->bytes;
      while (cached_ > kGradientCacheBytes) {
        freed.push_back(blocks_.front());
        cached_ -= blocks_.front()->bytes;
        blocks_.pop_front();
      }
    }
    free_blocks(freed);
  }

  static void free_blocks(const std::vector<Block*>& blocks) {
    for (Block* block : blocks) {
      c10::free_cpu(block->data);
      delete block;
    }
  }

  static void give_back(void* context);

 public:
  // pthread_atfork handlers (cache()): a fork while another thread held the lock would leave it
  // held for good in the child, which then hangs at its first cached buffer; the forking thread
  // holds it across fork instead, as glibc's malloc does with its arenas.
  void lock_for_fork() { mutex_.lock(); }
  void unlock_after_fork() { mutex_.unlock(); }

 private:
  std::mutex mutex_;
  std::deque<Block*> blocks_;  // least recently returned first
  size_t cached_ = 0;
};

GradientCache* the_cache = nullptr;  // set once, by cache(), before the fork handlers can run

// Never destroyed: a tensor that outlives static destruction still returns its block here.
GradientCache& cache() {
  static const bool created = [] {
    the_cache = new GradientCache();
#if !defined(_WIN32)
    pthread_atfork([] { the_cache->lock_for_fork(); }, [] { the_cache->unlock_after_fork(); },
                   [] { the_cache->unlock_after_fork(); });
#endif
    return true;
  }();
  (void)created;
  return *the_cache;
}

void GradientCache::give_back(void* context) {
  auto* block = static_cast<Block*>(context);
  c10::profiledCPUMemoryReporter().Delete(block->data);
  cache().put(block);
}

}  // namespace

at::Tensor gradient_buffer_cpu(const at::Tensor& like) {
  TORCH_CHECK(like.device().is_cpu(), "symattn gradient_buffer_cpu: like must be a CPU tensor, got ", like.device());
  at::Tensor out = at::detail::empty_generic(like.sizes(), &cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                             like.scalar_type(), std::nullopt);
  // As torch.empty: NaN-filled under torch.utils.deterministic.fill_uninitialized_memory.
  if (at::globalContext().deterministicAlgorithms() && at::globalContext().deterministicFillUninitializedMemory()) {
    at::native::fill_empty_deterministic_(out);
  }
  return out;
}

int64_t cpu_gradient_cache(bool release) { return cache().cached(release); }

TORCH_LIBRARY_IMPL(symattn, CPU, m) { m.impl("gradient_buffer_cpu", &gradient_buffer_cpu); }

}  // namespace symattn
