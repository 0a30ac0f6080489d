// vlafast._C: the compiled core. No libtorch: plain pybind11 over C++17.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "rt/clock.hpp"
#include "rt/periodic.hpp"
#include "servo/backend.hpp"
#include "servo/chunk.hpp"
#include "servo/servo_loop.hpp"

namespace py = pybind11;
using namespace vlafast::rt;
namespace sv = vlafast::servo;

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

using F64Array = py::array_t<double, py::array::c_style | py::array::forcecast>;

// q: [T, 6] float64 C-contiguous (other dtypes are converted); returns T.
int check_chunk(const F64Array& q) {
  if (q.ndim() != 2 || q.shape(1) != sv::kDof) {
    std::string shape = "[";
    for (py::ssize_t i = 0; i < q.ndim(); ++i) shape += (i ? ", " : "") + std::to_string(q.shape(i));
    throw std::invalid_argument("chunk must be [T, 6] joint positions (rad), got " + shape + "]");
  }
  return static_cast<int>(q.shape(0));
}

py::array_t<double> joints_rows(const double* data, py::ssize_t rows) {
  py::array_t<double> out({rows, static_cast<py::ssize_t>(sv::kDof)});
  std::copy(data, data + rows * sv::kDof, out.mutable_data());
  return out;
}

py::dict percentiles(const sv::Percentiles& p) {
  py::dict d;
  d["p50_us"] = p.p50_us;
  d["p99_us"] = p.p99_us;
  d["max_us"] = p.max_us;
  d["mean_us"] = p.mean_us;
  d["n"] = p.n;
  return d;
}

py::dict stats_to_dict(const sv::ServoStats& s) {
  py::dict d;
  d["state"] = s.state;
  d["stop_reason"] = s.stop_reason;
  d["policy"] = s.sched.policy;
  d["reason"] = s.sched.reason;
  d["cpu"] = s.sched.cpu;
  d["cycles"] = s.cycles;
  d["missed"] = s.missed;
  d["commands"] = s.commands;
  d["jitter"] = percentiles(s.jitter);
  d["chunk_age"] = percentiles(s.chunk_age);
  d["latency"] = percentiles(s.latency);
  d["pushed"] = s.pushed;
  d["accepted"] = s.accepted;
  d["rejected_nonfinite"] = s.rejected_nonfinite;
  d["rejected_limits"] = s.rejected_limits;
  d["rejected_stale"] = s.rejected_stale;
  d["dropped"] = s.dropped;
  d["executed_chunks"] = s.executed_chunks;
  d["clamped_cycles"] = s.clamped_cycles;
  d["max_abs_v"] = s.max_abs_v;
  d["max_abs_a"] = s.max_abs_a;
  d["q"] = s.q;
  d["v"] = s.v;
  return d;
}

const char* push_result_name(sv::PushResult r) {
  switch (r) {
    case sv::PushResult::kAccepted: return "accepted";
    case sv::PushResult::kNonFinite: return "nonfinite";
    case sv::PushResult::kOutOfLimits: return "out_of_limits";
    case sv::PushResult::kStale: return "stale";
  }
  return "?";
}

