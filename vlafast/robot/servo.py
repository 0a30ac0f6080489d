"""Python face of the C++ servo core (``vlafast._C.ServoLoop``).

The servo thread lives in C++: it wakes on absolute deadlines, takes the newest chunk from a
lock-free buffer, interpolates, clamps joint position / velocity / acceleration and calls a C++
backend every cycle without the GIL. Python only pushes chunks, reads statistics and, for the
MuJoCo and ur_rtde backends, forwards the newest target from a lock-free mailbox on its own
thread (``vlafast.robot.backends``).

Letters: T waypoints per chunk, 6 joints (UR arms).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Sequence

import numpy as np

from vlafast._ext import load_C

DOF = 6
_INTERP = ("linear", "cubic", "spline")


def _joints(name: str, x: Sequence[float]) -> tuple[float, ...]:
    t = tuple(float(v) for v in x)
    if len(t) != DOF:
        raise ValueError(f"{name} must have {DOF} entries (one per joint), got {len(t)}")
    return t


@dataclasses.dataclass(frozen=True)
class JointLimits:
    """Per-joint limits: positions (rad), speed (rad/s), acceleration (rad/s^2)."""

    q_min: tuple[float, ...]
    q_max: tuple[float, ...]
    v_max: tuple[float, ...]
    a_max: tuple[float, ...]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _joints(f.name, getattr(self, f.name)))

    @classmethod
    def ur5e(cls, *, v_max: float = math.pi, a_max: float = 8.0) -> "JointLimits":
        """UR5e: +-2 pi on every joint but the elbow (+-pi); 180 deg/s on every joint (the
        datasheet's maximum). The acceleration limit is our choice for servoing (UR publishes
        none per joint); 8 rad/s^2 keeps hand-overs gentle."""
        two_pi = 2 * math.pi
        return cls(
            q_min=(-two_pi, -two_pi, -math.pi, -two_pi, -two_pi, -two_pi),
            q_max=(two_pi, two_pi, math.pi, two_pi, two_pi, two_pi),
            v_max=(v_max,) * DOF,
            a_max=(a_max,) * DOF,
        )


# A relaxed, reachable pose: shoulder lifted, elbow bent, wrist down.
UR5E_HOME = (0.0, -1.5708, 1.5708, -1.5708, -1.5708, 0.0)


@dataclasses.dataclass(frozen=True)
class ServoConfig:
    """The servo thread: rate, scheduling, interpolation, limits.

    hz: 500 (e-series) or 125 (CB3). spin_us: busy-wait before each deadline. realtime /
    priority / cpu: SCHED_FIFO and affinity when permitted (the reason is reported otherwise).
    interp: 'cubic' (Catmull-Rom, C1), 'spline' (clamped cubic spline, C2: bounded jerk) or 'linear'.
    max_horizon: longest chunk the buffer holds.
    """

    hz: float = 500.0
    spin_us: float = 100.0
    realtime: bool = True
    priority: int = 80
    cpu: int = -1
    interp: str = "spline"
    limits: JointLimits = dataclasses.field(default_factory=JointLimits.ur5e)
    max_horizon: int = 256

    def __post_init__(self) -> None:
        if self.interp not in _INTERP:
            raise ValueError(f"interp must be one of {_INTERP}, got {self.interp!r}")

    @classmethod
    def cb3(cls, **kw: Any) -> "ServoConfig":
        return cls(hz=125.0, **kw)

    @property
    def period_s(self) -> float:
        return 1.0 / self.hz


def interpolate(q: np.ndarray, dt: float, t: np.ndarray, interp: str = "cubic") -> tuple[np.ndarray, np.ndarray]:
    """The servo loop's own interpolant. q: [T, 6] at times i * dt; t: [N] (s) ->
    (q [N, 6], v [N, 6]). Outside [0, (T - 1) dt] the end waypoint is held with v = 0."""
    return load_C().interpolate(np.asarray(q, dtype=np.float64), float(dt), np.asarray(t, dtype=np.float64), interp)


class ServoLoop:
    """Owns one C++ servo thread and its backend.

    ``with ServoLoop(cfg, backend) as loop: loop.push(chunk, t0_ns, dt)``; leaving the block
    (normally, on an exception or on Ctrl-C) decelerates to rest at the acceleration limit,
    stops the backend and joins every thread.
    """

    def __init__(self, config: ServoConfig, backend: Any):
        backend_hz = getattr(backend, "hz", config.hz)
        if backend_hz != config.hz:
            raise ValueError(f"backend paces at {backend_hz:g} Hz but the servo loop runs at {config.hz:g} Hz; "
                             "make them equal")
        self.config = config
        self.backend = backend
        self._loop = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "ServoLoop":
        if self._loop is not None:
            raise RuntimeError("ServoLoop already started; make a new one")
        cfg, lim = self.config, self.config.limits
        q0 = self.backend.open()  # the loop starts from where the arm is: no jump on the first cycle
        self._loop = load_C().ServoLoop(
            self.backend.c_backend, [float(x) for x in q0],
            hz=cfg.hz, spin_us=cfg.spin_us, realtime=cfg.realtime, priority=cfg.priority, cpu=cfg.cpu,
            interp=cfg.interp, q_min=lim.q_min, q_max=lim.q_max, v_max=lim.v_max, a_max=lim.a_max,
            max_horizon=cfg.max_horizon,
        )
        self.backend.start(self)
        self._loop.start()
        return self

    def stop(self, reason: str = "stop requested", timeout_s: float = 5.0) -> dict:
        """Decelerate to rest, stop the backend, join the threads; returns the final stats."""
        if self._loop is None:
            return {}
        self._loop.request_stop(reason)
        self.wait(timeout_s)
        self.backend.close()
        return self.stats()

    def request_stop(self, reason: str) -> None:
        """Ask the servo thread to brake to rest and stop the backend; returns at once."""
        self._loop.request_stop(reason)

    def wait(self, timeout_s: float) -> bool:
        """Block up to timeout_s (signals are handled every 50 ms); True once the thread ended."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if self._loop.wait(max(0.0, min(0.05, left))):
                return True
            if left <= 0:
                return False

    def __enter__(self) -> "ServoLoop":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        reason = "interrupted" if exc_type is KeyboardInterrupt else (
            f"exception: {exc_type.__name__}" if exc_type else "context exit")
        self.stop(reason)

    # -- data ----------------------------------------------------------------------------------

    def push(self, q: np.ndarray, t0_ns: int, dt: float, obs_ns: int = 0) -> str:
        """Push q: [T, 6] waypoints (rad) at t0_ns + i * dt (monotonic ns, dt in s).
        Returns 'accepted', 'nonfinite', 'out_of_limits' or 'stale' (ends before the next
        deadline); rejected chunks are counted and never reach the backend."""
        return self._loop.push(q, int(t0_ns), int(round(dt * 1e9)), int(obs_ns))

    @property
    def state(self) -> str:
        """'idle' | 'holding' | 'tracking' | 'stopping' | 'stopped'."""
        return "idle" if self._loop is None else self._loop.state

    @property
    def done(self) -> bool:
        return self.state == "stopped"

    def stats(self) -> dict:
        """Loop statistics: jitter / chunk_age / latency percentiles (us), counts, state."""
        s = self._loop.stats()
        err = getattr(self.backend, "error", None)
        s["backend_error"] = repr(err) if err is not None else ""
        return s

    def commanded_q(self) -> np.ndarray:
        """q: [6], the last target the loop commanded."""
        return np.asarray(self._loop.stats()["q"])


def format_stats(s: dict) -> str:
    """One terminal line of loop statistics."""
    j, a, lat = s["jitter"], s["chunk_age"], s["latency"]
    line = (
        f"{s['state']:<8} cycles {s['cycles']:>7} missed {s['missed']:>3} | jitter p50 {j['p50_us']:6.1f} "
        f"p99 {j['p99_us']:6.1f} max {j['max_us']:7.1f} us | chunks {s['accepted']}/{s['pushed']} "
        f"rej {s['rejected_nonfinite'] + s['rejected_limits'] + s['rejected_stale']} | age p50 {a['p50_us'] / 1e3:5.1f} ms "
        f"| obs->cmd p50 {lat['p50_us'] / 1e3:5.1f} ms | {s['policy']}"
    )
    if s.get("stop_reason"):
        line += f" | {s['stop_reason']}"
    return line
