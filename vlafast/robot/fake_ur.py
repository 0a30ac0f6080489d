"""A UR e-series controller on loopback, as far as ur_rtde can tell: its RTDE, dashboard and
script ports, and the control script ur_rtde uploads, run in Python threads.

What it speaks:

- **RTDE** (port 30004, protocol v2, big-endian ``uint16 size, uint8 type`` frames): protocol
  version and controller version requests, output recipes (a frequency and variable names; the
  reply gives each variable's type, or ``NOT_FOUND``), input recipes (``IN_USE`` when another
  connection owns a variable), start / pause, data packages both ways. Every started connection
  gets its output recipes at the frequency it asked for (500 Hz at most, as on e-series).
- **Dashboard** (port 29999): the welcome line, then one reply per command line
  (``PolyscopeVersion``, ``is in remote control``, ``robotmode``, ``safetystatus``,
  ``programState``, ``running``, ``stop``, ``power on``, ``brake release``, ...).
- **Script** (ports 30001-30003): a program ``def NAME(): ... end`` starts when it arrives; a
  new program replaces the running one, as the controller does. The register offsets are read
  from the program text (``global reg_offset_int = N``), as the program itself would.

What the uploaded ur_rtde control script does is emulated, not interpreted: each 2 ms tick reads
the command from ``input_int_register(offset + 0)``; real-time commands (servoJ, speedJ, ...) are
taken and answered with ``output_int_register(offset + 0) = 1`` (ready), other commands once
with ``2`` (done), ``0`` (no command) with ``1``, and 255 ends the program, which is ur_rtde's
protocol. Implemented commands: servoJ (11), speedJ (9), speedStop (15), servoStop (16),
stopJ (34), setWatchdog (35: from then on, no input package for 1 / min_frequency pauses the
program, as the controller's ``rtde_set_watchdog`` does; the time is counted in the fake's own
ticks, so a stall of its own process is not taken for the client's silence), kickWatchdog (any
input package; ur_rtde 1.6.5 sends one with no command, the script also takes 58 as a no-op),
stop script (255). Any other command stops the program with ``unsupported command N`` in
``errors``: a fake that answered "done" would hide it.

Hostile or broken clients: every input buffer is bounded (an RTDE frame by its 16-bit size, a
dashboard line to ``MAX_LINE_BYTES``, a script upload to ``MAX_SCRIPT_BYTES``; at most
``MAX_CONNECTIONS`` clients and 255 recipes per connection), and so is every record kept; bytes
that do not parse (invalid UTF-8, a short or unknown RTDE frame, a payload of the wrong size) are
answered where the controller answers (``could not understand`` on the dashboard, ``NOT_FOUND``
in a recipe) or close that connection with a line in ``errors``, never a traceback. It listens on
loopback only unless ``allow_remote`` (``--allow-remote``): it has no authentication.

The arm: joint positions integrate a velocity command. servoJ tracks its target as a first
order lag with the lookahead time as time constant (UR's servoj is a filtered proportional
tracker with the same role for lookahead), clipped to the UR5e's joint speed limits. Outputs
the fake does not model (TCP pose and force, currents, IO, temperatures) read as zeros of the
right type; everything it does model is listed in ``OUTPUTS`` below.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import ipaddress
import logging
import multiprocessing as mp
import re
import socket
import struct
import threading
import time
from typing import Any, Callable

import numpy as np

from vlafast.robot.servo import DOF, UR5E_HOME

log = logging.getLogger(__name__)

RTDE_PORT, DASHBOARD_PORT, SCRIPT_PORTS = 30004, 29999, (30001, 30002, 30003)

# RTDE frame types
REQUEST_PROTOCOL_VERSION, GET_URCONTROL_VERSION = ord("V"), ord("v")
TEXT_MESSAGE, DATA_PACKAGE = ord("M"), ord("U")
SETUP_OUTPUTS, SETUP_INPUTS, START, PAUSE = ord("O"), ord("I"), ord("S"), ord("P")

# RTDE data types -> struct format
TYPE_FORMAT = {"BOOL": "?", "UINT8": "B", "UINT32": "I", "UINT64": "Q", "INT32": "i", "DOUBLE": "d",
               "VECTOR3D": "3d", "VECTOR6D": "6d", "VECTOR6INT32": "6i", "VECTOR6UINT32": "6I"}

# runtime_state, robot_mode, safety_mode values (RTDE guide)
RUNTIME_STOPPED, RUNTIME_PLAYING, RUNTIME_PAUSED = 1, 2, 4
ROBOT_MODE_RUNNING, SAFETY_MODE_NORMAL = 7, 1
STATUS_POWER_ON, STATUS_PROGRAM_RUNNING = 1 << 0, 1 << 1

# ur_rtde control script commands (RTDEControlInterface's RobotCommand::Type)
CMD_NONE, CMD_SPEEDJ, CMD_SERVOJ, CMD_SPEED_STOP, CMD_SERVO_STOP = 0, 9, 11, 15, 16
CMD_STOPJ, CMD_SET_WATCHDOG, CMD_WATCHDOG, CMD_STOP_SCRIPT = 34, 35, 58, 255
REALTIME_CMDS = frozenset({6, 9, 10, 11, 24, 25, 26, 27, 38, 58, 66, 67, 68, 69, 70, 71})  # the script's list
READY, DONE = 1, 2

# dashboard commands whose reply does not depend on the controller's state
DASHBOARD_FIXED = {"safetystatus": "Safetystatus: NORMAL", "safetymode": "Safetymode: NORMAL",
                   "brake release": "Brake releasing", "unlock protective stop": "Protective stop releasing",
                   "close safety popup": "closing popup", "close popup": "closing popup",
                   "get serial number": "20260000000", "get robot model": "UR5", "quit": "Disconnected"}

# bounds on what clients can make the fake hold
MAX_LINE_BYTES = 4096            # a dashboard command line
MAX_SCRIPT_BYTES = 1 << 20       # a script upload before its closing `end` (ur_rtde 1.6.5's control script: 42 kB)
MAX_CONNECTIONS = 32             # clients on all ports together
MAX_RECIPES = 255                # per connection and direction (recipe ids are one byte)
RECORD_SECONDS = 120.0           # servo_targets and commands keep the last 2 min at 500 Hz
MAX_LOG_LINES = 1000             # dashboard_log and errors (programs: the last 16)


class Malformed(ValueError):
    """Bytes from a client that do not parse: the connection is closed, with a line in ``errors``."""


UR5E_QD_MAX = np.array([np.pi, np.pi, np.pi, 2 * np.pi, 2 * np.pi, 2 * np.pi])  # rad/s (UR5e joint limits)


def _vector6(kind: str) -> dict[str, str]:
    return {name: kind for name in (
        "target_q", "target_qd", "target_qdd", "target_current", "target_moment", "actual_q", "actual_qd",
        "actual_current", "joint_control_output", "actual_TCP_pose", "actual_TCP_speed", "actual_TCP_force",
        "target_TCP_pose", "target_TCP_speed", "joint_temperatures", "actual_joint_voltage", "payload_inertia",
        "ft_raw_wrench", "joint_position_deviation_ratio", "actual_current_window", "actual_current_as_torque",
        "target_qd_raw")}


# name -> RTDE type of every variable a client may ask for (RTDE guide, e-series 5.x)
OUTPUTS: dict[str, str] = {
    "timestamp": "DOUBLE", **_vector6("VECTOR6D"),
    "actual_digital_input_bits": "UINT64", "actual_digital_output_bits": "UINT64",
    "actual_execution_time": "DOUBLE", "robot_mode": "INT32", "joint_mode": "VECTOR6INT32",
    "safety_mode": "INT32", "safety_status": "INT32", "actual_tool_accelerometer": "VECTOR3D",
    "speed_scaling": "DOUBLE", "target_speed_fraction": "DOUBLE", "actual_momentum": "DOUBLE",
    "actual_main_voltage": "DOUBLE", "actual_robot_voltage": "DOUBLE", "actual_robot_current": "DOUBLE",
    "runtime_state": "UINT32", "elbow_position": "VECTOR3D", "elbow_velocity": "VECTOR3D",
    "robot_status_bits": "UINT32", "safety_status_bits": "UINT32", "analog_io_types": "UINT32",
    "standard_analog_input0": "DOUBLE", "standard_analog_input1": "DOUBLE",
    "standard_analog_output0": "DOUBLE", "standard_analog_output1": "DOUBLE", "io_current": "DOUBLE",
    "euromap67_input_bits": "UINT32", "euromap67_output_bits": "UINT32",
    "euromap67_24V_voltage": "DOUBLE", "euromap67_24V_current": "DOUBLE",
    "tool_mode": "UINT32", "tool_analog_input_types": "UINT32", "tool_analog_input0": "DOUBLE",
    "tool_analog_input1": "DOUBLE", "tool_output_voltage": "INT32", "tool_output_current": "DOUBLE",
    "tool_temperature": "DOUBLE", "tcp_force_scalar": "DOUBLE", "tool_output_mode": "UINT8",
    "tool_digital_output0_mode": "UINT8", "tool_digital_output1_mode": "UINT8",
    "payload": "DOUBLE", "payload_cog": "VECTOR3D", "script_control_line": "UINT32",
    "collision_detection_ratio": "DOUBLE", "time_scale_source": "UINT32",
    "output_bit_registers0_to_31": "UINT32", "output_bit_registers32_to_63": "UINT32",
    "input_bit_registers0_to_31": "UINT32", "input_bit_registers32_to_63": "UINT32",
    **{f"{io}_int_register_{i}": "INT32" for io in ("input", "output") for i in range(48)},
    **{f"{io}_double_register_{i}": "DOUBLE" for io in ("input", "output") for i in range(48)},
    **{f"{io}_bit_register_{i}": "BOOL" for io in ("input", "output") for i in range(64, 128)},
}

# what clients may write (RTDE guide): the input registers and the IO / speed-slider inputs
INPUTS: dict[str, str] = {
    **{k: v for k, v in OUTPUTS.items() if k.startswith("input_")},
    "speed_slider_mask": "UINT32", "speed_slider_fraction": "DOUBLE",
    "standard_digital_output_mask": "UINT8", "standard_digital_output": "UINT8",
    "configurable_digital_output_mask": "UINT8", "configurable_digital_output": "UINT8",
    "tool_digital_output_mask": "UINT8", "tool_digital_output": "UINT8",
    "standard_analog_output_mask": "UINT8", "standard_analog_output_type": "UINT8",
    "standard_analog_output_0": "DOUBLE", "standard_analog_output_1": "DOUBLE",
    "external_force_torque": "VECTOR6D",
}


def _fmt(types: list[str]) -> str:
    return ">" + "".join(TYPE_FORMAT[t] for t in types)


def _zero(kind: str) -> Any:
    n = int(TYPE_FORMAT[kind][0]) if TYPE_FORMAT[kind][0].isdigit() else 0
    scalar = 0.0 if kind.endswith("D") or kind == "DOUBLE" else 0
    return [scalar] * n if n else (False if kind == "BOOL" else scalar)


def _names(payload: bytes) -> list[str]:
    """A recipe's variable names; ur_rtde ends the list with a comma, which the controller ignores.
    Bytes that are not UTF-8 become U+FFFD: such a name is NOT_FOUND, as any unknown name."""
    names = payload.decode(errors="replace").split(",")
    return names[:-1] if names and names[-1] == "" else names


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("peer closed")
        buf += part
    return buf


def check_listen_host(host: str, allow_remote: bool = False) -> None:
    """Raise ValueError unless ``host`` is a loopback address (or ``allow_remote``)."""
    if allow_remote:
        return
    try:
        addrs = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"--host {host!r} does not resolve ({exc})") from exc
    if not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs):
        raise ValueError(f"--host {host} is not a loopback address: the fake UR controller takes commands from anyone "
                         "who can reach it, so it listens on 127.0.0.0/8 or ::1 only unless --allow-remote is given")


def _frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack(">HB", 3 + len(payload), kind) + payload


@dataclasses.dataclass
class _Recipe:
    names: list[str]
    types: list[str]
    freq: float = 0.0


class _Conn:
    """One RTDE client connection."""

    def __init__(self, sock: socket.socket):
        self.sock, self.lock = sock, threading.Lock()
        self.outputs: dict[int, _Recipe] = {}
        self.inputs: dict[int, _Recipe] = {}
        self.streaming, self.closed = False, False

    def send(self, kind: int, payload: bytes = b"") -> None:
        with self.lock:
            self.sock.sendall(_frame(kind, payload))


class FakeURController:
    """The controller: ``with FakeURController() as ur: rtde_control.RTDEControlInterface(ur.host)``.

    ``host``: the loopback address to listen on (each fake needs its own, since ur_rtde's ports
    are fixed; any 127.x.y.z works on Linux; ``None`` picks a free one); another address only
    with ``allow_remote``. ``q0``: initial joint positions. ``remote_control``: what the
    dashboard answers to ``is in remote control``. Inspect ``servo_targets`` (t_s, q): each new
    servoJ target the script took (the last ``RECORD_SECONDS``; ``servo_target_count`` counts
    all); ``commands`` (t_s, cmd): the commands it took (a real-time command repeated tick after
    tick once); t_s is ``time.monotonic()``, comparable across processes. Also ``programs``
    uploaded, ``dashboard_log`` and ``errors`` (the last ``MAX_LOG_LINES`` each).
    """

    def __init__(self, host: str | None = None, q0=UR5E_HOME, version: tuple[int, int, int, int] = (5, 15, 0, 1),
                 remote_control: bool = True, tick_hz: float = 500.0, allow_remote: bool = False):
        if host:
            check_listen_host(host, allow_remote)
        self.host = host or _free_loopback()
        self.version, self.remote_control, self.tick_s = version, remote_control, 1.0 / tick_hz
        self._lock = threading.RLock()
        self.q = np.asarray(q0, dtype=np.float64).copy()
        if self.q.shape != (DOF,):
            raise ValueError(f"q0 must be 6 joint positions, got {self.q.shape}")
        self.qd = np.zeros(DOF)
        self.target_q = self.q.copy()
        self.registers: dict[str, Any] = {}
        self.input_owner: dict[str, _Conn] = {}
        self.runtime_state = RUNTIME_STOPPED
        self.powered, self.t0 = True, time.monotonic()
        self.reg_int = self.reg_float = 0
        self.servo: dict[str, Any] | None = None       # {target, lookahead, gain, time} while servoing
        self.speed: np.ndarray | None = None           # speedJ target velocity
        self.executing = False
        # RTDE watchdog: seconds without an input package, counted in the fake's own ticks (see _control_loop)
        self.watchdog_hz, self.silent_s = 0.0, 0.0
        self.ticks = 0  # control ticks run: the fake's own clock
        records = int(RECORD_SECONDS * tick_hz)
        self.servo_targets: collections.deque[tuple[float, np.ndarray]] = collections.deque(maxlen=records)
        self.servo_target_count = self.program_count = 0
        self.commands: collections.deque[tuple[float, int]] = collections.deque(maxlen=records)
        self.programs: collections.deque[str] = collections.deque(maxlen=16)
        self.dashboard_log: collections.deque[str] = collections.deque(maxlen=MAX_LOG_LINES)
        self.errors: collections.deque[str] = collections.deque(maxlen=MAX_LOG_LINES)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._servers: list[socket.socket] = []
        self._conns: list[socket.socket] = []

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> "FakeURController":
        for port, handler in [(RTDE_PORT, self._serve_rtde), (DASHBOARD_PORT, self._serve_dashboard),
                              *[(p, self._serve_script) for p in SCRIPT_PORTS]]:
            srv = socket.create_server((self.host, port), reuse_port=False)
            srv.settimeout(0.2)
            self._servers.append(srv)
            self._spawn(self._accept, srv, handler)
        self._spawn(self._control_loop)
        return self

    def stop(self) -> None:
        self._stop.set()
        for s in self._servers + self._conns:
            try:
                s.close()
            except OSError:
                pass
        for t in list(self._threads):
            t.join(timeout=2.0)

    def __enter__(self) -> "FakeURController":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, fn: Callable, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True, name=f"fake-ur-{fn.__name__}")
        t.start()
        self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _accept(self, srv: socket.socket, handler: Callable[[socket.socket], None]) -> None:
        port = srv.getsockname()[1]
        while not self._stop.is_set():
            try:
                sock, _ = srv.accept()
            except (socket.timeout, OSError):
                continue
            with self._lock:
                full = len(self._conns) >= MAX_CONNECTIONS
                if not full:
                    self._conns.append(sock)
            if full:
                self.errors.append(f"port {port}: more than {MAX_CONNECTIONS} clients; connection refused")
                sock.close()
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._spawn(self._guard, handler, sock, port)

    def _guard(self, handler: Callable[[socket.socket], None], sock: socket.socket, port: int) -> None:
        """Serve one client; whatever it sends, the connection ends without a traceback."""
        try:
            handler(sock)
        except (ConnectionError, OSError):
            pass  # the client went away
        except Exception as exc:  # noqa: BLE001 - Malformed, or bytes no check foresaw
            self.errors.append(f"port {port}: {exc if isinstance(exc, Malformed) else repr(exc)}; connection closed")
            log.debug("port %d: closing a client", port, exc_info=True)
        finally:
            sock.close()
            with self._lock:
                if sock in self._conns:
                    self._conns.remove(sock)

    @property
    def program_running(self) -> bool:
        return self.runtime_state == RUNTIME_PLAYING

    # -- RTDE ----------------------------------------------------------------------------
    def _serve_rtde(self, sock: socket.socket) -> None:
        conn = _Conn(sock)
        self._spawn(self._stream, conn)
        try:
            while not self._stop.is_set():
                size, kind = struct.unpack(">HB", _recv_exact(sock, 3))
                if size < 3:
                    raise Malformed(f"RTDE frame of size {size} (a header alone is 3 bytes)")
                payload = _recv_exact(sock, size - 3)
                try:
                    self._rtde_message(conn, kind, payload)
                except (struct.error, IndexError, KeyError, ValueError) as exc:
                    raise Malformed(f"RTDE frame {kind!r} ({chr(kind) if 32 <= kind < 127 else '?'}) "
                                    f"that does not parse: {exc}") from exc
        finally:
            conn.closed = True
            with self._lock:
                for name in [n for n, c in self.input_owner.items() if c is conn]:
                    del self.input_owner[name]

    def _rtde_message(self, conn: _Conn, kind: int, payload: bytes) -> None:
        """Answer one frame; a payload that does not parse raises (struct.error, IndexError, ...)."""
        if kind != DATA_PACKAGE:
            log.debug("RTDE %s %r", chr(kind), payload[:200])
        if kind == REQUEST_PROTOCOL_VERSION:
            (version,) = struct.unpack(">H", payload)
            conn.send(kind, struct.pack(">B", version in (1, 2)))
        elif kind == GET_URCONTROL_VERSION:
            conn.send(kind, struct.pack(">IIII", *self.version))
        elif kind == SETUP_OUTPUTS:
            (freq,) = struct.unpack(">d", payload[:8])
            freq = freq if 0.0 < freq <= 500.0 else 500.0  # NaN, <= 0, too fast: the fastest
            names = _names(payload[8:])
            types = [OUTPUTS.get(n, "NOT_FOUND") for n in names]
            rid = self._new_recipe(conn, conn.outputs, names, types, freq)
            log.debug("outputs %d: %s", rid, dict(zip(names, types)))
            conn.send(kind, struct.pack(">B", rid) + ",".join(types).encode())
        elif kind == SETUP_INPUTS:
            names = _names(payload)
            with self._lock:
                types = [INPUTS.get(n, "NOT_FOUND") for n in names]
                types = ["IN_USE" if self.input_owner.get(n, conn) is not conn else t for n, t in zip(names, types)]
                rid = self._new_recipe(conn, conn.inputs, names, types)
                if rid:
                    self.input_owner.update({n: conn for n in names})
            conn.send(kind, struct.pack(">B", rid) + ",".join(types).encode())
        elif kind in (START, PAUSE):
            conn.streaming = kind == START and bool(conn.outputs)
            conn.send(kind, struct.pack(">B", 1))
        elif kind == DATA_PACKAGE:
            recipe = conn.inputs.get(payload[0])
            if recipe is None:
                self.errors.append(f"data package for unknown input recipe {payload[0]}")
                return
            if len(payload) - 1 != struct.calcsize(_fmt(recipe.types)):
                self.errors.append(f"input recipe {payload[0]} has {struct.calcsize(_fmt(recipe.types))} bytes, "
                                   f"got {len(payload) - 1}")
                return
            values = self._unpack(recipe.types, payload[1:])
            with self._lock:
                self.registers.update(zip(recipe.names, values))
                self.silent_s = 0.0
        elif kind == TEXT_MESSAGE:
            pass
        else:
            raise Malformed(f"unknown RTDE frame type {kind}")

    @staticmethod
    def _new_recipe(conn: _Conn, table: dict, names: list[str], types: list[str], freq: float = 0.0) -> int:
        if any(t in ("NOT_FOUND", "IN_USE") for t in types) or len(table) >= MAX_RECIPES:
            return 0  # the controller's "recipe refused"
        rid = len(table) + 1  # output and input recipes are numbered apart, each from 1
        table[rid] = _Recipe(names, types, freq)
        return rid

    @staticmethod
    def _unpack(types: list[str], data: bytes) -> list[Any]:
        flat = list(struct.unpack(_fmt(types), data))
        out = []
        for t in types:
            n = int(TYPE_FORMAT[t][0]) if TYPE_FORMAT[t][0].isdigit() else 1
            out.append(flat[:n] if n > 1 else flat[0])
            flat = flat[n:]
        return out

    def _stream(self, conn: _Conn) -> None:
        """Send each started recipe at its frequency until the connection closes."""
        due: dict[int, float] = {}
        while not (self._stop.is_set() or conn.closed):
            now = time.monotonic()
            if not conn.streaming:
                due.clear()
                time.sleep(0.001)
                continue
            for rid, recipe in list(conn.outputs.items()):
                period = 1.0 / recipe.freq if recipe.freq > 0 else 0.002
                if now >= due.get(rid, 0.0):
                    due[rid] = max(due.get(rid, now) + period, now)
                    values = self._values(recipe.names)
                    flat = [x for v in values for x in (v if isinstance(v, list) else [v])]
                    try:
                        conn.send(DATA_PACKAGE, struct.pack(">B", rid) + struct.pack(_fmt(recipe.types), *flat))
                    except OSError:
                        conn.closed = True
                        return
            time.sleep(max(0.0, min(due.values(), default=now + 0.001) - time.monotonic()))

    def _values(self, names: list[str]) -> list[Any]:
        with self._lock:
            running = self.program_running
            state = {
                "timestamp": time.monotonic() - self.t0, "actual_q": self.q.tolist(), "target_q": self.target_q.tolist(),
                "actual_qd": self.qd.tolist(), "target_qd": self.qd.tolist(), "robot_mode": ROBOT_MODE_RUNNING,
                "safety_mode": SAFETY_MODE_NORMAL, "safety_status": SAFETY_MODE_NORMAL, "runtime_state": self.runtime_state,
                "robot_status_bits": STATUS_POWER_ON * self.powered | STATUS_PROGRAM_RUNNING * running,
                "safety_status_bits": 1, "speed_scaling": 1.0, "target_speed_fraction": 1.0,
                "joint_mode": [255] * DOF,  # JOINT_RUNNING_MODE
            }
            return [state[n] if n in state else self.registers.get(n, _zero(OUTPUTS[n])) for n in names]

    # -- dashboard -----------------------------------------------------------------------
    def _serve_dashboard(self, sock: socket.socket) -> None:
        sock.sendall(b"Connected: Universal Robots Dashboard Server\n")
        buf = b""
        while not self._stop.is_set():
            part = sock.recv(4096)
            if not part:
                return
            buf += part
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if len(line) > MAX_LINE_BYTES:
                    raise Malformed(f"dashboard line longer than {MAX_LINE_BYTES} bytes")
                cmd = line.decode(errors="replace").strip()  # not UTF-8: a command nobody understands
                self.dashboard_log.append(cmd)
                log.debug("dashboard %r", cmd)
                sock.sendall((self._dashboard_reply(cmd) + "\n").encode())
            if len(buf) > MAX_LINE_BYTES:  # the line in progress
                raise Malformed(f"dashboard line longer than {MAX_LINE_BYTES} bytes")

    def _dashboard_reply(self, cmd: str) -> str:
        major, minor, bugfix, build = self.version
        low = cmd.lower()
        with self._lock:
            playing = self.program_running
            if low == "polyscopeversion":
                return f"URSoftware {major}.{minor}.{bugfix}.{build} (Dec 01 2026)"
            if low == "is in remote control":
                return "true" if self.remote_control else "false"
            if low == "robotmode":
                return "Robotmode: RUNNING" if self.powered else "Robotmode: POWER_OFF"
            if low == "programstate":
                return f"{'PLAYING' if playing else 'STOPPED'} {'rtde_control' if playing else '<unnamed>'}"
            if low == "running":
                return f"Program running: {'true' if playing else 'false'}"
            if low == "stop":
                self._end_program()
                return "Stopped"
            if low == "power on":
                self.powered = True
                return "Powering on"
            if low == "power off":
                self.powered = False
                return "Powering off"
        return DASHBOARD_FIXED.get(low, f"could not understand: '{cmd}'")

    # -- script --------------------------------------------------------------------------
    def _serve_script(self, sock: socket.socket) -> None:
        buf = ""
        while not self._stop.is_set():
            part = sock.recv(65536)
            if not part:
                return
            buf += part.decode(errors="replace")
            if len(buf) > MAX_SCRIPT_BYTES:
                raise Malformed(f"script upload over {MAX_SCRIPT_BYTES} bytes without a complete program")
            while True:
                m = re.search(r"^(def|sec) (\w+)\(\):\n", buf, re.M)
                end = re.search(r"^end\s*$", buf[m.end():], re.M) if m else None
                if m is None or end is None:
                    break
                program = buf[m.start(): m.end() + end.end()]
                buf = buf[m.end() + end.end():]
                self._run_program(program)

    def _run_program(self, program: str) -> None:
        offsets = {k: int(v) for k, v in re.findall(r"global reg_offset_(int|float)\s*=\s*(\d+)", program)}
        log.debug("program %r (%d chars)", program[:40], len(program))
        with self._lock:
            self.programs.append(program)
            self.program_count += 1
            self._end_program()
            if "reg_offset_int" not in program and "rtde_cmd" not in program:
                return  # a one-shot script (e.g. stopj): nothing to emulate
            self.reg_int, self.reg_float = offsets.get("int", 0), offsets.get("float", 0)
            self.runtime_state, self.executing = RUNTIME_PLAYING, False
            self._write_int(0, READY)

    def _end_program(self) -> None:
        self.runtime_state = RUNTIME_STOPPED
        self.servo, self.speed, self.watchdog_hz = None, None, 0.0

    def _in_int(self, i: int) -> int:
        return int(self.registers.get(f"input_int_register_{i + self.reg_int}", 0))

    def _in_double(self, i: int) -> float:
        return float(self.registers.get(f"input_double_register_{i + self.reg_float}", 0.0))

    def _write_int(self, i: int, value: int) -> None:
        self.registers[f"output_int_register_{i + self.reg_int}"] = value

    # -- the control script and the arm, every tick ---------------------------------------
    def _control_loop(self) -> None:
        """The controller's tick. The RTDE watchdog's clock is this loop's ticks, each counting at
        most two periods: time this process itself was not scheduled (a busy machine) is not
        silence a controller would have seen, and inputs that arrived meanwhile wait in the
        socket for the receiving thread."""
        t_next = t_prev = time.monotonic()
        while not self._stop.is_set():
            t_next += self.tick_s
            now = time.monotonic()
            with self._lock:
                self.silent_s += min(now - t_prev, 2 * self.tick_s)
                t_prev, self.ticks = now, self.ticks + 1
                if self.program_running:
                    self._script_tick()
                self._arm_tick()
            time.sleep(max(0.0, t_next - time.monotonic()))
            if time.monotonic() - t_next > 0.05:
                t_next = time.monotonic()  # fell behind (a paused process): do not burst

    def _script_tick(self) -> None:
        if self.watchdog_hz and self.silent_s > 1.0 / self.watchdog_hz:
            self.errors.append(f"RTDE watchdog: no input for {1.0 / self.watchdog_hz:.3f} s; program paused")
            self._end_program()
            self.runtime_state = RUNTIME_PAUSED
            return
        cmd = self._in_int(0)
        if cmd in REALTIME_CMDS:
            self._process(cmd)
            self._write_int(0, READY)
        elif cmd == CMD_NONE:
            self.executing = False
            self._write_int(0, READY)
        elif not self.executing:
            self.executing = True
            if self._process(cmd):
                self._write_int(0, DONE)

    def _process(self, cmd: int) -> bool:
        """Run one script command; False: the program ended."""
        now = time.monotonic()
        if cmd != (self.commands[-1][1] if self.commands else None) or cmd not in REALTIME_CMDS:
            self.commands.append((now, cmd))
        if cmd == CMD_SERVOJ:
            target = np.array([self._in_double(i) for i in range(DOF)])
            if self.servo is None or not np.array_equal(target, self.servo["target"]):
                self.servo_targets.append((now, target))
                self.servo_target_count += 1
            self.servo = {"target": target, "time": self._in_double(8), "lookahead": self._in_double(9),
                          "gain": self._in_double(10)}
            self.speed = None
        elif cmd == CMD_SPEEDJ:
            self.speed, self.servo = np.array([self._in_double(i) for i in range(DOF)]), None
        elif cmd in (CMD_SERVO_STOP, CMD_SPEED_STOP, CMD_STOPJ):
            self.servo = self.speed = None
        elif cmd == CMD_SET_WATCHDOG:
            self.watchdog_hz, self.silent_s = self._in_double(0), 0.0
        elif cmd == CMD_WATCHDOG:
            pass  # kickWatchdog: the input package that carried it was the kick
        elif cmd == CMD_STOP_SCRIPT:
            self._end_program()
            return False
        else:
            self.errors.append(f"unsupported command {cmd}")
            self._end_program()
            return False
        return True

    def _arm_tick(self) -> None:
        dt = self.tick_s
        if self.servo is not None:
            tau = max(self.servo["lookahead"], dt)
            self.target_q = self.servo["target"]
            qd = (self.target_q - self.q) / tau
        elif self.speed is not None:
            qd = self.speed
        else:
            qd = np.zeros(DOF)  # stopped (a real stopj decelerates; the fake stops at once)
        self.qd = np.clip(qd, -UR5E_QD_MAX, UR5E_QD_MAX)
        self.q = self.q + self.qd * dt
        if self.servo is None:
            self.target_q = self.q.copy()


class FakeURProcess:
    """``FakeURController`` in a child process, for clients in this one: ur_rtde's Python
    bindings keep the GIL while they wait for the controller's replies, so a fake served by
    threads of the client's own process would never answer (the constructor deadlocks).

    ``with FakeURProcess(q0=...) as ur: ...; ur.snapshot()`` -> the records of
    ``FakeURController`` as plain data: ``servo_targets`` [N, 6], ``servo_t`` [N] (s),
    ``commands`` [(t_s, cmd)], ``programs``, ``dashboard_log``, ``errors``, ``q`` [6],
    ``program_running``, ``servo`` (the running servoJ's time, lookahead and gain, or None),
    ``registers``, ``ticks`` (control ticks run).
    """

    def __init__(self, **kw: Any):
        ctx = mp.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        level = logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.WARNING  # the child logs as we do
        self._proc = ctx.Process(target=_serve_in_child, args=(child, kw, level), daemon=True, name="fake-ur")
        self.host = ""

    def start(self) -> "FakeURProcess":
        self._proc.start()
        if not self._pipe.poll(60.0):
            self._proc.kill()
            raise RuntimeError("the fake UR controller process did not start within 60 s")
        reply = self._pipe.recv()
        if isinstance(reply, BaseException):
            raise RuntimeError(f"the fake UR controller did not start: {reply!r}") from reply
        self.host = reply
        return self

    def snapshot(self) -> dict[str, Any]:
        self._pipe.send("snapshot")
        return self._pipe.recv()

    def stop(self) -> None:
        if self._proc.is_alive():
            try:
                self._pipe.send("stop")
                self._pipe.recv()
            except (EOFError, OSError):
                pass
            self._proc.join(5.0)
        if self._proc.is_alive():
            self._proc.kill()

    def __enter__(self) -> "FakeURProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _snapshot(ur: FakeURController) -> dict[str, Any]:
    with ur._lock:
        targets = list(ur.servo_targets)
        return {"servo_t": np.array([t for t, _ in targets]), "servo_targets": np.array([q for _, q in targets]).reshape(-1, DOF),
                "commands": list(ur.commands), "programs": list(ur.programs), "dashboard_log": list(ur.dashboard_log),
                "errors": list(ur.errors), "q": ur.q.copy(), "program_running": ur.program_running,
                "servo": None if ur.servo is None else {k: v for k, v in ur.servo.items() if k != "target"},
                "registers": dict(ur.registers), "ticks": ur.ticks}


def _serve_in_child(pipe, kw: dict[str, Any], level: int = logging.WARNING) -> None:
    logging.basicConfig(level=level, format="fake-ur %(levelname)s %(message)s")
    try:
        ur = FakeURController(**kw).start()
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        pipe.send(exc)
        return
    pipe.send(ur.host)
    try:
        while True:
            request = pipe.recv()
            pipe.send(_snapshot(ur))
            if request == "stop":
                break
    except (EOFError, OSError):
        pass
    finally:
        ur.stop()


def _free_loopback() -> str:
    """A 127.x.y.z address none of the fake's ports is bound on."""
    rng = np.random.default_rng()
    for _ in range(64):
        host = f"127.{rng.integers(1, 255)}.{rng.integers(0, 255)}.{rng.integers(1, 255)}"
        try:
            for port in (RTDE_PORT, DASHBOARD_PORT, *SCRIPT_PORTS):
                socket.create_server((host, port)).close()
            return host
        except OSError:
            continue
    raise RuntimeError("no free loopback address for a fake UR controller")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="loopback address to listen on")
    p.add_argument("--allow-remote", action="store_true",
                   help="listen on a --host that is not loopback (the fake has no authentication)")
    p.add_argument("--seconds", type=float, default=None, help="run time (default: until Ctrl-C)")


def main(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C or --seconds; a --host that is not loopback without --allow-remote
    raises ValueError (the CLI's one sentence and exit code 2)."""
    with FakeURController(args.host, allow_remote=args.allow_remote) as ur:
        print(f"fake UR controller on {ur.host}: RTDE {RTDE_PORT}, dashboard {DASHBOARD_PORT}, "
              f"script {SCRIPT_PORTS[-1]}; Ctrl-C stops", flush=True)
        try:
            t_end = None if args.seconds is None else time.monotonic() + args.seconds
            while t_end is None or time.monotonic() < t_end:
                time.sleep(0.1)
        except KeyboardInterrupt:
            pass
        print(f"{ur.program_count} programs, {ur.servo_target_count} servoJ targets, "
              f"errors: {list(ur.errors) or 'none'}")
    return 0
