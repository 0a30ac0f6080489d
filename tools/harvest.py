"""`vlafast bench import DIR`: file a GPU run's rows where they belong, as one habit in code.

After ``make gpu-check OUT=DIR`` the rows sit in DIR/*.csv, one file per benchmark step. This
merges them into ``bench/results/<device>.csv`` (same key -> the newer row), keeps the run's
``summary.txt`` beside it as ``<device>.gpu-check.txt``, regenerates that device's plots and
rewrites docs/benchmarks.md's numbers table (between the ``bench-table`` markers) from every results
file. Every file is written whole or not at all (write-then-rename).
"""

from __future__ import annotations

import csv
import os
from collections import defaultdict
from pathlib import Path

from vlafast._io import atomic_write_text
from vlafast.bench.core import KEY, device_slug, merge_records, read_rows

BEGIN, END = "<!-- bench-table:begin -->", "<!-- bench-table:end -->"


def _is_bench_csv(path: Path) -> bool:
    with open(path, newline="") as fh:
        header = next(csv.reader(fh), [])
    return set(KEY) <= set(header) and "median_ms" in header


def readme_table(results_dir: str | os.PathLike) -> str:
    """A Markdown table of every benchmark row in ``results_dir``, GPU devices first."""
    rows = []
    for path in sorted(Path(results_dir).glob("*.csv")):
        if _is_bench_csv(path):
            rows += read_rows(path)
    rows.sort(key=lambda r: (r["device"].startswith("CPU"), r["device"], r["bench"], r["op"], r["shape"], r["dtype"]))
    lines = ["| device | bench | op | shape | dtype | backend | ms | baseline | baseline ms | ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["device"], r["bench"], r["op"], r["shape"], r["dtype"], r["backend"], r["median_ms"],
                 r["baseline"], r["baseline_ms"], r["ratio"]]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def update_readme(readme: str | os.PathLike, results_dir: str | os.PathLike) -> bool:
    """Rewrite the table between the markers; False when the document has no markers."""
    readme = Path(readme)
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        return False
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(readme, f"{head}{BEGIN}\n{readme_table(results_dir)}\n{END}{tail}")
    return True


def import_run(run_dir: str | os.PathLike, results_dir: str | os.PathLike = "bench/results",
               readme: str | os.PathLike | None = "docs/benchmarks.md", plots: bool = True) -> list[Path]:
    """File the rows of a gpu-check folder; return the files written."""
    from vlafast.bench.plot import plot_results

    run_dir, results_dir = Path(run_dir), Path(results_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder (expected the OUT of `make gpu-check`)")
    by_device: dict[str, list[dict[str, str]]] = defaultdict(list)
    for path in sorted(run_dir.glob("*.csv")):
        if _is_bench_csv(path):
            for rec in read_rows(path):
                by_device[rec["device"]].append(rec)
    if not by_device:
        raise ValueError(f"{run_dir} holds no benchmark rows (no *.csv with the bench schema)")
    results_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for device, records in sorted(by_device.items()):
        target = merge_records(records, results_dir / f"{device_slug(device)}.csv", newer_only=True)
        written.append(target)
        summary = run_dir / "summary.txt"
        if summary.exists():
            copy = results_dir / f"{device_slug(device)}.gpu-check.txt"
            atomic_write_text(copy, summary.read_text())
            written.append(copy)
        if plots:
            written += plot_results(target, results_dir / "plots")
    if readme is not None and Path(readme).exists() and update_readme(readme, results_dir):
        written.append(Path(readme))
    return written
