"""The wheel builds from the tree and carries the compiled core."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pip_wheel_contains_C(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        check=True, timeout=600,
    )
    wheels = list(tmp_path.glob("vlafast-*.whl"))
    assert len(wheels) == 1
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert any(n.startswith("vlafast/_C") and n.endswith(".so") for n in names), names
    assert "vlafast/_backend.py" in names
    assert "vlafast/assets/ur5e.xml" in names  # package data: the UR5e model
    assert not any("libtorch" in n for n in names)
