"""RL methods against SFT at equal env-step budgets, over several seeds and testbeds: the table
behind docs/rl-results.md, written to ``bench/results/rl_compare.csv`` with one learning-curve
PNG per testbed beside it (named as the CSV when there is one testbed).

    python -m tools.rl_compare --testbeds reach headroom --seeds 0 1 2 --env-steps 1000000 --jobs 16

Each row is ``vlafast.rl.compare``'s (the seed's SFT policy, each method from it until the budget
is spent, evaluation on the seed's own episodes, gains paired with SFT's); this tool runs them in
parallel processes and writes the rows (atomically) as each run ends, so a cut-short run keeps
what it finished. The demo's RL phase is one of these rows (``vlafast.rl.compare.DEMO``).

``--lr-sweep LR ...`` measures instead what an actor lr does to the PPO step (approx_kl and
clipfrac of the first actor updates) and writes ``bench/results/rl_lr_sweep.csv``: the
methods' actor lrs (``ACTOR_LR``) were chosen from it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import multiprocessing as mp
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlafast._io import atomic_write_text
from vlafast.rl.compare import (COLUMNS, METHODS, RL_METHODS, TESTBEDS, actor_means, episodes_path, history_path,
                                policy_dir, pooled_curve, run_rl, run_sft, train)

SWEEP_COLUMNS = ("method", "testbed", "seed", "actor_lr", "chunks_per_step", "actor_updates", "approx_kl", "clipfrac",
                 "seconds")


def run_sweep(method: str, testbed: str, seed: int, actor_lr: float, updates: int, work: Path, threads: int
              ) -> dict[str, Any]:
    """approx_kl and clipfrac of ``updates`` actor updates at ``actor_lr`` from the seed's SFT
    policy, after one critic-only update (advantages are normalised per rollout, so the step
    size follows the lr more than the critic)."""
    torch.set_num_threads(threads)
    policy, recipe, history, seconds = train(method, seed, work / testbed, 1 + updates, None, actor_lr=actor_lr,
                                             critic_warmup=1)
    return {"method": method, "testbed": testbed, "seed": seed, "actor_lr": actor_lr,
            "chunks_per_step": recipe.num_envs * recipe.rl.chunks_per_rollout, "actor_updates": updates,
            **actor_means(history, recipe.rl.critic_warmup), "seconds": seconds}


def write_csv(rows: list[dict[str, Any]], path: Path, columns=COLUMNS) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    order = list(METHODS)
    for r in sorted(rows, key=lambda r: (r["testbed"], order.index(r["method"]), r.get("actor_lr", 0), r["seed"])):
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in columns})
    atomic_write_text(path, buf.getvalue())


def summary(rows: list[dict[str, Any]]) -> str:
    """Markdown tables, one per testbed: per method, success per seed [Wilson 95%], the gain over
    SFT paired on the same episodes [Newcombe 95%], and the means over seeds."""
    out = []
    for testbed in dict.fromkeys(r["testbed"] for r in rows):
        mine = [r for r in rows if r["testbed"] == testbed]
        seeds = sorted({r["seed"] for r in mine})
        lines = [f"**{testbed}**", "", "| method | env steps | " + " | ".join(f"seed {s}" for s in seeds)
                 + " | mean | mean gain |", "|---|---|" + "---|" * (len(seeds) + 2)]
        for m in [m for m in METHODS if any(r["method"] == m for r in mine)]:
            by_seed = {r["seed"]: r for r in mine if r["method"] == m}
            cells = []
            for s in seeds:
                r = by_seed.get(s)
                if r is None:
                    cells.append("-")
                    continue
                cell = f"{100 * r['success']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
                if m != "sft":
                    cell += f", {100 * r['gain']:+.1f} [{100 * r['gain_low']:+.1f}, {100 * r['gain_high']:+.1f}]"
                cells.append(cell)
            done = list(by_seed.values())
            mean = np.mean([r["success"] for r in done])
            gain = f"{100 * np.mean([r['gain'] for r in done]):+.1f}" if m != "sft" else "-"
            lines.append(f"| {m} | {max(r['env_steps'] for r in done)} | " + " | ".join(cells)
                         + f" | {100 * mean:.1f}% | {gain} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def plot_curves(work: Path, testbed: str, rows: list[dict[str, Any]], path: Path, bins: int = 12) -> Path | None:
    """Learning curves of one testbed: rollout success per update against env steps (thin: each
    seed; thick: every seed's rollouts pooled in ``bins`` env-step windows, weighted by the
    episodes each update finished), SFT's evaluated success as a dashed line, and each method's
    final evaluations (Wilson 95%) at the end of its budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["testbed"] == testbed]
    if not mine:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = dict(zip(RL_METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for m in RL_METHODS:
        xs, ys, ws = [], [], []
        for f in sorted((work / testbed).glob(history_path("", m, "*").name)):
            h = json.loads(f.read_text())
            x = np.cumsum([r["env_steps"] for r in h])
            y = np.array([r["success_rate"] for r in h], dtype=float)
            ax.plot(x, y, color=colours[m], alpha=0.2, lw=0.7)
            xs.append(x)
            ys.append(y)
            ws.append(np.array([r.get("episodes", 1) for r in h], dtype=float))
        if xs:
            ax.plot(*pooled_curve(np.concatenate(xs), np.concatenate(ys), np.concatenate(ws), bins), color=colours[m],
                    lw=2, label=m)
        for r in (r for r in mine if r["method"] == m):
            ax.errorbar([r["env_steps"]], [r["success"]], yerr=[[r["success"] - r["ci_low"]], [r["ci_high"] - r["success"]]],
                        color=colours[m], fmt="o", capsize=3)
    sft = []  # SFT's evaluations of the seeds in the table, read back where this invocation did not run SFT
    for seed in sorted({r["seed"] for r in mine}):
        f = episodes_path(work / testbed, "sft", seed)
        if f.exists():
            sft.append(float(np.mean([e["success"] for e in json.loads(f.read_text())])))
    if sft:
        ax.axhline(float(np.mean(sft)), color="k", ls="--", lw=1, label=f"SFT (evaluated, mean {100 * np.mean(sft):.1f}%)")
    save_success_plot(fig, ax, path, xlabel="env steps (rehearsed steps count)",
                      ylabel="success rate (lines: rollouts; points: evaluation)",
                      title=f"RL from few-shot SFT, testbed {testbed!r}", legend="lower right")
    return path


def save_success_plot(fig, ax, path: Path, *, xlabel: str, ylabel: str, title: str, legend: str) -> None:
    """Label a success-rate-vs-env-steps axes (0..1, grid, legend at ``legend``) and write the
    figure to ``path``."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _star(job: tuple) -> dict[str, Any]:
    fn, args = job
    return fn(*args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.rl_compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--testbeds", nargs="+", choices=list(TESTBEDS), default=["reach"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS),
                   help="sft is run (or read from --work) whenever another method needs it")
    p.add_argument("--env-steps", type=int, default=1_000_000, help="env-step budget of every RL run")
    p.add_argument("--episodes", type=int, default=1024, help="evaluation episodes per policy (the same for all)")
    p.add_argument("--recipe", default="{}", help="partial recipe JSON over every testbed, e.g. "
                   "'{\"env_kwargs\": {\"reward\": \"sparse\"}}'")
    p.add_argument("--lr-sweep", type=float, nargs="+", metavar="LR",
                   help="instead of comparing: approx_kl / clipfrac of PPO methods at these actor lrs")
    p.add_argument("--sweep-updates", type=int, default=2, help="actor updates per --lr-sweep run")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (1: in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", default=None, help="CSV (default bench/results/rl_compare.csv, or rl_lr_sweep.csv)")
    p.add_argument("--work", default="runs/rl_compare", help="SFT policies, per-run episodes and histories")
    args = p.parse_args(argv)
    overrides = json.loads(args.recipe)
    work = Path(args.work)
    sweep = args.lr_sweep is not None
    out = Path(args.out or ("bench/results/rl_lr_sweep.csv" if sweep else "bench/results/rl_compare.csv"))
    rl_methods = [m for m in args.methods if m != "sft"]
    if sweep and not all(m.startswith("ppo_") for m in rl_methods):
        p.error("--lr-sweep measures PPO methods: pass --methods ppo_flow_sde ppo_flow_noise")
    rows: list[dict[str, Any]] = []
    sft_jobs = [(run_sft, (t, s, work / t, args.episodes, overrides, args.threads)) for t in args.testbeds
                for s in args.seeds if "sft" in args.methods or not policy_dir(work / t, "sft", s).exists()]
    if sweep:
        jobs = [(run_sweep, (m, t, s, lr, args.sweep_updates, work, args.threads))
                for t in args.testbeds for m in rl_methods for lr in args.lr_sweep for s in args.seeds]
    else:
        jobs = [(run_rl, (m, t, s, args.env_steps, work / t, args.episodes, args.threads))
                for t in args.testbeds for m in rl_methods for s in args.seeds]
    with contextlib.ExitStack() as stack:
        run = map
        if args.jobs > 1:
            run = stack.enter_context(mp.get_context("spawn").Pool(args.jobs)).imap_unordered
        for row in run(_star, sft_jobs):
            if not sweep:
                rows.append(row)
                write_csv(rows, out)
            print(f"sft {row['testbed']} seed {row['seed']}: {100 * row['success']:.1f}% "
                  f"[{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}] ({row['seconds']:.0f} s)", flush=True)
        for row in run(_star, jobs):
            rows.append(row)
            write_csv(rows, out, SWEEP_COLUMNS if sweep else COLUMNS)
            if sweep:
                print(f"{row['method']} {row['testbed']} seed {row['seed']} lr {row['actor_lr']:g}: approx_kl "
                      f"{row['approx_kl']:.2e} clipfrac {row['clipfrac']:.3f} ({row['seconds']:.0f} s)", flush=True)
            else:
                print(f"{row['method']} {row['testbed']} seed {row['seed']}: {100 * row['success']:.1f}% "
                      f"[{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}], gain {100 * row['gain']:+.1f} "
                      f"[{100 * row['gain_low']:+.1f}, {100 * row['gain_high']:+.1f}] after {row['env_steps']} env "
                      f"steps ({row['seconds']:.0f} s)", flush=True)
    if not sweep:
        for t in args.testbeds:
            plot_curves(work, t, rows, out.with_suffix(".png") if len(args.testbeds) == 1 else
                        out.with_name(f"{out.stem}_{t}.png"))
        print(summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
