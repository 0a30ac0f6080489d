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
chunk's waypoint times, and W: [T] the RTC soft mask (``vlafast.flow.prefix_weights``: 1 on
the d waypoints the last inference took, decaying to 0 at T - chunk_exec; 0 where Y's plan has
run out). The policy's sampler freezes that prefix (``vlafast.flow.RTCGuidance``); the
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


CYCLE_FIELDS = {
    "obs_s": "observation time (s, monotonic)",
    "push_s": "hand-over time: the merged chunk pushed to the servo (s)",
    "inference_ms": "observation -> chunk ready",
    "queue_ms": "executing plan left at the observation (ms)",
    "queue_depth": "the same in waypoints",
    "prefix": "RTC: waypoints frozen for this chunk (d; 0 unguided)",
    "consumed": "waypoints the servo began between observation and hand-over (measured; the next d)",
    "jump_rad": "max |new chunk - executing plan| at the hand-over, before blending (rad)",
    "jump_rad_s": "max |their velocity difference| there (rad/s)",
    "jerk_plan": "jerk of the executed waypoints across the hand-over, at the chunk's dt (rad/s^3, max joint)",
    "jerk_new": "the same stencil inside the new chunk: its own jerk after the hand-over (rad/s^3)",
    "accepted": "1 if the servo took the chunk",
    "missed": "servo deadlines missed so far",
}


def command_jerk(t: np.ndarray, q: np.ndarray) -> np.ndarray:
    """|d^3 q / dt^3| (max over joints) of a command stream: t [N] (s, increasing, possibly
    uneven), q [N, 6] -> [N], by divided differences on the command times."""
    d = q
    for _ in range(3):
        d = np.gradient(d, t, axis=0)
    return np.abs(d).max(axis=1)


def boundary_jerk(t: np.ndarray, q: np.ndarray, boundaries: np.ndarray, window_s: float,
                  reduce: str = "max") -> tuple[np.ndarray, float]:
    """Jerk of a commanded trajectory at chunk hand-overs. t: [N] (s, increasing; a skipped servo
    cycle leaves a gap) and q: [N, 6] the servo's targets, boundaries: [M] hand-over times (s).
    -> (per boundary [M]: |d^3 q / dt^3| (max over joints) over [b, b + window_s] and the few
    samples before b that a difference stencil reaches, reduced by ``reduce``: "max" (the peak;
    saturates where the servo clamps acceleration) or "rms" (the jerk energy of the hand-over);
    NaN where nothing was commanded; and the 99th percentile of |jerk| away from every boundary:
    the trajectory's own jerk, to compare with)."""
    if reduce not in ("max", "rms"):
        raise ValueError(f"reduce must be 'max' or 'rms', got {reduce!r}")
    if len(t) < 4:
        return np.full(len(boundaries), np.nan), float("nan")
    jerk = command_jerk(t, q)
    spread = 4 * float(np.median(np.diff(t)))  # three differences smear a kink over ~3 samples each way
    near = np.zeros(len(t), bool)
    near[:3] = near[-3:] = True  # one-sided differences at the ends
    out = np.full(len(boundaries), np.nan)
    for i, b in enumerate(boundaries):
        sel = (t >= b - spread) & (t <= b + window_s)
        near |= sel
        if sel.any():
            out[i] = jerk[sel].max() if reduce == "max" else np.sqrt(np.mean(jerk[sel] ** 2))
    away = jerk[~near]
    return out, float(np.percentile(away, 99)) if len(away) else float("nan")


def command_stream(log: dict) -> tuple[np.ndarray, np.ndarray]:
    """(t [N] s, target [N, 6]) of the servo's commands, once each, from a backend log with
    ``t_cmd`` (``MujocoUR5eBackend.log()``)."""
    _, first = np.unique(log["t_cmd"], return_index=True)
    return log["t_cmd"][first], log["target"][first]


