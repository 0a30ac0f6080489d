"""The jobs behind `vlafast train` / `vlafast eval` and the demo: SFT, RL and evaluation runs
that write their results into a run folder (policy.pt, metrics.json, summary.json)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from vlafast.eval import evaluate, speed_by_word
from vlafast.policies import FlowPolicy
from vlafast._io import atomic_write_text
from vlafast.rl import train as T
from vlafast.rl.dist import DistConfig, LearnerGroup, RayCollector
from vlafast.rl.recipe import (
    Recipe, build_env, build_policy, collect_recipe_demos, dump, ensure_noise_head, env_slice, load_policy,
    save_policy,
)


def summarise_eval(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: ev[k] for k in ("episodes", "success_rate", "success_ci95", "return")} | {"speed": speed_by_word(ev["records"])}


def run_sft(recipe: Recipe, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Scripted demos -> SFT -> evaluation; writes out/policy.pt and out/summary.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.json", dump(recipe))
    env = build_env(recipe)
    policy = build_policy(recipe, env.spec)
    t0 = time.perf_counter()
    demos = collect_recipe_demos(recipe, env, progress=progress)
    losses = T.sft(policy, demos, steps=recipe.sft_steps, batch_size=recipe.sft_batch, lr=recipe.sft_lr,
                   seed=recipe.seed, progress=progress)
    ev = evaluate(policy, env, episodes=recipe.eval_episodes, seed=recipe.seed + 100, num_steps=recipe.rl.sampler.num_steps,
                    progress=progress)
    summary = {"phase": "sft", "demo_episodes": demos.episodes, "demo_chunks": len(demos), "sft_loss": losses,
               "eval": summarise_eval(ev), "seconds": time.perf_counter() - t0}
    save_policy(policy, recipe, out / "policy")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    env.close()
    return summary


def run_rl(init: str | Path, out: str | Path, *, recipe_overrides: dict[str, Any] | None = None,
           resume: bool = False, progress: bool = True, dist: DistConfig | None = None) -> dict[str, Any]:
    """PPO / GRPO from a policy checkpoint; writes checkpoints, metrics.json, policy.pt, summary.json.
    With ``dist``, rollouts come from ``dist.workers`` Ray actors (``vlafast.rl.dist``), each
    building its slice of the recipe's env and a replica of the policy, and ``dist.learners`` > 1
    ranks share each update."""
    policy, recipe, env = load_policy(init, overrides=recipe_overrides)
    ensure_noise_head(policy, recipe)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "recipe.json", dump(recipe))
    t0 = time.perf_counter()
    demos = collect_recipe_demos(recipe, env, progress=progress) if recipe.rl.bc_coef > 0 else None
    collector = learners = None
    # replicas for Ray workers / learners: the recipe's tiny model, or a copy of a loaded checkpoint
    make_policy = (functools.partial(build_policy, recipe) if policy.spec.recipe is not None
                   else functools.partial(replica_of, copy.deepcopy(policy).cpu()))
    try:
        if dist is not None:
            collector = RayCollector(policy, functools.partial(env_slice, recipe), make_policy, recipe.rl, dist,
                                     seed=recipe.seed + 7, num_envs=recipe.num_envs)
            learners = LearnerGroup(make_policy, recipe.rl, dist) if dist.learners > 1 else None
        history = T.train_rl(policy, env, recipe.rl, seed=recipe.seed + 7, run_dir=out, resume=resume,
                             progress=progress, demos=demos, collector=collector, learners=learners)
    finally:
        for part in (learners, collector):
            if part is not None:
                part.close()
    ev = evaluate(policy, env, episodes=recipe.eval_episodes, seed=recipe.seed + 100, num_steps=recipe.rl.sampler.num_steps,
                    progress=progress)
    summary = {"phase": recipe.rl.algo, "method": recipe.rl.sampler.kind, "history": history, "eval": summarise_eval(ev),
               "seconds": time.perf_counter() - t0}
    save_policy(policy, recipe, out / "policy")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
    env.close()
    return summary


def replica_of(template: FlowPolicy, spec) -> FlowPolicy:
    """A copy of ``template`` bound to ``spec`` (a Ray worker's env slice)."""
    return copy.deepcopy(template).bind(spec)


def run_eval(checkpoint: str | Path, *, episodes: int | None = None, seed: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    policy, recipe, env = load_policy(checkpoint)
    ev = evaluate(policy, env, episodes=episodes or recipe.eval_episodes,
                    seed=recipe.seed + 100 if seed is None else seed, num_steps=recipe.rl.sampler.num_steps, progress=progress)
    env.close()
    return summarise_eval(ev)


def recipe_from_file(path: str | Path | None, **overrides: Any) -> Recipe:
    """A recipe from a JSON file (partial: missing keys keep their defaults) plus CLI overrides."""
    data: dict[str, Any] = json.loads(Path(path).read_text()) if path else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    return Recipe.from_json(data)


def format_eval(name: str, s: dict[str, Any]) -> str:
    sp = s["speed"]
    lo, hi = s["success_ci95"]
    return (f"{name:10s} success {100 * s['success_rate']:5.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]  "
            f"return {s['return']:6.3f}  speed slowly/none/quickly "
            f"{sp['slowly']:.4f} / {sp['(none)']:.4f} / {sp['quickly']:.4f} m/step  ({s['episodes']} episodes)")


__all__ = ["run_sft", "run_rl", "run_eval", "recipe_from_file", "format_eval", "summarise_eval", "dataclasses"]
