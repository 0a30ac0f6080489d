// Absolute-deadline periodic loop: the timing core of the servo thread.
//
// Each cycle sleeps with clock_nanosleep(TIMER_ABSTIME) until `spin_ns` before the deadline,
// then busy-waits the rest. Measured on the 2-core CI VM at 500 Hz (2500 cycles, lateness):
//   SCHED_OTHER, sleep only          p50 85 us  p99 115 us  max 2.8 ms  (timer slack ~50 us)
//   SCHED_OTHER, 100 us spin         p50  0 us  p99  24 us  max 219 us
//   SCHED_FIFO,  sleep only          p50 43 us  p99  50 us  max  79 us
//   SCHED_FIFO,  100 us spin         p50  0 us  p99 0.1 us max 398 us
// std::this_thread::sleep_until behaved the same or worse, so we use clock_nanosleep and
// drop the thread's timer slack to 1 ns.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace vlafast::rt {

struct SchedRequest {
  bool realtime = true;   // try SCHED_FIFO; fall back to SCHED_OTHER with a reason
  int priority = 80;      // SCHED_FIFO priority, 1..99
  int cpu = -1;           // pin to this CPU when >= 0
};

struct SchedResult {
  std::string policy;     // "SCHED_FIFO" or "SCHED_OTHER"
  std::string reason;     // why realtime was not used (empty when it was)
  int cpu = -1;           // CPU the thread was pinned to, -1 when not pinned
};

// Applies `req` to the calling thread (priority, affinity, 1 ns timer slack).
SchedResult apply_sched(const SchedRequest& req);

// Sleeps until `deadline_ns` (monotonic): clock_nanosleep to deadline - spin_ns, then spin.
void sleep_until_ns(int64_t deadline_ns, int64_t spin_ns) noexcept;

// Drives a callback on absolute deadlines start + i * period. A cycle that wakes more than a
// whole period late counts as missed, and the schedule skips forward (no burst of catch-up
// cycles).
class PeriodicClock {
 public:
  PeriodicClock(int64_t period_ns, int64_t spin_ns, int64_t start_ns);

  // Waits for the next deadline; returns the lateness of this wake-up in ns (>= 0).
  int64_t wait_next() noexcept;

  int64_t period_ns() const noexcept { return period_ns_; }
  int64_t deadline_ns() const noexcept { return deadline_ns_; }
  int64_t missed() const noexcept { return missed_; }

 private:
  int64_t period_ns_;
  int64_t spin_ns_;
  int64_t deadline_ns_;
  int64_t missed_ = 0;
};

struct JitterStats {
  int64_t cycles = 0;
  int64_t missed = 0;
  double p50_us = 0, p99_us = 0, max_us = 0, mean_us = 0;
};

// Summarises lateness samples (ns) into percentiles (us). Sorts `lateness_ns` in place.
JitterStats summarise(std::vector<int64_t>& lateness_ns, int64_t missed);

struct LoopReport {
  double hz = 0, seconds = 0, spin_us = 0;
  JitterStats stats;
  SchedResult sched;
};

// Runs an empty periodic loop for `seconds` at `hz` on a fresh thread and reports its jitter.
// Throws std::invalid_argument for hz outside (0, kMaxHz], seconds outside (0, kMaxSeconds],
// spin_us outside [0, period).
constexpr double kMaxHz = 10000.0;
constexpr double kMaxSeconds = 3600.0;
void validate_loop_args(double hz, double seconds, double spin_us, const SchedRequest& req);
LoopReport measure_loop(double hz, double seconds, double spin_us, const SchedRequest& req);

}  // namespace vlafast::rt
