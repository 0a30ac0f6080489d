#include "servo/chunk.hpp"

#include <algorithm>
#include <stdexcept>

namespace vlafast::servo {

Interp parse_interp(const std::string& name) {
  if (name == "linear") return Interp::kLinear;
  if (name == "cubic") return Interp::kCubic;
  if (name == "spline") return Interp::kSpline;
  throw std::invalid_argument("interp must be 'linear', 'cubic' or 'spline', got '" + name + "'");
}

const char* interp_name(Interp mode) noexcept {
  return mode == Interp::kLinear ? "linear" : (mode == Interp::kCubic ? "cubic" : "spline");
}

void prepare(Chunk& c, Interp mode) noexcept {
  if (mode != Interp::kSpline) return;
  const int T = c.T;
  double* m = c.m.data();
  std::fill(m, m + static_cast<size_t>(T) * kDof, 0.0);
  if (T < 3) return;  // two waypoints: a line
  // Uniform knots, in units of position per segment^2 (h = 1; evaluation rescales by dt):
  //   2 M0 + M1 = 6 (y1 - y0 - s0),  M(i-1) + 4 Mi + M(i+1) = 6 (y(i+1) - 2 yi + y(i-1)),
  //   M(n-1) + 2 Mn = 6 (sn - yn + y(n-1)),  s0 / sn: one-sided end slopes.
  const double* y = c.q.data();
  auto at = [&](int i, int j) { return y[static_cast<size_t>(i) * kDof + j]; };
  const int n = T - 1;
  double* cp = c.scratch.data();  // the modified super-diagonal (the same for every joint)
  for (int j = 0; j < kDof; ++j) {
    // third-order one-sided slopes (exact for cubics) from 4 waypoints, second-order from 3
    const double s0 = T >= 4 ? (-11 * at(0, j) + 18 * at(1, j) - 9 * at(2, j) + 2 * at(3, j)) / 6.0
                             : 0.5 * (-3 * at(0, j) + 4 * at(1, j) - at(2, j));
    const double sn = T >= 4 ? (11 * at(n, j) - 18 * at(n - 1, j) + 9 * at(n - 2, j) - 2 * at(n - 3, j)) / 6.0
                             : 0.5 * (3 * at(n, j) - 4 * at(n - 1, j) + at(n - 2, j));
    auto rhs = [&](int i) {
      if (i == 0) return 6 * (at(1, j) - at(0, j) - s0);
      if (i == n) return 6 * (sn - at(n, j) + at(n - 1, j));
      return 6 * (at(i + 1, j) - 2 * at(i, j) + at(i - 1, j));
    };
    // forward sweep: diagonal 2 at the ends, 4 inside; off-diagonals 1
    double* d = m;  // reuse the output column as the modified right-hand side
    double b = 2.0;
    cp[0] = 1.0 / b;
    d[j] = rhs(0) / b;
    for (int i = 1; i <= n; ++i) {
      b = (i == n ? 2.0 : 4.0) - cp[i - 1];
      cp[i] = 1.0 / b;
      d[static_cast<size_t>(i) * kDof + j] = (rhs(i) - d[static_cast<size_t>(i - 1) * kDof + j]) / b;
    }
    for (int i = n - 1; i >= 0; --i) d[static_cast<size_t>(i) * kDof + j] -= cp[i] * d[static_cast<size_t>(i + 1) * kDof + j];
  }
}

Sample interpolate(const Chunk& c, int64_t t_ns, Interp mode) noexcept {
  Sample out;
  const double* q = c.q.data();
  auto row = [&](int i) { return q + static_cast<size_t>(i) * kDof; };
  if (c.T <= 1 || t_ns <= c.t0_ns) {
    for (int j = 0; j < kDof; ++j) out.q[j] = row(0)[j];
    return out;
  }
  if (t_ns >= c.end_ns()) {
    for (int j = 0; j < kDof; ++j) out.q[j] = row(c.T - 1)[j];
    return out;
  }
  const double dt = static_cast<double>(c.dt_ns) * 1e-9;
  const double u = static_cast<double>(t_ns - c.t0_ns) / static_cast<double>(c.dt_ns);
  const int i = std::min(static_cast<int>(u), c.T - 2);
  const double s = u - i;
  const double* p0 = row(i);
  const double* p1 = row(i + 1);
  if (mode == Interp::kSpline) {
    const double* m0 = c.m.data() + static_cast<size_t>(i) * kDof;
    const double* m1 = m0 + kDof;
    const double r = 1.0 - s;
    const double a0 = (r * r * r - r) / 6.0, a1 = (s * s * s - s) / 6.0;
    const double b0 = -(3 * r * r - 1) / 6.0, b1 = (3 * s * s - 1) / 6.0;
    for (int j = 0; j < kDof; ++j) {
      out.q[j] = r * p0[j] + s * p1[j] + a0 * m0[j] + a1 * m1[j];
      out.v[j] = (p1[j] - p0[j] + b0 * m0[j] + b1 * m1[j]) / dt;
    }
    return out;
  }
  if (mode == Interp::kLinear) {
    for (int j = 0; j < kDof; ++j) {
      out.q[j] = p0[j] + s * (p1[j] - p0[j]);
      out.v[j] = (p1[j] - p0[j]) / dt;
    }
    return out;
  }
  // Tangents in units of position per segment (i.e. already multiplied by dt).
  const double* pm = row(std::max(i - 1, 0));
  const double* pp = row(std::min(i + 2, c.T - 1));
  const double w0 = (i > 0) ? 0.5 : 1.0;           // central vs one-sided difference
  const double w1 = (i + 2 < c.T) ? 0.5 : 1.0;
  const double s2 = s * s, s3 = s2 * s;
  const double h00 = 2 * s3 - 3 * s2 + 1, h10 = s3 - 2 * s2 + s, h01 = -2 * s3 + 3 * s2, h11 = s3 - s2;
  const double d00 = 6 * s2 - 6 * s, d10 = 3 * s2 - 4 * s + 1, d01 = -6 * s2 + 6 * s, d11 = 3 * s2 - 2 * s;
  for (int j = 0; j < kDof; ++j) {
    const double m0 = w0 * (p1[j] - pm[j]);
    const double m1 = w1 * (pp[j] - p0[j]);
    out.q[j] = h00 * p0[j] + h10 * m0 + h01 * p1[j] + h11 * m1;
    out.v[j] = (d00 * p0[j] + d10 * m0 + d01 * p1[j] + d11 * m1) / dt;
  }
  return out;
}

}  // namespace vlafast::servo
