"""The one benchmark schema, timing, device facts and the results writer.

Every row has: when and where it ran (timestamp, commit, device), what ran (bench, op, shape,
dtype, backend), our time and the baseline's measured in the same run (median_ms, baseline,
baseline_ms, ratio = median_ms / baseline_ms, so < 1 means we are faster), and where it
applies the achieved rate against the device's peak (achieved, unit, peak, pct_peak).
``extra`` is a JSON object for bench-specific numbers (percentiles, counts).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import functools
import io
import json
import math
import os
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from vlafast._io import atomic_write_text

COLUMNS = (
    "timestamp", "commit", "device", "bench", "op", "shape", "dtype", "backend",
    "median_ms", "baseline", "baseline_ms", "ratio",
    "achieved", "unit", "peak", "pct_peak", "extra",
)
# A row is identified by these; a new run replaces the old row with the same key.
KEY = ("device", "bench", "op", "shape", "dtype", "backend", "baseline")


@dataclasses.dataclass
class Row:
    bench: str
    op: str
    shape: str
    dtype: str
    backend: str
    median_ms: float
    baseline: str = ""
    baseline_ms: float | None = None
    achieved: float | None = None
    unit: str = ""
    peak: float | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    device: str = ""
    commit: str = ""
    timestamp: str = ""

    @property
    def ratio(self) -> float | None:
        if self.baseline_ms is None or self.baseline_ms <= 0:
            return None
        return self.median_ms / self.baseline_ms

    @property
    def pct_peak(self) -> float | None:
        if self.achieved is None or not self.peak:
            return None
        return 100.0 * self.achieved / self.peak

    def as_record(self) -> dict[str, str]:
        def num(x: float | None) -> str:
            return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.6g}"

        scale = time_scale()
        extra = self.extra | {"time_scale": scale} if scale != 1 else self.extra

        return {
            "timestamp": self.timestamp or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "commit": self.commit or git_commit(),
            "device": self.device or device_name(),
            "bench": self.bench, "op": self.op, "shape": self.shape, "dtype": self.dtype,
            "backend": self.backend,
            "median_ms": num(self.median_ms), "baseline": self.baseline,
            "baseline_ms": num(self.baseline_ms), "ratio": num(self.ratio),
            "achieved": num(self.achieved), "unit": self.unit, "peak": num(self.peak),
            "pct_peak": num(self.pct_peak),
            "extra": json.dumps(extra, sort_keys=True) if extra else "",
        }


# ---------------------------------------------------------------------------------------------
# device facts

# Dense spec peaks (TFLOP/s for bf16/fp16 tensor cores, fp32 without tensor cores; TB/s HBM).
# Measured on the lent machines: ~790-800 TFLOP/s bf16 on 8192^3 GEMMs, 3.0 TB/s (H100),
# 4.3 TB/s (H200) device-to-device.
_PEAKS: dict[str, dict[str, float]] = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9, "tbps": 4.8},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2, "tbps": 2.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9, "tbps": 3.35},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5, "tbps": 2.0},
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "fp32": 82.6, "tbps": 1.0},
}


@functools.lru_cache(maxsize=None)
def device_name() -> str:
    """Human-readable name of the device benchmarks run on (GPU 0, else the CPU model)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {model or 'unknown'} x{os.cpu_count()}"


