"""URRTDEBackend against fakes of ur_rtde's two interface classes, installed where the backend
imports them (the `rtde_control` / `rtde_receive` modules): the network boundary. No robot or
URSim can run here; these tests pin the call sequence, the units and the limits."""

import datetime
import sys
import threading
import types

import numpy as np
import pytest

from vlafast._ext import load_C
from vlafast.robot import UR5E_HOME, JointLimits, RealtimeRunner, ServoConfig, ServoLoop, SinusoidPolicy, URRTDEBackend

C = load_C()
CFG = ServoConfig(realtime=False, spin_us=0.0)


class Wire:
    """Everything the fakes were asked, in order, with the monotonic time of each call."""

    def __init__(self, q0, fail_servoj_after=None):
        self.calls, self.q0, self.fail_after = [], list(q0), fail_servoj_after
        self.lock = threading.Lock()

    def log(self, name, *args):
        with self.lock:
            self.calls.append((name, args, C.monotonic_ns()))

    def names(self):
        return [c[0] for c in self.calls]


def install_fakes(monkeypatch, wire):
    class FakeControl:
        def __init__(self, hostname, frequency=-1.0, *rest):
            wire.log("RTDEControlInterface", hostname, frequency)
            self.period_ns = int(round(1e9 / frequency))
            self.servoj = 0

        def initPeriod(self):
            wire.log("initPeriod")
            return datetime.timedelta(microseconds=C.monotonic_ns() / 1e3)

        def waitPeriod(self, t_start):
            wire.log("waitPeriod", t_start)
            assert isinstance(t_start, datetime.timedelta)
            C.sleep_until_ns(int(t_start / datetime.timedelta(microseconds=1) * 1e3) + self.period_ns, 0.0)

        def servoJ(self, q, speed, acceleration, time, lookahead_time, gain):
            wire.log("servoJ", list(q), speed, acceleration, time, lookahead_time, gain)
            self.servoj += 1
            return not (wire.fail_after is not None and self.servoj > wire.fail_after)

        def servoStop(self, a=10.0):
            wire.log("servoStop", a)
            return True

        def stopScript(self):
            wire.log("stopScript")

        def disconnect(self):
            wire.log("control.disconnect")

    class FakeReceive:
        def __init__(self, hostname, frequency=-1.0, *rest):
            wire.log("RTDEReceiveInterface", hostname, frequency)

        def getActualQ(self):
            wire.log("getActualQ")
            return list(wire.q0)

        def disconnect(self):
            wire.log("receive.disconnect")

    monkeypatch.setitem(sys.modules, "rtde_control", types.SimpleNamespace(RTDEControlInterface=FakeControl))
    monkeypatch.setitem(sys.modules, "rtde_receive", types.SimpleNamespace(RTDEReceiveInterface=FakeReceive))


def test_arguments_are_checked_against_servoj_ranges():
    with pytest.raises(ValueError, match=r"lookahead must be in \[0.03, 0.2\]"):
        URRTDEBackend("10.0.0.2", lookahead=0.5)
    with pytest.raises(ValueError, match=r"gain must be in \[100, 2000\]"):
        URRTDEBackend("10.0.0.2", gain=50)
    with pytest.raises(ValueError, match="500 .e-series. or 125 .CB3."):
        URRTDEBackend("10.0.0.2", hz=250.0)


def test_backend_rate_must_match_the_servo_rate():
    with pytest.raises(ValueError, match="backend paces at 125 Hz but the servo loop runs at 500 Hz"):
        ServoLoop(CFG, URRTDEBackend("10.0.0.2", hz=125.0))


def test_missing_ur_rtde_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rtde_control", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'vlafast\[robot\]'"):
        URRTDEBackend("10.0.0.2").open()


def test_call_sequence_units_and_limits(monkeypatch):
    wire = Wire(UR5E_HOME)
    install_fakes(monkeypatch, wire)
    lim = JointLimits.ur5e()
    policy = SinusoidPolicy(amplitude=0.2, freq_hz=0.5, dt=0.02, horizon=40, ramp_s=0.5)
    be = URRTDEBackend("192.168.1.10", hz=500.0, lookahead=0.1, gain=300.0)
    s = RealtimeRunner(policy, be, hz=500.0, chunk_exec=5, config=CFG).run(1.0)
    assert s["stop_reason"] == "requested: run complete" and s["backend_error"] == ""

    names = wire.names()
    # Connect (control, receive at the servo rate), read the start pose ...
    assert wire.calls[0][:2] == ("RTDEControlInterface", ("192.168.1.10", 500.0))
    assert wire.calls[1][:2] == ("RTDEReceiveInterface", ("192.168.1.10", 500.0))
    assert names[2] == "getActualQ"
    # ... then paced periods: initPeriod, at most one servoJ, waitPeriod with initPeriod's value ...
    body = [c for c in wire.calls[3:] if c[0] in ("initPeriod", "servoJ", "waitPeriod", "servoStop")]
    i = 0
    periods = 0
    while i < len(body) and body[i][0] == "initPeriod":
        j = i + 1
        if j < len(body) and body[j][0] == "servoJ":
            j += 1
        if j < len(body) and body[j][0] == "servoStop":
            break
        assert body[j][0] == "waitPeriod", [b[0] for b in body[i:j + 1]]
        i, periods = j + 1, periods + 1
    assert periods > 100
    # ... and after the servo loop braked to rest: servoStop, stopScript, both disconnects.
    tail = [n for n in names if n in ("servoStop", "stopScript", "control.disconnect", "receive.disconnect")]
    assert tail == ["servoStop", "stopScript", "control.disconnect", "receive.disconnect"]
    assert names.index("servoStop") > max(k for k, n in enumerate(names) if n == "servoJ")

    servoj = [c for c in wire.calls if c[0] == "servoJ"]
    q = np.array([c[1][0] for c in servoj])
    t = np.array([c[2] for c in servoj]) * 1e-9
    for _, args, _ in servoj:
        qs, speed, acc, period, lookahead, gain = args
        assert len(qs) == 6 and all(isinstance(x, float) for x in qs)  # rad, plain floats
        assert (speed, acc, period, lookahead, gain) == (0.0, 0.0, 1 / 500.0, 0.1, 300.0)  # s, s, unitless
    assert np.all(q >= np.array(lim.q_min)) and np.all(q <= np.array(lim.q_max))
    # Targets between forwarded calls never move faster than the joint speed limit allows.
    dq = np.abs(np.diff(q, axis=0)).max(1)
    dt = np.diff(t)
    assert np.all(dq <= lim.v_max[0] * (dt + 2 * CFG.period_s)), (dq / dt).max()
    # It started at the start pose and then moved.
    np.testing.assert_allclose(q[0], UR5E_HOME, atol=1e-3)
    assert np.abs(q - np.asarray(UR5E_HOME)).max() > 0.05


def test_servoj_refusal_stops_the_loop_and_the_robot(monkeypatch):
    wire = Wire(UR5E_HOME, fail_servoj_after=30)
    install_fakes(monkeypatch, wire)
    be = URRTDEBackend("10.0.0.2")
    loop = ServoLoop(CFG, be).start()
    t0 = C.monotonic_ns()
    loop.push(np.tile(UR5E_HOME, (100, 1)), t0, 0.02, t0)
    assert loop.wait(5.0)
    s = loop.stop()
    assert "ur-rtde failed" in s["stop_reason"] and "servoJ refused" in s["backend_error"]
    names = wire.names()
    assert names.count("servoJ") == 31
    assert names[-4:] == ["servoStop", "stopScript", "control.disconnect", "receive.disconnect"]
