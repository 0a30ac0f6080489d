"""`vlafast serve-robot`: the real-time loop with a scripted policy and a live readout.

Model policies (pi0, OpenVLA, ...) plug in through ``vlafast.robot.RealtimeRunner`` from Python:
any callable ``policy(q [6], t_s) -> chunk [T, 6]`` with a ``dt`` attribute.
"""

from __future__ import annotations

import argparse
import sys

from vlafast.robot.backends import make_backend
from vlafast.robot.policies import POLICIES, make_policy
from vlafast.robot.runner import RealtimeRunner, write_cycle_report
from vlafast.robot.servo import ServoConfig, format_stats


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["mujoco", "ur-rtde", "null"], default="mujoco")
    p.add_argument("--host", default="", help="robot IP address (ur-rtde)")
    p.add_argument("--policy", choices=sorted(POLICIES), default="sinusoid",
                   help="scripted policy (model policies plug in through vlafast.robot.RealtimeRunner)")
    p.add_argument("--hz", type=float, default=500.0, help="servo rate: 500 (e-series) or 125 (CB3)")
    p.add_argument("--seconds", type=float, default=None, help="run time (default: until Ctrl-C)")
    p.add_argument("--amplitude", type=float, default=0.2, help="sinusoid amplitude per joint (rad)")
    p.add_argument("--freq", type=float, default=0.5, help="sinusoid frequency (Hz)")
    p.add_argument("--latency-ms", type=float, default=0.0, help="simulated inference time per chunk")
    p.add_argument("--chunk-exec", type=int, default=5, help="waypoints executed per chunk before replanning")
    p.add_argument("--blend", type=float, default=0.1, help="hand-over blend (s)")
    p.add_argument("--interp", choices=["cubic", "linear"], default="cubic")
    p.add_argument("--no-realtime", action="store_true", help="do not ask for SCHED_FIFO")
    p.add_argument("--cpu", type=int, default=-1, help="pin the servo thread to this CPU")
    p.add_argument("--lookahead", type=float, default=0.1, help="servoJ lookahead (s, ur-rtde)")
    p.add_argument("--gain", type=float, default=300.0, help="servoJ gain (ur-rtde)")
    p.add_argument("--report", default=None, help="write the per-cycle record, its plot and report.md to this folder")


def main(args: argparse.Namespace) -> int:
    kw = {"lookahead": args.lookahead, "gain": args.gain} if args.backend == "ur-rtde" else {}
    robot = make_backend(args.backend, host=args.host, hz=args.hz, **kw)
    policy = make_policy(args.policy, amplitude=args.amplitude, freq_hz=args.freq, latency_s=args.latency_ms / 1e3)
    cfg = ServoConfig(hz=args.hz, realtime=not args.no_realtime, cpu=args.cpu, interp=args.interp)
    runner = RealtimeRunner(policy, robot, hz=args.hz, chunk_exec=args.chunk_exec, blend_s=args.blend, config=cfg)
    tty = sys.stdout.isatty()

    def show(stats: dict) -> None:
        line = format_stats(stats)
        print(f"\r{line}\033[K" if tty else line, end="" if tty else "\n", flush=True)

    print(f"serve-robot: {args.backend} backend, {args.policy} policy, {args.hz:g} Hz; Ctrl-C brakes to rest and stops")
    code = 0
    try:
        stats = runner.run(args.seconds, on_stats=show)
    except KeyboardInterrupt:
        stats = runner.report(runner.loop.stats())
        code = 130
    if tty:
        print()
    print(format_stats(stats))
    if args.report:
        log = robot.log() if callable(getattr(robot, "log", None)) else None
        for path in write_cycle_report(runner, stats, args.report, log):
            print(f"wrote {path}")
    if stats["reason"]:
        print(f"note: {stats['reason']}")
    for key in ("policy_error", "backend_error"):
        if stats.get(key):
            print(f"{key.replace('_', ' ')}: {stats[key]}")
            code = code or 1
    if stats["stop_reason"].startswith(("watchdog", "backend fault")):
        code = code or 1
    return code
