"""URRTDEBackend through the real ur_rtde library, against the loopback UR controller of
``vlafast.robot.fake_ur`` (RTDE v2, dashboard and script ports; ur_rtde's control-script
protocol emulated). Each test starts its own controller on a free 127.x.y.z address.

Nothing here asserts how fast the machine is (rates, lags: `vlafast bench ur-rtde` reports
them): the tests check what the code controls, e.g. that the targets the controller took are the
plan, in order, and that a stall of the forwarder trips the controller's RTDE watchdog with a
message that says so. Waits poll for an event with a deadline far beyond any load."""

import os
import re
import signal
import socket
import struct
import sys
import threading
import time

import numpy as np
import pytest

from vlafast._ext import load_C
from vlafast.bench.ur_rtde import PhasedSinusoid, match_plan
from vlafast.robot import UR5E_HOME, JointLimits, RealtimeRunner, ServoConfig, ServoLoop, SinusoidPolicy, URRTDEBackend
from vlafast.robot.backends import RUNTIME_PAUSED, SERVO_SILENCE_S, refusal_message
from vlafast.robot.fake_ur import (CMD_SERVO_STOP, CMD_SERVOJ, CMD_SET_WATCHDOG, CMD_STOP_SCRIPT, DASHBOARD_PORT,
                                   RTDE_PORT, FakeURController, FakeURProcess)

pytest.importorskip("rtde_control", reason="ur_rtde is part of the [robot] extra, which `make setup` installs")

C = load_C()
CFG = ServoConfig(realtime=False, spin_us=0.0)
POLICY = dict(amplitude=0.2, freq_hz=0.5, dt=0.02, horizon=40, ramp_s=0.5)
# Where a test needs the controller's RTDE watchdog not to trip, it runs at 2 Hz: at the default
# 10 Hz a busy machine that leaves the forwarder unscheduled for 100 ms trips it, as it should
# (measured: a 104 ms silence once, next to two busy processes and other jobs at load 11).
# The 10 Hz default itself is tested where it trips.
LENIENT_WATCHDOG_HZ = 2.0


