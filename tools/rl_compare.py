"""RL methods against SFT at equal env-step budgets, over several seeds and testbeds: the table
behind docs/rl-results.md, written to ``bench/results/rl_compare.csv`` with one learning-curve
PNG per testbed beside it.

    python -m tools.rl_compare --testbeds reach headroom --seeds 0 1 2 --env-steps 1000000 --jobs 16

Per testbed and seed: the recipe's few-shot SFT policy (the same one for every method), then
each RL method from it until the env-step budget is spent (rehearsed steps count: GRPO over
states pays for its counterfactual chunks), then ODE evaluation on ``--episodes`` fixed
episodes. Every seed draws its demonstrations, training and evaluation episodes from its own
streams (``vlafast.eval.seed_streams``): no episode is shared between seeds, and evaluation
never sees a training or demonstration episode. Each success rate comes with its Wilson 95%
interval, each method's gain over SFT is paired on the same episodes with Newcombe's 95%
interval (``vlafast.eval.paired_difference``). Rows are written (atomically) as each run ends,
so a cut-short run keeps what it finished.

``--lr-sweep LR ...`` measures instead what an actor lr does to the PPO step (approx_kl and
clipfrac of the first actor updates) and writes ``bench/results/rl_lr_sweep.csv``: the
methods' actor lrs (``ACTOR_LR``) were chosen from it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import math
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlafast._io import atomic_write_text
from vlafast.eval import evaluate, paired_difference, seed_streams, wilson_interval
from vlafast.rl.losses import PPOConfig
from vlafast.rl.sampler_spec import FlowNoise, FlowSDE

# Testbeds: partial recipe JSON over the default recipe (the demo's: 7 cm reach radius, 24
# scripted demonstrations, shaped reward).
TESTBEDS: dict[str, dict[str, Any]] = {
    "reach": {},
    # a 5 cm radius: few-shot SFT at 41.0 / 47.1 / 51.3% for seeds 0 / 1 / 2 (1024 episodes
    # each; "reach": 69.9 / 66.6 / 72.3%, bench/results/rl_sft_levels.csv), where pi_RL's
    # LIBERO (57.6%) and ManiSkill (41.6%) runs start
    "headroom": {"reach_radius": 0.05},
}

# Actor lr per sampler for the tiny pi0 (0.24 M parameters), chosen by the sweep in
# bench/results/rl_lr_sweep.csv (``--lr-sweep``; seed 0, 2048 chunks per optimiser step, the
# first two actor updates) for approx_kl 5e-3..1e-2: 1e-4 gives 8.2e-3 (Flow-SDE) and 6.4e-3
# (Flow-Noise), 3e-5 gives 2.1e-3 / 1.1e-3, 3e-4 gives 6.2e-2 / 2.1e-2. RLinf uses 5e-6..1e-5
# for the 3B pi0 / pi0.5.
ACTOR_LR = {"flow_sde": 1e-4, "flow_noise": 1e-4}

# PPO in RLinf's regime, scaled to the tiny policy: 64 envs x 32 chunks = 2048 chunks per
# rollout and per optimiser step (the whole rollout, accumulated over micro-batches of 128),
# 4 epochs stopped early at approx_kl 0.05, time-outs terminal, 3 critic-only warm-up updates,
# no BC anchor (the paper's PPO).
_PPO = dict(algo="ppo", chunks_per_rollout=32, critic_warmup=3, bc_coef=0.0, timeouts="terminal")


def _ppo(sampler) -> dict[str, Any]:
    return dict(_PPO, sampler=sampler, ppo=PPOConfig(actor_lr=ACTOR_LR[sampler.kind], critic_lr=1e-3, minibatch=None,
                                                     micro_batch=128, epochs=4, target_kl=0.05))


METHODS: dict[str, dict[str, Any] | None] = {
    "sft": None,
    "ppo_flow_sde": dict(num_envs=64, rl=_ppo(FlowSDE())),
    "ppo_flow_noise": dict(num_envs=64, rl=_ppo(FlowNoise())),
    # GRPO over whole episodes: 256 envs in groups of 8 sharing a seed, one episode each (~2500
    # chunks per update), Flow-SDE, no critic.
    "grpo": dict(num_envs=256, rl=dict(algo="grpo", grpo_groups="episode", group_size=8, bc_coef=0.0, critic_warmup=0,
                                       chunks_per_rollout=1, sampler=FlowSDE(),
                                       ppo=PPOConfig(actor_lr=ACTOR_LR["flow_sde"], minibatch=None, micro_batch=128,
                                                     epochs=4, target_kl=0.05))),
    # The demo's RL phase as it is (Recipe().rl): GRPO over states, myopic score, BC anchor.
    "grpo_states": dict(num_envs=16, rl={}),
}
RL_METHODS = [m for m, spec in METHODS.items() if spec is not None]

COLUMNS = ("method", "testbed", "seed", "env_steps", "updates", "episodes", "success", "ci_low", "ci_high",
           "gain", "gain_low", "gain_high", "approx_kl", "clipfrac", "seconds")
SWEEP_COLUMNS = ("method", "testbed", "seed", "actor_lr", "chunks_per_step", "actor_updates", "approx_kl", "clipfrac",
                 "seconds")
EVAL_ENVS = 16  # evaluation env count: the episodes are (env, index) pairs, the same for every method


def base_recipe(testbed: str, seed: int, overrides: dict[str, Any] | None = None):
    """The default recipe with a testbed's settings, then ``overrides`` (partial recipe JSON)."""
    from vlafast.rl.recipe import Recipe, merge

    return Recipe.from_json({**merge(TESTBEDS[testbed], overrides or {}), "seed": seed})


