// Stress harness for the lock-free paths, built with -fsanitize=thread by tests/test_servo_tsan.py:
// one producer pushing chunks as fast as it can, the servo thread at 2 kHz, one mailbox reader,
// and a stats reader, all at once; then the same with the shared-memory seqlock mailbox and two
// readers. Exits non-zero on any inconsistency (a torn or stale-after-newer target); TSan reports
// races.
#include <atomic>
#include <cstdio>
#include <memory>
#include <thread>
#include <vector>

#include "rt/clock.hpp"
#include "servo/backend.hpp"
#include "servo/servo_loop.hpp"

using namespace vlafast;

// Runs one loop on `backend` for 1.5 s of pushes while `read()` is polled by `readers` threads;
// returns the number of inconsistencies seen.
template <class Read>
int stress(const std::shared_ptr<servo::Backend>& backend, Read read, int readers, const char* name) {
  servo::ServoConfig cfg;
  cfg.hz = 2000.0;
  cfg.spin_us = 0.0;
  cfg.sched.realtime = false;
  cfg.max_horizon = 64;
  for (int j = 0; j < servo::kDof; ++j) {
    cfg.limits.q_min[j] = -10;
    cfg.limits.q_max[j] = 10;
    cfg.limits.v_max[j] = 5;
    cfg.limits.a_max[j] = 50;
  }
  servo::ServoLoop loop(cfg, backend, servo::Joints{});
  loop.start();

  std::atomic<bool> done{false};
  std::atomic<int> bad{0};
  std::vector<std::thread> pool;
  for (int r = 0; r < readers; ++r) {
    pool.emplace_back([&] {  // the forwarder side: sequence numbers never go backwards
      int64_t last = 0;
      while (!done.load()) {
        const servo::Target t = read();
        if (t.seq < last) ++bad;
        last = t.seq;
        // Every published target comes from a chunk whose rows are all equal to k / 1000.
        for (int j = 1; j < servo::kDof; ++j)
          if (t.q[j] != t.q[0]) ++bad;
      }
    });
  }
  std::thread stats([&] {
    while (!done.load()) (void)loop.stats();
  });

  std::vector<double> q(64 * servo::kDof);
  const int64_t start = rt::monotonic_ns();
  int k = 0;
  while (rt::monotonic_ns() - start < 1'500'000'000LL) {  // producer: 1.5 s of pushes
    for (double& x : q) x = (k % 1000) / 1000.0;
    // 64 waypoints 50 ms apart: a 3 s plan, so a push the scheduler delays is never stale
    loop.push(q.data(), 64, rt::monotonic_ns(), 50'000'000, 0);
    ++k;
  }
  loop.request_stop("stress done");
  loop.wait(120.0);  // returns once stopped (~0.1 s of braking); the bound is for a hang only
  done.store(true);
  for (auto& t : pool) t.join();
  stats.join();
  const servo::ServoStats s = loop.stats();
  std::printf("%s: pushes %d accepted %lld dropped %lld cycles %lld bad %d state %s\n", name, k,
              static_cast<long long>(s.accepted), static_cast<long long>(s.dropped),
              static_cast<long long>(s.cycles), bad.load(), s.state.c_str());
  return bad.load() + (s.state == "stopped" ? 0 : 1) + (s.accepted == k ? 0 : 1);
}

int main() {
  auto box = std::make_shared<servo::MailboxBackend>();
  const int bad_box = stress(box, [&] { return box->read(); }, 1, "mailbox");
  auto shared = std::make_unique<servo::SharedTarget>();  // value-initialised: zeroed, as a new shm block
  const servo::SharedTarget* raw = shared.get();
  const int bad_shared = stress(std::make_shared<servo::SharedMailboxBackend>(shared.get()),
                                [raw] { return servo::read_shared(raw); }, 2, "shared");
  std::printf("bad %d state stopped\n", bad_box + bad_shared);
  return bad_box + bad_shared == 0 ? 0 : 1;
}