void bind_servo(py::module_& m) {
  py::class_<sv::Backend, std::shared_ptr<sv::Backend>>(
      m, "Backend", "A C++ servo backend (called on the servo thread; Python subclasses are not allowed).");

  py::class_<sv::NullBackend, sv::Backend, std::shared_ptr<sv::NullBackend>>(m, "NullBackend", "Counts commands.")
      .def(py::init<>())
      .def_property_readonly("commands", &sv::NullBackend::commands)
      .def_property_readonly("stops", &sv::NullBackend::stops);

  py::class_<sv::RecordingBackend, sv::Backend, std::shared_ptr<sv::RecordingBackend>>(
      m, "RecordingBackend", "Stores the first `capacity` commands; throw_after >= 0 injects a fault.")
      .def(py::init<int64_t, int64_t>(), py::arg("capacity"), py::arg("throw_after") = -1)
      .def_property_readonly("size", &sv::RecordingBackend::size)
      .def_property_readonly("calls", &sv::RecordingBackend::calls)
      .def_property_readonly("stops", &sv::RecordingBackend::stops)
      .def(
          "records",
          [](const sv::RecordingBackend& b) {
            const auto n = static_cast<py::ssize_t>(b.size());
            py::array_t<int64_t> t(n);
            std::copy(b.t().begin(), b.t().begin() + n, t.mutable_data());
            return py::make_tuple(t, joints_rows(b.q().data(), n), joints_rows(b.v().data(), n));
          },
          "(t_ns [N], q [N, 6], v [N, 6]) of the commands recorded so far.");

  py::class_<sv::MailboxBackend, sv::Backend, std::shared_ptr<sv::MailboxBackend>>(
      m, "MailboxBackend", "Publishes the newest target to one forwarding thread (lock-free).")
      .def(py::init<>())
      .def(
          "read",
          [](sv::MailboxBackend& b) {
            const sv::Target t = b.read();
            py::array_t<double> q(sv::kDof), v(sv::kDof);
            std::copy(t.q.begin(), t.q.end(), q.mutable_data());
            std::copy(t.v.begin(), t.v.end(), v.mutable_data());
            return py::make_tuple(t.seq, t.t_ns, q, v, t.stopped);
          },
          "(seq, t_ns, q [6], v [6], stopped) of the newest target; seq 0 means none yet.\n"
          "Call from one thread only (the forwarder).");

  // A SharedTarget block inside a writable Python buffer (multiprocessing.shared_memory's .buf).
  auto shared_box = [](const py::buffer& buf) {
    py::buffer_info info = buf.request(/*writable=*/true);
    if (info.size * info.itemsize < static_cast<py::ssize_t>(sizeof(sv::SharedTarget))) {
      throw std::invalid_argument("shared mailbox buffer has " + std::to_string(info.size * info.itemsize) +
                                  " bytes, needs " + std::to_string(sizeof(sv::SharedTarget)));
    }
    if (reinterpret_cast<std::uintptr_t>(info.ptr) % alignof(sv::SharedTarget) != 0) {
      throw std::invalid_argument("shared mailbox buffer must be 8-byte aligned");
    }
    return static_cast<sv::SharedTarget*>(info.ptr);
  };
  m.attr("SHARED_MAILBOX_BYTES") = py::int_(sizeof(sv::SharedTarget));

  py::class_<sv::SharedMailboxBackend, sv::Backend, std::shared_ptr<sv::SharedMailboxBackend>>(
      m, "SharedMailboxBackend",
      "Publishes the newest target into a seqlock in a shared-memory buffer (SHARED_MAILBOX_BYTES, zeroed), for a\n"
      "forwarder in another process: read_shared_target(buf) there. Keeps a reference to the buffer.")
      .def(py::init([shared_box](const py::buffer& buf) {
             return std::make_shared<sv::SharedMailboxBackend>(shared_box(buf));
           }),
           py::arg("buffer"), py::keep_alive<1, 2>())
      .def_property_readonly("published", &sv::SharedMailboxBackend::published);

  m.def(
      "read_shared_target",
      [shared_box](const py::buffer& buf) {
        const sv::Target t = sv::read_shared(shared_box(buf));
        py::array_t<double> q(sv::kDof), v(sv::kDof);
        std::copy(t.q.begin(), t.q.end(), q.mutable_data());
        std::copy(t.v.begin(), t.v.end(), v.mutable_data());
        return py::make_tuple(t.seq, t.t_ns, q, v, t.stopped);
      },
      py::arg("buffer"),
      "(seq, t_ns, q [6], v [6], stopped) of the newest target in a SharedMailboxBackend's buffer (any process);\n"
      "seq 0 means none yet.");

  py::class_<sv::ServoLoop>(m, "ServoLoop",
                            "The servo thread. push() chunks from one producer thread at a time.")
      .def(py::init([](std::shared_ptr<sv::Backend> backend, const sv::Joints& q0, double hz, double spin_us,
                       bool realtime, int priority, int cpu, const std::string& interp, const sv::Joints& q_min,
                       const sv::Joints& q_max, const sv::Joints& v_max, const sv::Joints& a_max,
                       int max_horizon) {
             sv::ServoConfig cfg;
             cfg.hz = hz;
             cfg.spin_us = spin_us;
             cfg.sched.realtime = realtime;
             cfg.sched.priority = priority;
             cfg.sched.cpu = cpu;
             cfg.interp = sv::parse_interp(interp);
             cfg.limits = sv::Limits{q_min, q_max, v_max, a_max};
             cfg.max_horizon = max_horizon;
             return std::make_unique<sv::ServoLoop>(cfg, std::move(backend), q0);
           }),
           py::arg("backend"), py::arg("q0"), py::kw_only(), py::arg("hz"), py::arg("spin_us"),
           py::arg("realtime"), py::arg("priority"), py::arg("cpu"), py::arg("interp"), py::arg("q_min"),
           py::arg("q_max"), py::arg("v_max"), py::arg("a_max"), py::arg("max_horizon"))
      .def("start", &sv::ServoLoop::start)
      .def(
          "push",
          [](sv::ServoLoop& loop, const F64Array& q, int64_t t0_ns, int64_t dt_ns, int64_t obs_ns) {
            const int T = check_chunk(q);
            // The GIL stays held: it serialises Python producers, keeping the buffer single-producer.
            return push_result_name(loop.push(q.data(), T, t0_ns, dt_ns, obs_ns));
          },
          py::arg("q"), py::arg("t0_ns"), py::arg("dt_ns"), py::arg("obs_ns") = 0,
          "Push q: [T, 6] waypoints (rad) at t0_ns + i * dt_ns (monotonic). Returns 'accepted',\n"
          "'nonfinite', 'out_of_limits' or 'stale' (ends before the next deadline); rejected\n"
          "chunks are counted and never reach the backend.")
      .def("request_stop", &sv::ServoLoop::request_stop, py::arg("reason"),
           "Decelerate at the acceleration limit, then stop the backend and end the thread.")
      .def("wait", &sv::ServoLoop::wait, py::arg("timeout_s"), py::call_guard<py::gil_scoped_release>(),
           "Wait up to timeout_s for the thread to end; True when it has.")
      .def_property_readonly("state", [](const sv::ServoLoop& l) { return sv::state_name(l.state()); })
      .def_property_readonly("period_ns", &sv::ServoLoop::period_ns)
      .def("stats", [](const sv::ServoLoop& l) { return stats_to_dict(l.stats()); });

  m.def(
      "interpolate",
      [](const F64Array& q, double dt_s, const F64Array& t_s, const std::string& interp) {
        const int T = check_chunk(q);
        if (!(dt_s > 0)) throw std::invalid_argument("dt_s must be > 0");
        if (t_s.ndim() != 1) throw std::invalid_argument("t_s must be a 1-D array of times (s)");
        const sv::Interp mode = sv::parse_interp(interp);
        sv::Chunk c(T);
        std::copy(q.data(), q.data() + static_cast<size_t>(T) * sv::kDof, c.q.begin());
        c.T = T;
        c.t0_ns = 0;
        c.dt_ns = static_cast<int64_t>(std::llround(dt_s * 1e9));
        sv::prepare(c, mode);
        const py::ssize_t n = t_s.shape(0);
        py::array_t<double> qo({n, static_cast<py::ssize_t>(sv::kDof)}), vo({n, static_cast<py::ssize_t>(sv::kDof)});
        for (py::ssize_t i = 0; i < n; ++i) {
          const sv::Sample s = sv::interpolate(c, static_cast<int64_t>(std::llround(t_s.data()[i] * 1e9)), mode);
          std::copy(s.q.begin(), s.q.end(), qo.mutable_data() + i * sv::kDof);
          std::copy(s.v.begin(), s.v.end(), vo.mutable_data() + i * sv::kDof);
        }
        return py::make_tuple(qo, vo);
      },
      py::arg("q"), py::arg("dt_s"), py::arg("t_s"), py::arg("interp"),
      "The servo loop's interpolant: q: [T, 6] at times i * dt_s, evaluated at t_s: [N] ->\n"
      "(q [N, 6], v [N, 6]).");

  m.attr("DOF") = sv::kDof;
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

  bind_servo(m);

  m.attr("MAX_HZ") = kMaxHz;
  m.attr("MAX_SECONDS") = kMaxSeconds;
}
