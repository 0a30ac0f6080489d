"""Smooth real-time control: real-time chunking vs naive switching vs temporal ensembling.

The tiny pi0 of ``vlafast.robot.reach`` (trained here, about a minute on a CPU; slow and fast
demonstrators, so independently sampled chunks disagree) drives the simulated UR5e
(``MujocoUR5eBackend``, real time, 500 Hz servo) through ``RealtimeRunner`` from home to a
target, with an injected inference delay on top of its own, in three hand-over modes:

- ``naive``: each new chunk replaces the plan at once (no blend, no guidance);
- ``rtc``: the chunk is sampled with real-time chunking on the executing plan (``Pi0ChunkPolicy``,
  guided, no blend): the frozen prefix is what the servo ran during the last hand-over;
- ``ensemble``: temporal ensembling (every plan a recursive average, new chunk weight 0.5).

Per (mode, delay), over the same targets and noise seeds in every mode:
- ``jerk_plan``: the executed waypoints' jerk across each hand-over (``runner.cycles``: third
  difference at the chunk's dt of the old plan before and the new one after; the servo's
  interpolation knots do not enter), median over hand-overs, with the paired bootstrap 95%
  interval of its ratio to naive (episodes resampled); ``jerk_new``: the same stencil inside
  the new chunk, the policy's own jerk, for scale;
- the hand-over jump in position and in velocity;
- ``cmd_jerk``: the RMS jerk of the servo's 500 Hz commands in the 100 ms after each hand-over
  (``runner.boundary_jerk``), which the Catmull-Rom knots and acceleration clamping dominate;
- task success (max joint error to the target < ``TOL_RAD`` at the end) with its Wilson 95%
  interval.
The baseline of every row is ``naive`` at the same delay, in the same run.
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from vlafast.bench.core import Row
from vlafast.robot.reach import DT, HORIZON, random_target, train_policy

CHUNK_EXEC = 4      # waypoints executed before the next observation (replanning every 0.2 s)
TOL_RAD = 0.05      # success: every joint within this of the target (3 degrees)
MODES = ("naive", "rtc", "ensemble")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--delays", type=float, nargs="+", default=[0.0, 100.0, 300.0], help="injected inference delay (ms)")
    p.add_argument("--episodes", type=int, default=12, help="targets per (mode, delay); the same in every mode")
    p.add_argument("--seconds", type=float, default=3.5, help="episode length (s)")
    p.add_argument("--interp", nargs="+", choices=["cubic", "spline"], default=["cubic", "spline"],
                   help="servo interpolants to run each setting with (Catmull-Rom C1, clamped spline C2)")
    p.add_argument("--sft-steps", type=int, default=1500, help="SFT steps of the tiny pi0 (1200: ~0.03 rad open-loop error)")


def episode(model, observe, mode: str, delay_s: float, seconds: float, seed: int, interp: str = "cubic") -> dict:
    """One reach on the simulated UR5e in real time -> jerk per hand-over, jumps, success."""
    from vlafast.robot.backends import MujocoUR5eBackend
    from vlafast.robot.policies import Delayed, Pi0ChunkPolicy
    from vlafast.robot.runner import RealtimeRunner, boundary_jerk, command_stream
    from vlafast.robot.servo import ServoConfig

    backend = MujocoUR5eBackend(log_seconds=seconds + 2.0)
    policy = Delayed(Pi0ChunkPolicy(model, observe, dt=DT, guided=mode == "rtc", num_steps=10, noise_seed=seed), delay_s)
    runner = RealtimeRunner(policy, backend, hz=500.0, chunk_exec=CHUNK_EXEC, blend_s=0.0,
                            config=ServoConfig(hz=500.0, spin_us=0.0, interp=interp), ensemble=0.5 if mode == "ensemble" else 0.0)
    stats = runner.run(seconds)
    log = backend.log()
    pushes = np.array([c["push_s"] for c in runner.cycles[1:]])  # hand-overs (the first chunk starts from rest)
    jerk, _ = boundary_jerk(*command_stream(log), pushes, 0.1, reduce="rms")
    handovers = runner.cycles[1:]
    return {"cmd_jerk": jerk[np.isfinite(jerk)], **{k: np.array([c[k] for c in handovers]) for k in
                                                    ("jerk_plan", "jerk_new", "jump_rad", "jump_rad_s")},
            "inference_ms": [c["inference_ms"] for c in runner.cycles], "q_end": log["q"][-1],
            "missed": stats["missed"], "clamped": stats["clamped_cycles"], "error": stats["policy_error"]}


def _pooled_median(eps: list[dict], key: str, idx: np.ndarray | None = None) -> float:
    idx = np.arange(len(eps)) if idx is None else idx
    x = np.concatenate([eps[i][key] for i in idx])
    return float(np.median(x)) if len(x) else math.nan


def ratio_ci(eps: list[dict], base: list[dict], key: str, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Paired percentile-bootstrap 95% interval of median(eps[key]) / median(base[key]), episodes
    resampled together (episode i has the same target and noise seed in both)."""
    rng = np.random.default_rng(seed)
    ratios = []
    for _ in range(samples):
        idx = rng.integers(0, len(eps), len(eps))
        b = _pooled_median(base, key, idx)
        if b > 0:
            ratios.append(_pooled_median(eps, key, idx) / b)
    if not ratios:
        return math.nan, math.nan
    lo, hi = np.percentile(ratios, [2.5, 97.5])
    return float(lo), float(hi)