def merge_chunk(new: np.ndarray, new_t0_ns: int, prev: tuple[np.ndarray, int] | None, dt: float,
                now_ns: int, blend_s: float, interp: str = "cubic", ensemble: float = 0.0) -> tuple[np.ndarray, int]:
    """Align new: [T, 6] (waypoint i at new_t0_ns + i dt) to now_ns and blend it into prev =
    (q [T', 6], t0_ns) on the same dt grid spacing. Returns (merged [T'', 6], t0_ns).
    ``ensemble`` in (0, 1): temporal ensembling instead of the blend: where prev still has a
    plan, merged = (1 - ensemble) prev + ensemble new (so every plan is an exponentially
    weighted average of the chunks that predicted each instant, newest weighted ``ensemble``;
    ACT's scheme with a recursive average), the new chunk alone after prev ends."""
    T = new.shape[0]
    # Keep two waypoints at or before now: the segment holding now then has a central tangent
    # at its start (cubic), as it had in the chunk it came from.
    k = int(math.floor((now_ns - new_t0_ns) / (dt * 1e9))) - 1
    k = min(max(k, 0), max(T - 2, 0))
    out = np.array(new[k:], dtype=np.float64)
    t0 = new_t0_ns + int(round(k * dt * 1e9))
    if prev is None or (blend_s <= 0 and not ensemble):
        return out, t0
    prev_q, prev_t0 = prev
    t_rel = (t0 - prev_t0) * 1e-9 + dt * np.arange(out.shape[0])
    old, _ = interpolate(prev_q, dt, t_rel, interp)
    if ensemble:
        w = np.where(t_rel <= (prev_q.shape[0] - 1) * dt, ensemble, 1.0)[:, None]
    else:
        w = smootherstep((t0 - now_ns) * 1e-9 / blend_s + dt * np.arange(out.shape[0]) / blend_s)[:, None]
    return (1.0 - w) * old + w * out, t0


