"""The built-in MuJoCo UR5e and its real-time backend."""

import math
import time

import numpy as np
import pytest

mujoco = pytest.importorskip("mujoco")  # the [sim] extra; part of `make test`'s set-up

from vlafast.robot import UR5E_HOME, JointLimits, MujocoUR5eBackend, RealtimeRunner, ServoConfig, SinusoidPolicy  # noqa: E402
from vlafast.robot.backends import ASSET  # noqa: E402

# Published UR5e DH parameters (m, rad).
DH_D = [0.1625, 0, 0, 0.1333, 0.0997, 0.0996]
DH_A = [0, -0.425, -0.3922, 0, 0, 0]
DH_ALPHA = [math.pi / 2, 0, 0, math.pi / 2, -math.pi / 2, 0]


def dh_flange(q):
    T = np.eye(4)
    for th, d, a, al in zip(q, DH_D, DH_A, DH_ALPHA):
        ct, st, ca, sa = math.cos(th), math.sin(th), math.cos(al), math.sin(al)
        T = T @ np.array([[ct, -st * ca, st * sa, a * ct], [st, ct * ca, -ct * sa, a * st], [0, sa, ca, d], [0, 0, 0, 1]])
    return T[:3, 3]


def test_model_kinematics_match_the_ur5e_dh_parameters():
    m = mujoco.MjModel.from_xml_path(str(ASSET))
    d = mujoco.MjData(m)
    rng = np.random.default_rng(0)
    for q in [np.zeros(6), np.asarray(UR5E_HOME)] + [rng.uniform(-3, 3, 6) for _ in range(5)]:
        d.qpos[:] = q
        mujoco.mj_kinematics(m, d)
        np.testing.assert_allclose(d.site("flange").xpos, dh_flange(q), atol=2e-4)  # DH rounded to 0.1 mm


def test_model_limits_match_joint_limits():
    m = mujoco.MjModel.from_xml_path(str(ASSET))
    lim = JointLimits.ur5e()
    np.testing.assert_allclose(m.jnt_range[:, 0], lim.q_min, atol=1e-6)
    np.testing.assert_allclose(m.jnt_range[:, 1], lim.q_max, atol=1e-6)
    assert m.nu == 12 and m.opt.timestep == 0.002


def run_sinusoid(seconds, **policy_kw):
    policy = SinusoidPolicy(**policy_kw)
    be = MujocoUR5eBackend(log_seconds=seconds + 2)
    wall0 = time.monotonic()
    s = RealtimeRunner(policy, be, hz=500.0, chunk_exec=5, config=ServoConfig(spin_us=0.0)).run(seconds)
    wall = time.monotonic() - wall0
    log = be.log()
    t = log["t"]
    sel = (t >= policy.t_start + 0.5) & (t <= policy.t_start + seconds - 0.2)
    # A stalled VM delays the servo loop or the forwarder: the arm runs on a stale target, then
    # catches up under the acceleration limit. 300 ms after each stale step are left out, and
    # must stay a minority of the run.
    n_before = sel.sum()
    for late_t in t[log["late"]]:
        sel &= ~((t >= late_t) & (t < late_t + 0.3))
    assert sel.sum() > 0.5 * n_before, f"stalled too often: {be.late_steps} stale steps"
    err = np.abs(log["q"][sel] - policy.reference(t[sel])).max(0)
    return s, be, log, err, wall


def test_short_real_time_run():
    s, be, log, err, wall = run_sinusoid(1.2, amplitude=0.1, ramp_s=0.5, latency_s=0.01)
    assert s["stop_reason"] == "requested: run complete" and s["backend_error"] == "" and be.stopped_by_loop
    # Real time: simulated time advanced with the wall clock (one 2 ms step per 2 ms).
    sim_span = log["t"][-1] - log["t"][0]
    assert 0.8 * 1.2 < sim_span <= wall + 0.01
    assert err.max() < 0.05  # measured max 1.5e-3 rad (shoulder lift)
    with pytest.raises(RuntimeError, match="make a new backend"):
        be.start(None)


@pytest.mark.slow
def test_ten_second_sinusoid_tracking():
    """A sinusoid on every joint (0.3 rad, 0.5 Hz; 0.94 rad/s, 3 rad/s^2 peak) as 40-waypoint
    chunks every 100 ms with 20 ms of simulated inference: the simulated arm stays within
    0.03 rad of the analytic trajectory (measured max 1.1e-2 rad, shoulder lift and elbow)."""
    s, be, log, err, wall = run_sinusoid(10.0, amplitude=0.3, freq_hz=0.5, ramp_s=1.0, dt=0.02, horizon=40,
                                         latency_s=0.02)
    assert s["stop_reason"] == "requested: run complete", s
    assert s["accepted"] >= 90 and s["rejected_nonfinite"] + s["rejected_limits"] == 0
    assert err.max() < 0.03, err


def test_menagerie_root_is_used_when_set(tmp_path, monkeypatch):
    scene = tmp_path / "universal_robots_ur5e" / "scene.xml"
    scene.parent.mkdir()
    scene.write_text(ASSET.read_text())  # stands in for the menagerie's model
    monkeypatch.setenv("MENAGERIE_ROOT", str(tmp_path))
    be = MujocoUR5eBackend()
    assert be.model_path == scene
    np.testing.assert_allclose(be.open(), UR5E_HOME)
    monkeypatch.setenv("MENAGERIE_ROOT", str(tmp_path / "missing"))
    assert MujocoUR5eBackend().model_path == ASSET
    assert MujocoUR5eBackend(model_path=scene).model_path == scene  # an explicit model wins
