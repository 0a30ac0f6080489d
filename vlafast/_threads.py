"""How many threads torch's CPU kernels use, chosen once per process and said out loud.

The policies here are small (the built-in ones have 0.2-1 M parameters) and run next to
simulators, env workers and servo threads. torch's default, one intra-op thread per core,
spins those threads on every small matmul; on a machine that is busy with anything else that
made RL updates 20-25x slower (issue measurements: 1.1-2.1 s instead of 0.05-0.08 s per step).
So the default is half the cores this process may run on (at least 1, at most 8): one thread
on a 2-core machine. ``--threads N`` or ``VLAFAST_THREADS=N`` choose another number; Ray
actors get theirs from the CPUs they reserve (Ray sets ``OMP_NUM_THREADS``)."""

from __future__ import annotations

import logging
import os

ENV = "VLAFAST_THREADS"
log = logging.getLogger(__name__)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def choose(requested: int | None = None) -> tuple[int, str]:
    """(threads, why): ``requested``, else ``$VLAFAST_THREADS``, else half the available cores."""
    if requested is not None:
        if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
            raise ValueError(f"--threads must be an integer >= 1, got {requested!r}")
        return requested, "--threads"
    env = os.environ.get(ENV)
    if env is not None:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"{ENV} must be an integer >= 1, got {env!r}")
        return n, ENV
    cores = available_cores()
    return max(1, min(8, cores // 2)), f"default for {cores} core{'s' * (cores != 1)}"


def configure(requested: int | None = None) -> str:
    """Set torch's intra-op threads (see the module docstring); returns the line that says so."""
    import torch

    n, why = choose(requested)
    torch.set_num_threads(n)
    line = f"torch uses {n} CPU thread{'s' * (n != 1)} ({why}; --threads or {ENV} to change)"
    log.info(line)
    return line
