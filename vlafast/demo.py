"""`vlafast demo`: the project's main job, on a CPU, with no downloads (about 10 minutes).

1. The real-time core: jitter of the 500 Hz servo timing loop.
2. A tiny pi0 (the real architecture, ~0.24 M parameters) learns the built-in UR5e reach task
   from a few scripted demonstrations (flow-matching SFT), then is fine-tuned online with the
   RL method the committed comparison shows best at the demo's env-step budget
   (``vlafast.rl.compare.DEMO``). Both are evaluated on the same 1024 episodes; what it prints
   is the comparison's own computation, the two rows of its table for that seed.
3. The neuron dictionary of the SFT policy, and clamped keyword clusters against the unsteered
   policy and a direction baseline: end-effector speed on the same episodes.

Writes ``runs/<date>/report.md`` with PNG plots and prints a summary table.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlafast import info
from vlafast._io import atomic_path, atomic_write_text
from vlafast.bench import servo_timing
from vlafast.eval import seed_streams, speed_by_word, speed_word
from vlafast.rl import compare

METHOD_NAMES = {"ppo_flow_sde": "PPO Flow-SDE", "ppo_flow_noise": "PPO Flow-Noise", "grpo": "GRPO",
                "grpo_states": "GRPO over states"}


def _plots(out: Path, folder: Path, run: compare.Run, rows: dict[str, dict], history: list[dict],
           records: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = METHOD_NAMES[run.method]
    losses = [h["loss"] for h in json.loads(compare.history_path(folder, "sft", run.seed).read_text())]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(losses, lw=0.8)
    axes[0].set(title="SFT flow-matching loss", xlabel="step", yscale="log")
    steps = np.cumsum([h["env_steps"] for h in history])
    rates = np.array([h["success_rate"] for h in history], dtype=float)
    axes[1].plot(steps, rates, marker="o", ms=2, lw=0.6, alpha=0.4, label="rollout success per update (sampled)")
    weights = np.array([h.get("episodes", 1) for h in history], dtype=float)
    axes[1].plot(*compare.pooled_curve(steps, rates, weights, 8), lw=2, c="tab:blue", label="rollouts pooled, 8 windows")
    for key, style in (("sft", "--"), ("rl", "-")):
        r = rows[key]
        label = f"eval {'SFT' if key == 'sft' else name} {100 * r['success']:.1f}% (ODE, {r['episodes']} episodes)"
        axes[1].axhline(r["success"], ls=style, c="k", lw=1, label=label)
        axes[1].axhspan(r["ci_low"], r["ci_high"], color="k", alpha=0.08)
    axes[1].set(title="success rate vs env steps", xlabel="env steps (rehearsed steps count)", ylim=(-0.02, 1.02))
    axes[1].legend(fontsize=7)
    axes[2].plot(steps, [h["return"] for h in history], marker="o", ms=3)
    axes[2].set(title="episode return vs env steps", xlabel="env steps")
    for ax in axes[1:]:
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
    fig.tight_layout()
    with atomic_path(out / "training.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for word, colour in (("slowly", "tab:blue"), ("(none)", "tab:gray"), ("quickly", "tab:red")):
        vals = [r["speed"] for r in records if speed_word(r["instruction"]) == word]
        if vals:
            ax.hist(vals, bins=15, alpha=0.5, color=colour, label=f"{word} (n={len(vals)})")
    ax.set(title=f"end-effector speed per episode (after {name})", xlabel="mean displacement per step (m)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "speed.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return ["training.png", "speed.png"]


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
    from vlafast.rl.recipe import build_env, dump, load_policy

    t_start = time.perf_counter()
    out = Path(args.out) / _dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    run = compare.DEMO_QUICK if args.quick else compare.DEMO  # quick: the smoke-test budget; results mean little
    name = METHOD_NAMES[run.method]
    facts = info.collect()
    print("== vlafast " + facts["vlafast"] + f" | torch {facts['torch']} | _C {facts['_C'].split(' ')[0]}")

    print(f"\n== 1/3 real-time core: 500 Hz absolute-deadline loop, {args.seconds:g} s each")
    servo_md, servo = _servo_section(args.seconds)
    print(servo_md)

    print(f"\n== 2/3 pi_RL on the built-in task, {run.testbed!r} testbed (ur5e-reach), seed {run.seed}: few-shot SFT, "
          f"then {name} for {run.env_steps} env steps, each evaluated on the same {run.episodes} episodes")
    folder = out / "rl"
    t0 = time.perf_counter()
    progress = not args.no_progress
    sft_row = compare.run_sft(run.testbed, run.seed, folder, run.episodes, run.overrides, torch.get_num_threads(),
                              progress)
    print(compare.format_row(sft_row) + f" ({sft_row['seconds']:.0f} s)", flush=True)
    rl_row = compare.run_rl(run.method, run.testbed, run.seed, run.env_steps, folder, run.episodes,
                            torch.get_num_threads(), run.method_overrides, progress)
    print(compare.format_row(rl_row) + f" ({rl_row['seconds']:.0f} s)")
    t_rl = time.perf_counter() - t0
    if run.table:
        print(f"(the comparison's rows sft,{run.testbed},{run.seed} and {run.method},{run.testbed},{run.seed} of "
              f"{run.table}: {name} has the highest mean paired gain at this budget)")
    sft_policy, recipe, _ = load_policy(compare.policy_dir(folder, "sft", run.seed))
    _, rl_recipe, _ = load_policy(compare.policy_dir(folder, run.method, run.seed))
    records = {k: json.loads(compare.episodes_path(folder, m, run.seed).read_text())
               for k, m in (("sft", "sft"), ("rl", run.method))}
    history = json.loads(compare.history_path(folder, run.method, run.seed).read_text())

    print("\n== 3/3 steering: neuron dictionary of the SFT policy, keyword clusters, clamped")
    env = build_env(recipe)
    try:
        steer_md, steer = _steering_section(sft_policy, env, episodes=4 if args.quick else 64,
                                            seed=seed_streams(run.seed).eval)
    finally:
        env.close()
    print(steer_md)

    rows = {"sft": sft_row, "rl": rl_row}
    plots = _plots(out, folder, run, rows, history, records["rl"])
    speed = {k: speed_by_word(v) for k, v in records.items()}
    table_rows = [
        ("servo p99 jitter", f"{servo['p99_us']:.1f} us ({servo['policy']}), {servo['missed']} missed"),
        ("SFT", f"{recipe.demos} scripted episodes, {recipe.sft_steps} steps; {compare.success_text(sft_row)} "
                f"({sft_row['episodes']} episodes)"),
        (f"SFT + {name}", f"{compare.success_text(rl_row)}, gain {100 * rl_row['gain']:+.1f} [{100 * rl_row['gain_low']:+.1f}, "
                          f"{100 * rl_row['gain_high']:+.1f}] paired on the same episodes"),
        (name, f"{rl_row['updates']} updates, {rl_row['env_steps']} env steps ({rl_recipe.rl.sampler.kind}, "
               f"K={rl_recipe.rl.sampler.num_steps}) in {rl_row['seconds']:.0f} s"),
        ("SFT + RL + evaluations", f"{t_rl:.0f} s"),
        ("total", f"{time.perf_counter() - t_start:.0f} s"),
    ]
    table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in table_rows)
    speed_md = "| policy | slowly | (none) | quickly |\n|---|---|---|---|\n" + "\n".join(
        f"| {label} | " + " | ".join(f"{speed[k][w]:.4f}" for w in ("slowly", "(none)", "quickly")) + " |"
        for label, k in (("SFT", "sft"), (f"SFT + {name}", "rl")))
    source = (f"the rows `sft,{run.testbed},{run.seed}` and `{run.method},{run.testbed},{run.seed}` of "
              f"`{run.table}`, which compares every method at this budget over three seeds" if run.table
              else "a smoke-test budget")
    report = f"""# vlafast demo report ({out.name})

