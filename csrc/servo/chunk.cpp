#include "servo/chunk.hpp"

#include <algorithm>
#include <stdexcept>

namespace vlafast::servo {

Interp parse_interp(const std::string& name) {
  if (name == "linear") return Interp::kLinear;
  if (name == "cubic") return Interp::kCubic;
  throw std::invalid_argument("interp must be 'linear' or 'cubic', got '" + name + "'");
}

const char* interp_name(Interp mode) noexcept { return mode == Interp::kLinear ? "linear" : "cubic"; }

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
