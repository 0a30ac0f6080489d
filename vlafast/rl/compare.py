"""RL methods against SFT at equal env-step budgets: one seed's few-shot SFT policy, each method
from it until its budget is spent, every policy evaluated on the seed's own evaluation episodes.

This is the computation behind ``bench/results/rl_compare*.csv`` (``python -m tools.rl_compare``
runs it over testbeds, seeds and methods, in parallel) and behind the demo's RL phase, which is
one row of that table: ``DEMO`` names the testbed, seed, budget and the method the committed
comparison shows best there (``best_method``), and ``vlafast demo`` calls ``run_sft`` and
``run_rl`` with it, so the numbers it prints are that row's.

Every seed draws its demonstrations, training and evaluation episodes from its own streams
(``vlafast.eval.seed_streams``): no episode is shared between seeds, and evaluation never sees
a training or demonstration episode. Each success rate comes with its Wilson 95% interval, each
method's gain over SFT is paired on the same episodes with Newcombe's 95% interval
(``vlafast.eval.paired_difference``). Env steps that rehearse from a copied simulator state count
towards the budget: GRPO over states pays for its counterfactual chunks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vlafast._io import atomic_write_text
from vlafast.eval import evaluate, paired_difference, seed_streams
from vlafast.rl.losses import PPOConfig
from vlafast.rl.sampler_spec import FlowNoise, FlowSDE

# Testbeds: partial recipe JSON over the default recipe (7 cm reach radius, 24 scripted
# demonstrations, shaped reward).
TESTBEDS: dict[str, dict[str, Any]] = {
    "reach": {},
    # a 5 cm radius: few-shot SFT at 41.0 / 47.1 / 51.3% for seeds 0 / 1 / 2 (1024 episodes
    # each; "reach": 69.9 / 66.6 / 72.3%, bench/results/rl_sft_levels.csv), where pi_RL's
    # LIBERO (57.6%) and ManiSkill (41.6%) runs start
    "headroom": {"reach_radius": 0.05},
}

# Actor lr per sampler for the tiny pi0 (0.24 M parameters), chosen by the sweep in
# bench/results/rl_lr_sweep.csv (``tools.rl_compare --lr-sweep``; seed 0, 2048 chunks per
# optimiser step, the first two actor updates) for approx_kl 5e-3..1e-2: 1e-4 gives 8.2e-3
# (Flow-SDE) and 6.4e-3 (Flow-Noise), 3e-5 gives 2.1e-3 / 1.1e-3, 3e-4 gives 6.2e-2 / 2.1e-2.
# RLinf uses 5e-6..1e-5 for the 3B pi0 / pi0.5.
ACTOR_LR = {"flow_sde": 1e-4, "flow_noise": 1e-4}

# PPO in RLinf's regime, scaled to the tiny policy: 64 envs x 32 chunks = 2048 chunks per
# rollout and per optimiser step (the whole rollout, accumulated over micro-batches of 128),
# 4 epochs stopped early at approx_kl 0.05, time-outs terminal, 3 critic-only warm-up updates,
# no BC anchor (the paper's PPO).
_PPO = dict(algo="ppo", chunks_per_rollout=32, critic_warmup=3, bc_coef=0.0, timeouts="terminal")


def ppo_settings(sampler) -> dict[str, Any]:
    """The RL settings of PPO on ``sampler`` (a FlowSDE or FlowNoise spec) in the regime above."""
    return dict(_PPO, sampler=sampler, ppo=PPOConfig(actor_lr=ACTOR_LR[sampler.kind], critic_lr=1e-3, minibatch=None,
                                                     micro_batch=128, epochs=4, target_kl=0.05))


# Each method's env count and RL settings over the testbed's recipe; "sft" is the starting policy.
METHODS: dict[str, dict[str, Any] | None] = {
    "sft": None,
    "ppo_flow_sde": dict(num_envs=64, rl=ppo_settings(FlowSDE())),
    "ppo_flow_noise": dict(num_envs=64, rl=ppo_settings(FlowNoise())),
    # GRPO over whole episodes: 256 envs in groups of 8 sharing a seed, one episode each (~2500
    # chunks per update), Flow-SDE, no critic.
    "grpo": dict(num_envs=256, rl=dict(algo="grpo", grpo_groups="episode", group_size=8, bc_coef=0.0, critic_warmup=0,
                                       chunks_per_rollout=1, sampler=FlowSDE(),
                                       ppo=PPOConfig(actor_lr=ACTOR_LR["flow_sde"], minibatch=None, micro_batch=128,
                                                     epochs=4, target_kl=0.05))),
    # GRPO over simulator states (sim only), the default recipe's RL settings: 8 chunks
    # rehearsed from a copy of each env's state, the myopic score, a BC anchor.
    "grpo_states": dict(num_envs=16, rl={}),
}
RL_METHODS = [m for m, spec in METHODS.items() if spec is not None]

COLUMNS = ("method", "testbed", "seed", "env_steps", "updates", "episodes", "success", "ci_low", "ci_high",
           "gain", "gain_low", "gain_high", "approx_kl", "clipfrac", "seconds")
EVAL_ENVS = 16  # evaluation env count: the episodes are (env, index) pairs, the same for every method


@dataclasses.dataclass(frozen=True)
class Run:
    """One row of the comparison: ``method`` from seed ``seed``'s SFT policy on ``testbed`` for
    ``env_steps``, evaluated on ``episodes`` episodes. ``overrides`` (partial recipe JSON) apply
    over the testbed, ``method_overrides`` over the method's settings (a smoke-test budget)."""

    testbed: str
    seed: int
    method: str
    env_steps: int
    episodes: int
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    method_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    table: str = ""  # the committed CSV that holds this row, where there is one


