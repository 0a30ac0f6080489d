// Single-producer / single-consumer "newest value wins" buffer: three preallocated slots and one
// atomic word. Wait-free on both sides; no slot is ever read and written at the same time.
//
// The producer fills its private back slot, then swaps it with the shared middle slot (setting
// the fresh bit). The consumer, when the fresh bit is set, swaps its front slot with the middle.
// A publish that finds the fresh bit still set replaced a value nobody read: it is counted as
// dropped. Slots are constructed once (callers size their storage up front), so neither side
// allocates after construction.
#pragma once

#include <array>
#include <atomic>
#include <cstdint>
#include <utility>

namespace vlafast::servo {

template <typename T>
class TripleBuffer {
 public:
  explicit TripleBuffer(const T& prototype) : slots_{prototype, prototype, prototype} {}

  TripleBuffer(const TripleBuffer&) = delete;
  TripleBuffer& operator=(const TripleBuffer&) = delete;

  // Producer side: the slot to fill before publish(). Only the producer thread may touch it.
  T& back() noexcept { return slots_[back_]; }

  // Producer side: hands the back slot to the consumer. Returns true when it replaced a value
  // the consumer never saw.
  bool publish() noexcept {
    const uint32_t prev = middle_.exchange(back_ | kFresh, std::memory_order_acq_rel);
    back_ = prev & kIndex;
    return (prev & kFresh) != 0;
  }

  // Consumer side: takes the newest published value when there is one. Returns true when the
  // front slot changed.
  bool consume() noexcept {
    if ((middle_.load(std::memory_order_relaxed) & kFresh) == 0) return false;
    const uint32_t prev = middle_.exchange(front_, std::memory_order_acq_rel);
    front_ = prev & kIndex;
    return true;
  }

  // Consumer side: the value last taken by consume(). Only the consumer thread may touch it.
  const T& front() const noexcept { return slots_[front_]; }

 private:
  static constexpr uint32_t kFresh = 4;
  static constexpr uint32_t kIndex = 3;
  std::array<T, 3> slots_;
  uint32_t back_ = 0;                // producer-owned
  uint32_t front_ = 1;               // consumer-owned
  std::atomic<uint32_t> middle_{2};  // shared: index | fresh bit
};

}  // namespace vlafast::servo