def wait_for(condition, what, timeout_s=60.0):
    """Poll until condition() holds; the deadline only bounds a hang, no test relies on it."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.01)


def run_cycles(runner, cycles):
    """Run until the servo loop has run ``cycles`` periods (connecting to the controller first
    takes a load-dependent while, which a run of fixed seconds would take out of the servoing)
    -> (stats, t_stop: monotonic s when the stop was asked for)."""
    runner.start()
    try:
        wait_for(lambda: runner.loop.stats()["cycles"] >= cycles or runner.loop.done, f"{cycles} servo cycles")
    finally:
        t_stop = time.monotonic()
        s = runner.stop()
    return s, t_stop


def dashboard(host: str, command: str) -> str:
    with socket.create_connection((host, DASHBOARD_PORT), timeout=30) as s:
        f = s.makefile("rb")
        f.readline()  # welcome
        s.sendall(command.encode() + b"\n")
        return f.readline().decode().strip()


class BusyThread:
    """A Python thread that never blocks: it holds the GIL whenever it runs (inference's
    Python between torch ops, at worst)."""

    def __enter__(self):
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._spin, daemon=True)
        self._t.start()
        return self

    def _spin(self):
        n = 0
        while not self._stop.is_set():
            n += 1

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def test_arguments_are_checked_against_servoj_ranges():
    with pytest.raises(ValueError, match=r"lookahead must be in \[0.03, 0.2\]"):
        URRTDEBackend("127.0.0.1", lookahead=0.5)
    with pytest.raises(ValueError, match=r"gain must be in \[100, 2000\]"):
        URRTDEBackend("127.0.0.1", gain=50)
    with pytest.raises(ValueError, match="500 .e-series. or 125 .CB3."):
        URRTDEBackend("127.0.0.1", hz=250.0)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"watchdog_hz must be a finite number >= 0 \(0: off\)"):
            URRTDEBackend("127.0.0.1", watchdog_hz=bad)


def test_backend_rate_must_match_the_servo_rate():
    with pytest.raises(ValueError, match="backend paces at 125 Hz but the servo loop runs at 500 Hz"):
        ServoLoop(CFG, URRTDEBackend("127.0.0.1", hz=125.0))


def test_missing_ur_rtde_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rtde_receive", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'vlafast\[robot\]'"):
        URRTDEBackend("127.0.0.1").open()


def test_a_run_through_ur_rtde_streams_the_plan_and_ends_cleanly():
    lim = JointLimits.ur5e()
    # Joint j at phase j pi / 3: the plan is a curve in joint space, so a target is on it at one
    # moment only (peak acceleration ~5 rad/s^2 during the 1 s ramp, inside the servo's limit).
    policy = PhasedSinusoid(**dict(POLICY, ramp_s=1.0))
    with FakeURProcess() as ur, BusyThread():
        be = URRTDEBackend(ur.host, hz=500.0, lookahead=0.1, gain=300.0, watchdog_hz=LENIENT_WATCHDOG_HZ)
        s, t_stop = run_cycles(RealtimeRunner(policy, be, hz=500.0, chunk_exec=5, config=CFG), 750)  # 1.5 s
        snap = ur.snapshot()
    assert s["stop_reason"] == "requested: run complete" and s["backend_error"] == "", s
    assert snap["errors"] == []  # the watchdog never tripped
    # ur_rtde connected as it does to a robot: dashboard checks, then its control script.
    assert "is in remote control" in snap["dashboard_log"]
    assert snap["programs"] and snap["programs"][0].startswith("def rtde_control():")
    # The forwarder's own record: one command per period it ran, servoJ for each new target
    # (rates are `vlafast bench ur-rtde`'s: 492-494 servoJ/s next to a busy thread, idle machine).
    stats = be.forwarder_stats
    assert 0 < stats["servoj"] <= stats["periods"] + 1 and 0 <= stats["late"] <= stats["periods"], stats
    assert 0 < stats["p50_ms"] <= stats["p99_ms"] <= stats["max_ms"], stats
    q, t = snap["servo_targets"], snap["servo_t"]
    assert np.all(q >= np.array(lim.q_min)) and np.all(q <= np.array(lim.q_max))
    # Until the stop (then the servo brakes to rest, off the plan), enough targets to judge
    # (measured ~600 idle, ~270 next to two busy processes on 2 cores) ...
    q, t = q[t < t_stop], t[t < t_stop]
    assert len(q) >= 20, len(q)
    # ... and they are the plan, in order: each one lies on the curve at a moment no earlier
    # than the previous target's and no later than when the controller took it (plus one
    # period: the servo issues a target ahead of its deadline); `match_plan` searches only
    # there, so a target out of order is far from every point it may match. On the plan means
    # within 2e-4 rad: interpolation and the 0.2 ms search grid (at most 6e-5 rad at the 0.63
    # rad/s peak speed), measured max 4e-5-6e-5 rad; a target one 2 ms period out of order is
    # up to 1.3e-3 rad off. The exception is the servo's own: after a missed cycle it catches
    # up under its acceleration limit, each joint on its own (off the curve for ~9 sqrt(k)
    # cycles after k missed ones; measured 15 targets off after 30 missed cycles, 0 after
    # 1-7). How late the targets arrived (the pipeline's lag) is the benchmark's.
    t_plan, dist = match_plan(policy.reference, policy.t_start, t, q)
    off = dist > 2e-4
    assert off.sum() <= 30 * s["missed"], (int(off.sum()), s["missed"], dist.max(), len(dist))
    np.testing.assert_allclose(q[0], UR5E_HOME, atol=1e-3)
    assert np.abs(q - np.asarray(UR5E_HOME)).max() > 0.05
    # The watchdog was armed first; servoJ streamed.
    cmds = [c for _, c in snap["commands"]]
    assert cmds[0] == CMD_SET_WATCHDOG and CMD_SERVOJ in cmds
    # After the servo loop braked to rest: servoStop, then the script was stopped.
    assert cmds[-2:] == [CMD_SERVO_STOP, CMD_STOP_SCRIPT], cmds[-5:]
    assert not snap["program_running"]


class StubLoop:
    """What a backend needs of a servo loop: request_stop, recorded."""

    def __init__(self):
        self.reasons = []

    def request_stop(self, reason):
        self.reasons.append(reason)


def publish(be, seq, q, stopped=False):
    """Write a target into the backend's shared mailbox as the servo thread does (a seqlock:
    odd version while writing)."""
    box = np.ndarray((1,), dtype=SHARED_TARGET, buffer=be._shm.buf)[0]  # noqa: SLF001
    box["version"] += 1
    box["seq"], box["t_ns"], box["q"], box["v"], box["stopped"] = seq, C.monotonic_ns(), q, 0.0, int(stopped)
    box["version"] += 1


# csrc/servo/backend.hpp SharedTarget
SHARED_TARGET = np.dtype([("version", "<u8"), ("seq", "<i8"), ("t_ns", "<i8"), ("q", "<f8", 6), ("v", "<f8", 6),
                          ("stopped", "<i8")])


def test_the_forwarder_feeds_the_rtde_watchdog_on_its_own_clock():
    """No target yet, then one target and a silent servo loop: the forwarder keeps feeding the
    controller's watchdog (2.5 Hz here) on its own clock (kickWatchdog, then servoJ with that
    target each period), so nothing trips for SERVO_SILENCE_S (2.5 watchdog periods); then it
    stops servoing and the script, and says why."""
    assert C.SHARED_MAILBOX_BYTES == SHARED_TARGET.itemsize
    with FakeURProcess() as ur:
        be = URRTDEBackend(ur.host, watchdog_hz=2.5)
        q0 = be.open()
        loop = StubLoop()
        be.start(loop)
        wait_for(lambda: ur.snapshot()["commands"], "setWatchdog")
        armed = ur.snapshot()["ticks"]
        wait_for(lambda: ur.snapshot()["ticks"] > armed + 250, "1.25 watchdog periods of the controller's ticks")
        snap = ur.snapshot()
        assert snap["program_running"] and snap["errors"] == []  # kicked while there was nothing to servo
        publish(be, 1, q0 + 0.01)
        wait_for(lambda: be.error is not None, "the forwarder's report of a silent servo loop")
        snap = ur.snapshot()
        be.close()
    assert f"published no target for {SERVO_SILENCE_S:g} s" in str(be.error), be.error
    assert loop.reasons and "ur-rtde failed" in loop.reasons[0]
    assert snap["errors"] == []  # the controller's watchdog never saw the servo loop's silence
    cmds = [c for _, c in snap["commands"]]
    assert cmds == [CMD_SET_WATCHDOG, CMD_SERVOJ, CMD_SERVO_STOP, CMD_STOP_SCRIPT], cmds
    np.testing.assert_allclose(snap["servo_targets"], [q0 + 0.01])


def test_a_stalled_forwarder_trips_the_rtde_watchdog_and_the_error_says_so():
    """SIGSTOP the forwarder until the controller's watchdog (10 Hz) pauses the program: the loop
    stops with one sentence naming the watchdog."""
    with FakeURProcess() as ur:
        be = URRTDEBackend(ur.host)
        runner = RealtimeRunner(SinusoidPolicy(**POLICY), be, hz=500.0, chunk_exec=5, config=CFG)

        def stall():
            wait_for(lambda: runner.chunks >= 3, "the run")
            os.kill(be._proc.pid, signal.SIGSTOP)  # noqa: SLF001
            try:
                wait_for(lambda: any("RTDE watchdog" in e for e in ur.snapshot()["errors"]), "the watchdog")
            finally:
                os.kill(be._proc.pid, signal.SIGCONT)  # noqa: SLF001

        th = threading.Thread(target=stall)
        th.start()
        s = runner.run(120.0)  # ends at the failure: "run complete" would mean it was missed
        th.join()
    assert "ur-rtde failed" in s["stop_reason"], s["stop_reason"]
    assert "RTDE watchdog tripped" in s["backend_error"] and "watchdog_hz=10" in s["backend_error"], s["backend_error"]


def test_refusal_messages_name_the_cause():
    STOPPED = 1
    # The controller paused the program: the watchdog's doing, however short the silence seen here.
    for gap in (0.35, 0.004):
        wd = refusal_message("servoJ", gap, 10.0, RUNTIME_PAUSED, False)
        assert wd.startswith("RTDE watchdog tripped") and "over 100 ms" in wd and f"{gap * 1e3:.0f} ms" in wd
        assert wd.count(". ") == 0 and wd.count(": ") == 1  # one sentence
    assert refusal_message("servoJ", 0.35, 10.0, None, False).startswith("RTDE watchdog tripped")  # state unknown
    assert refusal_message("servoJ", 0.35, 0.0, RUNTIME_PAUSED, False).startswith("servoJ refused")  # watchdog off
    assert "protective stop" in refusal_message("servoJ", 0.002, 10.0, STOPPED, True)
    stopped = refusal_message("kickWatchdog", 0.002, 10.0, STOPPED, False)
    assert stopped.startswith("kickWatchdog refused") and "pendant or dashboard" in stopped
    assert "watchdog" not in stopped.replace("kickWatchdog", "")
    # Stopped after a long silence: someone, or the watchdog (its action may be a stop).
    both = refusal_message("servoJ", 0.104, 10.0, STOPPED, False)
    assert both.startswith("servoJ refused: the control script is not running") and "RTDE watchdog" in both
    assert "104 ms, over its 100 ms" in both


def test_servoj_arguments_reach_the_controller():
    with FakeURProcess() as ur:
        be = URRTDEBackend(ur.host, hz=500.0, lookahead=0.05, gain=600.0)
        loop = ServoLoop(CFG, be).start()
        t0 = C.monotonic_ns()
        loop.push(np.tile(UR5E_HOME, (20, 1)) + 0.01, t0, 0.02, t0)
        wait_for(lambda: ur.snapshot()["servo"] is not None, "servoJ")
        servo = ur.snapshot()["servo"]
        loop.stop()
    assert servo == {"time": pytest.approx(0.002), "lookahead": pytest.approx(0.05), "gain": pytest.approx(600.0)}


def test_stop_on_the_dashboard_stops_the_loop():
    """Someone stops the program (dashboard or pendant): servoJ is refused, the loop brakes."""
    with FakeURProcess() as ur:
        be = URRTDEBackend(ur.host)
        runner = RealtimeRunner(SinusoidPolicy(**POLICY), be, hz=500.0, chunk_exec=5, config=CFG)
        stopper = threading.Thread(target=lambda: (wait_for(lambda: runner.chunks >= 3, "the run"),
                                                   dashboard(ur.host, "stop")))
        stopper.start()
        s = runner.run(120.0)  # ends at the failure: "run complete" would mean it was missed
        stopper.join()
    assert "ur-rtde failed" in s["stop_reason"], s["stop_reason"]
    # (on a busy machine the forwarder may also have been silent past the watchdog's period: the
    # sentence then names the watchdog as a possible cause, after the stopped program)
    assert re.search(r"(servoJ|kickWatchdog) refused: the control script is not running", s["backend_error"]), s


def test_forwarder_death_stops_the_loop():
    with FakeURProcess() as ur:
        be = URRTDEBackend(ur.host)
        runner = RealtimeRunner(SinusoidPolicy(**POLICY), be, hz=500.0, chunk_exec=5, config=CFG)
        killer = threading.Thread(target=lambda: (wait_for(lambda: runner.chunks >= 3, "the run"),
                                                  os.kill(be._proc.pid, signal.SIGKILL)))  # noqa: SLF001
        killer.start()
        s = runner.run(120.0)  # ends at the failure: "run complete" would mean it was missed
        killer.join()
        # The controller stops too, by itself: the RTDE watchdog armed at start sees no input.
        wait_for(lambda: any("RTDE watchdog" in e for e in ur.snapshot()["errors"]), "the controller's watchdog")
        snap = ur.snapshot()
    assert "forwarder process died" in s["backend_error"], s
    assert "ur-rtde failed" in s["stop_reason"], s["stop_reason"]
    assert not snap["program_running"]


def test_remote_control_off_is_a_clear_error():
    with FakeURProcess(remote_control=False) as ur:
        be = URRTDEBackend(ur.host)
        with pytest.raises(RuntimeError, match="enable remote control"):
            be.open()
        be.close()


def test_no_controller_is_a_clear_error():
    with FakeURProcess() as ur:
        host = ur.host
    be = URRTDEBackend(host, connect_timeout_s=20)  # nothing listens there any more
    with pytest.raises(RuntimeError, match=f"could not start the control interface on {host}"):
        be.open()
    be.close()


# -- the controller's RTDE answers, with a bare client --------------------------------------------

def rtde_request(sock, kind, payload=b""):
    sock.sendall(struct.pack(">HB", 3 + len(payload), ord(kind)) + payload)
    size, got = struct.unpack(">HB", sock.recv(3))
    data = b""
    while len(data) < size - 3:
        data += sock.recv(size - 3 - len(data))
    assert chr(got) == kind
    return data


def test_rtde_recipes_types_refusals_and_data():
    with FakeURController() as ur:
        a = socket.create_connection((ur.host, RTDE_PORT), timeout=5)
        b = socket.create_connection((ur.host, RTDE_PORT), timeout=5)
        assert rtde_request(a, "V", struct.pack(">H", 2)) == b"\x01"
        assert struct.unpack(">IIII", rtde_request(a, "v")) == ur.version
        reply = rtde_request(a, "O", struct.pack(">d", 125.0) + b"timestamp,actual_q,runtime_state,output_int_register_3")
        assert reply == b"\x01DOUBLE,VECTOR6D,UINT32,INT32"
        assert rtde_request(a, "O", struct.pack(">d", 125.0) + b"actual_q,no_such_variable") == b"\x00VECTOR6D,NOT_FOUND"
        assert rtde_request(a, "I", b"input_int_register_3,input_double_register_1,") == b"\x01INT32,DOUBLE"
        assert rtde_request(b, "I", b"input_int_register_3") == b"\x00IN_USE"  # a owns it
        a.sendall(struct.pack(">HBBid", 3 + 1 + 4 + 8, ord("U"), 1, -7, 2.5))
        assert rtde_request(a, "S") == b"\x01"
        size, kind = struct.unpack(">HB", a.recv(3))
        body = a.recv(size - 3)
        assert chr(kind) == "U" and body[0] == 1
        ts, *q, state, reg3 = struct.unpack(">d6dIi", body[1:])
        np.testing.assert_allclose(q, UR5E_HOME)
        assert state == 1 and reg3 == 0  # no program: stopped; outputs are the script's, not the inputs
        wait_for(lambda: ur.registers.get("input_int_register_3") == -7, "the input package")
        assert ur.registers["input_int_register_3"] == -7 and ur.registers["input_double_register_1"] == 2.5
        a.close()
        b.close()


def test_a_stalled_controller_process_does_not_trip_its_own_watchdog():
    """The fake's RTDE watchdog counts its own ticks: while its process is stopped (a busy
    machine) the forwarder's inputs wait in the socket, as they would not for a controller."""
    policy = SinusoidPolicy(**POLICY)
    with FakeURProcess() as ur:
        be = URRTDEBackend(ur.host, watchdog_hz=LENIENT_WATCHDOG_HZ)
        runner = RealtimeRunner(policy, be, hz=500.0, chunk_exec=5, config=CFG)
        runner.start()
        try:
            wait_for(lambda: runner.chunks >= 3, "the run")
            os.kill(ur._proc.pid, signal.SIGSTOP)  # noqa: SLF001
            try:
                time.sleep(1.5)  # 3 watchdog periods of wall time (an injected stall, not a wait for a result)
            finally:
                os.kill(ur._proc.pid, signal.SIGCONT)  # noqa: SLF001
            resumed = runner.chunks
            wait_for(lambda: runner.chunks >= resumed + 3 or runner.loop.done, "the run after the stall")
        finally:
            s = runner.stop()
        snap = ur.snapshot()
    assert s["stop_reason"] == "requested: run complete" and s["backend_error"] == "", s
    assert snap["errors"] == []


