import csv
import json
import subprocess
import sys

import pytest

from vlafast.bench.core import COLUMNS, Row, device_slug, read_rows, time_ms, write_rows
from vlafast.cli import main


def _row(op="matmul", shape="8x8", ms=2.0, base=4.0, **kw):
    return Row(bench="unit", op=op, shape=shape, dtype="fp32", backend="torch", median_ms=ms,
               baseline="naive", baseline_ms=base, **kw)


def test_row_derived_columns():
    rec = _row(achieved=50.0, unit="TFLOP/s", peak=200.0, extra={"k": 3}).as_record()
    assert tuple(rec) == COLUMNS
    assert float(rec["ratio"]) == pytest.approx(0.5)
    assert float(rec["pct_peak"]) == pytest.approx(25.0)
    assert json.loads(rec["extra"]) == {"k": 3}
    bare = Row(bench="unit", op="x", shape="1", dtype="fp32", backend="torch", median_ms=1.0).as_record()
    assert bare["ratio"] == "" and bare["pct_peak"] == "" and bare["device"]


def test_write_rows_merges_by_key(tmp_path):
    path = tmp_path / "r.csv"
    write_rows([_row(shape="a", ms=1.0), _row(shape="b", ms=2.0)], path)
    write_rows([_row(shape="a", ms=3.0)], path)
    rows = {r["shape"]: r for r in read_rows(path)}
    assert set(rows) == {"a", "b"}
    assert float(rows["a"]["median_ms"]) == 3.0
    with open(path) as fh:
        assert tuple(next(csv.reader(fh))) == COLUMNS


def test_failed_write_keeps_previous_results(tmp_path, monkeypatch):
    path = tmp_path / "r.csv"
    write_rows([_row(shape="a")], path)
    before = path.read_text()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    import vlafast._io as io_mod

    monkeypatch.setattr(io_mod.os, "replace", boom)
    with pytest.raises(RuntimeError):
        write_rows([_row(shape="z")], path)
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]  # no temp file left behind


def test_atomic_write_has_default_permissions(tmp_path):
    import os

    from vlafast._io import atomic_write_text

    path = tmp_path / "x.txt"
    atomic_write_text(path, "hi")
    old = os.umask(0o022)
    os.umask(old)
    assert (path.stat().st_mode & 0o777) == (0o666 & ~old)


def test_time_ms_measures_cpu_work():
    import time

    ms = time_ms(lambda: time.sleep(0.002), iters=5, warmup=1)
    assert 1.9 <= ms < 50


def test_device_slug():
    assert device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_cli_servo_timing_writes_schema_row(tmp_path, capsys):
    out = tmp_path / "res.csv"
    rc = main(["bench", "servo-timing", "--hz", "250", "--seconds", "0.1", "--out", str(out)])
    assert rc == 0
    rows = read_rows(out)
    assert len(rows) == 1
    r = rows[0]
    assert r["bench"] == "servo-timing" and r["baseline"] == "SCHED_OTHER sleep-only"
    extra = json.loads(r["extra"])
    assert extra["cycles"] == 25
    assert "baseline_p99_us" in extra
    # The SCHED_OTHER fallback figure is reported whenever SCHED_FIFO was obtained.
    assert ("fallback_p99_us" in extra) == (extra["policy"] == "SCHED_FIFO")
    assert float(r["achieved"]) == pytest.approx(extra["p99_us"], rel=1e-4)
    assert "p99 jitter" in capsys.readouterr().out


def test_cli_bench_all_and_plot(tmp_path):
    out = tmp_path / "all.csv"
    # `all` runs each benchmark with its defaults; servo-timing's 5 s default is too long for a
    # unit test, so exercise `all`'s wiring through one short benchmark run and the plotter.
    assert main(["bench", "servo-timing", "--seconds", "0.05", "--out", str(out)]) == 0
    assert main(["bench", "plot", str(out), "-o", str(tmp_path / "plots")]) == 0
    pngs = list((tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 1 and pngs[0].stat().st_size > 1000


def test_cli_rejects_unknown_bench():
    with pytest.raises(SystemExit):
        main(["bench", "no-such-bench"])


def test_cli_bad_servo_args_are_clear(tmp_path, capsys):
    assert main(["bench", "servo-timing", "--hz", "0", "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err
    assert "hz must be in" in err and "Traceback" not in err


def test_vlafast_info_entry_point():
    out = subprocess.run([sys.executable, "-m", "vlafast.cli", "info"], capture_output=True, text=True, check=True)
    assert "_C" in out.stdout and "built" in out.stdout
    assert "torch" in out.stdout
    from importlib import metadata

    extras = next(ln for ln in out.stdout.splitlines() if ln.startswith("extras"))
    assert f"ur_rtde {metadata.version('ur-rtde')}" in extras  # make setup installs the [robot] extra


def test_a_benchmark_whose_extra_is_missing_is_skipped_by_name(monkeypatch, capsys):
    """e.g. `bench rtc` on the GPU image (no MuJoCo): a skip that names the module, and gpu-check
    leaves it out of its plan."""
    import dataclasses

    from tools import gpucheck
    from vlafast import bench

    fake = dataclasses.replace(bench.BENCHMARKS["servo-timing"], needs=("no_such_module_here",))
    assert fake.missing() == ["no_such_module_here"] and bench.BENCHMARKS["servo-timing"].missing() == []
    monkeypatch.setitem(bench.BENCHMARKS, "servo-timing", fake)
    assert main(["bench", "servo-timing"]) == 1  # nothing ran
    assert "skip servo-timing: needs no_such_module_here" in capsys.readouterr().out
    assert "bench-servo-timing" not in [s.name for s in gpucheck.plan()]
