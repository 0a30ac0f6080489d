"""The _C timing core. Jitter bounds are not asserted (noisy VM): the benchmark reports them."""

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
    # Absolute deadlines: the run lasts its nominal time (plus at most a few missed periods).
    assert elapsed >= seconds
    assert elapsed < seconds + 0.5


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


def test_gil_released_during_loop():
    ticks = []
    stop = threading.Event()

    def spinner():
        while not stop.is_set():
            ticks.append(1)
            time.sleep(0.001)

    t = threading.Thread(target=spinner)
    t.start()
    C.measure_loop(500.0, 0.3, realtime=False)
    stop.set()
    t.join()
    # With the GIL held for 0.3 s the Python thread could not tick at all.
    assert len(ticks) > 20
