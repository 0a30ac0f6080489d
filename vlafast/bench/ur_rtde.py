"""The ur_rtde servoJ stream next to inference: ``URRTDEBackend`` (a child process fed by a
shared-memory seqlock) vs the obvious design, a Python thread in the policy's process calling
``initPeriod / servoJ / waitPeriod`` (ur_rtde's own example loop), both driving the loopback UR
controller (``vlafast.robot.fake_ur``, in its own process) through the real ur_rtde library
while the runner streams a 500 Hz plan.

Loads in the policy's process: ``none``; ``torch``: a thread running 256x256 matmuls back to
back (torch releases the GIL inside each op; Python runs between them); ``python``: a thread of
pure Python (holds the GIL whenever it runs: the worst case for a Python forwarder).
Per load: servoJ calls per second (the physical target is the controller's 500 Hz), the
period's p99, the share of periods longer than 1.5x nominal, and the lag from the plan to the
controller (each target the controller took, matched to the moment of the plan it is:
``match_plan``; median and max). The tests assert none of these (they depend on the machine):
they check that the targets arrive in order and lie on the plan.
"""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np

from vlafast.bench.core import Row
from vlafast.robot.policies import SinusoidPolicy, smoothstep
from vlafast.robot.servo import DOF

HZ = 500.0
LOADS = ("none", "torch", "python")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seconds", type=float, default=3.0, help="servoing per (design, load), after connecting")
    p.add_argument("--loads", nargs="+", choices=LOADS, default=list(LOADS))


class _ThreadForwarderBackend:
    """The baseline: ur_rtde driven from a Python thread of this process."""

    def __init__(self, host: str):
        from vlafast.robot.backends import _Forwarder

        self.host, self.hz, self.error = host, HZ, None
        self._fwd = _Forwarder("ur-rtde-thread", self._tick)
        self.c_backend = self._fwd.mailbox
        self._gaps: list[float] = []
        self._t_prev: float | None = None
        self._servoing = False

    def open(self) -> np.ndarray:
        import rtde_control
        import rtde_receive

        self._c = rtde_control.RTDEControlInterface(self.host, HZ)
        self._r = rtde_receive.RTDEReceiveInterface(self.host, HZ)
        return np.asarray(self._r.getActualQ(), dtype=np.float64)

    def start(self, loop) -> None:
        self._fwd.start(loop)

    def _tick(self, target: tuple) -> bool:
        seq, _t, q, _v, stopped = target
        t_start = self._c.initPeriod()
        if stopped:
            if self._servoing:
                self._c.servoStop()
            return False
        if seq > 0:
            self._c.servoJ([float(x) for x in q], 0.0, 0.0, 1.0 / HZ, 0.1, 300.0)
            self._servoing = True
            now = time.monotonic()
            if self._t_prev is not None:
                self._gaps.append(now - self._t_prev)
            self._t_prev = now
        self._c.waitPeriod(t_start)
        return True

    def read_q(self):
        return None

    def close(self) -> None:
        self._fwd.close()
        self._c.stopScript()
        self._c.disconnect()
        self._r.disconnect()

    @property
    def forwarder_stats(self) -> dict:
        g = np.asarray(self._gaps or [0.0])
        return {"hz": len(g) / max(g.sum(), 1e-9), "p99_ms": float(np.percentile(g, 99) * 1e3),
                "late": int((g > 1.5 / HZ).sum()), "periods": len(g)}


class PhasedSinusoid(SinusoidPolicy):
    """``SinusoidPolicy`` with joint j's phase j pi / 3: a curve in joint space, not a line (the
    plain sinusoid moves every joint alike), so each position on it belongs to one moment and a
    target's lag is well defined (``match_plan``). Starts at rest at ``center``."""

    def reference(self, t: np.ndarray) -> np.ndarray:
        tau = np.asarray(t, dtype=np.float64)[:, None] - (self.t_start or 0.0)
        phase = np.pi / 3 * np.arange(DOF)
        return self.center + self.amplitude * smoothstep(tau / self.ramp_s) * np.sin(2 * np.pi * self.freq_hz * tau + phase)


class _Load:
    def __init__(self, kind: str):
        self.kind, self._halt = kind, threading.Event()
        self._t: threading.Thread | None = None

    def __enter__(self):
        if self.kind != "none":
            self._t = threading.Thread(target=getattr(self, f"_{self.kind}"), daemon=True)
            self._t.start()
        return self

    def _python(self) -> None:
        n = 0
        while not self._halt.is_set():
            n += 1

    def _torch(self) -> None:
        import torch

        a, b = torch.randn(256, 256), torch.randn(256, 256)
        while not self._halt.is_set():
            torch.mm(a, b)

    def __exit__(self, *exc) -> None:
        self._halt.set()
        if self._t is not None:
            self._t.join()


