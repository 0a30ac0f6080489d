#include "servo/servo_loop.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <sstream>
#include <stdexcept>

#include "rt/clock.hpp"

namespace vlafast::servo {

namespace {

constexpr size_t kCycleWindow = 1 << 15;  // per-cycle samples kept for percentiles (65 s at 500 Hz)
constexpr size_t kChunkWindow = 1 << 12;  // per-chunk latency samples kept

[[noreturn]] void bad(const std::string& what) { throw std::invalid_argument(what); }

const ServoConfig& validated(const ServoConfig& cfg) {
  cfg.validate();
  return cfg;
}

Percentiles summarise_ns(std::vector<int64_t> xs) {
  const rt::JitterStats s = rt::summarise(xs, 0);
  return Percentiles{s.p50_us, s.p99_us, s.max_us, s.mean_us, s.cycles};
}

}  // namespace

const char* state_name(State s) noexcept {
  switch (s) {
    case State::kIdle: return "idle";
    case State::kHolding: return "holding";
    case State::kTracking: return "tracking";
    case State::kStopping: return "stopping";
    case State::kStopped: return "stopped";
  }
  return "?";
}

void ServoConfig::validate() const {
  rt::validate_loop_args(hz, 1.0, spin_us, sched);
  if (max_horizon < 1 || max_horizon > 100000) bad("max_horizon must be in [1, 100000], got " + std::to_string(max_horizon));
  for (int j = 0; j < kDof; ++j) {
    const auto jn = " (joint " + std::to_string(j) + ")";
    if (!(std::isfinite(limits.q_min[j]) && std::isfinite(limits.q_max[j]) && limits.q_min[j] < limits.q_max[j]))
      bad("limits need finite q_min < q_max" + jn);
    if (!(std::isfinite(limits.v_max[j]) && limits.v_max[j] > 0)) bad("limits need finite v_max > 0" + jn);
    if (!(std::isfinite(limits.a_max[j]) && limits.a_max[j] > 0)) bad("limits need finite a_max > 0" + jn);
  }
}

void ServoLoop::Ring::add(int64_t x) noexcept {
  const int64_t n = count.load(std::memory_order_relaxed);
  data[static_cast<size_t>(n) % size].store(x, std::memory_order_relaxed);
  count.store(n + 1, std::memory_order_release);
}

std::vector<int64_t> ServoLoop::Ring::snapshot() const {
  const auto n = static_cast<size_t>(std::min<int64_t>(count.load(std::memory_order_acquire), static_cast<int64_t>(size)));
  std::vector<int64_t> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = data[i].load(std::memory_order_relaxed);
  return out;
}

ServoLoop::ServoLoop(const ServoConfig& cfg, std::shared_ptr<Backend> backend, const Joints& q0)
    : cfg_(validated(cfg)),
      backend_(std::move(backend)),
      period_ns_(static_cast<int64_t>(std::llround(1e9 / cfg_.hz))),
      spin_ns_(static_cast<int64_t>(std::llround(cfg_.spin_us * 1e3))),
      dt_s_(static_cast<double>(period_ns_) * 1e-9),
      q0_(q0),
      chunks_(Chunk(cfg_.max_horizon)),
      jitter_(kCycleWindow),
      age_(kCycleWindow),
      latency_(kChunkWindow) {
  if (!backend_) bad("backend must not be None");
  for (int j = 0; j < kDof; ++j) {
    if (!(std::isfinite(q0[j]) && q0[j] >= cfg.limits.q_min[j] && q0[j] <= cfg.limits.q_max[j]))
      bad("q0 must be finite and inside the joint limits (joint " + std::to_string(j) + " = " + std::to_string(q0[j]) + ")");
    q_cmd_[j].store(q0[j]);
    v_cmd_[j].store(0.0);
  }
}

ServoLoop::~ServoLoop() {
  std::lock_guard<std::mutex> lock(join_mu_);
  if (thread_.joinable()) {
    request_stop("ServoLoop destroyed");
    thread_.join();
  }
}

void ServoLoop::start() {
  if (started_) throw std::logic_error("ServoLoop.start() called twice; make a new loop");
  started_ = true;
  state_.store(State::kHolding, std::memory_order_release);
  thread_ = std::thread([this] { run(); });
}

PushResult ServoLoop::push(const double* q, int T, int64_t t0_ns, int64_t dt_ns, int64_t obs_ns) {
  if (T < 1 || T > cfg_.max_horizon)
    bad("chunk must have 1 <= T <= max_horizon = " + std::to_string(cfg_.max_horizon) + " waypoints, got " + std::to_string(T));
  if (dt_ns <= 0) bad("chunk dt must be > 0 ns, got " + std::to_string(dt_ns));
  pushed_.fetch_add(1, std::memory_order_relaxed);
  if (t0_ns + static_cast<int64_t>(T - 1) * dt_ns < rt::monotonic_ns() + period_ns_) {
    rej_stale_.fetch_add(1, std::memory_order_relaxed);
    return PushResult::kStale;
  }
  const Limits& L = cfg_.limits;
  for (int i = 0; i < T; ++i) {
    for (int j = 0; j < kDof; ++j) {
      const double x = q[static_cast<size_t>(i) * kDof + j];
      if (!std::isfinite(x)) {
        rej_nonfinite_.fetch_add(1, std::memory_order_relaxed);
        return PushResult::kNonFinite;
      }
      if (x < L.q_min[j] || x > L.q_max[j]) {
        rej_limits_.fetch_add(1, std::memory_order_relaxed);
        return PushResult::kOutOfLimits;
      }
    }
  }
  Chunk& slot = chunks_.back();
  std::memcpy(slot.q.data(), q, sizeof(double) * static_cast<size_t>(T) * kDof);
  slot.T = T;
  slot.t0_ns = t0_ns;
  slot.dt_ns = dt_ns;
  slot.obs_ns = obs_ns;
  slot.seq = ++push_seq_;
  prepare(slot, cfg_.interp);  // spline accelerations: O(T) here, on the producer's thread
  slot.push_ns = rt::monotonic_ns();
  if (chunks_.publish()) dropped_.fetch_add(1, std::memory_order_relaxed);
  accepted_.fetch_add(1, std::memory_order_relaxed);
  return PushResult::kAccepted;
}

void ServoLoop::request_stop(const std::string& reason) {
  {
    std::lock_guard<std::mutex> lock(text_mu_);
    if (request_reason_.empty()) request_reason_ = reason;
  }
  stop_requested_.store(true, std::memory_order_release);
}

bool ServoLoop::wait(double timeout_s) {
  if (!started_) return true;
  const auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(timeout_s);
  while (state() != State::kStopped) {
    if (std::chrono::steady_clock::now() >= until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  std::lock_guard<std::mutex> lock(join_mu_);
  if (thread_.joinable()) thread_.join();
  return true;
}

// `want` is the interpolant at the NEXT deadline: the command sent now is where the arm should
// be when the next one goes out (servoJ's meaning). Velocity = feed-forward want.v plus a
// correction for the part of the error the feed-forward does not explain, capped at the speed
// from which the joint can still brake onto the target (~sqrt(2 a |e|)); then velocity,
// acceleration (relative to the previous command) and position are clamped. Within the limits
// this lands exactly on want.q. Returns true when a limit bit.
bool ServoLoop::step_tracking(const Sample& want, Joints& q, Joints& v) const noexcept {
  const Limits& L = cfg_.limits;
  bool clamped = false;
  for (int j = 0; j < kDof; ++j) {
    const double target = std::clamp(want.q[j], L.q_min[j], L.q_max[j]);
    const double e = target - q[j] - want.v[j] * dt_s_;
    double corr = e / dt_s_;
    // Fastest speed from which steps of a dt per cycle still stop within |e|: v = n a dt with
    // n (n + 1) a dt^2 / 2 = |e| (the discrete form of sqrt(2 a |e|), which would overshoot).
    const double adt = L.a_max[j] * dt_s_;
    const double brake = adt * (std::sqrt(0.25 + 2.0 * std::abs(e) / (adt * dt_s_)) - 0.5);
    if (std::abs(corr) > brake) corr = std::copysign(brake, e);
    const double wanted = want.v[j] + corr;
    const double lo = std::max(-L.v_max[j], v[j] - L.a_max[j] * dt_s_);
    const double hi = std::min(L.v_max[j], v[j] + L.a_max[j] * dt_s_);
    double vn = std::clamp(wanted, lo, hi);
    if (vn != wanted) clamped = true;
    double qn = q[j] + vn * dt_s_;
    if (qn > L.q_max[j] || qn < L.q_min[j]) {
      qn = std::clamp(qn, L.q_min[j], L.q_max[j]);
      vn = (qn - q[j]) / dt_s_;
      clamped = true;
    }
    q[j] = qn;
    v[j] = vn;
  }
  return clamped;
}

// Brakes every joint at its acceleration limit. Returns true once all joints are at rest.
bool ServoLoop::step_stopping(Joints& q, Joints& v) const noexcept {
  const Limits& L = cfg_.limits;
  bool rest = true;
  for (int j = 0; j < kDof; ++j) {
    const double dv = L.a_max[j] * dt_s_;
    v[j] = std::abs(v[j]) <= dv ? 0.0 : v[j] - std::copysign(dv, v[j]);
    double qn = q[j] + v[j] * dt_s_;
    if (qn > L.q_max[j] || qn < L.q_min[j]) {  // position limits win over a smooth stop
      qn = std::clamp(qn, L.q_min[j], L.q_max[j]);
      v[j] = 0.0;
    }
    q[j] = qn;
    rest = rest && v[j] == 0.0;
  }
  return rest;
}

void ServoLoop::finish(const std::string& reason) {
  std::string why = reason;
  try {
    backend_->stop();
  } catch (const std::exception& e) {
    why += "; backend stop() failed: " + std::string(e.what());
  } catch (...) {
    why += "; backend stop() failed";
  }
  {
    std::lock_guard<std::mutex> lock(text_mu_);
    stop_reason_ = why;
  }
  state_.store(State::kStopped, std::memory_order_release);
}

void ServoLoop::run() {
  {
    const rt::SchedResult sched = rt::apply_sched(cfg_.sched);
    std::lock_guard<std::mutex> lock(text_mu_);
    sched_ = sched;
  }
  Joints q = q0_, v{};
  const Chunk* cur = nullptr;
  bool latency_pending = false;
  bool by_watchdog = false;
  rt::PeriodicClock clock(period_ns_, spin_ns_, rt::monotonic_ns() + period_ns_);
  State st = State::kHolding;

  for (;;) {
    const int64_t late = clock.wait_next();
    const int64_t now = clock.deadline_ns();
    jitter_.add(late);
    cycles_.fetch_add(1, std::memory_order_relaxed);
    missed_.store(clock.missed(), std::memory_order_relaxed);

    if (st != State::kStopping) {
      if (stop_requested_.load(std::memory_order_acquire)) {
        st = State::kStopping;
      } else {
        if (chunks_.consume()) {
          cur = &chunks_.front();
          latency_pending = true;
        }
        if (cur != nullptr) {
          if (now + period_ns_ > cur->end_ns()) {
            st = State::kStopping;  // watchdog: the newest chunk has no target for the next deadline
            by_watchdog = true;
          } else {
            st = State::kTracking;
          }
        }
      }
      state_.store(st, std::memory_order_release);
    }

    const Joints v_prev = v;
    bool rest = false;
    if (st == State::kTracking) {
      if (step_tracking(interpolate(*cur, now + period_ns_, cfg_.interp), q, v)) clamped_.fetch_add(1, std::memory_order_relaxed);
      age_.add(now - cur->push_ns);
    } else if (st == State::kStopping) {
      rest = step_stopping(q, v);
    }

    double vmax = max_abs_v_.load(std::memory_order_relaxed), amax = max_abs_a_.load(std::memory_order_relaxed);
    for (int j = 0; j < kDof; ++j) {
      vmax = std::max(vmax, std::abs(v[j]));
      amax = std::max(amax, std::abs(v[j] - v_prev[j]) / dt_s_);
      q_cmd_[j].store(q[j], std::memory_order_relaxed);
      v_cmd_[j].store(v[j], std::memory_order_relaxed);
    }
    max_abs_v_.store(vmax, std::memory_order_relaxed);
    max_abs_a_.store(amax, std::memory_order_relaxed);

    try {
      backend_->command(q, v, now);
    } catch (const std::exception& e) {
      finish(std::string("backend fault: ") + e.what());
      return;
    } catch (...) {
      finish("backend fault: unknown exception");
      return;
    }
    commands_.fetch_add(1, std::memory_order_relaxed);
    if (st == State::kTracking && latency_pending) {
      latency_.add(rt::monotonic_ns() - cur->obs_ns);
      executed_.fetch_add(1, std::memory_order_relaxed);
      latency_pending = false;
    }
    if (st == State::kStopping && rest) {
      std::string reason;
      if (by_watchdog) {
        reason = "watchdog: no fresh chunk within the horizon";
      } else {
        std::lock_guard<std::mutex> lock(text_mu_);
        reason = "requested: " + request_reason_;
      }
      finish(reason);
      return;
    }
  }
}

ServoStats ServoLoop::stats() const {
  ServoStats s;
  s.state = state_name(state());
  {
    std::lock_guard<std::mutex> lock(text_mu_);
    s.stop_reason = stop_reason_;
    s.sched = sched_;
  }
  s.cycles = cycles_.load(std::memory_order_relaxed);
  s.missed = missed_.load(std::memory_order_relaxed);
  s.commands = commands_.load(std::memory_order_relaxed);
  s.jitter = summarise_ns(jitter_.snapshot());
  s.chunk_age = summarise_ns(age_.snapshot());
  s.latency = summarise_ns(latency_.snapshot());
  s.pushed = pushed_.load(std::memory_order_relaxed);
  s.accepted = accepted_.load(std::memory_order_relaxed);
  s.rejected_nonfinite = rej_nonfinite_.load(std::memory_order_relaxed);
  s.rejected_limits = rej_limits_.load(std::memory_order_relaxed);
  s.rejected_stale = rej_stale_.load(std::memory_order_relaxed);
  s.dropped = dropped_.load(std::memory_order_relaxed);
  s.executed_chunks = executed_.load(std::memory_order_relaxed);
  s.clamped_cycles = clamped_.load(std::memory_order_relaxed);
  s.max_abs_v = max_abs_v_.load(std::memory_order_relaxed);
  s.max_abs_a = max_abs_a_.load(std::memory_order_relaxed);
  for (int j = 0; j < kDof; ++j) {
    s.q[j] = q_cmd_[j].load(std::memory_order_relaxed);
    s.v[j] = v_cmd_[j].load(std::memory_order_relaxed);
  }
  return s;
}

}  // namespace vlafast::servo
