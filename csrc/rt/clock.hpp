// Monotonic time in integer nanoseconds, the one clock every part of the real-time core uses.
#pragma once

#include <cstdint>
#include <ctime>

namespace vlafast::rt {

// CLOCK_MONOTONIC in nanoseconds: the clock clock_nanosleep(TIMER_ABSTIME) sleeps on, and the
// same clock std::chrono::steady_clock reads on Linux, so deadlines from either agree.
inline int64_t monotonic_ns() noexcept {
  timespec ts{};
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000LL + ts.tv_nsec;
}

}  // namespace vlafast::rt
