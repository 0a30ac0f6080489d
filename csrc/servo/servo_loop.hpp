// The servo thread: absolute-deadline cycles (rt::PeriodicClock), newest chunk from a
// lock-free buffer, interpolation, velocity / acceleration / position limits, one backend call
// per cycle, a watchdog, and statistics. Python never runs on this thread.
//
// States: holding (started, no chunk yet: holds the start pose) -> tracking (a chunk covers
// now) -> stopping (watchdog: the newest chunk's horizon ends before the next deadline; or a
// stop was requested: decelerate every joint at its acceleration limit) -> stopped (backend.stop() called, thread ends). A backend that
// throws ends the loop at once: there is no way left to move the arm, so stop() is attempted
// and the reason recorded.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "rt/periodic.hpp"
#include "servo/backend.hpp"
#include "servo/chunk.hpp"
#include "servo/triple_buffer.hpp"

namespace vlafast::servo {

struct Limits {
  Joints q_min{}, q_max{};  // rad
  Joints v_max{};           // rad/s, > 0
  Joints a_max{};           // rad/s^2, > 0
};

struct ServoConfig {
  double hz = 500.0;
  double spin_us = 100.0;
  rt::SchedRequest sched{};
  Interp interp = Interp::kCubic;
  Limits limits{};
  int max_horizon = 256;  // waypoints per chunk the buffer can hold

  void validate() const;  // throws std::invalid_argument naming the bad field
};

enum class State { kIdle, kHolding, kTracking, kStopping, kStopped };
const char* state_name(State s) noexcept;

struct Percentiles {
  double p50_us = 0, p99_us = 0, max_us = 0, mean_us = 0;
  int64_t n = 0;
};

struct ServoStats {
  std::string state, stop_reason;
  rt::SchedResult sched;
  int64_t cycles = 0, missed = 0, commands = 0;
  Percentiles jitter, chunk_age, latency;  // lateness per cycle; age per cycle; obs->command per chunk
  int64_t pushed = 0, accepted = 0, rejected_nonfinite = 0, rejected_limits = 0, rejected_stale = 0, dropped = 0;
  int64_t executed_chunks = 0;  // chunks that produced at least one command
  int64_t clamped_cycles = 0;   // cycles where a velocity / acceleration / position limit bit
  double max_abs_v = 0, max_abs_a = 0;  // over commanded targets (rad/s, rad/s^2)
  Joints q{}, v{};                      // last commanded target
};

// kStale: the chunk ends before the loop's next deadline, so it could only trigger the watchdog;
// it is refused so that a late chunk never displaces one that still has a horizon.
enum class PushResult { kAccepted, kNonFinite, kOutOfLimits, kStale };

class ServoLoop {
 public:
  ServoLoop(const ServoConfig& cfg, std::shared_ptr<Backend> backend, const Joints& q0);
  ~ServoLoop();  // requests a stop and joins: the thread never outlives the object
  ServoLoop(const ServoLoop&) = delete;
  ServoLoop& operator=(const ServoLoop&) = delete;

  void start();  // spawns the thread; throws std::logic_error when called twice

  // Producer side (one thread at a time): copies q: [T, kDof] row-major into the buffer.
  // Shape errors throw std::invalid_argument; unsafe chunks are counted and rejected.
  PushResult push(const double* q, int T, int64_t t0_ns, int64_t dt_ns, int64_t obs_ns);

  void request_stop(const std::string& reason);  // decelerate, then stop the backend
  bool wait(double timeout_s);                   // true once the thread has ended
  State state() const noexcept { return state_.load(std::memory_order_acquire); }
  ServoStats stats() const;
  const ServoConfig& config() const noexcept { return cfg_; }
  int64_t period_ns() const noexcept { return period_ns_; }

 private:
  void run();
  void finish(const std::string& reason);
  bool step_tracking(const Sample& want, Joints& q, Joints& v) const noexcept;
  bool step_stopping(Joints& q, Joints& v) const noexcept;

  // Lock-free sample rings the servo thread writes and stats() reads (relaxed: statistics).
  struct Ring {
    explicit Ring(size_t n) : data(std::make_unique<std::atomic<int64_t>[]>(n)), size(n) {}
    void add(int64_t x) noexcept;
    std::vector<int64_t> snapshot() const;
    std::unique_ptr<std::atomic<int64_t>[]> data;
    size_t size;
    std::atomic<int64_t> count{0};
  };

  ServoConfig cfg_;
  std::shared_ptr<Backend> backend_;
  int64_t period_ns_, spin_ns_;
  double dt_s_;
  Joints q0_;

  TripleBuffer<Chunk> chunks_;
  int64_t push_seq_ = 0;  // producer-owned

  std::atomic<State> state_{State::kIdle};
  std::atomic<bool> stop_requested_{false};
  bool started_ = false;
  std::thread thread_;
  std::mutex join_mu_;  // wait() may be called from several Python threads

  // Written by the servo thread, read by stats().
  Ring jitter_, age_, latency_;
  std::atomic<int64_t> cycles_{0}, missed_{0}, commands_{0}, executed_{0}, clamped_{0};
  std::atomic<int64_t> pushed_{0}, accepted_{0}, rej_nonfinite_{0}, rej_limits_{0}, rej_stale_{0}, dropped_{0};
  std::atomic<double> max_abs_v_{0}, max_abs_a_{0};
  std::array<std::atomic<double>, kDof> q_cmd_{}, v_cmd_{};
  mutable std::mutex text_mu_;  // guards the strings below; never taken inside a cycle
  std::string stop_reason_, request_reason_;
  rt::SchedResult sched_;
};

}  // namespace vlafast::servo
