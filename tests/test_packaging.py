"""What `pip install vlafast` gives: an sdist that builds on its own, a manylinux wheel built from
it in isolation (tools/wheels.py, as `make wheel` does for 3.10-3.13), and that wheel installed
into a fresh venv, away from the source tree, running its compiled core, CLI, servo loop and demo."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import wheels  # noqa: E402

MAX_WHEEL_BYTES = 2_000_000  # measured: 401 kB (cp311)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    sdist = wheels.build_sdist(out)
    raw = wheels.build_wheel(sys.executable, sdist, out / "raw")
    wheel, verdict = wheels.repair(raw, out)
    return sdist, wheel, verdict


@pytest.mark.slow
def test_sdist_holds_the_sources_and_nothing_local(built):
    sdist, _, _ = built
    names = tarfile.open(sdist).getnames()
    top = names[0].split("/")[0]
    for need in ("pyproject.toml", "CMakeLists.txt", "csrc/bindings.cpp", "vlafast/__init__.py", "README.md"):
        assert f"{top}/{need}" in names, need
    assert not [n for n in names if any(f"/{d}/" in n + "/" for d in (".venv", "build", "dist", "runs", ".git"))]


@pytest.mark.slow
def test_wheel_is_manylinux_small_and_clean(built):
    _, wheel, verdict = built
    assert "manylinux_2_" in wheel.name and wheel.name.endswith("_x86_64.whl"), wheel.name
    assert "is consistent with" in verdict
    assert wheel.stat().st_size < MAX_WHEEL_BYTES
    assert wheels.contents_problems(wheel) == []
    names = zipfile.ZipFile(wheel).namelist()
    assert "vlafast/assets/ur5e.xml" in names and "vlafast/envs/libero_worker.py" in names
    assert not any("libtorch" in n for n in names)
    # Developer tooling lives in tools/, which the wheel does not ship, nor its old homes.
    tooling = ("vlafast/gpucheck.py", "vlafast/bench/harvest.py", "vlafast/ops/aot.py")  # the demo runs rl/compare.py
    assert not [n for n in names if n.startswith("tools/") or n in tooling]


@pytest.mark.slow
def test_contents_check_can_fail(tmp_path):
    bad = tmp_path / "vlafast-0-py3-none-any.whl"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("vlafast/__init__.py", "")
        z.writestr("tests/test_x.py", "")
        z.writestr("vlafast/__pycache__/x.cpython-311.pyc", "")
    problems = wheels.contents_problems(bad)
    assert any("tests/test_x.py" in p for p in problems) and any(".pyc" in p for p in problems)
    assert "no vlafast/_C extension" in problems


@pytest.mark.slow
def test_wheel_runs_from_a_fresh_venv(built, tmp_path):
    """Installed with --no-deps into a new venv; its dependencies (torch, mujoco, ...) come from
    this venv's site-packages through a .pth line, whose own .pth files (this checkout's editable
    install) are not processed, so the source tree is never on the path."""
    _, wheel, _ = built
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py, bin_ = venv / "bin" / "python", venv / "bin"
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    site = Path(subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "deps-from-test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}

    def run(*argv, timeout=300):
        r = subprocess.run([*argv], cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        return r.stdout

    where = run(py, "-c", "import vlafast, vlafast._C as C; print(vlafast.__file__); print(C.__file__)")
    assert all(line.startswith(str(venv)) for line in where.split()), where
    assert "_C" in run(bin_ / "vlafast", "info")
    run(bin_ / "vlafast", "bench", "servo-timing", "--seconds", "1", "--no-baseline", "--out", str(work / "servo.csv"))
    assert "periodic_loop" in (work / "servo.csv").read_text()
    run(bin_ / "vlafast", "demo", "--quick", "--no-progress", "--out", str(work / "runs"), timeout=900)
    assert list((work / "runs").rglob("*.md")) or list((work / "runs").rglob("*.html"))