def measure(design: str, load: str, seconds: float) -> dict:
    import torch

    from vlafast.robot import RealtimeRunner, ServoConfig, URRTDEBackend
    from vlafast.robot.fake_ur import FakeURProcess

    torch.set_num_threads(1)
    with FakeURProcess() as ur:
        be = URRTDEBackend(ur.host) if design == "process" else _ThreadForwarderBackend(ur.host)
        # peak acceleration 0.2 (6 + 3 pi + pi^2) ~ 5 rad/s^2 during the ramp: the servo's limits never bend it
        policy = PhasedSinusoid(amplitude=0.2, freq_hz=0.5, dt=0.02, horizon=40, ramp_s=1.0)
        runner = RealtimeRunner(policy, be, hz=HZ, chunk_exec=5, config=ServoConfig(realtime=False, spin_us=0.0))
        with _Load(load):  # `seconds` of servo periods, after connecting (which takes a while of its own)
            runner.start()
            try:
                while runner.loop.stats()["cycles"] < seconds * HZ and not runner.loop.done:
                    runner.loop.wait(0.05)
            finally:
                t_stop = time.monotonic()  # targets taken later may be the brake to rest, off the plan
                stats = runner.stop()
        if stats["backend_error"] or stats["policy_error"]:
            raise RuntimeError(f"{design}/{load}: {stats['backend_error'] or stats['policy_error']}")
        fs = dict(be.forwarder_stats)
        snap = ur.snapshot()
        fs["controller_errors"] = snap["errors"]
    fs["late_frac"] = fs["late"] / max(fs["periods"], 1)
    t_plan, _ = match_plan(policy.reference, policy.t_start, snap["servo_t"], snap["servo_targets"])
    # issued by the servo loop one period before the plan time it is for; taken by the controller at servo_t
    on_plan = (snap["servo_t"] > policy.t_start) & (snap["servo_t"] < t_stop)
    lag_ms = (snap["servo_t"] - (t_plan - 1.0 / HZ))[on_plan] * 1e3
    fs["lag_p50_ms"], fs["lag_max_ms"] = (float(np.median(lag_ms)), float(lag_ms.max())) if len(lag_ms) else (0.0, 0.0)
    return fs


def run(args: argparse.Namespace) -> list[Row]:
    rows = []
    for load in args.loads:
        ours = measure("process", load, args.seconds)
        base = measure("thread", load, args.seconds)
        rows.append(Row(
            bench="ur-rtde", op="servoJ stream to the loopback UR controller (real ur_rtde)",
            shape=f"{HZ:g} Hz, load: {load}", dtype="-", backend="child process + shm seqlock",
            median_ms=1e3 / ours["servoj_hz"], baseline="Python thread in the policy's process", baseline_ms=1e3 / base["hz"],
            achieved=ours["servoj_hz"], unit="servoJ/s", peak=HZ,
            extra={"load": load, "commands_hz": round(ours["hz"], 1), "p99_ms": round(ours["p99_ms"], 3), "late_frac": round(ours["late_frac"], 4),
                   "lag_p50_ms": round(ours["lag_p50_ms"], 2), "lag_max_ms": round(ours["lag_max_ms"], 2),
                   "baseline_hz": round(base["hz"], 1), "baseline_p99_ms": round(base["p99_ms"], 3),
                   "baseline_late_frac": round(base["late_frac"], 4), "baseline_lag_p50_ms": round(base["lag_p50_ms"], 2),
                   "baseline_lag_max_ms": round(base["lag_max_ms"], 2), "seconds": args.seconds}))
    return rows


def match_plan(reference, t_start: float, t: np.ndarray, q: np.ndarray, step_s: float = 2e-4,
               slack_s: float = 0.005) -> tuple[np.ndarray, np.ndarray]:
    """Which moment of the plan each target the controller took is, in order.

    ``reference(t [M]) -> q [M, 6]`` is the plan (s, monotonic), ``t`` [N] when the controller
    took each target (its clock; ``time.monotonic()`` is one clock across processes), ``q``
    [N, 6] the targets. Target k is matched to the nearest plan point on a ``step_s`` grid
    between target k-1's match and t_k + ``slack_s`` (the servo issues a target one period
    before its deadline): a target out of order, or not on the plan, is far from every point
    it may match. Returns (plan time t' [N], distance [N] rad, max over joints); t - t' plus
    the servo period is the pipeline's lag (servo loop -> shared memory -> forwarder -> RTDE ->
    controller tick).
    """
    grid = np.arange(t_start, max(float(t.max()), t_start) + slack_s + step_s, step_s)
    ref = reference(grid)
    t_plan, dist = np.empty(len(t)), np.empty(len(t))
    lo = 0
    for k, (tk, qk) in enumerate(zip(t, q)):
        hi = max(int(np.searchsorted(grid, tk + slack_s, side="right")), lo + 1)
        d = np.abs(ref[lo:hi] - qk).max(axis=1)
        i = int(np.argmin(d))
        lo += i
        t_plan[k], dist[k] = grid[lo], d[i]
    return t_plan, dist
