// Backends the servo thread calls every cycle. All are C++: no Python runs inside the loop.
//
//   NullBackend       counts commands (timing benchmarks).
//   RecordingBackend  stores every command in a preallocated buffer (tests); can be told to
//                     throw on the n-th command (fault injection).
//   MailboxBackend    publishes the newest command into a lock-free triple buffer; a Python
//                     thread outside the loop forwards it to MuJoCo at its own pace.
//   SharedMailboxBackend publishes it into a seqlock in memory the caller gives (a shared-memory
//                     block): a forwarder in another process (ur_rtde's) reads it without
//                     touching this process's interpreter lock.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "servo/chunk.hpp"
#include "servo/triple_buffer.hpp"

namespace vlafast::servo {

class Backend {
 public:
  virtual ~Backend() = default;
  // One servo target per cycle: position, velocity (rad, rad/s) at monotonic time t_ns.
  virtual void command(const Joints& q, const Joints& v, int64_t t_ns) = 0;
  // The loop has brought the arm to rest (or failed): stop servoing.
  virtual void stop() = 0;
};

class NullBackend final : public Backend {
 public:
  void command(const Joints&, const Joints&, int64_t) override {
    commands_.fetch_add(1, std::memory_order_relaxed);
  }
  void stop() override { stops_.fetch_add(1, std::memory_order_relaxed); }
  int64_t commands() const noexcept { return commands_.load(std::memory_order_relaxed); }
  int64_t stops() const noexcept { return stops_.load(std::memory_order_relaxed); }

 private:
  std::atomic<int64_t> commands_{0};
  std::atomic<int64_t> stops_{0};
};

class RecordingBackend final : public Backend {
 public:
  // Keeps the first `capacity` commands; `throw_after` >= 0 makes command number throw_after+1
  // (and every later one) throw std::runtime_error.
  explicit RecordingBackend(int64_t capacity, int64_t throw_after = -1);

  void command(const Joints& q, const Joints& v, int64_t t_ns) override;
  void stop() override { stops_.fetch_add(1, std::memory_order_relaxed); }

  // Commands recorded so far; rows [0, size()) of t/q/v are complete (release/acquire).
  int64_t size() const noexcept { return size_.load(std::memory_order_acquire); }
  int64_t calls() const noexcept { return calls_.load(std::memory_order_relaxed); }
  int64_t stops() const noexcept { return stops_.load(std::memory_order_relaxed); }
  const std::vector<int64_t>& t() const noexcept { return t_; }
  const std::vector<double>& q() const noexcept { return q_; }  // [capacity, kDof]
  const std::vector<double>& v() const noexcept { return v_; }  // [capacity, kDof]

 private:
  int64_t capacity_;
  int64_t throw_after_;
  std::vector<int64_t> t_;
  std::vector<double> q_, v_;
  std::atomic<int64_t> size_{0};
  std::atomic<int64_t> calls_{0};
  std::atomic<int64_t> stops_{0};
};

struct Target {
  int64_t seq = 0;   // 0: nothing commanded yet
  int64_t t_ns = 0;
  Joints q{};
  Joints v{};
  bool stopped = false;  // the loop called stop(): the forwarder must stop the robot
};

class MailboxBackend final : public Backend {
 public:
  MailboxBackend() : box_(Target{}) {}
  void command(const Joints& q, const Joints& v, int64_t t_ns) override;
  void stop() override;
  // Consumer side (one forwarding thread): the newest target published so far.
  Target read() noexcept;
  int64_t published() const noexcept { return seq_; }

 private:
  TripleBuffer<Target> box_;
  int64_t seq_ = 0;  // producer-owned (servo thread)
  Joints last_q_{};
  int64_t last_t_ = 0;
};

// The shared-memory layout: a seqlock (version odd while the writer is inside) over one Target.
// Every field is a lock-free atomic, so a reader in another process mapping the same block sees
// either the whole previous target or the whole new one.
struct SharedTarget {
  std::atomic<uint64_t> version;
  std::atomic<int64_t> seq;
  std::atomic<int64_t> t_ns;
  std::atomic<double> q[kDof];
  std::atomic<double> v[kDof];
  std::atomic<int64_t> stopped;
};
static_assert(std::atomic<double>::is_always_lock_free && std::atomic<uint64_t>::is_always_lock_free,
              "the shared mailbox needs lock-free 64-bit atomics");

// Reads the newest target out of a SharedTarget block (any process). Retries while the writer is
// inside; the writer is wait-free, so a read finishes within a few writes.
Target read_shared(const SharedTarget* box) noexcept;

class SharedMailboxBackend final : public Backend {
 public:
  // box: at least sizeof(SharedTarget) bytes, 8-byte aligned, zeroed (a fresh shared-memory
  // block); owned by the caller, who keeps it mapped while the loop runs.
  explicit SharedMailboxBackend(SharedTarget* box) : box_(box) {}
  void command(const Joints& q, const Joints& v, int64_t t_ns) override;
  void stop() override;
  int64_t published() const noexcept { return seq_; }

 private:
  void publish(const Joints& q, const Joints& v, int64_t t_ns, bool stopped) noexcept;
  SharedTarget* box_;
  int64_t seq_ = 0;  // producer-owned (servo thread)
  Joints last_q_{};
  int64_t last_t_ = 0;
};

}  // namespace vlafast::servo
