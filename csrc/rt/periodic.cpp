#include "rt/periodic.hpp"

#include <pthread.h>
#include <sched.h>
#include <sys/prctl.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "rt/clock.hpp"

namespace vlafast::rt {

SchedResult apply_sched(const SchedRequest& req) {
  SchedResult out;
  out.policy = "SCHED_OTHER";
  // The default 50 us timer slack would dominate our jitter; ask for the tightest wake-ups.
  prctl(PR_SET_TIMERSLACK, 1UL, 0UL, 0UL, 0UL);

  if (req.cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(req.cpu, &set);
    const int rc = pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
    if (rc == 0) {
      out.cpu = req.cpu;
    } else {
      out.reason = "affinity to cpu " + std::to_string(req.cpu) + " refused: " + std::strerror(rc) + "; ";
    }
  }
  if (!req.realtime) {
    out.reason += "realtime scheduling not requested";
    return out;
  }
  sched_param param{};
  param.sched_priority = req.priority;
  const int rc = pthread_setschedparam(pthread_self(), SCHED_FIFO, &param);
  if (rc == 0) {
    out.policy = "SCHED_FIFO";
  } else {
    out.reason += std::string("SCHED_FIFO refused (") + std::strerror(rc) +
                  "): run as root or grant CAP_SYS_NICE / an rtprio limit";
  }
  return out;
}

void sleep_until_ns(int64_t deadline_ns, int64_t spin_ns) noexcept {
  const int64_t wake_ns = deadline_ns - spin_ns;
  if (monotonic_ns() < wake_ns) {
    timespec ts{};
    ts.tv_sec = static_cast<time_t>(wake_ns / 1'000'000'000LL);
    ts.tv_nsec = static_cast<long>(wake_ns % 1'000'000'000LL);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr) == EINTR) {
    }
  }
  while (monotonic_ns() < deadline_ns) {
  }
}

PeriodicClock::PeriodicClock(int64_t period_ns, int64_t spin_ns, int64_t start_ns)
    : period_ns_(period_ns), spin_ns_(spin_ns), deadline_ns_(start_ns) {}

int64_t PeriodicClock::wait_next() noexcept {
  deadline_ns_ += period_ns_;
  sleep_until_ns(deadline_ns_, spin_ns_);
  const int64_t late = monotonic_ns() - deadline_ns_;
  if (late >= period_ns_) {
    const int64_t skipped = late / period_ns_;
    missed_ += skipped;
    deadline_ns_ += skipped * period_ns_;
  }
  return late;
}

JitterStats summarise(std::vector<int64_t>& lateness_ns, int64_t missed) {
  JitterStats s;
  s.cycles = static_cast<int64_t>(lateness_ns.size());
  s.missed = missed;
  if (lateness_ns.empty()) return s;
  std::sort(lateness_ns.begin(), lateness_ns.end());
  auto pct = [&](double q) {
    const size_t idx = static_cast<size_t>(std::ceil(q * static_cast<double>(lateness_ns.size()))) - 1;
    return static_cast<double>(lateness_ns[std::min(idx, lateness_ns.size() - 1)]) / 1e3;
  };
  double sum = 0;
  for (const int64_t v : lateness_ns) sum += static_cast<double>(v);
  s.p50_us = pct(0.50);
  s.p99_us = pct(0.99);
  s.max_us = static_cast<double>(lateness_ns.back()) / 1e3;
  s.mean_us = sum / static_cast<double>(lateness_ns.size()) / 1e3;
  return s;
}

namespace {

[[noreturn]] void bad_argument(const char* name, const std::string& range, double got) {
  std::ostringstream msg;
  msg << name << " must be in " << range << ", got " << got;
  throw std::invalid_argument(msg.str());
}

}  // namespace

void validate_loop_args(double hz, double seconds, double spin_us, const SchedRequest& req) {
  if (!(hz > 0.0 && hz <= kMaxHz)) bad_argument("hz", "(0, 10000]", hz);
  if (!(seconds > 0.0 && seconds <= kMaxSeconds)) bad_argument("seconds", "(0, 3600]", seconds);
  const double period_us = 1e6 / hz;
  if (!(spin_us >= 0.0 && spin_us < period_us)) {
    std::ostringstream range;
    range << "[0, period = " << period_us << " us)";
    bad_argument("spin_us", range.str(), spin_us);
  }
  if (req.realtime && (req.priority < 1 || req.priority > 99)) bad_argument("priority", "[1, 99]", req.priority);
}

LoopReport measure_loop(double hz, double seconds, double spin_us, const SchedRequest& req) {
  validate_loop_args(hz, seconds, spin_us, req);
  const auto period_ns = static_cast<int64_t>(std::llround(1e9 / hz));
  const auto cycles = static_cast<int64_t>(std::llround(hz * seconds));
  const auto spin_ns = static_cast<int64_t>(std::llround(spin_us * 1e3));

  LoopReport report;
  report.hz = hz;
  report.seconds = seconds;
  report.spin_us = spin_us;
  std::vector<int64_t> lateness;
  lateness.reserve(static_cast<size_t>(cycles));
  int64_t missed = 0;

  // A fresh thread, so the caller's scheduling policy is never changed.
  std::thread worker([&] {
    report.sched = apply_sched(req);
    PeriodicClock clock(period_ns, spin_ns, monotonic_ns() + period_ns);
    while (static_cast<int64_t>(lateness.size()) < cycles) {
      lateness.push_back(clock.wait_next());
    }
    missed = clock.missed();
  });
  worker.join();
  report.stats = summarise(lateness, missed);
  return report;
}

}  // namespace vlafast::rt
