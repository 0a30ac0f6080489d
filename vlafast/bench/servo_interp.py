"""The servo's interpolants on a smooth plan: what reaches the motors between waypoints.

A scripted sinusoid (0.2 rad, 0.5 Hz: jerk at most 0.2 (2 pi 0.5)^3 = 6.2 rad/s^3) is replanned
every ``--chunk-exec`` waypoints of ``--dt`` through ``RealtimeRunner`` with no blend, into the
recording backend at 500 Hz. Per interpolant: the commanded jerk (third differences of the 500 Hz
commands: median, p99, max), the cycles the servo clamped, and the worst deviation from the
analytic curve. Baseline: Catmull-Rom (``cubic``, C1: its acceleration steps at every waypoint);
ours: the clamped cubic spline (``spline``, C2).
"""

from __future__ import annotations

import argparse

import numpy as np

from vlafast.bench.core import Row


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=4.0, help="run per interpolant (the first second and the final brake are left out)")
    p.add_argument("--dt", type=float, default=0.05, help="waypoint spacing (s)")
    p.add_argument("--chunk-exec", type=int, default=4, help="waypoints executed per chunk")


def measure(interp: str, seconds: float, dt: float, chunk_exec: int) -> dict:
    from vlafast.robot import RealtimeRunner, RecordingBackend, ServoConfig, SinusoidPolicy
    from vlafast.robot.runner import command_jerk

    policy = SinusoidPolicy(amplitude=0.2, freq_hz=0.5, dt=dt, horizon=16, ramp_s=0.5)
    backend = RecordingBackend(int(seconds * 500) + 1000)
    runner = RealtimeRunner(policy, backend, hz=500.0, chunk_exec=chunk_exec, blend_s=0.0,
                            config=ServoConfig(realtime=False, spin_us=0.0, interp=interp))
    stats = runner.run(seconds)
    if stats["policy_error"]:
        raise RuntimeError(stats["policy_error"])
    rec = backend.records()
    keep = (rec["t"] > rec["t"][0] + 1.0) & (rec["t"] < rec["t"][-1] - 0.3)  # past the ramp, before the brake to rest
    t, q = rec["t"][keep], rec["q"][keep]
    jerk = command_jerk(t, q)
    # the command at t is the plan at the next deadline (t + 2 ms)
    err = np.abs(q - policy.reference(t + 0.002)).max()
    return {"jerk_p50": float(np.median(jerk)), "jerk_p99": float(np.percentile(jerk, 99)), "jerk_max": float(jerk.max()),
            "clamped_cycles": int(stats["clamped_cycles"]), "cycles": int(stats["cycles"]), "max_err_rad": float(err),
            "missed": int(stats["missed"])}


def run(args: argparse.Namespace) -> list[Row]:
    base = measure("cubic", args.seconds, args.dt, args.chunk_exec)
    ours = measure("spline", args.seconds, args.dt, args.chunk_exec)
    rows = []
    for name, r in (("cubic", base), ("spline", ours)):
        rows.append(Row(
            bench="servo-interp", op="commanded jerk, sinusoid replanned without blend",
            shape=f"dt={args.dt:g}s, replan every {args.chunk_exec}, 500 Hz", dtype="fp64", backend=name,
            median_ms=r["jerk_p99"], baseline="Catmull-Rom (cubic)", baseline_ms=base["jerk_p99"],
            achieved=r["jerk_p50"], unit="rad/s^3 median jerk (median_ms column: p99 jerk)", peak=None,
            extra={**r, "jerk_bound_of_the_plan": 0.2 * (2 * np.pi * 0.5) ** 3}))
    return rows
