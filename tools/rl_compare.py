"""RL methods against SFT at equal env-step budgets, over several seeds: the table behind the
README's RL section, written to ``bench/results/rl_compare.csv``.

    python -m tools.rl_compare --seeds 0 1 2 --env-steps 200000 --jobs 2

Per seed: the recipe's few-shot SFT policy (the same one for every method), then each RL
method from it until the env-step budget is spent (rehearsed steps count: GRPO over states
pays for its counterfactual chunks), then evaluation on the same fixed episodes with ODE
sampling. Success comes with a 95% Wilson interval. Rows are written (atomically) as each run
ends, so a cut-short run keeps what it finished.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import math
import multiprocessing as mp
import time
from pathlib import Path
from typing import Any

import torch

from vlafast.eval import evaluate
from vlafast._io import atomic_write_text
from vlafast.eval import wilson_interval
from vlafast.rl.losses import PPOConfig
from vlafast.rl.sampler_spec import FlowNoise, FlowSDE
from vlafast.rl.train import RLConfig

COLUMNS = ("method", "seed", "env_steps", "success", "ci_low", "ci_high", "episodes", "updates", "seconds")

# PPO in RLinf's regime, scaled to the tiny policy: 32 envs x 16 chunks = 512 chunks per rollout,
# 4 epochs of 2 optimiser steps (256 chunks each, accumulated over micro-batches of 128),
# early stop at approx_kl 0.05, actor lr 1e-5 (the top of RLinf's 5e-6..1e-5 band), 3 critic-only
# warm-up updates, no BC anchor (the paper's PPO).
_PPO = dict(algo="ppo", chunks_per_rollout=16, critic_warmup=3, bc_coef=0.0,
            ppo=PPOConfig(actor_lr=1e-5, critic_lr=1e-3, minibatch=256, micro_batch=128, epochs=4, target_kl=0.05))
METHODS: dict[str, dict[str, Any]] = {
    "ppo_flow_sde": dict(num_envs=32, rl=dict(_PPO, sampler=FlowSDE())),
    "ppo_flow_noise": dict(num_envs=32, rl=dict(_PPO, sampler=FlowNoise())),
    # The demo's GRPO over states, horizon-correct (r + gamma V(end state)); needs a simulator.
    "grpo_states_sim_only": dict(num_envs=16, rl=dict(algo="grpo", grpo_groups="state", rehearsal_bootstrap=True,
                                                      critic_warmup=3)),
}


def steps_per_update(recipe) -> int:
    """Env steps one update spends (upper bound: episodes ending inside a chunk spend fewer)."""
    rl = recipe.rl
    per_chunk = recipe.exec_horizon * (rl.group_size + 1 if rl.algo == "grpo" and rl.grpo_groups == "state" else 1)
    return recipe.num_envs * rl.chunks_per_rollout * per_chunk


def method_recipe(base, method: str):
    """The base recipe with a method's env count and RL settings."""
    spec = METHODS[method]
    rl = dataclasses.replace(base.rl, **spec["rl"])
    return dataclasses.replace(base, num_envs=spec["num_envs"], rl=rl)


def _evaluate(policy, recipe, episodes: int) -> dict[str, Any]:
    from vlafast.rl import train as T
    from vlafast.rl.recipe import build_env

    env = build_env(recipe, num_envs=16)  # the same fixed episodes for every method
    try:
        ev = evaluate(policy, env, episodes=episodes, seed=recipe.seed + 100, num_steps=recipe.rl.sampler.num_steps,
                        progress=False)
    finally:
        env.close()
    k = sum(r["success"] for r in ev["records"])
    lo, hi = wilson_interval(k, ev["episodes"])
    return {"success": ev["success_rate"], "ci_low": lo, "ci_high": hi, "episodes": ev["episodes"]}


def _sft(seed: int, out: Path, episodes: int) -> dict[str, Any]:
    from vlafast.rl import train as T
    from vlafast.rl.recipe import Recipe, build_env, build_policy, collect_recipe_demos, save_policy

    torch.set_num_threads(1)
    recipe = Recipe(seed=seed)
    env = build_env(recipe)
    policy = build_policy(recipe, env.spec)
    t0 = time.perf_counter()
    demos = collect_recipe_demos(recipe, env, progress=False)
    T.sft(policy, demos, steps=recipe.sft_steps, batch_size=recipe.sft_batch, lr=recipe.sft_lr, seed=seed,
          progress=False)
    env.close()
    save_policy(policy, recipe, out / f"sft_seed{seed}.pt")
    return {"method": "sft", "seed": seed, "env_steps": 0, "updates": 0, **_evaluate(policy, recipe, episodes),
            "seconds": time.perf_counter() - t0}


