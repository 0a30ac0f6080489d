"""`vlafast robot run` / `serve-robot` (live readout, Ctrl-C, pi0-reach with RTC, ur-rtde against
`vlafast robot fake-ur`) and `vlafast bench servo | rtc | ur-rtde`, end to end."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

from vlafast.cli import main


def test_serve_robot_null_backend_runs_and_reports(capsys):
    assert main(["robot", "run", "--backend", "null", "--seconds", "0.8", "--no-realtime", "--latency-ms", "5"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if "cycles" in ln]
    # Live readout lines every 0.5 s (how many fit in 0.8 s depends on the machine; the Ctrl-C
    # test waits for one), then the summary.
    assert lines and "requested: run complete" in lines[-1] and "missed" in lines[-1]


def test_serve_robot_writes_the_cycle_report(tmp_path, capsys):
    """--report: the per-cycle record (with the commands' jerk from the MuJoCo backend's log)."""
    assert main(["robot", "run", "--backend", "mujoco", "--seconds", "1.0", "--no-realtime", "--latency-ms", "20",
                 "--report", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    with open(tmp_path / "cycles.csv") as f:
        rows = list(csv.DictReader(f))
    # one row per inference cycle, 20 ms each at least (measured 10 rows idle; two needed to judge)
    assert len(rows) >= 2 and float(rows[1]["inference_ms"]) >= 20.0
    assert any(r["jerk_max"] not in ("nan", "") for r in rows)
    assert (tmp_path / "cycles.png").stat().st_size > 0 and "inference cycles" in (tmp_path / "report.md").read_text()


def test_robot_run_pi0_reach_with_rtc_trains_once_then_loads(tmp_path, capsys):
    weights = tmp_path / "reach.pt"
    args = ["robot", "run", "--backend", "mujoco", "--policy", "pi0-reach", "--rtc", "--sft-steps", "3",
            "--reach-weights", str(weights), "--seconds", "1.2", "--no-realtime", "--num-steps", "3"]
    assert main([*args, "--report", str(tmp_path / "report")]) == 0
    out = capsys.readouterr().out
    assert "training (3 steps" in out and weights.stat().st_size > 0 and "+ RTC" in out
    assert "reach: max joint error to the target" in out and "(measured)" in out
    with open(tmp_path / "report" / "cycles.csv") as f:
        rows = list(csv.DictReader(f))
    # one row per inference cycle (measured 5 idle; how many fit in 1.2 s is the machine's, two are needed here)
    assert len(rows) >= 2 and {"jerk_plan", "jerk_new", "prefix"} <= set(rows[0])
    assert any(int(float(r["prefix"])) > 0 for r in rows[1:])  # guided chunks froze a measured prefix
    again = ["robot", "run", "--backend", "mujoco", "--policy", "pi0-reach", "--ensemble", "0.5",
             "--reach-weights", str(weights), "--seconds", "0.5", "--no-realtime", "--num-steps", "3"]
    assert main(again) == 0
    assert "loading" in capsys.readouterr().out


def test_robot_run_on_ur_rtde_against_the_fake_controller(capsys):
    """The two commands a user without a robot runs: `robot fake-ur` in one terminal, `robot run
    --backend ur-rtde` in another (this process; ur_rtde keeps the GIL, so the fake needs its own)."""
    import pytest

    pytest.importorskip("rtde_control")
    from vlafast.robot.fake_ur import _free_loopback

    host = _free_loopback()
    fake = subprocess.Popen([sys.executable, "-m", "vlafast.cli", "robot", "fake-ur", "--host", host, "--seconds", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert "fake UR controller on" in fake.stdout.readline()
        # a 2 Hz RTDE watchdog: at the default 10 Hz a busy machine may leave the forwarder
        # unscheduled for 100 ms, which trips it, as it should (tests/test_robot_urrtde.py)
        assert main(["robot", "run", "--backend", "ur-rtde", "--host", host, "--seconds", "1.0", "--no-realtime",
                     "--watchdog-hz", "2"]) == 0
        out = capsys.readouterr().out
        assert "requested: run complete" in out and "servoJ stream:" in out and "calls/s" in out
    finally:
        fake.send_signal(signal.SIGINT)
        tail, err = fake.communicate(timeout=30)
    assert "servoJ targets" in tail and "errors: none" in tail, (tail, err)


def test_serve_robot_ctrl_c_stops_cleanly():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlafast.cli", "robot", "run", "--backend", "mujoco", "--no-realtime"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        # A runner started in the background (CI, `cmd &`) inherits SIGINT as ignored; give the
        # child the default disposition so Ctrl-C reaches it as it would from a terminal.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        # Wait until the loop reports that it is tracking, then press Ctrl-C. Start-up (imports,
        # MuJoCo) takes seconds on an idle machine, far longer on a loaded CI host.
        deadline = time.monotonic() + 180
        seen = ""
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            seen += line
            if line.startswith("tracking") or (not line and proc.poll() is not None):
                break
        assert "tracking" in seen, seen + proc.stderr.read()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:  # never leave the server running after a failure
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, (out, err)
    summary = [ln for ln in out.splitlines() if ln.startswith("stopped")]
    assert summary and "requested: interrupted" in summary[-1], out
    assert "Traceback" not in err


def test_bench_servo_writes_a_row(tmp_path):
    out = tmp_path / "r.csv"
    args = ["bench", "servo", "--seconds", "0.6", "--baseline-seconds", "0.3", "--inference-ms", "5", "--out", str(out)]
    assert main(args) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 1 and rows[0]["bench"] == "servo" and rows[0]["baseline"] == "SCHED_OTHER sleep-only"
    extra = json.loads(rows[0]["extra"])
    # 0.6 s of absolute 2 ms deadlines: each one ran or was counted missed (how many were
    # missed is the machine's: the row reports it; measured 300 + 0 idle).
    assert extra["cycles"] + extra["missed"] >= 0.6 * 500 - 1 and extra["missed"] >= 0 and extra["accepted"] >= 1
    assert 0 <= extra["jitter_p50_us"] <= extra["jitter_p99_us"] <= extra["jitter_max_us"]
    assert extra["chunk_age_p50_us"] > 0 and extra["latency_p50_us"] >= 5000  # 5 ms of "inference"


def test_bench_rtc_rows_at_a_smoke_budget(tmp_path):
    """`vlafast bench rtc`: one row per (mode, delay), naive at the same delay as the baseline."""
    out = tmp_path / "rtc.csv"
    assert main(["bench", "rtc", "--delays", "0", "--episodes", "2", "--seconds", "0.8", "--sft-steps", "3",
                 "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    rows = {r["backend"]: r for r in rows}  # the CSV is sorted by key
    assert sorted(rows) == ["ensemble", "naive", "rtc"]
    for r in rows.values():
        extra = json.loads(r["extra"])
        assert r["baseline"] == "naive switching"
        assert {"jerk_plan", "jerk_new", "jump_rad", "cmd_jerk", "success", "success_ci95", "jerk_plan_vs_naive",
                "jerk_plan_vs_naive_ci95"} <= set(extra)
        assert float(r["median_ms"]) > 0 and extra["episodes"] == 2 and extra["handovers"] >= 2
        lo, hi = extra["success_ci95"]
        assert 0.0 <= lo <= extra["success"] <= hi <= 1.0
    naive = json.loads(rows["naive"]["extra"])
    assert naive["jerk_plan_vs_naive"] == 1.0 and naive["jerk_plan_vs_naive_ci95"] == [1.0, 1.0]
