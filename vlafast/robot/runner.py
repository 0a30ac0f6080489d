"""Asynchronous chunk execution: inference on a worker thread while the C++ servo thread moves
the arm.

Every ``chunk_exec * policy.dt`` seconds the worker observes the robot, runs the policy and
pushes the result. Chunks are timestamped by their observation, so inference delay never shifts
the plan in time: by the time a chunk is ready, its already-elapsed waypoints are dropped (two
are kept before *now*, so the cubic's tangents there stay central) and the rest is blended into
the chunk being executed with a smootherstep weight (6x^5 - 15x^4 + 10x^3), 0 with zero slope
and curvature at *now* and 1 after ``blend_s``. Position, velocity and acceleration stay
continuous at the hand-over; a jump h between plans costs about 5.77 h / blend_s^2 of extra
acceleration (up to 1.5x that once resampled on a coarse waypoint grid), and the servo thread
still clamps acceleration as a last line of defence.

Guided real-time chunking: a policy with ``guided = True`` and ``horizon`` (T) is called as
``policy(q, t, prefix=Y, weights=W)`` with Y: [T, 6] the plan being executed, sampled at the new
chunk's waypoint times, and W: [T] the RTC soft mask (``vlafast.robot.rtc.prefix_weights``: 1 on
the d waypoints the last inference took, decaying to 0 at T - chunk_exec; 0 where Y's plan has
run out). The policy's sampler freezes that prefix (``vlafast.robot.rtc.guided_sample``); the
blend above still runs and then has (almost) nothing to hide.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Callable

import numpy as np

from vlafast._ext import load_C
from vlafast.robot.policies import smootherstep
from vlafast.robot.servo import DOF, ServoConfig, ServoLoop, interpolate


def merge_chunk(new: np.ndarray, new_t0_ns: int, prev: tuple[np.ndarray, int] | None, dt: float,
                now_ns: int, blend_s: float, interp: str = "cubic") -> tuple[np.ndarray, int]:
    """Align new: [T, 6] (waypoint i at new_t0_ns + i dt) to now_ns and blend it into prev =
    (q [T', 6], t0_ns) on the same dt grid spacing. Returns (merged [T'', 6], t0_ns)."""
    T = new.shape[0]
    # Keep two waypoints at or before now: the segment holding now then has a central tangent
    # at its start (cubic), as it had in the chunk it came from.
    k = int(math.floor((now_ns - new_t0_ns) / (dt * 1e9))) - 1
    k = min(max(k, 0), max(T - 2, 0))
    out = np.array(new[k:], dtype=np.float64)
    t0 = new_t0_ns + int(round(k * dt * 1e9))
    if prev is None or blend_s <= 0:
        return out, t0
    prev_q, prev_t0 = prev
    t_rel = (t0 - prev_t0) * 1e-9 + dt * np.arange(out.shape[0])
    old, _ = interpolate(prev_q, dt, t_rel, interp)
    w = smootherstep((t0 - now_ns) * 1e-9 / blend_s + dt * np.arange(out.shape[0]) / blend_s)[:, None]
    return (1.0 - w) * old + w * out, t0


class RealtimeRunner:
    """Runs ``policy`` (``policy(q [6], t_s) -> chunk [T, 6]``, attribute ``dt``) against ``robot``
    (a backend from ``vlafast.robot.backends``) with the servo loop at ``hz``.

    chunk_exec: waypoints executed per chunk before the next observation (replanning period
    chunk_exec * policy.dt). blend_s: hand-over blend length (0: switch at once).
    """

    def __init__(self, policy: Any, robot: Any, hz: float = 500.0, chunk_exec: int = 10,
                 blend_s: float = 0.1, config: ServoConfig | None = None):
        if chunk_exec < 1:
            raise ValueError(f"chunk_exec must be >= 1 waypoint, got {chunk_exec}")
        if not getattr(policy, "dt", 0) > 0:
            raise ValueError("policy needs an attribute dt > 0 (waypoint spacing in seconds)")
        self.policy, self.robot, self.chunk_exec, self.blend_s = policy, robot, chunk_exec, blend_s
        self.config = config if config is not None else ServoConfig(hz=hz)
        if self.config.hz != hz:
            raise ValueError(f"hz={hz} disagrees with config.hz={self.config.hz}")
        self.loop = ServoLoop(self.config, robot)
        self.error: BaseException | None = None
        self.chunks = 0
        self.push_results: dict[str, int] = {}
        self._halt = threading.Event()
        self._worker: threading.Thread | None = None
        self._prev: tuple[np.ndarray, int] | None = None
        self._guided = bool(getattr(policy, "guided", False))
        if self._guided:
            if not getattr(policy, "horizon", 0) > chunk_exec:
                raise ValueError("a guided policy needs an attribute horizon (T) > chunk_exec")
            from vlafast.robot.rtc import prefix_weights  # imports torch: here, not between observe and push

            self._prefix_weights = prefix_weights
        self.last_inference_s = 0.0

    def _observe(self) -> tuple[np.ndarray, int]:
        got = self.robot.read_q()
        if got is not None:
            return got
        return self.loop.commanded_q(), load_C().monotonic_ns()

    def _guidance(self, obs_ns: int, dt: float) -> dict:
        """prefix: [T, 6] (the executing plan at the new chunk's waypoint times), weights: [T]."""
        T, s = int(self.policy.horizon), self.chunk_exec
        if self._prev is None:
            return {"prefix": None, "weights": None}
        prev_q, prev_t0 = self._prev
        t_rel = (obs_ns - prev_t0) * 1e-9 + dt * np.arange(T)
        prefix, _ = interpolate(prev_q, dt, t_rel, self.config.interp)
        d = min(int(math.ceil(self.last_inference_s / dt)), T - s)
        w = self._prefix_weights(T, d, s).numpy()
        w[t_rel > (prev_q.shape[0] - 1) * dt] = 0.0  # no plan to follow there
        return {"prefix": prefix, "weights": w}

    def _work(self) -> None:
        C = load_C()
        dt = float(self.policy.dt)
        period_ns = int(round(self.chunk_exec * dt * 1e9))
        next_ns = C.monotonic_ns()
        try:
            while not self._halt.is_set():
                q, obs_ns = self._observe()
                extra = self._guidance(obs_ns, dt) if self._guided else {}
                chunk = np.asarray(self.policy(q, obs_ns * 1e-9, **extra), dtype=np.float64)
                self.last_inference_s = (C.monotonic_ns() - obs_ns) * 1e-9
                if chunk.ndim != 2 or chunk.shape[1] != DOF or chunk.shape[0] < 1:
                    raise ValueError(f"policy must return a chunk [T, 6], got shape {chunk.shape}")
                merged, t0 = merge_chunk(chunk, obs_ns, self._prev, dt, C.monotonic_ns(), self.blend_s,
                                         self.config.interp)
                result = self.loop.push(merged, t0, dt, obs_ns)
                self.push_results[result] = self.push_results.get(result, 0) + 1
                if result == "accepted":
                    self._prev = (merged, t0)
                self.chunks += 1
                next_ns += period_ns
                now = C.monotonic_ns()
                if next_ns < now:  # inference overran the replanning period: replan at once
                    next_ns = now
                self._halt.wait((next_ns - now) * 1e-9)
        except BaseException as exc:  # noqa: BLE001 - the producer died; the servo watchdog stops the arm
            self.error = exc

    def start(self) -> "RealtimeRunner":
        self.loop.start()
        self._worker = threading.Thread(target=self._work, name="vlafast-inference", daemon=True)
        self._worker.start()
        return self

    def stop(self, reason: str = "run complete") -> dict:
        self._halt.set()
        if self._worker is not None:
            self._worker.join(10.0)
        return self.report(self.loop.stop(reason))

    def report(self, stats: dict) -> dict:
        stats = dict(stats)
        stats["policy_error"] = repr(self.error) if self.error is not None else ""
        stats["chunks_produced"] = self.chunks
        return stats

    def run(self, seconds: float | None, on_stats: Callable[[dict], None] | None = None,
            stats_every_s: float = 0.5) -> dict:
        """Run for ``seconds`` (None: until the loop stops or Ctrl-C). Ctrl-C brakes the arm to
        rest, stops the backend and re-raises. Returns the final statistics."""
        t_end = None if seconds is None else time.monotonic() + seconds
        try:
            self.start()  # inside the try: a Ctrl-C during start-up still stops what started
            while not self.loop.done and (t_end is None or time.monotonic() < t_end):
                left = stats_every_s if t_end is None else min(stats_every_s, t_end - time.monotonic())
                self.loop.wait(max(0.0, left))
                if on_stats is not None:
                    on_stats(self.report(self.loop.stats()))
        except KeyboardInterrupt:
            self.stop("interrupted")
            raise
        except BaseException as exc:
            self.stop(f"exception: {exc!r}")
            raise
        return self.stop("run complete")