def test_controller_survives_bad_bytes_on_every_port(monkeypatch):
    crashes = []
    monkeypatch.setattr(threading, "excepthook", crashes.append)  # a traceback on any of its threads

    def closed(sock):
        """True once the peer closed the connection (EOF), reading whatever it still sends."""
        sock.settimeout(30)
        try:
            while sock.recv(65536):
                pass
        except ConnectionResetError:
            pass
        return True

    with FakeURController() as ur:
        # Dashboard: bytes that are not UTF-8 get the controller's answer to any unknown command.
        d = socket.create_connection((ur.host, DASHBOARD_PORT), timeout=30)
        f = d.makefile("rb")
        assert f.readline().startswith(b"Connected")
        d.sendall(b"\xff\xfe\x80power\n")
        assert f.readline().decode().startswith("could not understand")
        d.sendall(b"robotmode\r\n")  # the same connection still serves
        assert f.readline() == b"Robotmode: RUNNING\n"
        d.sendall(b"x" * 5000)  # a line over MAX_LINE_BYTES (4096): the connection is dropped
        assert closed(d)
        # RTDE: a frame shorter than its header, an unknown type, and a payload of the wrong size.
        for bad in (struct.pack(">HB", 1, ord("V")), struct.pack(">HB", 3, 0xEE),
                    struct.pack(">HBB", 4, ord("V"), 2), struct.pack(">HB", 3, ord("U"))):
            r = socket.create_connection((ur.host, RTDE_PORT), timeout=30)
            r.sendall(bad)
            assert closed(r)
            r.close()
        # Recipe names that are not UTF-8 are answered as unknown names.
        r = socket.create_connection((ur.host, RTDE_PORT), timeout=30)
        assert rtde_request(r, "O", struct.pack(">d", 125.0) + b"actual_q,\xff\xfe") == b"\x00VECTOR6D,NOT_FOUND"
        assert rtde_request(r, "O", struct.pack(">d", float("nan")) + b"actual_q") == b"\x01VECTOR6D"
        r.close()
        # Script port: garbage, then an upload over MAX_SCRIPT_BYTES (1 MiB) without `end`.
        sc = socket.create_connection((ur.host, 30002), timeout=30)
        sc.sendall(bytes(range(256)) * 64 + b"def x():\n" + b"\xff" * (1 << 20))
        assert closed(sc)
        for s in (d, sc):
            s.close()
        assert dashboard(ur.host, "robotmode") == "Robotmode: RUNNING"  # still serving
        errors = list(ur.errors)
        assert not ur.programs  # the upload never ended
    assert crashes == []
    joined = "\n".join(errors)
    for want in ("dashboard line longer than 4096 bytes", "RTDE frame of size 1", "unknown RTDE frame type 238",
                 "does not parse", "script upload over 1048576 bytes"):
        assert want in joined, (want, errors)
    assert all(e.endswith("connection closed") for e in errors), errors


