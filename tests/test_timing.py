"""The _C timing core. Nothing here asserts how fast or how steady the machine is (jitter,
missed cycles, how long a call overran: `vlafast bench servo-timing` reports them); the tests
check what the code guarantees on any machine: never waking early, the cycle count, the run
lasting at least its nominal time, the GIL released."""

import threading
import time

import pytest

from vlafast._ext import load_C

C = load_C()


def test_monotonic_clock_matches_python():
    a = time.monotonic_ns()
    b = C.monotonic_ns()
    c = time.monotonic_ns()
    assert a <= b <= c


def test_sleep_until_never_wakes_early():
    for spin in (0.0, 100.0):
        deadline = C.monotonic_ns() + 3_000_000
        C.sleep_until_ns(deadline, spin)
        assert C.monotonic_ns() >= deadline


@pytest.mark.parametrize("hz,seconds", [(500.0, 0.2), (125.0, 0.24), (997.0, 0.1)])
def test_measure_loop_report(hz, seconds):
    start = time.monotonic()
    r = C.measure_loop(hz, seconds)
    elapsed = time.monotonic() - start
    assert r["cycles"] == round(hz * seconds)
    assert 0.0 <= r["p50_us"] <= r["p99_us"] <= r["max_us"]
    assert r["missed"] >= 0
    assert r["policy"] in ("SCHED_FIFO", "SCHED_OTHER")
    assert (r["policy"] == "SCHED_FIFO") == (r["reason"] == "")
    # Absolute deadlines: the run lasts at least its nominal time (how much longer it takes on a
    # busy machine is the benchmark's, as missed periods).
    assert elapsed >= seconds


def test_non_realtime_request_reports_reason():
    r = C.measure_loop(500.0, 0.05, spin_us=0.0, realtime=False)
    assert r["policy"] == "SCHED_OTHER"
    assert "not requested" in r["reason"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hz=0.0, seconds=1.0), r"hz must be in \(0, 10000\]"),
        (dict(hz=-5.0, seconds=1.0), r"hz must be in"),
        (dict(hz=1e6, seconds=1.0), r"hz must be in \(0, 10000\]"),
        (dict(hz=float("nan"), seconds=1.0), r"hz must be in"),
        (dict(hz=500.0, seconds=0.0), r"seconds must be in \(0, 3600\]"),
        (dict(hz=500.0, seconds=1e5), r"seconds must be in"),
        (dict(hz=500.0, seconds=0.1, spin_us=2000.0), r"spin_us must be in \[0, period = 2000 us\)"),
        (dict(hz=500.0, seconds=0.1, priority=0), r"priority must be in \[1, 99\]"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        C.measure_loop(**kwargs)


def ticks_inside(call, margin_s=0.1):
    """Run call() while a Python thread ticks (sleeping 1 ms between ticks) -> the ticks taken
    more than margin_s after the call began and before it ended. Were the GIL held during the
    call, none could be: the other thread runs Python only between bytecodes of this one (at
    most one switch interval, 5 ms, around the call's edges)."""
    ticks, stop = [], threading.Event()

    def spinner():
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.001)

    th = threading.Thread(target=spinner)
    th.start()
    t0 = time.monotonic()
    call()
    t1 = time.monotonic()
    stop.set()
    th.join()
    return [t for t in ticks if t0 + margin_s < t < t1 - margin_s]


def test_gil_released_during_loop():
    # 1 s of loop: a tick anywhere in its middle 0.8 s shows the GIL free, however busy the
    # machine (measured ~700 such ticks idle).
    assert ticks_inside(lambda: C.measure_loop(500.0, 1.0, realtime=False))