# The demo's RL phase: the comparison's best method at 150k env steps on the headroom testbed
# (mean paired gain over seeds 0 / 1 / 2 in the table; tests check it against the file), seed 0.
DEMO = Run(testbed="headroom", seed=0, method="grpo_states", env_steps=150_000, episodes=1024,
           table="bench/results/rl_compare_headroom_150k.csv")
# `vlafast demo --quick`: the same path at a smoke-test budget (its numbers mean nothing).
DEMO_QUICK = dataclasses.replace(DEMO, env_steps=720, episodes=EVAL_ENVS, table="",
                                 overrides={"num_envs": 4, "demos": 8, "sft_steps": 20},
                                 method_overrides={"num_envs": 4, "rl": {"chunks_per_rollout": 2}})


def base_recipe(testbed: str, seed: int, overrides: dict[str, Any] | None = None):
    """The default recipe with a testbed's settings, then ``overrides`` (partial recipe JSON)."""
    from vlafast.rl.recipe import Recipe, merge

    if testbed not in TESTBEDS:
        raise ValueError(f"testbed must be one of {sorted(TESTBEDS)}, got {testbed!r}")
    return Recipe.from_json({**merge(TESTBEDS[testbed], overrides or {}), "seed": seed})


def method_recipe(base, method: str, overrides: dict[str, Any] | None = None):
    """The base recipe with a method's env count and RL settings, then ``overrides`` (partial
    recipe JSON over the method's)."""
    from vlafast.rl.recipe import Recipe, merge

    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    spec = METHODS[method]
    if spec is None:
        return base
    recipe = dataclasses.replace(base, num_envs=spec["num_envs"], rl=dataclasses.replace(base.rl, **spec["rl"]))
    if overrides:
        recipe = Recipe.from_json(merge(json.loads(json.dumps(recipe.to_json())), overrides))
    return recipe


def steps_per_update(recipe, episode_length: float) -> int:
    """Env steps one update spends (upper bound: episodes ending inside a chunk spend fewer).
    Episode-group GRPO runs one episode per env: ``episode_length`` (the SFT policy's mean)
    each, so a policy that gets faster spends less than its budget (the CSV has what it spent)."""
    rl = recipe.rl
    if rl.algo == "grpo" and rl.grpo_groups == "episode":
        return math.ceil(recipe.num_envs * episode_length)
    per_chunk = recipe.exec_horizon * (rl.group_size + 1 if rl.algo == "grpo" and rl.grpo_groups == "state" else 1)
    return recipe.num_envs * rl.chunks_per_rollout * per_chunk


# -- files of a run, in the testbed's folder ------------------------------------------------------

def policy_dir(folder: Path, method: str, seed: int) -> Path:
    return Path(folder) / f"{method}_seed{seed}"


def episodes_path(folder: Path, method: str, seed: int) -> Path:
    """The evaluation's per-episode records (what paired gains are computed from)."""
    return Path(folder) / f"{method}_seed{seed}.episodes.json"


def history_path(folder: Path, method: str, seed: int) -> Path:
    """Per update: the RL history (rollout success, return, approx_kl, ...); for SFT the losses."""
    return Path(folder) / f"{method}_seed{seed}.history.json"


# -- the runs ---------------------------------------------------------------------------------------

def evaluate_seed(policy, recipe, episodes: int, progress: bool = False) -> dict[str, Any]:
    """ODE evaluation on the recipe seed's evaluation stream: ``vlafast.eval.evaluate``'s dict."""
    from vlafast.rl.recipe import build_env

    streams = seed_streams(recipe.seed)
    env = build_env(recipe, num_envs=EVAL_ENVS, seed=streams.eval)
    try:
        return evaluate(policy, env, episodes=episodes, seed=streams.eval, num_steps=recipe.rl.sampler.num_steps,
                        progress=progress)
    finally:
        env.close()


