"""`make gpu-check`: a prioritised GPU harvest that fits a lent machine's window and streams.

A lent GPU gives about 8 minutes for one command. The plan runs what matters most first: each
kernel's GPU tests against its torch reference, the headline benchmarks at reduced repetitions,
the model-level GPU tests, then the rest. Every step has its own cap; a shared deadline skips a
step whose minimum no longer fits. As soon as a step ends, its log, junit XML and CSV rows are in
OUT and ``summary.txt`` has its line, so a run killed at the window's end keeps all it finished.

    python -m tools.gpucheck --out DIR [--budget 420] [--dry-run]     # from the checkout's root

It runs from the source tree on whatever python3 runs it (the GPU image's: no venv, no
network); ``_C`` is compiled in place when no build of it imports, and the summary says if that
failed. ``--dry-run`` (part of ``make gpu-rehearsal``, on the CPU) walks the same plan with each
step replaced by a check of it (its tests collect, its benchmark arguments parse) and charges
each step its full cap against the budget, so the skip logic and the streaming are exercised.
After a real run, ``vlafast bench import DIR`` files the rows into ``bench/results``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import os
import re
import shlex
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BUDGET = 420.0
BENCH_TIME_SCALE = "0.3"  # reduced repetitions: a third of each benchmark's timing window


@dataclasses.dataclass(frozen=True)
class Step:
    """One unit of the plan: a pytest selection, a benchmark, or a command."""

    name: str
    kind: str                  # "tests" | "bench" | "cmd"
    args: tuple[str, ...]      # tests: pytest arguments; bench: name + options; cmd: argv after python
    cap: float                 # seconds this step may take at most
    need: float                # seconds it must have left to be worth starting

    def __post_init__(self):
        if self.kind not in ("tests", "bench", "cmd"):
            raise ValueError(f"step kind must be tests, bench or cmd, got {self.kind!r}")
        if not 0 < self.need <= self.cap:
            raise ValueError(f"step {self.name}: need 0 < need <= cap, got need={self.need} cap={self.cap}")


KERNEL_TESTS = ("tests/test_vocab_topk.py", "tests/test_steer_ops.py", "tests/test_gaussian_step.py")
FLOW_TESTS = ("tests/test_flow_sampler.py", "tests/test_flow_graphs.py", "tests/test_flow_noise_head.py")
MODEL_TESTS = ("tests/test_pi0_model.py", "tests/test_pi0_bench.py", "tests/test_openvla.py",
               "tests/test_interp_steering.py", "tests/test_interp_dictionary.py")
HEADLINE_BENCH = ("vocab-topk", "steer", "flow-sampler", "pi0", "rollout")


def plan() -> list[Step]:
    """The prioritised plan (order is priority). Each cap is the most a step may cost the window;
    the caps of the first ten (kernel and flow tests, the five headline benchmarks, the model
    tests) add up to the default budget, so those fit even if every one runs to its cap, and the
    rest run in whatever time they leave."""
    from vlafast.bench import BENCHMARKS

    gpu = ("-m", "gpu or vulkan")
    steps = [
        Step("build-C", "cmd", ("-m", "tools.gpucheck", "--build-c"), cap=60, need=10),
        Step("info", "cmd", ("-m", "vlafast", "info"), cap=20, need=5),
        Step("tests-kernels", "tests", (*gpu, *KERNEL_TESTS), cap=60, need=20),
        Step("tests-flow", "tests", (*gpu, *FLOW_TESTS), cap=40, need=15),
        Step("bench-vocab-topk", "bench", ("vocab-topk", "--scopes", "layer", "model"), cap=40, need=15),
        Step("bench-steer", "bench", ("steer",), cap=25, need=10),
        Step("bench-flow-sampler", "bench", ("flow-sampler", "--batch", "1", "64", "--steps", "10"), cap=35, need=15),
        Step("bench-pi0", "bench", ("pi0", "--views", "2", "--batches", "64"), cap=50, need=25),
        Step("bench-rollout", "bench", ("rollout", "--batches", "64"), cap=40, need=20),
        Step("tests-models", "tests", (*gpu, *MODEL_TESTS), cap=50, need=20),
        Step("tests-rest", "tests", (*gpu, "tests", *(f"--ignore={t}" for t in KERNEL_TESTS + FLOW_TESTS + MODEL_TESTS)),
             cap=60, need=15),
    ]
    steps += [Step(f"bench-{name}", "bench", (name,), cap=60, need=20)
              for name, b in BENCHMARKS.items() if name not in HEADLINE_BENCH and not b.missing()]
    return steps


# ---------------------------------------------------------------------------------------------
# running


@dataclasses.dataclass
class Outcome:
    step: Step
    status: str          # ok | failed | timeout | skipped
    seconds: float
    detail: str = ""

    def line(self, index: int) -> str:
        return f"{index:02d} {self.step.name:22s} {self.status:8s} {self.seconds:7.1f}s  {self.detail}".rstrip()


def _argv(step: Step, out: Path, index: int, python: str, dry: bool) -> list[str]:
    stem = out / f"{index:02d}-{step.name}"
    if step.kind == "tests":
        base = [python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs", *step.args]
        return base + (["--collect-only"] if dry else [f"--junitxml={stem}.xml"])
    if step.kind == "bench":
        name, *options = step.args
        if dry:
            code = ("import sys; from vlafast.cli.bench import _bench_parser; "
                    "print(_bench_parser(sys.argv[1]).parse_args(sys.argv[2:]))")
            return [python, "-c", code, name, *options]
        return [python, "-m", "vlafast", "bench", name, *options, "--out", f"{stem}.csv"]
    if dry:
        return [python, "-c", "import sys; print('would run:', sys.argv[1:])", *step.args]
    return [python, *step.args]


def _env(dry: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("VLAFAST_BENCH_TIME_SCALE", BENCH_TIME_SCALE)
    if not dry:
        env.pop("TRITON_INTERPRET", None)
    return env


def _run(argv: list[str], log_path: Path, timeout: float, env: dict[str, str]) -> tuple[int | None, float]:
    """Run argv with its output streamed into log_path; kill its process group at timeout.
    Returns (exit code or None on timeout, seconds)."""
    start = time.monotonic()
    with open(log_path, "ab", buffering=0) as log:
        log.write(f"$ {shlex.join(argv)}\n".encode())
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=ROOT, env=env, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=max(timeout, 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code = None
            log.write(f"\n== gpu-check: killed at its limit of {timeout:.0f} s\n".encode())
    return code, time.monotonic() - start


def _detail(step: Step, log_path: Path, code: int | None, dry: bool) -> str:
    """The one-line result people read first: pytest's closing line, or the rows written."""
    text = log_path.read_text(errors="replace")
    if step.kind == "tests":
        closing = [ln.strip(" =") for ln in text.splitlines()
                   if re.search(r"\b(passed|failed|skipped|deselected|error|no tests ran|tests? collected)\b", ln)]
        return closing[-1] if closing else ""
    if step.kind == "bench" and not dry:
        rows = re.findall(r"wrote (\d+) row\(s\)", text)
        return f"{rows[-1]} row(s)" if rows else ""
    tail = [ln for ln in text.splitlines() if ln.strip()]
    return tail[-1][:160] if tail and code not in (0, None) else ""


