// InOrder: the parts of a sum, handed in by any worker in any order, folded in one fixed order
// as soon as every earlier part is in, so the sum never depends on which worker finished first
// or on the thread count. The mirrored attention forward folds its row groups' running states
// through it (MirrorFolds), the LAMA backward its sequences' W (OrderedFold).
#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

namespace symattn::cpu {
namespace CPU_CAPABILITY {
namespace {

class InOrder {
 public:
  explicit InOrder(int64_t count = 0) : ready_(static_cast<size_t>(count), 0) {}

  // Room for one more part; returns its place in the order.
  int64_t add() {
    ready_.push_back(0);
    return static_cast<int64_t>(ready_.size()) - 1;
  }
  int64_t count() const { return static_cast<int64_t>(ready_.size()); }

  // Part k is in: fold(j) runs under the lock for each part j from the first one not yet folded,
  // while every part up to j is in. What a part's worker wrote before hand_in is visible to the
  // fold, whichever worker runs it.
  template <typename Fold>
  void hand_in(int64_t k, const Fold& fold) {
    std::lock_guard<std::mutex> guard(lock_);
    ready_[k] = 1;
    for (; next_ < count() && ready_[next_] != 0; ++next_) fold(next_);
  }

 private:
  std::mutex lock_;
  std::vector<char> ready_;
  int64_t next_ = 0;  // the first part not folded yet
};

}  // namespace
}  // namespace CPU_CAPABILITY
}  // namespace symattn::cpu
