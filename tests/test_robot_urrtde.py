"""URRTDEBackend through the real ur_rtde library, against the loopback UR controller of
``vlafast.robot.fake_ur`` (RTDE v2, dashboard and script ports; ur_rtde's control-script
protocol emulated). Each test starts its own controller on a free 127.x.y.z address."""

import os
import signal
import socket
import struct
import sys
import threading
import time

import numpy as np
import pytest

from vlafast._ext import load_C
from vlafast.robot import UR5E_HOME, JointLimits, RealtimeRunner, ServoConfig, ServoLoop, SinusoidPolicy, URRTDEBackend
from vlafast.robot.fake_ur import (CMD_SERVO_STOP, CMD_SERVOJ, CMD_SET_WATCHDOG, CMD_STOP_SCRIPT, DASHBOARD_PORT,
                                   RTDE_PORT, FakeURController, FakeURProcess)

pytest.importorskip("rtde_control", reason="ur_rtde is part of the [robot] extra, which `make setup` installs")

C = load_C()
CFG = ServoConfig(realtime=False, spin_us=0.0)
POLICY = dict(amplitude=0.2, freq_hz=0.5, dt=0.02, horizon=40, ramp_s=0.5)


def dashboard(host: str, command: str) -> str:
    with socket.create_connection((host, DASHBOARD_PORT), timeout=5) as s:
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


def test_backend_rate_must_match_the_servo_rate():
    with pytest.raises(ValueError, match="backend paces at 125 Hz but the servo loop runs at 500 Hz"):
        ServoLoop(CFG, URRTDEBackend("127.0.0.1", hz=125.0))


def test_missing_ur_rtde_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rtde_receive", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'vlafast\[robot\]'"):
        URRTDEBackend("127.0.0.1").open()


def test_a_run_through_ur_rtde_streams_the_plan_and_ends_cleanly():
    lim = JointLimits.ur5e()
    policy = SinusoidPolicy(**POLICY)
    with FakeURProcess() as ur, BusyThread():
        be = URRTDEBackend(ur.host, hz=500.0, lookahead=0.1, gain=300.0)
        s = RealtimeRunner(policy, be, hz=500.0, chunk_exec=5, config=CFG).run(1.5)
        snap = ur.snapshot()
    assert s["stop_reason"] == "requested: run complete" and s["backend_error"] == "", s
    assert snap["errors"] == []  # the watchdog (10 Hz) never tripped
    # ur_rtde connected as it does to a robot: dashboard checks, then its control script.
    assert "is in remote control" in snap["dashboard_log"]
    assert snap["programs"] and snap["programs"][0].startswith("def rtde_control():")
    # The forwarder kept its 500 Hz next to a busy Python thread in this process (a thread
    # forwarder ran ~180 periods/s there; `vlafast bench ur-rtde`); measured 492-494 Hz here.
    stats = be.forwarder_stats
    assert stats["hz"] > 0.8 * 500, stats
    q, t = snap["servo_targets"], snap["servo_t"]
    assert len(q) > 0.5 * 500 * 1.5, len(q)  # the fake's Python tick takes ~400/s of them under this load
    # Targets are the plan: the sinusoid at the time the controller took them, minus the
    # pipeline's lag (servo loop -> shared memory -> forwarder -> RTDE -> the fake's 2 ms tick).
    # Max speed 2 pi f A = 0.63 rad/s; measured max error 0.006-0.011 rad (10-17 ms of lag, most
    # of it the fake's own Python threads); bound 30 ms.
    err = np.abs(q - policy.reference(t)).max()
    assert err < 0.63 * 0.030, err
    assert np.all(q >= np.array(lim.q_min)) and np.all(q <= np.array(lim.q_max))
    np.testing.assert_allclose(q[0], UR5E_HOME, atol=1e-3)
    assert np.abs(q - np.asarray(UR5E_HOME)).max() > 0.05
    # servoJ's own arguments: period 1/hz, lookahead, gain.
    cmds = [c for _, c in snap["commands"]]
    assert cmds[0] == CMD_SET_WATCHDOG and CMD_SERVOJ in cmds
    # After the servo loop braked to rest: servoStop, then the script was stopped.
    assert cmds[-2:] == [CMD_SERVO_STOP, CMD_STOP_SCRIPT], cmds[-5:]
    assert not snap["program_running"]


def test_servoj_arguments_reach_the_controller():
    with FakeURProcess() as ur:
        be = URRTDEBackend(ur.host, hz=500.0, lookahead=0.05, gain=600.0)
        loop = ServoLoop(CFG, be).start()
        t0 = C.monotonic_ns()
        loop.push(np.tile(UR5E_HOME, (20, 1)) + 0.01, t0, 0.02, t0)
        deadline = time.monotonic() + 5
        while ur.snapshot()["servo"] is None and time.monotonic() < deadline:
            time.sleep(0.02)
        servo = ur.snapshot()["servo"]
        loop.stop()
    assert servo == {"time": pytest.approx(0.002), "lookahead": pytest.approx(0.05), "gain": pytest.approx(600.0)}


def test_stop_on_the_dashboard_stops_the_loop():
    """Someone stops the program (dashboard or pendant): servoJ is refused, the loop brakes."""
    with FakeURProcess() as ur:
        be = URRTDEBackend(ur.host)
        runner = RealtimeRunner(SinusoidPolicy(**POLICY), be, hz=500.0, chunk_exec=5, config=CFG)
        threading.Timer(0.8, dashboard, args=(ur.host, "stop")).start()
        s = runner.run(5.0)
    assert "ur-rtde failed" in s["stop_reason"], s["stop_reason"]
    assert "servoJ refused" in s["backend_error"], s["backend_error"]
    assert s["cycles"] < 4.0 * 500  # stopped long before the 5 s run was over


def test_forwarder_death_stops_the_loop():
    with FakeURProcess() as ur:
        be = URRTDEBackend(ur.host)
        runner = RealtimeRunner(SinusoidPolicy(**POLICY), be, hz=500.0, chunk_exec=5, config=CFG)
        threading.Timer(0.8, lambda: os.kill(be._proc.pid, signal.SIGKILL)).start()  # noqa: SLF001
        s = runner.run(5.0)
        snap = ur.snapshot()
    assert "forwarder process died" in s["backend_error"], s
    assert s["cycles"] < 4.0 * 500  # stopped long before the 5 s run was over
    # The controller stopped too, by itself: the RTDE watchdog armed at start saw no input.
    assert not snap["program_running"] and any("RTDE watchdog" in e for e in snap["errors"]), snap["errors"]


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
        deadline = time.monotonic() + 2
        while ur.registers.get("input_int_register_3") != -7 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ur.registers["input_int_register_3"] == -7 and ur.registers["input_double_register_1"] == 2.5
        a.close()
        b.close()
