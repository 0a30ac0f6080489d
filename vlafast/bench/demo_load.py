"""`vlafast demo` wall time with vlafast's thread policy against torch's default threads, alone
and next to a busy process (two spinning threads): what a user on a laptop in use sees.

The baseline runs the same demo with ``--threads`` = every core (what torch does unless told
otherwise); the ratio is ours / baseline, below 1 where the policy helps. ``--quick`` (default)
runs the demo's smoke budget; ``--full`` the README's demo (minutes per run)."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time

from vlafast._threads import available_cores, choose
from vlafast.bench.core import Row


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--full", action="store_true", help="the full demo instead of --quick (several minutes per run)")
    p.add_argument("--load-threads", type=int, default=2, help="spinning threads of the busy process (default 2)")
    p.add_argument("--no-baseline", action="store_true", help="skip the torch-default-threads runs (slow under load)")


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def demo_seconds(threads: int, full: bool) -> float:
    """Wall time of one `vlafast demo` run in a fresh process with ``--threads threads``."""
    with tempfile.TemporaryDirectory() as out:
        argv = [sys.executable, "-m", "vlafast.cli", "--threads", str(threads), "demo", "--no-progress",
                "--seconds", "0.5", "--out", out] + ([] if full else ["--quick"])
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "VLAFAST_THREADS")}
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        return time.perf_counter() - t0


def run(args: argparse.Namespace) -> list[Row]:
    if args.load_threads < 1:
        raise ValueError(f"--load-threads must be >= 1, got {args.load_threads}")
    ours, why = choose(None)
    cores = available_cores()
    rows = []
    for load in (0, args.load_threads):
        stop = mp.Event()
        spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(load)]
        for s in spinners:
            s.start()
        try:
            base = None if args.no_baseline else demo_seconds(cores, args.full)
            mine = demo_seconds(ours, args.full)
        finally:
            stop.set()
            for s in spinners:
                s.join(5.0)
        rows.append(Row(
            bench="demo-load", op=f"vlafast demo{'' if args.full else ' --quick'} wall time",
            shape=f"{load} busy thread{'s' * (load != 1)} beside it, {cores} cores", dtype="fp32",
            backend=f"threads={ours} ({why})", median_ms=mine * 1e3,
            baseline="" if base is None else f"threads={cores} (torch default)",
            baseline_ms=None if base is None else base * 1e3, achieved=mine, unit="s",
            extra={"load_threads": load, "cores": cores},
        ))
    return rows
