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

void SharedMailboxBackend::publish(const Joints& q, const Joints& v, int64_t t_ns, bool stopped) noexcept {
  const uint64_t ver = box_->version.load(std::memory_order_relaxed);
  box_->version.store(ver + 1, std::memory_order_relaxed);  // odd: writing
  std::atomic_thread_fence(std::memory_order_release);
  box_->seq.store(++seq_, std::memory_order_relaxed);
  box_->t_ns.store(t_ns, std::memory_order_relaxed);
  for (int j = 0; j < kDof; ++j) {
    box_->q[j].store(q[j], std::memory_order_relaxed);
    box_->v[j].store(v[j], std::memory_order_relaxed);
  }
  box_->stopped.store(stopped ? 1 : 0, std::memory_order_relaxed);
  box_->version.store(ver + 2, std::memory_order_release);  // even: done
}

void SharedMailboxBackend::command(const Joints& q, const Joints& v, int64_t t_ns) {
  last_q_ = q;
  last_t_ = t_ns;
  publish(q, v, t_ns, false);
}

void SharedMailboxBackend::stop() { publish(last_q_, Joints{}, last_t_, true); }

Target read_shared(const SharedTarget* box) noexcept {
  Target t;
  for (;;) {
    const uint64_t v1 = box->version.load(std::memory_order_acquire);
    if (v1 & 1u) continue;  // the writer is inside
    t.seq = box->seq.load(std::memory_order_relaxed);
    t.t_ns = box->t_ns.load(std::memory_order_relaxed);
    for (int j = 0; j < kDof; ++j) {
      t.q[j] = box->q[j].load(std::memory_order_relaxed);
      t.v[j] = box->v[j].load(std::memory_order_relaxed);
    }
    t.stopped = box->stopped.load(std::memory_order_relaxed) != 0;
    std::atomic_thread_fence(std::memory_order_acquire);
    if (box->version.load(std::memory_order_relaxed) == v1) return t;
  }
}

}  // namespace vlafast::servo