def _score(ev: dict[str, Any]) -> dict[str, Any]:
    lo, hi = ev["success_ci95"]  # Wilson, over every episode
    return {"success": ev["success_rate"], "ci_low": lo, "ci_high": hi, "episodes": ev["episodes"]}


def seed_demos(recipe, env, progress: bool = False):
    """The seed's scripted demonstrations (its demonstration stream)."""
    from vlafast.rl import train as T

    return T.collect_demos(env, recipe.demos, recipe.horizon, recipe.exec_horizon, seed=seed_streams(recipe.seed).demos,
                           progress=progress)


def run_sft(testbed: str, seed: int, folder: Path, episodes: int, overrides: dict[str, Any] | None = None,
            threads: int = 1, progress: bool = False) -> dict[str, Any]:
    """The seed's few-shot SFT policy, saved in ``folder`` for the RL runs with its evaluation
    records and losses -> its row (``progress``: bars on stderr)."""
    from vlafast.rl import train as T
    from vlafast.rl.recipe import build_env, build_policy, save_policy

    torch.set_num_threads(threads)
    recipe = base_recipe(testbed, seed, overrides)
    env = build_env(recipe)
    policy = build_policy(recipe, env.spec)
    t0 = time.perf_counter()
    try:
        demos = seed_demos(recipe, env, progress)
    finally:
        env.close()
    losses = T.sft(policy, demos, steps=recipe.sft_steps, batch_size=recipe.sft_batch, lr=recipe.sft_lr, seed=seed,
                   progress=progress)
    save_policy(policy, recipe, policy_dir(folder, "sft", seed))
    ev = evaluate_seed(policy, recipe, episodes, progress)
    atomic_write_text(episodes_path(folder, "sft", seed), json.dumps(ev["records"]))
    atomic_write_text(history_path(folder, "sft", seed), json.dumps([{"step": i, "loss": x} for i, x in enumerate(losses)]))
    return {"method": "sft", "testbed": testbed, "seed": seed, "env_steps": 0, "updates": 0, **_score(ev),
            "seconds": time.perf_counter() - t0}


def train(method: str, seed: int, folder: Path, iterations: int | None, budget: int | None, *,
          actor_lr: float | None = None, critic_warmup: int | None = None,
          method_overrides: dict[str, Any] | None = None, progress: bool = False):
    """(policy, recipe, history, seconds): ``method`` from the seed's SFT policy in ``folder``,
    for ``iterations`` updates or as many as ``budget`` env steps pay for (``actor_lr``,
    ``critic_warmup``: instead of the method's)."""
    from vlafast.rl import train as T
    from vlafast.rl.recipe import build_env, ensure_noise_head, load_policy

    policy, base, _ = load_policy(policy_dir(folder, "sft", seed))
    recipe = method_recipe(base, method, method_overrides)
    rl = recipe.rl
    if actor_lr is not None:
        rl = dataclasses.replace(rl, ppo=dataclasses.replace(rl.ppo, actor_lr=actor_lr))
    if critic_warmup is not None:
        rl = dataclasses.replace(rl, critic_warmup=critic_warmup)
    if iterations is None:
        # A fixed-cost update (PPO, GRPO over states) spends at most steps_per_update, so this many
        # stay within the budget. Episode GRPO's cost follows its episodes' length: up to twice
        # the estimate from SFT's, the budget ending the run (RLConfig.env_step_budget).
        sft = json.loads(episodes_path(folder, "sft", seed).read_text())
        iterations = math.ceil(budget / steps_per_update(recipe, float(np.mean([r["length"] for r in sft]))))
        if rl.algo == "grpo" and rl.grpo_groups == "episode":
            iterations *= 2
        rl = dataclasses.replace(rl, env_step_budget=budget)
    recipe = dataclasses.replace(recipe, rl=dataclasses.replace(rl, iterations=iterations))
    torch.manual_seed(seed)  # the Flow-Noise head's initialisation
    ensure_noise_head(policy, recipe)
    env = build_env(recipe, seed=seed_streams(seed).train)
    t0 = time.perf_counter()
    try:
        demos = seed_demos(recipe, env) if recipe.rl.bc_coef > 0 else None
        history = T.train_rl(policy, env, recipe.rl, seed=seed_streams(seed).train, progress=progress, demos=demos)
    finally:
        env.close()
    return policy, recipe, history, time.perf_counter() - t0


def actor_means(history: list[dict[str, float]], warmup: int) -> dict[str, float]:
    """Mean approx_kl and clipfrac over the updates that trained the actor (after the critic's warm-up)."""
    rows = history[warmup:]
    return {k: float(np.mean([h[k] for h in rows])) if rows else math.nan for k in ("approx_kl", "clipfrac")}