{table}

## Real-time core (500 Hz)

{servo_md}

## pi_RL on the built-in UR5e reach task

Task: ur5e-reach, the {run.testbed!r} testbed ({100 * recipe.reach_radius:g} cm reach radius), parallel
MuJoCo arms, a {recipe.image_size} px camera, instructions with colour and speed words. Policy: tiny pi0
({sum(p.numel() for p in sft_policy.model.parameters()) / 1e6:.2f} M parameters, real structure). SFT on
{recipe.demos} scripted episodes (few-shot on purpose), then {name} ({rl_recipe.rl.sampler.kind} log-probs,
K={rl_recipe.rl.sampler.num_steps}) for {run.env_steps} env steps, rehearsed steps counted. Both policies are
evaluated with ODE sampling on the same {run.episodes} episodes of seed {run.seed}'s evaluation stream
(Wilson 95% intervals; the gain paired episode by episode, Newcombe 95%). These are {source}.

- SFT: {compare.format_row(sft_row)}
- {name}: {compare.format_row(rl_row)}

![training](training.png)

Mean end-effector displacement per step (m), by instruction speed word:

{speed_md}

![speed](speed.png)

## Steering

On the SFT policy.

{steer_md}

## Recipe of the RL phase

```json
{dump(rl_recipe)}
```
"""
    atomic_write_text(out / "report.md", report)
    atomic_write_text(out / "summary.json", json.dumps(
        {"servo": servo, "run": dataclasses.asdict(run), "sft": sft_row, "rl": rl_row, "speed": speed,
         "history": history, "steering": {k: v for k, v in steer.items() if k != "markdown"}},
        indent=1, default=str))
    print("\n" + table)
    print(f"\nreport: {out / 'report.md'} (+ {', '.join(plots)})")
    return 0
