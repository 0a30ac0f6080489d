"""The GPU harvest on the CPU: its plan runner (deadline, caps, streaming), its dry run, the
suite's collection without the simulators, reduced benchmark repetitions, `bench import`, the
in-place `_C` build and the sm_90 AOT rehearsal of every Triton kernel config; and that this
tooling (tools/) stays out of the runtime package."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tools import gpucheck
from tools.gpucheck import Step, run_plan
from tools.harvest import BEGIN, END, import_run
from vlafast.bench import core

ROOT = Path(__file__).resolve().parent.parent


def _py(code: str) -> tuple[str, ...]:
    return ("-c", textwrap.dedent(code))


def test_plan_runner_streams_caps_and_skips(tmp_path):
    summary = tmp_path / "summary.txt"
    steps = [
        Step("first", "cmd", _py("print('hello from the first step')"), cap=5, need=0.1),
        # While it runs, the first step's line must already be on disk (streamed, not at the end).
        Step("hangs", "cmd", _py(f"""
            import pathlib, time
            print('first line on disk:', ' first ' in pathlib.Path({str(summary)!r}).read_text(), flush=True)
            time.sleep(60)"""), cap=1.5, need=0.1),
        Step("late", "cmd", _py("print('never')"), cap=5, need=3),
    ]
    out = run_plan(steps, tmp_path, budget=4, say=lambda s: None)
    assert [o.status for o in out] == ["ok", "timeout", "skipped"]
    assert 1.4 < out[1].seconds < 10  # killed at its cap, not after its 60 s sleep
    assert "first line on disk: True" in (tmp_path / "02-hangs.log").read_text()
    assert "hello from the first step" in (tmp_path / "01-first.log").read_text()
    assert not (tmp_path / "03-late.log").exists()
    lines = summary.read_text().splitlines()
    assert lines[0].startswith("# gpu-check") and lines[-1] == "# done: ok=1 failed=0 timeout=1 skipped=1"
    assert "needs 3 s" in lines[3]


def test_dry_run_charges_each_step_its_cap(tmp_path):
    steps = [Step(f"s{i}", "cmd", ("-c", "pass"), cap=2, need=1.5) for i in range(3)]
    out = run_plan(steps, tmp_path, budget=5, dry=True, say=lambda s: None)
    assert [o.status for o in out] == ["ok", "ok", "skipped"]  # 5 - 2 - 2 = 1 s < need 1.5 s


def test_failed_step_reports_its_last_line(tmp_path):
    out = run_plan([Step("bad", "cmd", _py("import sys; sys.exit('broken on purpose')"), cap=10, need=1)],
                   tmp_path, budget=20, say=lambda s: None)
    assert out[0].status == "failed" and "broken on purpose" in out[0].detail


def test_step_validation():
    with pytest.raises(ValueError, match="kind"):
        Step("x", "shell", (), cap=1, need=1)
    with pytest.raises(ValueError, match="need"):
        Step("x", "cmd", (), cap=1, need=2)


def test_headline_steps_fit_the_default_budget_at_their_caps():
    steps = gpucheck.plan()
    names = [s.name for s in steps]
    assert names.index("tests-kernels") < names.index("bench-vocab-topk") < names.index("tests-models")
    head = steps[: names.index("tests-models") + 1]
    assert sum(s.cap for s in head) <= gpucheck.DEFAULT_BUDGET
    assert len(set(names)) == len(names)


@pytest.mark.slow
def test_dry_run_of_the_whole_plan(tmp_path):
    """Every test selection of the plan collects at least one test; every benchmark's options parse."""
    r = subprocess.run([sys.executable, "-m", "tools.gpucheck", "--dry-run", "--out", str(tmp_path),
                        "--budget", "100000"], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = (tmp_path / "summary.txt").read_text().splitlines()[1:-1]
    assert len(lines) == len(gpucheck.plan())
    assert all(" ok " in ln for ln in lines), lines
    assert all("collected" in ln for ln in lines if " tests-" in ln)


_BLOCKER = """
import importlib.abc, sys
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"mujoco", "gymnasium", "mani_skill", "sapien"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Absent())
import pytest
sys.exit(pytest.main(sys.argv[1:]))
"""


def test_suite_collects_without_simulators():
    """The GPU image has no mujoco / gymnasium / mani-skill: collection must still succeed."""
    r = subprocess.run([sys.executable, "-c", _BLOCKER, "--collect-only", "-q", "-p", "no:cacheprovider", "tests"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:]
    assert "error" not in r.stdout.splitlines()[-1]
    assert int(r.stdout.splitlines()[-1].split()[0].split("/")[0]) > 500


def test_bench_time_scale(monkeypatch):
    calls = []
    monkeypatch.setenv("VLAFAST_BENCH_TIME_SCALE", "1")
    core.time_ms(lambda: calls.append(1), warmup=0, max_iters=100, min_time_s=10)
    full = len(calls)
    calls.clear()
    monkeypatch.setenv("VLAFAST_BENCH_TIME_SCALE", "0.1")
    core.time_ms(lambda: calls.append(1), warmup=0, max_iters=100, min_time_s=10)
    assert (full, len(calls)) == (101, 11)  # one probe call, then the capped iterations
    row = core.Row("b", "op", "1", "fp32", "torch", 1.0)
    assert json.loads(row.as_record()["extra"]) == {"time_scale": 0.1}
    monkeypatch.setenv("VLAFAST_BENCH_TIME_SCALE", "3")
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        core.time_ms(lambda: None)


def _rows(device: str, ms: float, stamp: str) -> list[core.Row]:
    return [core.Row("vocab-topk", "layer", "16384x2048", "bf16", "triton", ms, baseline="matmul+topk",
                     baseline_ms=2 * ms, device=device, commit="abc", timestamp=stamp)]


def test_bench_import_files_rows_plots_and_readme(tmp_path):
    run, results = tmp_path / "run", tmp_path / "results"
    run.mkdir()
    core.write_rows(_rows("NVIDIA H200", 1.5, "2026-12-04T10:00:00+00:00"), run / "05-bench-vocab-topk.csv")
    (run / "summary.txt").write_text("# gpu-check\n05 bench-vocab-topk ok 3.0s 1 row(s)\n")
    (run / "03-tests-kernels.log").write_text("not a csv\n")
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{BEGIN}\nold table\n{END}\n\nafter\n")
    written = import_run(run, results, readme)
    target = results / "nvidia-h200.csv"
    assert target in written and (results / "nvidia-h200.gpu-check.txt").exists()
    assert any(p.suffix == ".png" for p in written)
    assert [r["median_ms"] for r in core.read_rows(target)] == ["1.5"]
    text = readme.read_text()
    assert "old table" not in text and "| NVIDIA H200 | vocab-topk | layer |" in text and text.endswith("after\n")
    # An older row for the same key does not replace a newer one.
    core.write_rows(_rows("NVIDIA H200", 9.0, "2026-01-01T00:00:00+00:00"), run / "05-bench-vocab-topk.csv")
    import_run(run, results, None, plots=False)
    assert [r["median_ms"] for r in core.read_rows(target)] == ["1.5"]


def test_bench_import_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        import_run(tmp_path / "missing", tmp_path)
    with pytest.raises(ValueError, match="no benchmark rows"):
        import_run(tmp_path, tmp_path / "r", None)


def test_bench_import_command_runs_from_a_checkout_only(tmp_path, monkeypatch, capsys):
    """`vlafast bench import` loads the checkout's tools/harvest.py; an installed wheel has none."""
    import vlafast
    from vlafast.cli import main

    run, results = tmp_path / "run", tmp_path / "results"
    run.mkdir()
    core.write_rows(_rows("NVIDIA H200", 1.5, "2026-12-04T10:00:00+00:00"), run / "05-bench-vocab-topk.csv")
    assert main(["bench", "import", str(run), "--results-dir", str(results), "--readme", "", "--no-plots"]) == 0
    assert [r["median_ms"] for r in core.read_rows(results / "nvidia-h200.csv")] == ["1.5"]
    monkeypatch.setattr(vlafast, "__file__", str(tmp_path / "site-packages" / "vlafast" / "__init__.py"))
    assert main(["bench", "import", str(run), "--results-dir", str(results)]) == 2
    assert "runs from a source checkout" in capsys.readouterr().err


def test_tooling_stays_out_of_the_runtime_package():
    """tools/ is not in the wheel: no vlafast module imports it or keeps a copy, and the real-time
    loop imports no matplotlib (its reports are vlafast.robot.report's)."""
    pkg = ROOT / "vlafast"
    # (vlafast/rl/compare.py is back in the package: one comparison row is the demo's RL phase;
    # the comparison's CLI, table and curves stay in tools/rl_compare.py)
    assert not [old for old in ("gpucheck.py", "bench/harvest.py", "ops/aot.py") if (pkg / old).exists()]
    importers = [str(p) for p in pkg.rglob("*.py")
                 if re.search(r"^\s*(from|import)\s+tools\b", p.read_text(), re.M)]
    assert importers == []
    assert "install_lavapipe" not in (pkg / "envs" / "maniskill.py").read_text()
    code = ("import sys, vlafast.robot.runner, vlafast.cli.robot; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "[]", r.stdout[-2000:] + r.stderr[-2000:]


@pytest.mark.slow
def test_build_c_inplace_without_pip(tmp_path):
    """The GPU image may lack scikit-build-core: `_C` compiles with the system compiler alone."""
    path = gpucheck.build_c_inplace(tmp_path)
    spec = importlib.util.spec_from_file_location("vlafast._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.DOF == 6 and hasattr(mod, "ServoLoop") and hasattr(mod, "measure_loop")


def test_aot_records_every_launcher_branch():
    """The launchers, driven on CPU tensors, reach every kernel and config they can pick."""
    r = subprocess.run([sys.executable, "-c", "from tools import aot; import json; "
                        "print(json.dumps([(l.kernel, l.config) for l in aot.launches()]))"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.splitlines()[-1])
    kernels = {k.rsplit(".", 1)[1] for k, _ in seen}
    assert kernels == {"_partial_kernel", "_merge_kernel", "_correction_kernel", "_direction_kernel",
                       "_gaussian_step_kernel"}
    configs = " ".join(c for _, c in seen)
    for piece in ("BLOCK_N=64,BLOCK_V=256,BLOCK_D=64;warps=8,stages=3",  # vocab bf16, k <= 16
                  "BLOCK_N=64,BLOCK_V=128,BLOCK_D=64",                   # vocab bf16, k > 16
                  "BLOCK_N=64,BLOCK_V=64,BLOCK_D=32;warps=8,stages=2",   # vocab fp32
                  "BLOCK_M=16,BLOCK_D=128,BLOCK_S=32;warps=4",           # steer decode
                  "BLOCK_M=64,BLOCK_D=128,BLOCK_S=32;warps=8",           # steer prefill
                  "BLOCK_N=1024;warps=4", "BLOCK_N=16;warps=1"):         # gaussian step
        assert piece in configs, piece
    assert len(seen) == len({tuple(s) for s in seen})


def test_aot_problems_of():
    from tools.aot import MAX_SPILL_BYTES, SM90_MAX_SHARED, problems_of

    ok = {"ok": True, "spill_store_bytes": 0, "shared_bytes": 1024}
    assert problems_of(ok) == []
    assert "spills" in problems_of(ok | {"spill_store_bytes": MAX_SPILL_BYTES + 1})[0]
    assert "shared memory" in problems_of(ok | {"shared_bytes": SM90_MAX_SHARED + 1})[0]
    assert problems_of({"ok": False, "error": "CompilationError: x"}) == ["CompilationError: x"]


@pytest.mark.slow
def test_aot_compiles_every_config_for_sm90(tmp_path):
    """`make gpu-rehearsal`'s compile: every variant compiles for sm_90 within the spill bound."""
    r = subprocess.run([sys.executable, "-m", "tools.aot", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=900,
                       env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    doc = json.loads((tmp_path / "aot.json").read_text())
    assert r.returncode == 0 and doc["problems"] == [], (doc["problems"], r.stderr[-2000:])
    assert len(doc["variants"]) > 100
    assert all(v["ok"] and 0 < v["registers"] <= 255 for v in doc["variants"])
