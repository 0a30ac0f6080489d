"""The lock-free paths under ThreadSanitizer: csrc/tests/servo_stress.cpp pushes chunks as fast as
it can while the servo thread runs at 2 kHz, a mailbox reader and a stats reader run beside it;
then the shared-memory seqlock mailbox with two readers (fences are not modelled by TSan: every
field of the seqlock is an atomic, and the torn-read check is the test).
Built straight from csrc/ with -fsanitize=thread (the same sources as vlafast._C)."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_servo_core_is_race_free_under_tsan(tmp_path):
    cxx = shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH (building vlafast._C needs one too)")
    exe = tmp_path / "servo_stress"
    srcs = [ROOT / "csrc/tests/servo_stress.cpp", ROOT / "csrc/rt/periodic.cpp", *sorted((ROOT / "csrc/servo").glob("*.cpp"))]
    subprocess.run([cxx, "-std=c++17", "-O1", "-g", "-fsanitize=thread", "-Wno-tsan", f"-I{ROOT / 'csrc'}", *map(str, srcs),
                    "-o", str(exe), "-pthread"], check=True, timeout=300)
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120,
                         env={"TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert "ThreadSanitizer" not in out.stderr, out.stderr[-4000:]
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "bad 0 state stopped" in out.stdout
