// vlafast._C: the compiled core. No libtorch: plain pybind11 over C++17.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "rt/clock.hpp"
#include "rt/periodic.hpp"

namespace py = pybind11;
using namespace vlafast::rt;

namespace {

py::dict report_to_dict(const LoopReport& r) {
  py::dict d;
  d["hz"] = r.hz;
  d["seconds"] = r.seconds;
  d["spin_us"] = r.spin_us;
  d["cycles"] = r.stats.cycles;
  d["missed"] = r.stats.missed;
  d["p50_us"] = r.stats.p50_us;
  d["p99_us"] = r.stats.p99_us;
  d["max_us"] = r.stats.max_us;
  d["mean_us"] = r.stats.mean_us;
  d["policy"] = r.sched.policy;
  d["reason"] = r.sched.reason;
  d["cpu"] = r.sched.cpu;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "vlafast compiled core: real-time timing and servo loop";

  m.def("monotonic_ns", &monotonic_ns, "CLOCK_MONOTONIC in nanoseconds (same clock as time.monotonic_ns).");

  m.def(
      "sleep_until_ns",
      [](int64_t deadline_ns, double spin_us) {
        if (spin_us < 0) throw std::invalid_argument("spin_us must be >= 0");
        py::gil_scoped_release release;
        sleep_until_ns(deadline_ns, static_cast<int64_t>(spin_us * 1e3));
      },
      py::arg("deadline_ns"), py::arg("spin_us") = 100.0,
      "Sleep until a monotonic deadline: clock_nanosleep, then spin the last spin_us.");

  m.def(
      "measure_loop",
      [](double hz, double seconds, double spin_us, bool realtime, int priority, int cpu) {
        SchedRequest req;
        req.realtime = realtime;
        req.priority = priority;
        req.cpu = cpu;
        LoopReport r;
        {
          py::gil_scoped_release release;
          r = measure_loop(hz, seconds, spin_us, req);
        }
        return report_to_dict(r);
      },
      py::arg("hz"), py::arg("seconds"), py::arg("spin_us") = 100.0, py::arg("realtime") = true,
      py::arg("priority") = 80, py::arg("cpu") = -1,
      "Run an empty absolute-deadline loop on a fresh thread; return jitter p50/p99/max (us),\n"
      "missed cycles and the scheduling policy obtained (with the reason when not SCHED_FIFO).");

  m.attr("MAX_HZ") = kMaxHz;
  m.attr("MAX_SECONDS") = kMaxSeconds;
}