def method_recipe(base, method: str):
    """The base recipe with a method's env count and RL settings."""
    spec = METHODS[method]
    if spec is None:
        return base
    return dataclasses.replace(base, num_envs=spec["num_envs"], rl=dataclasses.replace(base.rl, **spec["rl"]))


def steps_per_update(recipe, episode_length: float) -> int:
    """Env steps one update spends (upper bound: episodes ending inside a chunk spend fewer).
    Episode-group GRPO runs one episode per env: ``episode_length`` (the SFT policy's mean)
    each, so a policy that gets faster spends less than its budget (the CSV has what it spent)."""
    rl = recipe.rl
    if rl.algo == "grpo" and rl.grpo_groups == "episode":
        return math.ceil(recipe.num_envs * episode_length)
    per_chunk = recipe.exec_horizon * (rl.group_size + 1 if rl.algo == "grpo" and rl.grpo_groups == "state" else 1)
    return recipe.num_envs * rl.chunks_per_rollout * per_chunk


def _run_dir(work: Path, testbed: str) -> Path:
    return work / testbed


def _evaluate(policy, recipe, episodes: int) -> dict[str, Any]:
    """ODE evaluation on the seed's evaluation stream -> success with its Wilson interval and the records."""
    from vlafast.rl.recipe import build_env

    streams = seed_streams(recipe.seed)
    env = build_env(recipe, num_envs=EVAL_ENVS, seed=streams.eval)
    try:
        ev = evaluate(policy, env, episodes=episodes, seed=streams.eval, num_steps=recipe.rl.sampler.num_steps,
                      progress=False)
    finally:
        env.close()
    k = sum(r["success"] for r in ev["records"])
    lo, hi = wilson_interval(k, ev["episodes"])
    return {"success": ev["success_rate"], "ci_low": lo, "ci_high": hi, "episodes": ev["episodes"],
            "records": ev["records"]}


def _demos(recipe, env):
    from vlafast.rl import train as T

    return T.collect_demos(env, recipe.demos, recipe.horizon, recipe.exec_horizon, seed=seed_streams(recipe.seed).demos,
                           progress=False)


def run_sft(testbed: str, seed: int, work: Path, episodes: int, overrides: dict[str, Any], threads: int
            ) -> dict[str, Any]:
    """The seed's few-shot SFT policy (saved for the RL runs) and its evaluation."""
    from vlafast.rl import train as T
    from vlafast.rl.recipe import build_env, build_policy, save_policy

    torch.set_num_threads(threads)
    recipe = base_recipe(testbed, seed, overrides)
    env = build_env(recipe)
    policy = build_policy(recipe, env.spec)
    t0 = time.perf_counter()
    demos = _demos(recipe, env)
    T.sft(policy, demos, steps=recipe.sft_steps, batch_size=recipe.sft_batch, lr=recipe.sft_lr, seed=seed,
          progress=False)
    env.close()
    folder = _run_dir(work, testbed)
    save_policy(policy, recipe, folder / f"sft_seed{seed}")
    ev = _evaluate(policy, recipe, episodes)
    atomic_write_text(folder / f"sft_seed{seed}.episodes.json", json.dumps(ev.pop("records")))
    return {"method": "sft", "testbed": testbed, "seed": seed, "env_steps": 0, "updates": 0, **ev,
            "seconds": time.perf_counter() - t0}


def _train(method: str, testbed: str, seed: int, work: Path, iterations: int | None, budget: int | None,
           actor_lr: float | None = None, critic_warmup: int | None = None):
    """(policy, recipe, history, seconds): ``method`` from the seed's SFT policy, for ``iterations``
    updates or as many as ``budget`` env steps pay for (``actor_lr``, ``critic_warmup``: instead
    of the method's)."""
    from vlafast.rl import train as T
    from vlafast.rl.recipe import build_env, ensure_noise_head, load_policy

    policy, base, _ = load_policy(_run_dir(work, testbed) / f"sft_seed{seed}")
    recipe = method_recipe(base, method)
    if actor_lr is not None:
        recipe = dataclasses.replace(recipe, rl=dataclasses.replace(
            recipe.rl, ppo=dataclasses.replace(recipe.rl.ppo, actor_lr=actor_lr)))
    if critic_warmup is not None:
        recipe = dataclasses.replace(recipe, rl=dataclasses.replace(recipe.rl, critic_warmup=critic_warmup))
    if iterations is None:
        sft = json.loads((_run_dir(work, testbed) / f"sft_seed{seed}.episodes.json").read_text())
        iterations = math.ceil(budget / steps_per_update(recipe, float(np.mean([r["length"] for r in sft]))))
    recipe = dataclasses.replace(recipe, rl=dataclasses.replace(recipe.rl, iterations=iterations))
    torch.manual_seed(seed)  # the Flow-Noise head's initialisation
    ensure_noise_head(policy, recipe)
    streams = seed_streams(seed)
    env = build_env(recipe, seed=streams.train)
    t0 = time.perf_counter()
    demos = _demos(recipe, env) if recipe.rl.bc_coef > 0 else None
    history = T.train_rl(policy, env, recipe.rl, seed=streams.train, progress=False, demos=demos)
    env.close()
    return policy, recipe, history, time.perf_counter() - t0


