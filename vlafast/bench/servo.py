"""The servo loop under load: the C++ servo thread at 500 Hz driving the null backend while a
Python producer runs a synthetic "policy" (a torch matmul loop on one thread for
``--inference-ms``) and pushes a 50-waypoint chunk every ``--chunk-exec`` waypoints. Reports
wake-up jitter (p50 / p99 / max), missed cycles, chunk age at execution and observation ->
command latency. Baseline, measured back to back: the same loop and producer under SCHED_OTHER
with plain sleeping (no spin)."""

from __future__ import annotations

import argparse
import logging
import threading

from vlafast.bench.core import Row

log = logging.getLogger(__name__)

JITTER_BUDGET_US = 200.0  # docs/architecture.md §7: 500 Hz, p99 jitter <= 200 us, 0 missed


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hz", type=float, default=500.0, help="servo rate (default 500)")
    p.add_argument("--seconds", type=float, default=25.0, help="measured run (default 25)")
    p.add_argument("--baseline-seconds", type=float, default=5.0, help="baseline run, 0 skips it (default 5)")
    p.add_argument("--spin-us", type=float, default=100.0, help="busy-wait before each deadline")
    p.add_argument("--cpu", type=int, default=-1, help="pin the servo thread to this CPU")
    p.add_argument("--inference-ms", type=float, default=30.0, help="synthetic policy compute per chunk")
    p.add_argument("--chunk-exec", type=int, default=5, help="waypoints (20 ms each) between chunks")


def _busy(ms: float, a, b) -> None:
    import time

    import torch

    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        torch.mm(a, b)


def measure(hz: float, seconds: float, *, spin_us: float, realtime: bool, cpu: int, inference_ms: float,
            chunk_exec: int) -> dict:
    """One run of the servo loop (null backend) with the synthetic producer; returns loop stats."""
    import torch

    from vlafast._ext import load_C
    from vlafast.robot import NullBackend, ServoConfig, ServoLoop, SinusoidPolicy

    C = load_C()
    cfg = ServoConfig(hz=hz, spin_us=spin_us, realtime=realtime, cpu=cpu)
    policy = SinusoidPolicy(amplitude=0.2, freq_hz=0.5, dt=0.02, horizon=50, ramp_s=1.0)
    halt = threading.Event()
    torch.set_num_threads(1)  # the policy owns one core; the servo thread gets the other
    a, b = torch.randn(256, 256), torch.randn(256, 256)

    def producer(loop: ServoLoop) -> None:
        next_ns = C.monotonic_ns()
        while not halt.is_set():
            obs = C.monotonic_ns()
            _busy(inference_ms, a, b)  # stands in for the policy's forward pass
            loop.push(policy(None, obs * 1e-9), obs, policy.dt, obs)
            next_ns += int(chunk_exec * policy.dt * 1e9)
            halt.wait(max(0.0, (next_ns - C.monotonic_ns()) * 1e-9))

    loop = ServoLoop(cfg, NullBackend()).start()
    th = threading.Thread(target=producer, args=(loop,), daemon=True)
    th.start()
    try:
        loop.wait(seconds)
    finally:
        halt.set()
        th.join()
        stats = loop.stop("benchmark done")
    if realtime and stats["policy"] != "SCHED_FIFO":
        log.warning("servo loop runs without real-time scheduling: %s", stats["reason"])
    if stats["stop_reason"] != "requested: benchmark done":
        raise RuntimeError(f"servo loop stopped early: {stats['stop_reason']}")
    return stats


def _extra(s: dict) -> dict:
    out = {"cycles": s["cycles"], "missed": s["missed"], "policy": s["policy"], "reason": s["reason"],
           "accepted": s["accepted"], "dropped": s["dropped"], "clamped_cycles": s["clamped_cycles"]}
    for group in ("jitter", "chunk_age", "latency"):
        for k in ("p50_us", "p99_us", "max_us"):
            out[f"{group}_{k}"] = round(s[group][k], 3)
    return out


def run(args: argparse.Namespace) -> list[Row]:
    common = dict(cpu=args.cpu, inference_ms=args.inference_ms, chunk_exec=args.chunk_exec)
    ours = measure(args.hz, args.seconds, spin_us=args.spin_us, realtime=True, **common)
    base = None
    if args.baseline_seconds > 0:
        base = measure(args.hz, args.baseline_seconds, spin_us=0.0, realtime=False, **common)
    extra = _extra(ours)
    if base is not None:
        extra.update({f"baseline_{k}": v for k, v in _extra(base).items()
                      if k.startswith("jitter") or k in ("missed", "policy")})
    extra["inference_ms"] = args.inference_ms
    return [Row(
        bench="servo",
        op="servo_loop+producer",
        shape=f"{args.hz:g}Hz x {args.seconds:g}s, chunk 50x20ms every {args.chunk_exec}",
        dtype="-",
        backend=f"{ours['policy']}+spin{args.spin_us:g}us",
        median_ms=ours["jitter"]["p50_us"] / 1e3,  # wake-up lateness; p99 in `achieved`
        baseline="SCHED_OTHER sleep-only" if base is not None else "",
        baseline_ms=base["jitter"]["p50_us"] / 1e3 if base is not None else None,
        achieved=ours["jitter"]["p99_us"],
        unit="us p99 jitter",
        peak=JITTER_BUDGET_US,
        extra=extra,
    )]
