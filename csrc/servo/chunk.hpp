// Action chunks ([T, 6] joint waypoints on a uniform time grid) and their interpolation.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

namespace vlafast::servo {

constexpr int kDof = 6;  // UR arms: six revolute joints
using Joints = std::array<double, kDof>;

enum class Interp { kLinear, kCubic, kSpline };

Interp parse_interp(const std::string& name);  // "linear" | "cubic" | "spline"; throws std::invalid_argument
const char* interp_name(Interp mode) noexcept;

struct Chunk {
  int64_t t0_ns = 0;    // monotonic time of waypoint 0
  int64_t dt_ns = 0;    // waypoint spacing
  int64_t obs_ns = 0;   // monotonic time of the observation the chunk was computed from
  int64_t push_ns = 0;  // when it entered the buffer
  int64_t seq = 0;      // 1, 2, ... in push order
  int T = 0;            // valid waypoints
  std::vector<double> q;  // q: [capacity, kDof] row-major, first T rows valid
  std::vector<double> m;  // spline only: d^2q/ds^2 at each waypoint (s in segments), [capacity, kDof]
  std::vector<double> scratch;  // prepare()'s workspace, [capacity]

  explicit Chunk(int capacity = 0)
      : q(static_cast<size_t>(capacity) * kDof, 0.0),
        m(static_cast<size_t>(capacity) * kDof, 0.0),
        scratch(static_cast<size_t>(capacity), 0.0) {}
  int capacity() const noexcept { return static_cast<int>(q.size() / kDof); }
  int64_t end_ns() const noexcept { return t0_ns + static_cast<int64_t>(T - 1) * dt_ns; }
};

struct Sample {
  Joints q{};  // position
  Joints v{};  // d/dt of the interpolant (0 outside the chunk)
};

// Makes a filled chunk ready for `mode`: for the spline, solves for its waypoint accelerations
// (O(T), Thomas algorithm; the producer calls it at push, never the servo thread).
void prepare(Chunk& c, Interp mode) noexcept;

// Evaluates the chunk at monotonic time t_ns. Outside [t0, end] the nearest waypoint is held.
// Linear: piecewise linear. Cubic: Catmull-Rom (cubic Hermite with central-difference tangents,
// one-sided at the ends): C1, passes through every waypoint, reproduces quadratics exactly on
// segments whose both tangents are central; its acceleration steps at every waypoint.
// Spline: the interpolating cubic spline with clamped ends (end slopes from third-order
// one-sided differences; second-order for T = 3): C2, so the commanded jerk stays bounded
// between waypoints; reproduces cubics exactly everywhere (quadratics for T = 3). Needs prepare().
Sample interpolate(const Chunk& c, int64_t t_ns, Interp mode) noexcept;

}  // namespace vlafast::servo