def actor_means(history: list[dict[str, float]], warmup: int) -> dict[str, float]:
    """Mean approx_kl and clipfrac over the updates that trained the actor (after the critic's warm-up)."""
    rows = history[warmup:]
    return {k: float(np.mean([h[k] for h in rows])) if rows else math.nan for k in ("approx_kl", "clipfrac")}


def run_rl(method: str, testbed: str, seed: int, budget: int, work: Path, episodes: int, threads: int
           ) -> dict[str, Any]:
    """One RL run from the seed's SFT policy, its evaluation, and its gain over SFT paired on the same episodes."""
    torch.set_num_threads(threads)
    policy, recipe, history, seconds = _train(method, testbed, seed, work, None, budget)
    ev = _evaluate(policy, recipe, episodes)
    records = ev.pop("records")
    folder = _run_dir(work, testbed)
    sft_records = json.loads((folder / f"sft_seed{seed}.episodes.json").read_text())
    gain = paired_difference(records, sft_records)
    atomic_write_text(folder / f"{method}_seed{seed}.episodes.json", json.dumps(records))
    atomic_write_text(folder / f"{method}_seed{seed}.history.json", json.dumps(history))
    return {"method": method, "testbed": testbed, "seed": seed, "env_steps": int(sum(h["env_steps"] for h in history)),
            "updates": len(history), **ev, "gain": gain["difference"], "gain_low": gain["ci95"][0],
            "gain_high": gain["ci95"][1], **actor_means(history, recipe.rl.critic_warmup), "seconds": seconds}


def run_sweep(method: str, testbed: str, seed: int, actor_lr: float, updates: int, work: Path, threads: int
              ) -> dict[str, Any]:
    """approx_kl and clipfrac of ``updates`` actor updates at ``actor_lr`` from the seed's SFT
    policy, after one critic-only update (advantages are normalised per rollout, so the step
    size follows the lr more than the critic)."""
    torch.set_num_threads(threads)
    policy, recipe, history, seconds = _train(method, testbed, seed, work, 1 + updates, None, actor_lr=actor_lr,
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
        w.writerow({k: (f"{r[k]:.4g}" if isinstance(r.get(k), float) else r.get(k, "")) for k in columns})
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


def plot_curves(work: Path, testbed: str, rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Learning curves of one testbed: rollout success per update against env steps (thin: each
    seed; thick: the mean over seeds), SFT's evaluated success as a dashed line, and each
    method's final evaluations (Wilson 95%) at the end of its budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["testbed"] == testbed]
    if not mine:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = dict(zip(RL_METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for m in RL_METHODS:
        curves = []
        for f in sorted((work / testbed).glob(f"{m}_seed*.history.json")):
            h = json.loads(f.read_text())
            x = np.cumsum([r["env_steps"] for r in h])
            y = np.array([r["success_rate"] for r in h], dtype=float)
            ax.plot(x, y, color=colours[m], alpha=0.25, lw=0.8)
            curves.append((x, y))
        if curves:
            n = min(len(c[0]) for c in curves)
            ax.plot(np.mean([c[0][:n] for c in curves], 0), np.nanmean([c[1][:n] for c in curves], 0),
                    color=colours[m], lw=2, label=m)
        for r in (r for r in mine if r["method"] == m):
            ax.errorbar([r["env_steps"]], [r["success"]], yerr=[[r["success"] - r["ci_low"]], [r["ci_high"] - r["success"]]],
                        color=colours[m], fmt="o", capsize=3)
    sft = []  # SFT's evaluations of the seeds in the table, read back where this invocation did not run SFT
    for seed in sorted({r["seed"] for r in mine}):
        f = work / testbed / f"sft_seed{seed}.episodes.json"
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
    sft_jobs = [(run_sft, (t, s, work, args.episodes, overrides, args.threads)) for t in args.testbeds for s in args.seeds
                if "sft" in args.methods or not (work / t / f"sft_seed{s}").exists()]
    if sweep:
        jobs = [(run_sweep, (m, t, s, lr, args.sweep_updates, work, args.threads))
                for t in args.testbeds for m in rl_methods for lr in args.lr_sweep for s in args.seeds]
    else:
        jobs = [(run_rl, (m, t, s, args.env_steps, work, args.episodes, args.threads))
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
            plot_curves(work, t, rows, out.with_name(f"{out.stem}_{t}.png"))
        print(summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