def _rl(method: str, seed: int, budget: int, out: Path, episodes: int) -> dict[str, Any]:
    from vlafast.rl import train as T
    from vlafast.rl.recipe import build_env, collect_recipe_demos, ensure_noise_head, load_policy

    torch.set_num_threads(1)
    policy, base, _ = load_policy(out / f"sft_seed{seed}.pt")
    recipe = method_recipe(base, method)
    recipe = dataclasses.replace(recipe, rl=dataclasses.replace(
        recipe.rl, iterations=math.ceil(budget / steps_per_update(recipe))))
    torch.manual_seed(seed)  # the Flow-Noise head's initialisation
    ensure_noise_head(policy, recipe)
    env = build_env(recipe)
    t0 = time.perf_counter()
    demos = collect_recipe_demos(recipe, env, progress=False) if recipe.rl.bc_coef > 0 else None
    history = T.train_rl(policy, env, recipe.rl, seed=seed + 7, progress=False, demos=demos)
    env.close()
    steps = int(sum(h["env_steps"] for h in history))
    row = {"method": method, "seed": seed, "env_steps": steps, "updates": len(history),
           **_evaluate(policy, recipe, episodes), "seconds": time.perf_counter() - t0}
    health = {k: [h[k] for h in history if k in h] for k in ("grad_cosine", "approx_kl", "clipfrac", "explained_variance")}
    atomic_write_text(out / f"{method}_seed{seed}.txt", repr(health))
    return row


def _write(rows: list[dict[str, Any]], path: Path) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    for r in sorted(rows, key=lambda r: (r["method"] != "sft", r["method"], r["seed"])):
        w.writerow({k: (f"{r[k]:.4f}" if isinstance(r[k], float) else r[k]) for k in COLUMNS})
    atomic_write_text(path, buf.getvalue())


def summary(rows: list[dict[str, Any]]) -> str:
    """A markdown table: per method, success per seed (Wilson 95%) and the mean over seeds."""
    lines = ["| method | env steps | " + " | ".join(f"seed {s}" for s in sorted({r['seed'] for r in rows})) + " | mean |",
             "|---|---|" + "---|" * (len({r['seed'] for r in rows}) + 1)]
    for m in dict.fromkeys(r["method"] for r in rows):
        mine = sorted((r for r in rows if r["method"] == m), key=lambda r: r["seed"])
        cells = [f"{100 * r['success']:.1f}% [{100 * r['ci_low']:.0f}, {100 * r['ci_high']:.0f}]" for r in mine]
        mean = sum(r["success"] for r in mine) / len(mine)
        steps = max(r["env_steps"] for r in mine)
        lines.append(f"| {m} | {steps} | " + " | ".join(cells) + f" | {100 * mean:.1f}% |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.rl_compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--env-steps", type=int, default=200_000, help="env-step budget of every RL run")
    p.add_argument("--episodes", type=int, default=256, help="fixed evaluation episodes per policy")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    p.add_argument("--out", default="bench/results/rl_compare.csv")
    p.add_argument("--work", default="runs/rl_compare", help="SFT policies and per-run health logs")
    args = p.parse_args(argv)
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.jobs) as pool:
        for row in pool.starmap(_sft, [(s, work, args.episodes) for s in args.seeds]):
            rows.append(row)
            _write(rows, out)
        jobs = [(m, s, args.env_steps, work, args.episodes) for m in args.methods for s in args.seeds]
        for row in pool.imap_unordered(_star_rl, jobs):
            rows.append(row)
            _write(rows, out)
            print(f"{row['method']:22s} seed {row['seed']}: {100 * row['success']:.1f}% "
                  f"[{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}] after {row['env_steps']} env steps "
                  f"({row['seconds']:.0f} s)", flush=True)
    print(summary(rows))
    return 0


def _star_rl(job: tuple) -> dict[str, Any]:
    return _rl(*job)


if __name__ == "__main__":
    raise SystemExit(main())