def test_controller_limits_its_clients():
    with FakeURController() as ur:
        from vlafast.robot.fake_ur import MAX_CONNECTIONS

        socks = [socket.create_connection((ur.host, RTDE_PORT), timeout=30) for _ in range(MAX_CONNECTIONS)]
        extra = socket.create_connection((ur.host, RTDE_PORT), timeout=30)
        extra.settimeout(30)
        assert extra.recv(1) == b""  # refused: closed at once
        assert rtde_request(socks[0], "V", struct.pack(">H", 2)) == b"\x01"  # the others still served
        for s in socks + [extra]:
            s.close()
        wait_for(lambda: len(ur._conns) == 0, "the closed clients to be let go")  # noqa: SLF001
        late = socket.create_connection((ur.host, RTDE_PORT), timeout=30)
        assert rtde_request(late, "V", struct.pack(">H", 2)) == b"\x01"
        late.close()
    assert any(f"more than {MAX_CONNECTIONS} clients" in e for e in ur.errors)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::"])
def test_controller_listens_on_loopback_unless_allowed(host):
    with pytest.raises(ValueError, match=f"--host {host} is not a loopback address.*--allow-remote"):
        FakeURController(host)
    assert FakeURController(host, allow_remote=True).host == host  # constructed, not started


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "localhost", "::1"])
def test_loopback_hosts_need_no_flag(host):
    assert FakeURController(host).host == host  # constructed, not started


