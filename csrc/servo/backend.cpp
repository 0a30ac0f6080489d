#include "servo/backend.hpp"

#include <stdexcept>
#include <string>

namespace vlafast::servo {

RecordingBackend::RecordingBackend(int64_t capacity, int64_t throw_after)
    : capacity_(capacity), throw_after_(throw_after) {
  if (capacity < 1) throw std::invalid_argument("capacity must be >= 1, got " + std::to_string(capacity));
  t_.resize(static_cast<size_t>(capacity));
  q_.resize(static_cast<size_t>(capacity) * kDof);
  v_.resize(static_cast<size_t>(capacity) * kDof);
}

void RecordingBackend::command(const Joints& q, const Joints& v, int64_t t_ns) {
  const int64_t n = calls_.fetch_add(1, std::memory_order_relaxed);
  if (throw_after_ >= 0 && n >= throw_after_) {
    throw std::runtime_error("RecordingBackend: injected fault at command " + std::to_string(n + 1));
  }
  const int64_t i = size_.load(std::memory_order_relaxed);
  if (i >= capacity_) return;
  t_[static_cast<size_t>(i)] = t_ns;
  for (int j = 0; j < kDof; ++j) {
    q_[static_cast<size_t>(i) * kDof + j] = q[j];
    v_[static_cast<size_t>(i) * kDof + j] = v[j];
  }
  size_.store(i + 1, std::memory_order_release);
}

void MailboxBackend::command(const Joints& q, const Joints& v, int64_t t_ns) {
  Target& slot = box_.back();
  slot.seq = ++seq_;
  slot.t_ns = t_ns;
  slot.q = q;
  slot.v = v;
  slot.stopped = false;
  last_q_ = q;
  last_t_ = t_ns;
  box_.publish();
}

void MailboxBackend::stop() {
  Target& slot = box_.back();
  slot.seq = ++seq_;
  slot.t_ns = last_t_;
  slot.q = last_q_;
  slot.v = Joints{};
  slot.stopped = true;
  box_.publish();
}

Target MailboxBackend::read() noexcept {
  box_.consume();
  return box_.front();
}

}  // namespace vlafast::servo