def run(args: argparse.Namespace) -> list[Row]:
    from vlafast.eval import wilson_interval

    t0 = time.perf_counter()
    model, make_observe, loss = train_policy(args.sft_steps)
    train_s = time.perf_counter() - t0
    rng = np.random.default_rng(123)
    targets = [random_target(rng) for _ in range(args.episodes)]
    runs: dict[tuple[str, float, str], list[dict]] = {}
    for interp, delay in ((i, d) for i in args.interp for d in args.delays):
        for mode in MODES:
            eps = [episode(model, make_observe(tg), mode, delay / 1e3, args.seconds, seed=i, interp=interp)
                   for i, tg in enumerate(targets)]
            errors = [e["error"] for e in eps if e["error"]]
            if errors:
                raise RuntimeError(f"{mode} at {delay:g} ms: the policy failed: {errors[0]}")
            for e, tg in zip(eps, targets):
                e["success"] = bool(np.abs(e["q_end"] - tg).max() < TOL_RAD)
            runs[(mode, delay, interp)] = eps
    rows = []
    for (mode, delay, interp), eps in runs.items():
        base = runs[("naive", delay, interp)]
        wins = sum(e["success"] for e in eps)
        r = {k: _pooled_median(eps, k) for k in ("jerk_plan", "jerk_new", "jump_rad", "jump_rad_s", "cmd_jerk")}
        r.update({
            "inference_ms": float(np.median(np.concatenate([e["inference_ms"] for e in eps]))),
            "success": wins / len(eps), "success_ci95": wilson_interval(wins, len(eps)), "episodes": len(eps),
            "handovers": int(sum(len(e["jerk_plan"]) for e in eps)),
            "final_error_rad": float(np.median([np.abs(e["q_end"] - tg).max() for e, tg in zip(eps, targets)])),
            "missed": int(sum(e["missed"] for e in eps)),
            "clamped_cycles": float(np.median([e["clamped"] for e in eps])),
        })
        for key, name in (("jerk_plan", "jerk_plan"), ("jump_rad", "jump"), ("jump_rad_s", "jump_v"), ("cmd_jerk", "cmd_jerk")):
            b = _pooled_median(base, key)
            r[f"{name}_vs_naive"] = r[key] / b if b > 0 else math.nan
            r[f"{name}_vs_naive_ci95"] = ratio_ci(eps, base, key) if eps is not base else (1.0, 1.0)
        cubic = runs.get((mode, delay, "cubic"))
        if interp != "cubic" and cubic is not None:  # the same plans through the C1 servo: what C2 buys
            c = _pooled_median(cubic, "cmd_jerk")
            r["cmd_jerk_vs_cubic"] = r["cmd_jerk"] / c if c > 0 else math.nan
            r["cmd_jerk_vs_cubic_ci95"] = ratio_ci(eps, cubic, "cmd_jerk")
            r["clamped_vs_cubic"] = r["clamped_cycles"] / max(float(np.median([e["clamped"] for e in cubic])), 1.0)
        rows.append(Row(
            bench="rtc", op=f"hand-over ({mode}) tiny pi0 on MuJoCo UR5e", shape=f"delay {delay:g} ms, T={HORIZON} dt={DT}s"
            + ("" if interp == "cubic" else f", servo {interp}"),
            dtype="fp32", backend=mode, median_ms=r["inference_ms"], baseline="naive switching",
            baseline_ms=float(np.median(np.concatenate([e["inference_ms"] for e in base]))), achieved=r["jerk_plan"],
            unit="rad/s^3 (median plan jerk across hand-overs)",
            extra={**r, "success_naive": sum(e["success"] for e in base) / len(base), "sft_loss": loss,
                   "sft_s": train_s, "tol_rad": TOL_RAD}))
    return rows