def test_fake_ur_cli_refuses_a_remote_host_in_one_sentence(capsys):
    from vlafast.cli import main

    assert main(["robot", "fake-ur", "--host", "0.0.0.0", "--seconds", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a loopback address" in err and "--allow-remote" in err, err
    assert "Traceback" not in err


def test_forwarder_period_statistics_in_constant_memory():
    from vlafast.robot.backends import _Gaps

    g = _Gaps(500.0)
    for gap_ms in [2.0] * 980 + [3.5] * 15 + [30.0] * 4 + [250.0]:  # 250 ms: past the histogram's 100 ms
        g.add(int(gap_ms * 1e6))
    s = g.stats(servoj=900)
    assert s["periods"] == 1000 and s["late"] == 20 and s["max_ms"] == pytest.approx(250.0)
    assert s["p50_ms"] == pytest.approx(2.005) and s["p99_ms"] == pytest.approx(3.505)  # 10 us bins: the middle of one
    span = 980 * 2.0 + 15 * 3.5 + 4 * 30.0 + 250.0
    assert s["hz"] == pytest.approx(1000 / span * 1e3) and s["servoj_hz"] == pytest.approx(900 / span * 1e3)
    assert list(g.recent)[-1] == 250_000_000 and len(g.recent) == 250  # the last 0.5 s of periods
    assert _Gaps(500.0).stats(0)["p99_ms"] == 0.0
