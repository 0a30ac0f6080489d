"""Jitter of the _C periodic loop: our loop (SCHED_FIFO when permitted, sleep + spin) against
the obvious baseline (SCHED_OTHER, clock_nanosleep only), measured back to back."""

from __future__ import annotations

import argparse
import logging

from vlafast._ext import load_C
from vlafast.bench.core import Row

log = logging.getLogger(__name__)

JITTER_BUDGET_US = 200.0  # docs/architecture.md §7: 500 Hz with p99 jitter <= 200 us


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hz", type=float, default=500.0, help="loop rate (default 500)")
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each run (default 5)")
    p.add_argument("--spin-us", type=float, default=100.0, help="busy-wait before each deadline")
    p.add_argument("--cpu", type=int, default=-1, help="pin the loop thread to this CPU")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain-sleep baseline run")


def measure(hz: float, seconds: float, *, spin_us: float = 100.0, realtime: bool = True, cpu: int = -1) -> dict:
    """One loop run; returns the _C report (p50/p99/max lateness in us, missed, policy)."""
    report = load_C().measure_loop(hz, seconds, spin_us=spin_us, realtime=realtime, cpu=cpu)
    if realtime and report["policy"] != "SCHED_FIFO":
        log.warning("servo timing runs without real-time scheduling: %s", report["reason"])
    return report


_SUMMARY = ("missed", "p50_us", "p99_us", "max_us", "policy")


def _row(report: dict, backend: str, baseline: dict | None, fallback: dict | None) -> Row:
    extra = {k: report[k] for k in ("cycles", "missed", "p50_us", "p99_us", "max_us", "mean_us", "policy", "reason")}
    for name, other in (("baseline", baseline), ("fallback", fallback)):
        if other is not None:
            extra.update({f"{name}_{k}": other[k] for k in _SUMMARY})
    return Row(
        bench="servo-timing",
        op="periodic_loop",
        shape=f"{report['hz']:g}Hz x {report['seconds']:g}s",
        dtype="-",
        backend=backend,
        # Wake-up lateness (the loop's jitter): median here, p99/max in `achieved` and extra.
        median_ms=report["p50_us"] / 1e3,
        baseline="SCHED_OTHER sleep-only" if baseline is not None else "",
        baseline_ms=baseline["p50_us"] / 1e3 if baseline is not None else None,
        achieved=report["p99_us"],
        unit="us p99 jitter",
        peak=JITTER_BUDGET_US,  # pct_peak = share of the jitter budget used
        extra=extra,
    )


def run(args: argparse.Namespace) -> list[Row]:
    ours = measure(args.hz, args.seconds, spin_us=args.spin_us, realtime=True, cpu=args.cpu)
    base = fallback = None
    if not args.no_baseline:
        base = measure(args.hz, args.seconds, spin_us=0.0, realtime=False, cpu=args.cpu)
    if ours["policy"] == "SCHED_FIFO":
        # What a machine that refuses SCHED_FIFO gets: the same loop under SCHED_OTHER.
        fallback = measure(args.hz, args.seconds, spin_us=args.spin_us, realtime=False, cpu=args.cpu)
    backend = f"{ours['policy']}+spin{args.spin_us:g}us"
    return [_row(ours, backend, base, fallback)]