def device_slug(name: str | None = None) -> str:
    """File-name form of a device name: 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    slug = re.sub(r"[^a-z0-9]+", "-", (name or device_name()).lower()).strip("-")
    return slug[:80] or "unknown"


def peak(kind: str, name: str | None = None) -> float | None:
    """Spec peak for ``kind`` in {'bf16','fp16','fp32','tbps'} on this device, None if unknown."""
    name = name or device_name()
    for key, peaks in _PEAKS.items():  # ordered: more specific names first where they overlap
        if key in name:
            return peaks.get(kind)
    return None


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        if out.returncode == 0:
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from vlafast import __version__

    return f"v{__version__}"


# ---------------------------------------------------------------------------------------------
# timing


def time_scale() -> float:
    """The factor in (0, 1] from ``VLAFAST_BENCH_TIME_SCALE`` (default 1: full repetitions)."""
    raw = os.environ.get("VLAFAST_BENCH_TIME_SCALE", "1")
    try:
        scale = float(raw)
    except ValueError:
        raise ValueError(f"VLAFAST_BENCH_TIME_SCALE must be a number in (0, 1], got {raw!r}") from None
    if not 0 < scale <= 1:
        raise ValueError(f"VLAFAST_BENCH_TIME_SCALE must be in (0, 1], got {scale}")
    return scale


def time_ms(
    fn: Callable[[], Any],
    *,
    device: torch.device | str | None = None,
    warmup: int = 3,
    iters: int | None = None,
    min_time_s: float = 0.5,
    max_iters: int = 1000,
) -> float:
    """Median wall time of ``fn()`` in ms: CUDA events on a GPU, perf_counter_ns on the CPU.

    With ``iters=None`` the count adapts so the timed part lasts about ``min_time_s``.
    ``VLAFAST_BENCH_TIME_SCALE`` (``time_scale()``) shrinks the timing window and the iteration
    cap for budgeted runs (``make gpu-check``); such rows say so in ``extra``.
    """
    scale = time_scale()
    min_time_s, max_iters = min_time_s * scale, max(5, int(max_iters * scale))
    device = torch.device(device) if device is not None else torch.device("cpu")
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    if iters is None:
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        once = max(time.perf_counter() - start, 1e-6)
        iters = int(min(max_iters, max(5, min_time_s / once)))
    samples: list[float] = []
    if cuda:
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        samples = [b.elapsed_time(e) for b, e in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter_ns()
            fn()
            samples.append((time.perf_counter_ns() - t0) / 1e6)
    return statistics.median(samples)


# ---------------------------------------------------------------------------------------------
# results files


@torch.no_grad()
def random_decoder(cls, tiny_cfg, published_cfg, device: torch.device, *,
                   ones: tuple[str, ...] = ()) -> tuple[Any, str, str]:
    """(model, dtype, config) of a decoder benchmark: off CUDA ``cls(tiny_cfg)`` in fp32 (seed 0);
    on CUDA ``cls(published_cfg)`` in bf16, built on the meta device and materialised straight on
    the GPU (no fp32 copy ever exists) with random weights kept finite and O(1), for timing only:
    matrices N(0, 1 / fan_in), 1-D tensors 0 except those whose name holds one of ``ones`` (1:
    norm gains that scale by w, not 1 + w)."""
    if device.type != "cuda":
        torch.manual_seed(0)
        return cls(tiny_cfg).eval(), "fp32", "tiny"
    with torch.device("meta"):
        model = cls(published_cfg).to(torch.bfloat16)
    model = model.to_empty(device=device).eval()
    random_weights_(model, ones, torch.Generator(device=device).manual_seed(0))
    return model, "bf16", "real"


@torch.no_grad()
def random_weights_(model: torch.nn.Module, ones: tuple[str, ...], generator: torch.Generator) -> None:
    """``random_decoder``'s weights, in place: matrices N(0, 1 / fan_in), 1-D tensors 0 except
    those whose name holds one of ``ones`` (1)."""
    for name, p in model.named_parameters():
        if p.ndim == 1:
            p.fill_(1.0 if any(o in name for o in ones) else 0.0)
        else:
            p.normal_(0.0, 1.0 / max(p[0].numel(), 1) ** 0.5, generator=generator)


def decoder_rows(bench: str, *, op: str, shape: str, step_shape: str, dtype: str, times: dict[str, float],
                 unit: str, extra: dict[str, Any], step_bytes: int, config: str, cuda: bool,
                 graph_backend: str = "graph-decode") -> list[Row]:
    """The rows of an autoregressive decoder's benchmark (OpenVLA, pi0-FAST): ``op`` per call
    for ``times["eager"]`` and ``times["graph-decode"]`` (as ``graph_backend``, against eager,
    ``unit`` = calls/s), and one decode step for ``times["step-eager"]`` / ``["step-graph"]``
    against the bandwidth floor (``step_bytes`` read per step, TB/s vs the device's peak).
    Missing keys give no row."""
    rows = []
    for key, backend in (("eager", "eager"), ("graph-decode", graph_backend)):
        if key in times:
            base = key != "eager"
            rows.append(Row(
                bench=bench, op=op, shape=shape, dtype=dtype, backend=backend, median_ms=times[key],
                baseline="eager" if base else "", baseline_ms=times["eager"] if base else None,
                achieved=1e3 / times[key], unit=unit, extra=extra,
            ))
    tbps = peak("tbps") if cuda else None
    for key, backend in (("step-eager", "eager"), ("step-graph", "graph-decode")):
        if key in times:
            base = key != "step-eager"
            rows.append(Row(
                bench=bench, op="decode_step", shape=step_shape, dtype=dtype, backend=backend, median_ms=times[key],
                baseline="eager" if base else "", baseline_ms=times["step-eager"] if base else None,
                achieved=step_bytes / (times[key] * 1e-3) / 1e12, unit="TB/s", peak=tbps,
                extra={"config": config, "weight_gb": round(step_bytes / 1e9, 3)},
            ))
    return rows


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(rows: Iterable[Row], path: str | os.PathLike) -> Path:
    """Merge ``rows`` into the CSV at ``path`` (same key -> replaced), written atomically."""
    return merge_records([row.as_record() for row in rows], path)


def merge_records(records: Iterable[dict[str, str]], path: str | os.PathLike, *, newer_only: bool = False) -> Path:
    """Merge CSV records into ``path`` by KEY, written atomically. A record replaces the one
    with its key, or with ``newer_only`` only if its timestamp is not older (filing rows of a
    past run must not undo a later one)."""
    path = Path(path)
    merged = {tuple(r.get(k, "") for k in KEY): r for r in read_rows(path)}
    for rec in records:
        key = tuple(rec.get(k, "") for k in KEY)
        old = merged.get(key)
        if old is None or not newer_only or rec.get("timestamp", "") >= old.get("timestamp", ""):
            merged[key] = rec
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for rec in sorted(merged.values(), key=lambda r: tuple(r.get(k, "") for k in KEY)):
        writer.writerow({c: rec.get(c, "") for c in COLUMNS})
    atomic_write_text(path, buf.getvalue())
    return path


def default_results_path(results_dir: str | os.PathLike = "bench/results") -> Path:
    return Path(results_dir) / f"{device_slug()}.csv"


def format_table(rows: list[Row]) -> str:
    """A compact fixed-width table of rows for people."""
    head = ("bench", "op", "shape", "dtype", "backend", "median_ms", "baseline_ms", "ratio", "achieved")
    lines = [head]
    for r in rows:
        rec = r.as_record()
        ach = f"{rec['achieved']} {r.unit}".strip()
        lines.append((r.bench, r.op, r.shape, r.dtype, r.backend, rec["median_ms"], rec["baseline_ms"], rec["ratio"], ach))
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)