def run_rl(method: str, testbed: str, seed: int, budget: int, folder: Path, episodes: int, threads: int = 1,
           method_overrides: dict[str, Any] | None = None, progress: bool = False) -> dict[str, Any]:
    """One RL run from the seed's SFT policy in ``folder``, its evaluation and its gain over SFT
    paired on the same episodes -> its row; the policy, records and history are saved beside."""
    from vlafast.rl.recipe import save_policy

    torch.set_num_threads(threads)
    policy, recipe, history, seconds = train(method, seed, folder, None, budget, method_overrides=method_overrides,
                                             progress=progress)
    save_policy(policy, recipe, policy_dir(folder, method, seed))
    ev = evaluate_seed(policy, recipe, episodes, progress)
    gain = paired_difference(ev["records"], json.loads(episodes_path(folder, "sft", seed).read_text()))
    atomic_write_text(episodes_path(folder, method, seed), json.dumps(ev["records"]))
    atomic_write_text(history_path(folder, method, seed), json.dumps(history))
    return {"method": method, "testbed": testbed, "seed": seed, "env_steps": int(sum(h["env_steps"] for h in history)),
            "updates": len(history), **_score(ev), "gain": gain["difference"], "gain_low": gain["ci95"][0],
            "gain_high": gain["ci95"][1], **actor_means(history, recipe.rl.critic_warmup), "seconds": seconds}


def run_rows(run: Run, folder: Path, threads: int = 1) -> tuple[dict[str, Any], dict[str, Any]]:
    """(SFT's row, the method's row) of ``run``: what the demo's RL phase computes."""
    sft = run_sft(run.testbed, run.seed, folder, run.episodes, run.overrides, threads)
    rl = run_rl(run.method, run.testbed, run.seed, run.env_steps, folder, run.episodes, threads, run.method_overrides)
    return sft, rl


# -- reading the table --------------------------------------------------------------------------------

def best_method(rows: Sequence[dict[str, Any]], testbed: str) -> str:
    """The RL method of ``rows`` (the table's rows, as strings or numbers) with the highest mean
    paired gain over SFT on ``testbed``, among those run on every seed of the testbed."""
    mine = [r for r in rows if r["testbed"] == testbed and r["method"] in RL_METHODS]
    seeds = {int(r["seed"]) for r in mine}
    gains: dict[str, list[float]] = {}
    for r in mine:
        gains.setdefault(r["method"], []).append(float(r["gain"]))
    complete = {m: float(np.mean(g)) for m, g in gains.items() if len(g) == len(seeds)}
    if not complete:
        raise ValueError(f"the table has no RL method run on every seed of testbed {testbed!r}")
    return max(complete, key=complete.get)


def pooled_curve(x: np.ndarray, y: np.ndarray, w: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(window centres, success) of rates ``y`` at env steps ``x`` weighted by episodes ``w``,
    pooled in ``bins`` equal env-step windows; windows without an episode are left out."""
    edges = np.linspace(0.0, float(x.max()), bins + 1)
    which = np.clip(np.searchsorted(edges, x, side="left") - 1, 0, bins - 1)
    ok = np.isfinite(y) & (w > 0)
    num = np.bincount(which[ok], weights=(y * w)[ok], minlength=bins)
    den = np.bincount(which[ok], weights=w[ok], minlength=bins)
    has = den > 0
    return ((edges[:-1] + edges[1:]) / 2)[has], num[has] / den[has]


def success_text(row: dict[str, Any]) -> str:
    """A row's success with its Wilson 95% interval, in percent."""
    return f"{100 * row['success']:.1f}% [{100 * row['ci_low']:.1f}, {100 * row['ci_high']:.1f}]"


def format_row(row: dict[str, Any]) -> str:
    """One row as the comparison prints it: success [Wilson 95%], and for RL the paired gain."""
    text = f"{row['method']} {row['testbed']} seed {row['seed']}: {success_text(row)} on {row['episodes']} episodes"
    if row["method"] != "sft":
        text += (f", gain {100 * row['gain']:+.1f} [{100 * row['gain_low']:+.1f}, {100 * row['gain_high']:+.1f}] "
                 f"paired, after {row['env_steps']} env steps ({row['updates']} updates)")
    return text


__all__ = ["ACTOR_LR", "COLUMNS", "DEMO", "DEMO_QUICK", "EVAL_ENVS", "METHODS", "RL_METHODS", "Run", "TESTBEDS",
           "actor_means", "base_recipe", "best_method", "episodes_path", "evaluate_seed", "format_row", "history_path",
           "method_recipe", "policy_dir", "pooled_curve", "ppo_settings", "run_rl", "run_rows", "run_sft", "seed_demos",
           "steps_per_update", "success_text", "train"]
