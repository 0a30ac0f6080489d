"""Turn a results CSV into PNGs: per benchmark, ours vs baseline time for each row."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from vlafast.bench.core import read_rows


def _f(x: str) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def plot_results(csv_path: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write one PNG per (device, bench) found in ``csv_path``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(csv_path)
    if not rows:
        raise ValueError(f"{csv_path} holds no benchmark rows")
    groups: dict[tuple[str, str], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        groups[(r["device"], r["bench"])].append(r)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (device, bench), group in sorted(groups.items()):
        labels = [f"{r['op']}\n{r['shape']}\n{r['dtype']} {r['backend']}" for r in group]
        ours = [_f(r["median_ms"]) or 0.0 for r in group]
        base = [_f(r["baseline_ms"]) for r in group]
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(group)), 4.5))
        xs = range(len(group))
        width = 0.4
        ax.bar([x - width / 2 for x in xs], ours, width, label="vlafast")
        ax.bar([x + width / 2 for x in xs], [b or 0.0 for b in base], width, label="baseline")
        for x, r in zip(xs, group):
            if r.get("ratio"):
                ax.annotate(f"x{float(r['ratio']):.2f}", (x, max(ours[x], 1e-9)), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=7)
        ax.set_ylabel("median ms (lower is better)")
        values = ours + [b for b in base if b is not None]
        if values and min(values) > 0 and max(values) / min(values) > 50:
            ax.set_yscale("log")
        ax.set_title(f"{bench} on {device}  (label: time ratio ours/baseline)")
        ax.legend()
        fig.tight_layout()
        path = out / f"{Path(csv_path).stem}__{bench}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
