"""Servo backends.

Every backend hands the servo loop a C++ object (``c_backend``) that the servo thread calls each
cycle without the GIL:

* ``NullBackend`` / ``RecordingBackend``: pure C++ (timing, tests). Nothing Python in the loop.
* ``MujocoUR5eBackend``: the servo thread writes each target into a C++ lock-free mailbox
  (``_C.MailboxBackend``); a Python forwarding thread reads the newest target once per period
  and steps MuJoCo. The servo thread never waits for Python, so its timing is unaffected by the
  GIL; the forwarder is soft real-time (a late forwarder sends the newest target, never a queue
  of stale ones).
* ``URRTDEBackend``: the same, but the mailbox is a seqlock in shared memory
  (``_C.SharedMailboxBackend``) and the forwarder is a child process running ur_rtde, so no
  Python thread of this process (inference) can delay the 500 Hz servoJ stream. ur_rtde's own
  C++ RTDE thread talks to the controller and servoJ's lookahead smooths the stream. Driving
  ``RTDEControlInterface`` from the C++ servo thread directly would need ur_rtde's C++ library
  and headers at build time (the Python wheel ships only the pybind module).

A backend implements: ``c_backend``, ``open() -> q0 [6]``, ``start(loop)``, ``read_q() -> (q [6],
t_ns) | None``, ``close()`` and ``error`` (an exception raised on its forwarding thread).
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import threading
import time
import weakref
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from vlafast._ext import load_C
from vlafast.robot.servo import DOF, UR5E_HOME

ASSET = Path(__file__).resolve().parents[1] / "assets" / "ur5e.xml"  # the one UR5e model, shared with vlafast.envs


class NullBackend:
    """Counts commands in C++; for timing."""

    def __init__(self, q0: Sequence[float] = UR5E_HOME):
        self.c_backend = load_C().NullBackend()
        self.q0 = np.asarray(q0, dtype=np.float64)
        self.error: BaseException | None = None

    def open(self) -> np.ndarray:
        return self.q0.copy()

    def start(self, loop: Any) -> None:
        pass

    def read_q(self) -> tuple[np.ndarray, int] | None:
        return None  # no sensors: callers use the commanded target

    def close(self) -> None:
        pass


class RecordingBackend(NullBackend):
    """Stores the first ``capacity`` commands in C++; ``throw_after=n`` makes command n+1 throw."""

    def __init__(self, capacity: int, q0: Sequence[float] = UR5E_HOME, throw_after: int = -1):
        super().__init__(q0)
        self.c_backend = load_C().RecordingBackend(capacity, throw_after)

    def records(self) -> dict[str, np.ndarray]:
        """t: [N] (s, monotonic), q: [N, 6], v: [N, 6] of the recorded commands."""
        t, q, v = self.c_backend.records()
        return {"t": t.astype(np.float64) * 1e-9, "q": q, "v": v}


class _Forwarder:
    """A Python thread that reads the newest target from a MailboxBackend once per call of
    ``tick`` and stops when the loop stops the backend, when ``close`` is called, or when
    ``tick`` raises (then it asks the servo loop to stop and keeps the exception)."""

    def __init__(self, name: str, tick: Callable[[tuple], bool]):
        self.mailbox = load_C().MailboxBackend()
        self._tick = tick
        self._name = name
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, loop: Any) -> None:
        if self._thread is not None:
            raise RuntimeError(f"{self._name}: a backend drives one servo loop; make a new backend")
        self._thread = threading.Thread(target=self._run, args=(loop,), name=self._name, daemon=True)
        self._thread.start()

    def _run(self, loop: Any) -> None:
        try:
            while not self._halt.is_set():
                if not self._tick(self.mailbox.read()):
                    return
        except BaseException as exc:  # noqa: BLE001 - reported through .error and the loop
            self.error = exc
            loop.request_stop(f"{self._name} failed: {exc!r}")

    def close(self, grace_s: float = 0.2, timeout_s: float = 5.0) -> None:
        """Give the thread ``grace_s`` to see the loop's stop (and stop the robot itself), then
        halt it."""
        if self._thread is not None:
            self._thread.join(grace_s)
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout_s)


def _menagerie_model() -> Path | None:
    root = os.environ.get("MENAGERIE_ROOT")
    if not root:
        return None
    path = Path(root) / "universal_robots_ur5e" / "scene.xml"
    return path if path.exists() else None


class MujocoUR5eBackend:
    """A simulated UR5e stepping in real time (one physics step per model timestep of wall time,
    catching up when late). Uses ``$MENAGERIE_ROOT/universal_robots_ur5e/scene.xml`` when set
    (position actuators: targets only), else the lean built-in model ``vlafast/assets/ur5e.xml``
    (PD + velocity feed-forward: targets and target velocities).

    ``log_seconds`` of (t, target, measured q) are kept for plots and tests.
    """

    def __init__(self, q0: Sequence[float] = UR5E_HOME, model_path: str | os.PathLike | None = None,
                 log_seconds: float = 30.0):
        self.q0 = np.asarray(q0, dtype=np.float64)
        if self.q0.shape != (DOF,):
            raise ValueError(f"q0 must be [6] joint positions, got shape {self.q0.shape}")
        self.model_path = Path(model_path) if model_path else (_menagerie_model() or ASSET)
        self.log_seconds = log_seconds
        self._fwd = _Forwarder("mujoco-ur5e", self._tick)
        self.c_backend = self._fwd.mailbox
        self._lock = threading.Lock()

    @property
    def error(self) -> BaseException | None:
        return self._fwd.error

    def open(self) -> np.ndarray:
        import mujoco

        self._mj = mujoco
        self.model = mujoco.MjModel.from_xml_path(str(self.model_path))
        self.data = mujoco.MjData(self.model)
        if self.model.nu not in (DOF, 2 * DOF) or self.model.nq < DOF:
            raise ValueError(f"{self.model_path}: expected a 6-joint arm with 6 or 12 actuators, got nu={self.model.nu}")
        self.data.qpos[:DOF] = self.q0
        self.data.ctrl[:DOF] = self.q0
        mujoco.mj_forward(self.model, self.data)
        self._dt_ns = int(round(self.model.opt.timestep * 1e9))
        n = max(1, int(self.log_seconds / self.model.opt.timestep))
        self._log_t = np.zeros(n, dtype=np.int64)
        self._log_t_cmd = np.zeros(n, dtype=np.int64)
        self._log_target = np.zeros((n, DOF))
        self._log_q = np.zeros((n, DOF))
        self._log_late = np.zeros(n, dtype=bool)
        self._log_n = 0
        self.late_steps = 0  # physics steps run with a stale target (this thread or the servo loop was delayed)
        self._q = self.q0.copy()
        self._q_ns = 0
        self.stopped_by_loop = False
        return self.q0.copy()

    def start(self, loop: Any) -> None:
        C = load_C()
        self._C = C
        self._sim_ns = C.monotonic_ns()  # wall time the sim state corresponds to
        with self._lock:
            self._q_ns = self._sim_ns
        self._fwd.start(loop)

    def _tick(self, target: tuple) -> bool:
        seq, t_ns, q, v, stopped = target
        if seq > 0:
            self.data.ctrl[:DOF] = q
            if self.model.nu == 2 * DOF:
                self.data.ctrl[DOF:] = 0.0 if stopped else v
        now = self._C.monotonic_ns()
        while self._sim_ns + self._dt_ns <= now:  # real time: catch up if this thread was late
            self._mj.mj_step(self.model, self.data)
            self._sim_ns += self._dt_ns
            # A target issued more than 3 steps before the time it is applied at is stale.
            late = seq > 0 and not stopped and self._sim_ns - t_ns > 3 * self._dt_ns
            if seq > 0 and self._log_n < len(self._log_t):
                i = self._log_n
                self._log_t[i], self._log_target[i], self._log_q[i] = self._sim_ns, q, self.data.qpos[:DOF]
                self._log_t_cmd[i] = t_ns
                self._log_late[i] = late
                self._log_n += 1
            self.late_steps += late
        with self._lock:
            self._q, self._q_ns = self.data.qpos[:DOF].copy(), self._sim_ns
        if stopped:
            self.stopped_by_loop = True
            return False
        self._C.sleep_until_ns(self._sim_ns + self._dt_ns, 0.0)
        return True

    def read_q(self) -> tuple[np.ndarray, int]:
        with self._lock:
            return self._q.copy(), self._q_ns

    def render(self, size: int = 224, camera: str | int = -1) -> np.ndarray:
        """uint8 [size, size, 3]: the arm at its latest simulated joint positions, from ``camera``
        (a camera of the model, or -1: MuJoCo's free camera). Renders a private copy of the state
        on the caller's thread (the inference thread), never touching the stepping thread's."""
        mj = self._mj
        renderer = getattr(self, "_renderer", None)
        if renderer is None or self._render_model is not self.model or renderer.height != size:
            self._close_renderer()
            self._render_model, self._render_data = self.model, mj.MjData(self.model)
            self._renderer = mj.Renderer(self.model, size, size)
        q, _ = self.read_q()
        self._render_data.qpos[:DOF] = q
        mj.mj_forward(self.model, self._render_data)
        self._renderer.update_scene(self._render_data, camera=camera)
        image = self._renderer.render().copy()
        _release_gl(self._renderer)
        return image

    def _close_renderer(self) -> None:
        renderer, self._renderer = getattr(self, "_renderer", None), None
        if renderer is not None:
            renderer.close()

    def log(self) -> dict[str, np.ndarray]:
        """t: [N] (s, monotonic), target: [N, 6] (commanded), q: [N, 6] (simulated), late: [N]
        (the step ran with a target issued more than 3 steps earlier: the servo loop or this
        thread was delayed), t_cmd: [N] (s) the servo deadline the target was issued for (a
        physics step that catches up repeats the last target: unique t_cmd give the servo's
        command stream)."""
        n = self._log_n
        return {"t": self._log_t[:n] * 1e-9, "target": self._log_target[:n].copy(), "q": self._log_q[:n].copy(),
                "late": self._log_late[:n].copy(), "t_cmd": self._log_t_cmd[:n] * 1e-9}

    def close(self) -> None:
        self._fwd.close()
        self._close_renderer()


def _release_gl(renderer: Any) -> None:
    """Leave the renderer's EGL context current on no thread: MuJoCo makes it current on the
    creating thread for good, and closing it from another thread (the loop's, or the garbage
    collector's) would then fail."""
    ctx = getattr(renderer, "_gl_context", None)
    if ctx is not None and os.environ.get("MUJOCO_GL") == "egl":
        from mujoco import egl
        from OpenGL import EGL

        if isinstance(ctx, egl.GLContext) and egl.EGL_DISPLAY is not None:
            EGL.eglMakeCurrent(egl.EGL_DISPLAY, EGL.EGL_NO_SURFACE, EGL.EGL_NO_SURFACE, EGL.EGL_NO_CONTEXT)


class URRTDEBackend:
    """A real UR (e-series 500 Hz, CB3 125 Hz) through ur_rtde (``pip install vlafast[robot]``).

    The servoJ stream runs in a child process, not a thread of this one: ur_rtde's Python
    bindings keep the GIL while they wait (the RTDE round trips), and a Python thread that must
    run every 2 ms in a process whose other threads run Python (the policy's inference) waits up
    to ``sys.getswitchinterval()`` (5 ms) for the GIL at each call. Measured against the loopback
    controller (``vlafast.robot.fake_ur``): next to one busy Python thread, a forwarding thread
    ran 181 periods/s of 500 (433 with a 0.2 ms switch interval).

    So the servo thread publishes each target into shared memory (``_C.SharedMailboxBackend``,
    a seqlock: no lock, no GIL), and the child (its own interpreter) runs on its own clock:
    every period (absolute deadlines, asleep in between: a process that sleeps is woken promptly
    on a busy machine, where ur_rtde's ``waitPeriod`` spins the end of each period) it sends
    ``servoJ(newest q, 0, 0, 1/hz, lookahead, gain)``, whether or not the servo loop published
    a new target since (before the first target and at rest: ``kickWatchdog()``). The
    controller's RTDE watchdog (``watchdog_hz``, default 10, 0: off; armed when the loop starts)
    therefore watches this process only: it stops the program by itself within 1 / watchdog_hz
    if the forwarder stalls or dies, and a late servo thread or a busy policy process never
    trips it. Whether the plan is fresh is the servo loop's own chunk watchdog's to judge (it
    brakes to rest); should the servo thread publish nothing for ``SERVO_SILENCE_S`` while
    servoing, the forwarder stops servoing and reports it. When the servo loop has braked to
    rest the child calls ``servoStop()``.
    ``close()`` also stops the control script and disconnects; ``forwarder_stats`` then holds
    the child's period statistics. A refused command becomes ``error`` with the reason: the RTDE
    watchdog (the controller heard nothing for 1 / watchdog_hz), a protective stop, or a program
    stopped by someone else. q in rad; speed and acceleration are unused by servoJ (ur_rtde's
    docs), the servo loop enforces our limits before the target gets here. ``read_q`` reads this
    process's own ``RTDEReceiveInterface`` (its data thread is ur_rtde's; the call returns the
    cached sample).
    """

    def __init__(self, host: str, hz: float = 500.0, lookahead: float = 0.1, gain: float = 300.0,
                 connect_timeout_s: float = 30.0, watchdog_hz: float = 10.0):
        if not 0.03 <= lookahead <= 0.2:
            raise ValueError(f"lookahead must be in [0.03, 0.2] s (servoJ's range), got {lookahead}")
        if not 100 <= gain <= 2000:
            raise ValueError(f"gain must be in [100, 2000] (servoJ's range), got {gain}")
        if hz not in (125.0, 500.0):
            raise ValueError(f"hz must be 500 (e-series) or 125 (CB3), got {hz}")
        self.host, self.hz, self.lookahead, self.gain = host, float(hz), float(lookahead), float(gain)
        if not 0 <= watchdog_hz < float("inf"):
            raise ValueError(f"watchdog_hz must be a finite number >= 0 (0: off), got {watchdog_hz}")
        self.connect_timeout_s, self.watchdog_hz = connect_timeout_s, float(watchdog_hz)
        C = load_C()
        self._shm = shared_memory.SharedMemory(create=True, size=C.SHARED_MAILBOX_BYTES)  # zero-filled
        self.c_backend = C.SharedMailboxBackend(self._shm.buf)
        self._finalize = weakref.finalize(self, _release_shm, self._shm)
        self._proc: Any = None
        self._pipe: Any = None
        self._watch: threading.Thread | None = None
        self._rtde_r: Any = None
        self._closed = threading.Event()
        self.error: BaseException | None = None
        self.forwarder_stats: dict[str, float] = {}

    def open(self) -> np.ndarray:
        try:
            import rtde_receive
        except ImportError as exc:
            raise ImportError("URRTDEBackend needs ur_rtde: pip install 'vlafast[robot]'") from exc
        ctx = mp.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._proc = ctx.Process(target=_urrtde_forwarder, name="vlafast-ur-rtde", daemon=True, args=(
            child, self._shm.name, self.host, self.hz, self.lookahead, self.gain, self.watchdog_hz))
        self._proc.start()
        child.close()
        kind, value = self._reply(self.connect_timeout_s, "connect")
        if kind != "ready":
            self._end_child()
            raise RuntimeError(f"ur-rtde: could not start the control interface on {self.host}: {value}")
        self._rtde_r = rtde_receive.RTDEReceiveInterface(self.host, self.hz)
        q = np.asarray(self._rtde_r.getActualQ(), dtype=np.float64)
        if q.shape != (DOF,):
            self.close()
            raise RuntimeError(f"robot at {self.host} reported {q.shape} joint positions, expected 6")
        return q

    def _reply(self, timeout_s: float, what: str) -> tuple[str, Any]:
        if not self._pipe.poll(timeout_s):
            return "error", f"no answer from the forwarder process within {timeout_s:g} s ({what})"
        try:
            return self._pipe.recv()
        except (EOFError, OSError):
            return "error", f"the forwarder process died (exit code {self._proc.exitcode}) during {what}"

    def start(self, loop: Any) -> None:
        if self._watch is not None:
            raise RuntimeError("ur-rtde: a backend drives one servo loop; make a new backend")
        self._pipe.send("start")
        self._watch = threading.Thread(target=self._watch_child, args=(loop,), name="ur-rtde-watch", daemon=True)
        self._watch.start()

    def _watch_child(self, loop: Any) -> None:
        """Turn a failure of the child (an exception, a refused command, or its death) into a stop
        of the servo loop."""
        while not self._closed.is_set():
            if self._pipe.poll(0.05):
                kind, value = self._reply(0.0, "the run")
                if kind == "refused":
                    kind, value = "error", self._refusal(value)
                if kind == "error":
                    self.error = RuntimeError(value)
                    loop.request_stop(f"ur-rtde failed: {value}")
                    return
                if kind == "stats":
                    self.forwarder_stats = value
                    return
            elif not self._proc.is_alive():
                self.error = RuntimeError(f"the ur-rtde forwarder process died (exit code {self._proc.exitcode})")
                loop.request_stop(f"ur-rtde failed: {self.error}")
                return

    def _refusal(self, info: dict[str, Any]) -> str:
        """Why the controller refused a command, from its state as this process's receive
        interface sees it. That is another connection than the forwarder's, and may be behind
        it: a program still playing there is waited for (1 s at most), then taken as unknown."""
        runtime_state, protective = None, False
        try:
            deadline = time.monotonic() + 1.0
            while (state := int(self._rtde_r.getRuntimeState())) == RUNTIME_PLAYING and time.monotonic() < deadline:
                time.sleep(0.01)
            runtime_state = None if state == RUNTIME_PLAYING else state
            protective = bool(self._rtde_r.isProtectiveStopped())
        except Exception:  # noqa: BLE001 - the state is a hint; the refusal is reported either way
            pass
        return refusal_message(info["what"], info["gap_s"], self.watchdog_hz, runtime_state, protective)

    def read_q(self) -> tuple[np.ndarray, int]:
        t_ns = load_C().monotonic_ns()
        return np.asarray(self._rtde_r.getActualQ(), dtype=np.float64), t_ns

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop servoing and the script, disconnect, end the child; idempotent."""
        if self._proc is not None and self._proc.is_alive():
            try:
                self._pipe.send("close")
            except OSError:
                pass
            deadline = time.monotonic() + timeout_s
            while self._watch is None and time.monotonic() < deadline:  # never started: read the reply here
                kind, value = self._reply(max(0.0, deadline - time.monotonic()), "close")
                if kind == "stats":
                    self.forwarder_stats = value
                if kind in ("stats", "error"):
                    break
            if self._watch is not None:
                self._watch.join(max(0.0, deadline - time.monotonic()))
        self._closed.set()
        self._end_child()
        if self._rtde_r is not None:
            self._rtde_r.disconnect()
            self._rtde_r = None
        try:
            self._shm.unlink()  # the mapping stays valid for the C++ backend until this object dies
        except FileNotFoundError:
            pass

    def _end_child(self) -> None:
        if self._proc is not None:
            self._proc.join(5.0)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5.0)


def _release_shm(shm: shared_memory.SharedMemory) -> None:
    try:
        shm.close()
        shm.unlink()
    except (FileNotFoundError, BufferError):
        pass


RUNTIME_PLAYING, RUNTIME_PAUSED = 2, 4  # RTDE runtime_state; paused: what rtde_set_watchdog's default action leaves
SERVO_SILENCE_S = 1.0  # no new target from a servoing loop for this long: the servo thread is gone


def refusal_message(what: str, gap_s: float, watchdog_hz: float, runtime_state: int | None, protective: bool) -> str:
    """The sentence a user reads when the controller refused ``what`` (servoJ, kickWatchdog):
    ``gap_s`` is the forwarder's longest silence just before (seconds between its commands),
    ``runtime_state`` and ``protective`` the controller's state (None: unknown). A paused
    program is the watchdog's doing (rtde_set_watchdog's default action); a stopped one may be
    anyone's, the watchdog's too when the forwarder was silent longer than its period."""
    period_ms, gap_ms = 1e3 / watchdog_hz if watchdog_hz > 0 else 0.0, gap_s * 1e3
    silent = watchdog_hz > 0 and gap_s > 1.0 / watchdog_hz
    if watchdog_hz > 0 and (runtime_state == RUNTIME_PAUSED or (silent and runtime_state is None)):
        return (f"RTDE watchdog tripped: the controller heard nothing from the servoJ forwarder for over "
                f"{period_ms:.0f} ms (watchdog_hz={watchdog_hz:g}) and stopped the program, the forwarder's "
                f"last silence being {gap_ms:.0f} ms (an overloaded machine or network delays it)")
    if protective:
        return f"{what} refused: the robot is in a protective stop (clear it on the pendant, then restart)"
    if silent:
        return (f"{what} refused: the control script is not running (stopped on the pendant or dashboard, not in "
                f"remote control, or by the RTDE watchdog: the forwarder was silent for {gap_ms:.0f} ms, over its "
                f"{period_ms:.0f} ms)")
    return (f"{what} refused: the control script is not running (stopped on the pendant or dashboard, "
            f"or not in remote control?)")


class _Gaps:
    """The gaps between the forwarder's commands, in constant memory however long it runs:
    count, sum, max, periods over 1.5x nominal, a 10 us histogram up to 100 ms (p50, p99) and
    the last 0.5 s of gaps."""

    BIN_NS, BINS = 10_000, 10_000

    def __init__(self, hz: float):
        self.period_ns = 1e9 / hz
        self.hist = np.zeros(self.BINS + 1, dtype=np.int64)  # the last bin: 100 ms and longer
        self.n = self.sum_ns = self.max_ns = self.late = 0
        self.recent: collections.deque[int] = collections.deque(maxlen=max(1, int(hz) // 2))

    def add(self, gap_ns: int) -> None:
        self.hist[min(gap_ns // self.BIN_NS, self.BINS)] += 1
        self.n, self.sum_ns, self.max_ns = self.n + 1, self.sum_ns + gap_ns, max(self.max_ns, gap_ns)
        self.late += gap_ns > 1.5 * self.period_ns
        self.recent.append(gap_ns)

    def stats(self, servoj: int) -> dict[str, float]:
        span_s = max(self.sum_ns * 1e-9, 1e-9)
        cum = np.cumsum(self.hist)

        def pct_ms(q: float) -> float:  # the bin's middle; 0 with no gap
            return 0.0 if not self.n else float((np.searchsorted(cum, q * self.n) + 0.5) * self.BIN_NS * 1e-6)

        return {"periods": self.n, "late": self.late, "hz": self.n / span_s, "servoj": servoj,
                "servoj_hz": servoj / span_s, "p50_ms": min(pct_ms(0.5), self.max_ns * 1e-6),
                "p99_ms": min(pct_ms(0.99), self.max_ns * 1e-6), "max_ms": self.max_ns * 1e-6}


def _urrtde_forwarder(pipe: Any, shm_name: str, host: str, hz: float, lookahead: float, gain: float,
                      watchdog_hz: float) -> None:
    """The child process of URRTDEBackend: connect, then each period (absolute deadlines) send
    servoJ with the newest servo target (kickWatchdog before the first one and at rest) until
    the parent says ``close``; servoStop once the servo loop has braked to rest. With ``watchdog_hz`` the
    controller's RTDE watchdog is armed at the start: should this process stall or die, the
    controller stops the program itself after 1 / watchdog_hz. A refused command is sent to the
    parent as ``("refused", {"what", "gap_s"})``, other failures as ``("error", text)``."""
    try:
        import rtde_control
    except ImportError as exc:
        pipe.send(("error", f"ur_rtde is not installed (pip install 'vlafast[robot]'): {exc}"))
        return
    C = load_C()
    shm = shared_memory.SharedMemory(name=shm_name)  # spawn children share the parent's resource tracker
    rtde_c = None
    try:
        rtde_c = rtde_control.RTDEControlInterface(host, hz)
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        shm.close()
        return
    pipe.send(("ready", None))
    period_ns, silence_ns = int(round(1e9 / hz)), int(SERVO_SILENCE_S * 1e9)
    servoing, seq_last, servoj_calls, gaps = False, 0, 0, _Gaps(hz)
    try:
        if pipe.recv() == "start":
            if watchdog_hz > 0:
                rtde_c.setWatchdog(watchdog_hz)
            last_ns, fresh_ns = None, 0
            deadline = C.monotonic_ns()
            while not pipe.poll():
                seq, _t_ns, q, _v, stopped = C.read_shared_target(shm.buf)
                now = C.monotonic_ns()
                if stopped and servoing:  # braked to rest
                    what, ok, servoing = "servoStop", rtde_c.servoStop(), False
                elif seq > 0 and not stopped:  # the newest target every period, new or not: it feeds the watchdog
                    if seq > seq_last:
                        seq_last, fresh_ns = seq, now
                    elif now - fresh_ns > silence_ns:
                        rtde_c.servoStop()
                        rtde_c.stopScript()
                        raise RuntimeError(f"the servo loop published no target for {SERVO_SILENCE_S:g} s while "
                                           "servoing (its thread stalled or died); servoing and the script stopped")
                    what, ok = "servoJ", rtde_c.servoJ([float(x) for x in q], 0.0, 0.0, 1.0 / hz, lookahead, gain)
                    servoing, servoj_calls = True, servoj_calls + 1
                else:  # nothing to servo yet, or at rest: keep the watchdog fed
                    what, ok = "kickWatchdog", rtde_c.kickWatchdog() if watchdog_hz > 0 else True
                if not ok and what != "servoStop":  # the controller's view may lag ours: the last 0.5 s count
                    silence = max([now - (last_ns or now), *gaps.recent])
                    pipe.send(("refused", {"what": what, "gap_s": silence * 1e-9}))
                    rtde_c.disconnect()
                    return
                if last_ns is not None:
                    gaps.add(now - last_ns)
                last_ns = now
                deadline += period_ns
                if deadline <= C.monotonic_ns():  # this process was late: the next deadline still ahead, no burst
                    deadline += ((C.monotonic_ns() - deadline) // period_ns + 1) * period_ns
                C.sleep_until_ns(deadline, 0.0)
        if servoing:
            rtde_c.servoStop()
        rtde_c.stopScript()
        rtde_c.disconnect()
        pipe.send(("stats", gaps.stats(servoj_calls)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        try:
            if rtde_c is not None:
                rtde_c.disconnect()
        finally:
            pipe.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        shm.close()


def make_backend(name: str, *, host: str = "", hz: float = 500.0, **kw: Any) -> Any:
    """'null' | 'mujoco' | 'ur-rtde' -> a backend object."""
    if name == "null":
        return NullBackend(**kw)
    if name == "mujoco":
        return MujocoUR5eBackend(**kw)
    if name == "ur-rtde":
        if not host:
            raise ValueError("the ur-rtde backend needs --host (the robot's IP address)")
        return URRTDEBackend(host, hz=hz, **kw)
    raise ValueError(f"backend must be 'null', 'mujoco' or 'ur-rtde', got {name!r}")
