"""Ahead-of-time compile of every Triton kernel config the launchers can pick, for a GPU we lack.

No GPU is needed: the launchers are driven on CPU tensors over inputs that reach each of their
branches (dtypes, k buckets, decode vs prefill row counts, masks, widths), with the backend
forced to ``triton`` and ``JITFunction.run`` replaced by a recorder. Each distinct launch
(kernel, argument types, constexprs, num_warps, num_stages) is then compiled by Triton for the
target (default ``cuda`` sm_90), and ptxas reports registers, spills and local memory per thread;
Triton's metadata gives the shared memory per block.

``python -m tools.aot --out DIR`` writes ``DIR/aot.json`` and exits non-zero when a
variant does not compile or spills more than ``MAX_SPILL_BYTES``. It must run without
``TRITON_INTERPRET`` (under the interpreter ``triton.jit`` gives functions that cannot compile).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from vlafast._io import atomic_write_text

# A spill this small is a handful of registers per thread, reloaded from L1; the steer prefill
# tile (64 x 128, 8 warps) was chosen knowing it spills 16 B. Anything above fails the rehearsal.
MAX_SPILL_BYTES = 64
SM90_MAX_SHARED = 227 * 1024  # dynamic shared memory one block may opt into on sm_90
H200_SMS = 132  # the split heuristic of vocab_topk reads the SM count; the rehearsal's device


@dataclasses.dataclass(frozen=True)
class Launch:
    """One kernel launch as the launcher made it, reduced to what selects a compiled binary."""

    kernel: str                           # module.function
    signature: tuple[tuple[str, str], ...]  # (argument, Triton type or "constexpr")
    constexprs: tuple[tuple[str, Any], ...]
    num_warps: int
    num_stages: int

    @property
    def config(self) -> str:
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs)
        ptrs = ",".join(t for _, t in self.signature if t.startswith("*"))
        return f"{consts};warps={self.num_warps},stages={self.num_stages};{ptrs}"


_TRITON_DTYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "i1",
}


def _arg_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_DTYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type a kernel argument of type {type(value).__name__}")


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Within the block, vlafast's ops launch nothing: each launch is recorded instead."""
    from triton.runtime.jit import JITFunction

    from vlafast import _backend

    vocab = importlib.import_module("vlafast.ops.vocab_topk")
    launches: list[Launch] = []

    def record(self, *args, grid, warmup, **kwargs):
        names = self.arg_names
        bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        const_names = {p.name for p in self.params if p.is_constexpr}
        signature = tuple((n, "constexpr" if n in const_names else _arg_type(bound[n])) for n in names)
        constexprs = tuple((n, bound[n]) for n in names if n in const_names)
        launches.append(Launch(f"{self.fn.__module__}.{self.fn.__name__}", signature, constexprs,
                               int(kwargs.get("num_warps", 4)), int(kwargs.get("num_stages", 3))))

    saved = (JITFunction.run, _backend.resolve, torch.cuda.device, torch.cuda.current_device, vocab._sm_count)
    JITFunction.run = record
    _backend.resolve = lambda op, device: "triton"
    torch.cuda.device = lambda device: contextlib.nullcontext()
    torch.cuda.current_device = lambda: 0
    vocab._sm_count = lambda index: H200_SMS
    try:
        yield launches
    finally:
        JITFunction.run, _backend.resolve, torch.cuda.device, torch.cuda.current_device, vocab._sm_count = saved


def _drive_vocab_topk() -> None:
    from vlafast.ops.vocab_topk import MAX_K, vocab_topk

    D = 96
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for k in sorted({1, 2, 4, 8, 10, 16, 32, MAX_K}):  # one k per KP bucket, the largest, and 10
            for N, V in ((1, 50_000), (4096, 32_000), (256, 257_152)):  # one row (many splits) ... pi0 layer
                values = torch.empty(N, D, dtype=dtype)
                emb = torch.empty(V, D, dtype=dtype)
                vocab_topk(values, emb, k)
                vocab_topk(values, emb, k, largest=False, scale=torch.empty(N))


def _drive_steer() -> None:
    from vlafast.ops.steer import add_direction_, steer_correction_

    D, S, F = 80, 24, 160
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for B, T in ((1, 1), (64, 1), (2, 300)):  # decode at batch 1 / 64, prefill
            y = torch.empty(B, T, D, dtype=dtype)
            W = torch.empty(D, S, dtype=dtype)
            mask = torch.ones(B)
            steer_correction_(y, torch.empty(B, T, S, dtype=dtype), W, torch.empty(B), mask)
            steer_correction_(y, torch.empty(B, T, F, dtype=dtype), W, torch.empty(B, S), mask,
                              index=torch.arange(S))
            add_direction_(y, torch.empty(D, dtype=dtype), torch.empty(B), mask)


def _drive_gaussian_step() -> None:
    from vlafast.ops.gaussian_step import gaussian_step

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for N in (7, 350, 1600):  # block 16, 512, 1024 (pi0 chunk: 50 x 32 = 1600)
            mean, sigma = torch.empty(3, N, dtype=dtype), torch.ones(3, 1, dtype=dtype)
            for mask in (None, torch.ones(N)):
                gaussian_step(mean, sigma, mask, eps=torch.empty(3, N, dtype=dtype))
                gaussian_step(mean, sigma, mask, x_next=torch.empty(3, N, dtype=dtype))


