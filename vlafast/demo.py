"""`vlafast demo`: the project's main job, on a CPU, with no downloads (about 5-10 minutes).

1. The real-time core: jitter of the 500 Hz servo timing loop.
2. A tiny pi0 (the real architecture, ~0.3 M parameters) learns the built-in UR5e reach task
   from a few scripted demonstrations (flow-matching SFT), is evaluated on fixed seeds, then
   fine-tuned online on Flow-SDE log-probs (pi_RL: GRPO with groups of chunks from one simulator
   state, the PPO-clip objective, a BC anchor on the demonstrations) and evaluated again.
3. The neuron dictionary of the SFT policy (whose speed still follows the speed words: RL
   rewards reaching and drives every episode towards top speed), and clamped keyword clusters
   against the unsteered policy and a direction baseline: end-effector speed on the same episodes.

Writes ``runs/<date>/report.md`` with PNG plots and prints a summary table.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlafast import info
from vlafast.eval import evaluate as evaluate_policy
from vlafast._io import atomic_path, atomic_write_text
from vlafast.bench import servo_timing


def _rl_name(rl) -> str:
    """The RL phase's label: PPO, GRPO (episode groups) or GRPO over states."""
    if rl.algo == "ppo":
        return "PPO"
    return "GRPO" + (" over states" if rl.grpo_groups == "state" else "")