def _append(path: Path, line: str) -> None:
    with open(path, "a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def run_plan(steps: Sequence[Step], out: str | os.PathLike, budget: float = DEFAULT_BUDGET, *,
             dry: bool = False, python: str = sys.executable,
             clock: Callable[[], float] = time.monotonic, say: Callable[[str], None] = print) -> list[Outcome]:
    """Run ``steps`` in order under one deadline; stream each result to ``out`` as it lands.

    A step starts only if ``need`` seconds are left, and gets ``min(cap, left)``. In a dry run
    each step is charged its full cap (the worst case), so the skips shown are those a real run
    could meet.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = out / "summary.txt"
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    _append(summary, f"# gpu-check {'dry run ' if dry else ''}{started} budget={budget:.0f}s python={python}")
    env = _env(dry)
    has_pytest = subprocess.run([python, "-c", "import pytest"], capture_output=True).returncode == 0
    t0, charged = clock(), 0.0
    outcomes = []
    for index, step in enumerate(steps, 1):
        left = budget - (charged if dry else clock() - t0)
        if left < step.need:
            outcome = Outcome(step, "skipped", 0.0, f"needs {step.need:.0f} s, {max(left, 0):.0f} s left")
        elif step.kind == "tests" and not has_pytest:
            outcome = Outcome(step, "skipped", 0.0, f"pytest does not import in {python}")
        else:
            log_path = out / f"{index:02d}-{step.name}.log"
            say(f"== gpu-check [{index}/{len(steps)}] {step.name} (cap {min(step.cap, left):.0f} s)")
            code, seconds = _run(_argv(step, out, index, python, dry), log_path, min(step.cap, left), env)
            charged += step.cap
            status = "timeout" if code is None else "ok" if code == 0 else "failed"
            outcome = Outcome(step, status, seconds, _detail(step, log_path, code, dry))
        outcomes.append(outcome)
        _append(summary, outcome.line(index))
        say(outcome.line(index))
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "failed", "timeout", "skipped")}
    _append(summary, "# done: " + " ".join(f"{k}={v}" for k, v in counts.items()))
    return outcomes


# ---------------------------------------------------------------------------------------------
# _C without pip: the GPU image may lack scikit-build-core, but torch ships pybind11's headers


def _c_sources() -> list[Path]:
    """The sources of ``_C``, read from CMakeLists.txt so there is one list."""
    text = (ROOT / "CMakeLists.txt").read_text()
    block = re.search(r"pybind11_add_module\(_C\s+(.*?)\)", text, re.S)
    if not block:
        raise RuntimeError("CMakeLists.txt has no pybind11_add_module(_C ...)")
    return [ROOT / s for s in block.group(1).split()]


def _pybind11_include() -> str:
    try:
        import pybind11

        return pybind11.get_include()
    except ImportError:
        import torch.utils.cpp_extension as ext

        for inc in ext.include_paths():
            if (Path(inc) / "pybind11" / "pybind11.h").exists():
                return inc
    raise RuntimeError("no pybind11 headers: neither the pybind11 package nor torch's copy was found")


def build_c_inplace(out_dir: str | os.PathLike | None = None, compiler: str | None = None) -> Path:
    """Compile ``_C`` with the system C++ compiler into ``out_dir`` (default: the package)."""
    out = Path(out_dir) if out_dir is not None else ROOT / "vlafast"
    target = out / f"_C{sysconfig.get_config_var('EXT_SUFFIX')}"
    cxx = compiler or os.environ.get("CXX", "c++")
    argv = [cxx, "-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-pthread",
            f"-I{ROOT / 'csrc'}", f"-I{sysconfig.get_paths()['include']}", f"-I{_pybind11_include()}",
            *map(str, _c_sources()), "-o", str(target) + ".tmp"]
    subprocess.run(argv, check=True)
    os.replace(str(target) + ".tmp", target)
    return target


def _cmd_build_c() -> int:
    try:
        from vlafast import _C  # noqa: F401

        print(f"_C already imports from {_C.__file__}; not rebuilt")
        return 0
    except ImportError as exc:
        print(f"_C does not import ({exc}); compiling it in place")
    try:
        path = build_c_inplace()
    except (subprocess.CalledProcessError, RuntimeError, OSError) as exc:
        print(f"_C could not be compiled: {exc}; the servo tests and benchmarks will fail or skip")
        return 1
    print(f"built {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for logs, junit XML, CSV rows and summary.txt")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help=f"seconds in all (default {DEFAULT_BUDGET:.0f})")
    p.add_argument("--dry-run", action="store_true", help="check each step instead of running it (CPU)")
    p.add_argument("--only", nargs="+", default=None, help="run only these steps (names as in the plan)")
    p.add_argument("--list", action="store_true", help="print the plan and exit")
    p.add_argument("--build-c", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build_c:
        return _cmd_build_c()
    steps = plan()
    if args.only:
        unknown = set(args.only) - {s.name for s in steps}
        if unknown:
            p.error(f"unknown step(s) {sorted(unknown)}; the plan has {[s.name for s in steps]}")
        steps = [s for s in steps if s.name in args.only]
    if args.list:
        for i, s in enumerate(steps, 1):
            print(f"{i:02d} {s.name:22s} cap {s.cap:4.0f}s need {s.need:4.0f}s  {s.kind}: {' '.join(s.args)}")
        return 0
    if args.out is None:
        p.error("--out DIR is required")
    if args.budget <= 0:
        p.error(f"--budget must be > 0 seconds, got {args.budget}")
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu-check needs a CUDA device (torch.cuda.is_available() is False); "
                  "on the CPU, `make gpu-rehearsal` runs the dry run", file=sys.stderr)
            return 2
    outcomes = run_plan(steps, args.out, args.budget, dry=args.dry_run)
    print(f"gpu-check: results in {args.out} (summary.txt); file them with `vlafast bench import {args.out}`")
    return 0 if all(o.status in ("ok", "skipped") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