DRIVERS: dict[str, Callable[[], None]] = {
    "vocab_topk": _drive_vocab_topk, "steer": _drive_steer, "gaussian_step": _drive_gaussian_step,
}


def launches() -> list[Launch]:
    """The distinct launches the launchers make over the driven inputs, in first-seen order."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("AOT compilation needs TRITON_INTERPRET unset (the interpreter's kernels do not compile)")
    with torch.no_grad(), recording() as seen:
        for drive in DRIVERS.values():
            drive()
    return list(dict.fromkeys(seen))


def _ptxas() -> str:
    from triton.backends.nvidia import compiler as nv

    try:
        return nv.get_ptxas(90).path
    except TypeError:  # Triton versions whose get_ptxas takes no architecture
        return nv.get_ptxas().path


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame")


def compile_launch(launch: Launch, arch: int = 90, ptxas: str | None = None) -> dict[str, Any]:
    """Compile one launch for ``cuda`` sm_<arch>; its resource usage as a JSON-able record."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name = launch.kernel.rsplit(".", 1)
    fn = getattr(importlib.import_module(module), name)
    index = {n: i for i, n in enumerate(fn.arg_names)}
    src = ASTSource(fn, dict(launch.signature), constexprs={(index[k],): v for k, v in launch.constexprs})
    record: dict[str, Any] = {"kernel": launch.kernel, "config": launch.config, "arch": f"sm_{arch}",
                              "num_warps": launch.num_warps, "num_stages": launch.num_stages}
    start = time.perf_counter()
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    except Exception as exc:  # a compile error is a result of the rehearsal, not a crash of it
        return record | {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    record["shared_bytes"] = int(compiled.metadata.shared)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp, "k.ptx")
        ptx.write_text(compiled.asm["ptx"])
        out = subprocess.run([ptxas or _ptxas(), "-v", f"--gpu-name=sm_{arch}a", str(ptx), "-o", str(Path(tmp, "k.cubin"))],
                             capture_output=True, text=True)
    report = out.stdout + out.stderr
    used, spill, stack = _PTXAS_USED.search(report), _PTXAS_SPILL.search(report), _PTXAS_STACK.search(report)
    if out.returncode != 0 or not used:
        return record | {"ok": False, "error": f"ptxas: {report.strip()[-2000:]}"}
    record |= {
        "registers": int(used.group(1)),
        "spill_store_bytes": int(spill.group(1)) if spill else 0,
        "spill_load_bytes": int(spill.group(2)) if spill else 0,
        "stack_bytes": int(stack.group(1)) if stack else 0,
        "compile_s": round(time.perf_counter() - start, 2),
        "ok": True,
    }
    return record


def problems_of(record: dict[str, Any], max_spill: int = MAX_SPILL_BYTES) -> list[str]:
    """What is wrong with one compiled variant: a compile error, spills above the bound, or more
    shared memory than a block may have."""
    if not record["ok"]:
        return [record["error"]]
    out = []
    if record["spill_store_bytes"] > max_spill:
        out.append(f"spills {record['spill_store_bytes']} B per thread > {max_spill} B")
    if record["shared_bytes"] > SM90_MAX_SHARED:
        out.append(f"needs {record['shared_bytes']} B of shared memory > {SM90_MAX_SHARED} B")
    return out


def rehearse(out_dir: str | os.PathLike, arch: int = 90, max_spill: int = MAX_SPILL_BYTES,
             log: Callable[[str], None] = print) -> tuple[Path, list[str]]:
    """Compile every launch; write ``out_dir/aot.json``; return (its path, the problems found)."""
    import triton

    plan = launches()
    log(f"aot: {len(plan)} kernel variants for cuda sm_{arch} (triton {triton.__version__})")
    records, problems = [], []
    ptxas = _ptxas()
    for i, launch in enumerate(plan, 1):
        rec = compile_launch(launch, arch, ptxas)
        problems += [f"{launch.kernel} [{launch.config}]: {p}" for p in problems_of(rec, max_spill)]
        records.append(rec)
        regs = rec.get("registers", "-")
        log(f"aot: [{i}/{len(plan)}] {launch.kernel.rsplit('.', 1)[1]} {launch.config}: "
            f"{'ok' if rec['ok'] else 'FAILED'} regs={regs} spill={rec.get('spill_store_bytes', '-')} "
            f"smem={rec.get('shared_bytes', '-')}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "aot.json"
    doc = {"target": f"cuda sm_{arch}", "triton": triton.__version__, "torch": torch.__version__,
           "max_spill_bytes": max_spill, "variants": records, "problems": problems}
    atomic_write_text(path, json.dumps(doc, indent=1) + "\n")
    return path, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for aot.json")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (default 90)")
    p.add_argument("--max-spill", type=int, default=MAX_SPILL_BYTES, help="bytes of spill stores allowed per thread")
    args = p.parse_args(argv)
    path, problems = rehearse(args.out, args.arch, args.max_spill)
    for line in problems:
        print(f"aot: PROBLEM {line}", file=sys.stderr)
    print(f"aot: wrote {path}; {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