def _plots(out: Path, sft_losses: list[float], history: list[dict[str, Any]], evals: dict[str, dict],
           algo: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlafast.eval import speed_word

    names = []
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(sft_losses, lw=0.8)
    axes[0].set(title="SFT flow-matching loss", xlabel="step", yscale="log")
    it = [h["iteration"] for h in history]
    axes[1].plot(it, [h["success_rate"] for h in history], marker="o", ms=3, label="rollout success (SDE)")
    for key, style, colour in (("sft", "--", "k"), ("rl", "-", "k"), ("sft_sde", "--", "tab:orange"), ("rl_sde", "-", "tab:orange")):
        name = ("SFT" if key.startswith("sft") else f"+{algo}") + (" SDE" if key.endswith("sde") else " ODE")
        axes[1].axhline(evals[key]["success_rate"], ls=style, c=colour, lw=1, label=f"eval {name}")
    axes[1].set(title="success rate vs update", xlabel=f"{algo} update", ylim=(-0.02, 1.02))
    axes[1].legend(fontsize=7)
    axes[2].plot(it, [h["return"] for h in history], marker="o", ms=3)
    axes[2].set(title="episode return vs update", xlabel=f"{algo} update")
    fig.tight_layout()
    for name in ("training.png",):
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        names.append(name)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for word, colour in (("slowly", "tab:blue"), ("(none)", "tab:gray"), ("quickly", "tab:red")):
        vals = [r["speed"] for r in evals["rl"]["records"] if speed_word(r["instruction"]) == word]
        if vals:
            ax.hist(vals, bins=15, alpha=0.5, color=colour, label=f"{word} (n={len(vals)})")
    ax.set(title="end-effector speed per episode (after RL)", xlabel="mean displacement per step (m)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "speed.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return names + ["speed.png"]


def _servo_section(seconds: float) -> tuple[str, dict]:
    ours = servo_timing.measure(500.0, seconds, spin_us=100.0, realtime=True)
    base = servo_timing.measure(500.0, seconds, spin_us=0.0, realtime=False)
    lines = ["| loop | policy | p50 us | p99 us | max us | missed / cycles |", "|---|---|---|---|---|---|"]
    for label, r in (("vlafast (sleep + 100 us spin)", ours), ("baseline (sleep only)", base)):
        lines.append(f"| {label} | {r['policy']} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {r['max_us']:.1f} "
                     f"| {r['missed']} / {r['cycles']} |")
    return "\n".join(lines), ours


def _steering_section(policy, env, episodes: int, seed: int) -> tuple[str, dict]:
    """The policy's neuron dictionary, the fast / slow keyword clusters clamped at
    alpha = 4 and the speed-word direction baseline, each against the unsteered policy on the
    same fixed episodes (what `vlafast steer` runs)."""
    from vlafast.interp import KEYWORDS, NeuronDictionary
    from vlafast.interp import behaviour as bh

    dictionary = NeuronDictionary.build(policy, policy.tokenizer, k=3)
    plans = bh.default_plans(policy, env, dictionary=dictionary)
    episodes -= episodes % env.spec.num_envs or 0  # every run sees the same episodes
    result = bh.steering_comparison(policy, env, plans, max(episodes, env.spec.num_envs), seed)
    hits = {name: [f"{h.layer}/{h.neuron} {'/'.join(h.tokens)}" for h in dictionary.search(KEYWORDS[name], limit=3)]
            for name in ("fast", "slow")}
    md = "```\n" + bh.format_comparison(result) + "\n```\n\nstrongest dictionary hits: " + "; ".join(
        f"{k}: {', '.join(v) or 'none'}" for k, v in hits.items()) + "\n"
    return md, {"comparison": result, "dictionary_hits": hits}


def main(args: argparse.Namespace) -> int:
    from vlafast.rl import train as T
    from vlafast.rl.jobs import format_eval, summarise_eval
    from vlafast.rl.recipe import Recipe, build_env, build_policy, collect_recipe_demos, dump, save_policy

    t_start = time.perf_counter()
    out = Path(args.out) / _dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    recipe = Recipe()
    if args.quick:  # the smoke-test budget (tests use it); results mean little
        recipe = dataclasses.replace(recipe, num_envs=4, demos=8, sft_steps=20, eval_episodes=8,
                                     rl=dataclasses.replace(recipe.rl, iterations=2, chunks_per_rollout=2))
    progress = not args.no_progress
    facts = info.collect()
    print("== vlafast " + facts["vlafast"] + f" | torch {facts['torch']} | _C {facts['_C'].split(' ')[0]}")

    print(f"\n== 1/3 real-time core: 500 Hz absolute-deadline loop, {args.seconds:g} s each")
    servo_md, servo = _servo_section(args.seconds)
    print(servo_md)

    print(f"\n== 2/3 pi_RL on the built-in task ({recipe.env}, {recipe.num_envs} envs, {recipe.image_size} px)")
    env = build_env(recipe)
    policy = build_policy(recipe, env.spec)
    n_params = sum(p.numel() for p in policy.model.parameters())
    print(f"tiny pi0: {n_params / 1e6:.2f} M parameters, horizon {recipe.horizon}, executes {recipe.exec_horizon}")
    t0 = time.perf_counter()
    demos = collect_recipe_demos(recipe, env, progress=progress)
    losses = T.sft(policy, demos, steps=recipe.sft_steps, batch_size=recipe.sft_batch, lr=recipe.sft_lr,
                   seed=recipe.seed, progress=progress)
    t_sft = time.perf_counter() - t0
    eval_seed = recipe.seed + 100
    sde = T.rl_sampler(policy, recipe.rl)

    def evaluate(name: str) -> tuple[dict, dict]:
        """The same fixed seeds under ODE sampling and under the training sampler."""
        ode_ev = evaluate_policy(policy, env, episodes=recipe.eval_episodes, seed=eval_seed,
                                 num_steps=recipe.rl.sampler.num_steps, progress=progress)
        sde_ev = evaluate_policy(policy, env, episodes=recipe.eval_episodes, seed=eval_seed, sampler=sde, progress=progress)
        print(format_eval(f"{name} ODE", summarise_eval(ode_ev)))
        print(format_eval(f"{name} SDE", summarise_eval(sde_ev)))
        return ode_ev, sde_ev

    ev_sft, ev_sft_sde = evaluate("SFT")
    save_policy(policy, recipe, out / "policy_sft")
    sft_policy = copy.deepcopy(policy)  # steered in part 3
    t0 = time.perf_counter()
    history = T.train_rl(policy, env, recipe.rl, seed=recipe.seed + 7, run_dir=out / "rl", progress=progress, demos=demos)
    t_rl = time.perf_counter() - t0
    ev_rl, ev_rl_sde = evaluate("+" + _rl_name(recipe.rl).split()[0])
    save_policy(policy, recipe, out / "policy")

    print("\n== 3/3 steering: neuron dictionary of the SFT policy, keyword clusters, clamped")
    steer_md, steer = _steering_section(sft_policy, env, episodes=recipe.eval_episodes // 2, seed=eval_seed)
    print(steer_md)
    env.close()

    evals = {"sft": ev_sft, "rl": ev_rl, "sft_sde": ev_sft_sde, "rl_sde": ev_rl_sde}
    algo = _rl_name(recipe.rl)
    plots = _plots(out, losses, history, evals, algo)
    s_sft, s_rl = summarise_eval(ev_sft), summarise_eval(ev_rl)
    s_sft_sde, s_rl_sde = summarise_eval(ev_sft_sde), summarise_eval(ev_rl_sde)

    def pct(s: dict) -> str:
        lo, hi = s["success_ci95"]
        return f"{100 * s['success_rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"

    rows = [
        ("servo p99 jitter", f"{servo['p99_us']:.1f} us ({servo['policy']}), {servo['missed']} missed"),
        ("demos", f"{demos.episodes} scripted episodes, {len(demos)} chunks"),
        ("SFT", f"{recipe.sft_steps} steps in {t_sft:.0f} s"),
        ("success SFT (ODE / SDE)", f"{pct(s_sft)} / {pct(s_sft_sde)} ({s_sft['episodes']} episodes each)"),
        (f"success SFT + {algo} (ODE / SDE)", f"{pct(s_rl)} / {pct(s_rl_sde)} ({s_rl['episodes']} episodes each)"),
        (algo, f"{len(history)} updates ({recipe.rl.sampler.kind}, K={recipe.rl.sampler.num_steps}) in {t_rl:.0f} s, "
                f"{np.mean([h['chunks_per_s'] for h in history]):.0f} chunks/s"),
        ("total", f"{time.perf_counter() - t_start:.0f} s"),
    ]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
    speed_md = "| phase | slowly | (none) | quickly |\n|---|---|---|---|\n" + "\n".join(
        f"| {name} | " + " | ".join(f"{s['speed'][w]:.4f}" for w in ("slowly", "(none)", "quickly")) + " |"
        for name, s in (("SFT", s_sft), (f"SFT + {algo}", s_rl)))
    report = f"""# vlafast demo report ({out.name})

{table}

## Real-time core (500 Hz)

{servo_md}

## pi_RL on the built-in UR5e reach task

Task: {recipe.env}, {recipe.num_envs} parallel MuJoCo arms, {recipe.image_size} px camera, instructions with
colour and speed words. Policy: tiny pi0 ({n_params / 1e6:.2f} M parameters, real structure). SFT on
{demos.episodes} scripted episodes (few-shot on purpose), then {algo} on {recipe.rl.sampler.kind} log-probs
(K={recipe.rl.sampler.num_steps}, PPO-clip objective, BC anchor weight {recipe.rl.bc_coef:g} on the
demonstrations), evaluated on fixed seeds with deterministic ODE sampling
and with the training sampler (SDE).

![training](training.png)

Mean end-effector displacement per step (m), by instruction speed word:

{speed_md}

![speed](speed.png)

## Steering

On the SFT policy, whose speed still follows the speed words (RL drives every episode towards
top speed, leaving the "fast" plans no room).

{steer_md}

## Recipe

```json
{dump(recipe)}
```
"""
    atomic_write_text(out / "report.md", report)
    atomic_write_text(out / "summary.json", json.dumps(
        {"servo": servo, "sft": s_sft, "rl": s_rl, "sft_sde": s_sft_sde, "rl_sde": s_rl_sde, "history": history,
         "steering": None if steer is None else {k: v for k, v in steer.items() if k != "markdown"}},
        indent=1, default=str))
    print("\n" + table)
    print(f"\nreport: {out / 'report.md'} (+ {', '.join(plots)})")
    return 0