class RealtimeRunner:
    """Runs ``policy`` (``policy(q [6], t_s) -> chunk [T, 6]``, attribute ``dt``) against ``robot``
    (a backend from ``vlafast.robot.backends``) with the servo loop at ``hz``.

    chunk_exec: waypoints executed per chunk before the next observation (replanning period
    chunk_exec * policy.dt). blend_s: hand-over blend length (0: switch at once). ensemble:
    temporal ensembling weight of each new chunk in (0, 1) (``merge_chunk``; replaces the blend).
    """

    def __init__(self, policy: Any, robot: Any, hz: float = 500.0, chunk_exec: int = 10,
                 blend_s: float = 0.1, config: ServoConfig | None = None, ensemble: float = 0.0):
        if chunk_exec < 1:
            raise ValueError(f"chunk_exec must be >= 1 waypoint, got {chunk_exec}")
        if not 0.0 <= ensemble < 1.0:
            raise ValueError(f"ensemble must be in [0, 1) (0: off), got {ensemble}")
        self.ensemble = ensemble
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
            from vlafast.flow import prefix_weights  # imports torch: here, not between observe and push

            self._prefix_weights = prefix_weights
        self.last_inference_s = 0.0
        self.cycles: list[dict[str, float]] = []  # one record per inference cycle: ``CYCLE_FIELDS``

    def _observe(self) -> tuple[np.ndarray, int]:
        got = self.robot.read_q()
        if got is not None:
            return got
        return self.loop.commanded_q(), load_C().monotonic_ns()

    def _guidance(self, obs_ns: int, dt: float) -> tuple[dict, int]:
        """(policy kwargs: prefix [T, 6], the executing plan at the new chunk's waypoint times, and
        weights [T]; d): d, the waypoints frozen, is how many the servo consumed between the last
        observation and the hand-over of its chunk (measured, ``cycles[-1]["consumed"]``): the
        best estimate of what it will run while this inference takes."""
        T, s = int(self.policy.horizon), self.chunk_exec
        if self._prev is None:
            return {"prefix": None, "weights": None}, 0
        prev_q, prev_t0 = self._prev
        t_rel = (obs_ns - prev_t0) * 1e-9 + dt * np.arange(T)
        prefix, _ = interpolate(prev_q, dt, t_rel, self.config.interp)
        d = min(int(self.cycles[-1]["consumed"]), T - s)  # a plan executes only after a recorded cycle
        w = self._prefix_weights(T, d, s).numpy()
        w[t_rel > (prev_q.shape[0] - 1) * dt] = 0.0  # no plan to follow there
        return {"prefix": prefix, "weights": w}, d

    def _queue(self, at_ns: int, dt: float) -> float:
        """Seconds of the executing plan left after ``at_ns`` (0 with none)."""
        if self._prev is None:
            return 0.0
        prev_q, prev_t0 = self._prev
        return max(0.0, (prev_t0 - at_ns) * 1e-9 + (prev_q.shape[0] - 1) * dt)

    def _handover(self, chunk: np.ndarray, obs_ns: int, now_ns: int, dt: float) -> dict[str, float]:
        """What a switch to ``chunk`` at now_ns does to the executed plan, before any blending
        (the step the blend, RTC or the servo must absorb): ``jump_rad`` max |new - old|,
        ``jump_rad_s`` max |their velocity difference|, ``jerk_plan`` the executed waypoint
        stream's jerk across the switch (third difference at the chunk's dt of the old plan at
        now - 2 dt, now - dt and the new one at now, now + dt; interpolation knots do not enter)
        and ``jerk_new`` the same stencil inside the new chunk (its own jerk there)."""
        if self._prev is None:
            return {"jump_rad": 0.0, "jump_rad_s": 0.0, "jerk_plan": 0.0, "jerk_new": 0.0}
        interp = self.config.interp
        at_new = (now_ns - obs_ns) * 1e-9 + dt * np.arange(-2, 4)
        new, v_new = interpolate(chunk, dt, np.clip(at_new, 0.0, (chunk.shape[0] - 1) * dt), interp)
        prev_q, prev_t0 = self._prev
        at_old = (now_ns - prev_t0) * 1e-9 + dt * np.arange(-2, 1)
        old, v_old = interpolate(prev_q, dt, np.clip(at_old, 0.0, (prev_q.shape[0] - 1) * dt), interp)
        stitched = np.concatenate([old[:2], new[2:4]])  # executed: old before now, new from now

        def jerk(x: np.ndarray) -> float:
            return float(np.abs(x[3] - 3 * x[2] + 3 * x[1] - x[0]).max() / dt**3)

        return {"jump_rad": float(np.abs(new[2] - old[2]).max()), "jump_rad_s": float(np.abs(v_new[2] - v_old[2]).max()),
                "jerk_plan": jerk(stitched), "jerk_new": jerk(new[2:6])}

    def _work(self) -> None:
        C = load_C()
        dt = float(self.policy.dt)
        period_ns = int(round(self.chunk_exec * dt * 1e9))
        next_ns = C.monotonic_ns()
        try:
            while not self._halt.is_set():
                q, obs_ns = self._observe()
                queue_s = self._queue(obs_ns, dt)
                extra, d = self._guidance(obs_ns, dt) if self._guided else ({}, 0)
                chunk = np.asarray(self.policy(q, obs_ns * 1e-9, **extra), dtype=np.float64)
                ready_ns = C.monotonic_ns()
                self.last_inference_s = (ready_ns - obs_ns) * 1e-9
                if chunk.ndim != 2 or chunk.shape[1] != DOF or chunk.shape[0] < 1:
                    raise ValueError(f"policy must return a chunk [T, 6], got shape {chunk.shape}")
                push_ns = C.monotonic_ns()
                handover = self._handover(chunk, obs_ns, push_ns, dt)
                merged, t0 = merge_chunk(chunk, obs_ns, self._prev, dt, push_ns, self.blend_s, self.config.interp,
                                         self.ensemble)
                result = self.loop.push(merged, t0, dt, obs_ns)
                self.push_results[result] = self.push_results.get(result, 0) + 1
                if result == "accepted":
                    self._prev = (merged, t0)
                self.chunks += 1
                stats = self.loop.stats()
                self.cycles.append({
                    "obs_s": obs_ns * 1e-9, "push_s": push_ns * 1e-9, "inference_ms": self.last_inference_s * 1e3,
                    "queue_ms": queue_s * 1e3, "queue_depth": math.floor(queue_s / dt), "prefix": d,
                    "consumed": math.ceil((push_ns - obs_ns) * 1e-9 / dt), **handover,
                    "accepted": float(result == "accepted"), "missed": stats["missed"],
                })
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

