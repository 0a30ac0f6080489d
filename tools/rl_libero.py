"""PPO Flow-SDE on one LIBERO task from a tiny pi0 SFT'd on the scripted expert's demonstrations
(pi_RL's few-shot start, on the CPU): the learning curve behind the README's LIBERO paragraph,
written to ``bench/results/rl_libero.csv`` (one row per update), ``rl_libero_eval.csv`` (SFT and
the result evaluated on the same episodes, the paired gain) and ``rl_libero.png``.

    python -m tools.rl_libero --work runs/rl_libero --task 6 --env-steps 32000 --workers 2

1. SFT (skipped when ``--work``/sft holds one): ``SFT_RECIPE``, the tiny pi0 behaviour-cloned on
   ``vlafast.envs.libero_expert``'s demonstrations from the suite's own init states, every task
   of libero_object (the instruction names the object).
2. The SFT policy is evaluated (ODE) on ``--episodes`` episodes of the task: ``--envs`` envs walk
   its init states (env r: r, r + envs, ...), the same episodes every evaluation here sees; and
   again sampled with Flow-SDE, as the rollouts sample.
3. PPO with Flow-SDE on that task (``RL``: pi_RL's PPO, sparse 0/1 success reward, time-outs
   terminal), rollouts from ``--workers`` Ray workers, until ``--env-steps`` are spent; a cut
   run continues with ``--resume`` (the run folder's checkpoint); a finished one is reported again.
4. The result is evaluated on the same episodes; its gain over SFT is paired on them
   (``eval.paired_difference``, Newcombe 95%). The curve: each update's rollout success (the
   stochastic Flow-SDE policy, Wilson 95% over a window of updates) against env steps, SFT's and
   the result's evaluations as points.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tools.rl_compare import save_success_plot
from vlafast._io import atomic_write_text
from vlafast.eval import evaluate, paired_difference, wilson_interval

# The SFT policy: the recipe's tiny pi0 (width 64, depth 2) on both cameras at 32 px, chunks of
# 8 executing 4, 200 scripted episodes over the ten libero_object tasks (20 init states each);
# its own evaluation takes 20 episodes per task (the task RL trains on is evaluated on --episodes).
SFT_RECIPE: dict[str, Any] = {
    "env": "libero:libero_object", "env_kwargs": {"render_size": 64}, "num_envs": 10, "image_size": 32,
    "horizon": 8, "exec_horizon": 4, "demos": 200, "sft_steps": 3000, "eval_episodes": 20,
}

# PPO in pi_RL's shape at CPU scale: Flow-SDE (one stochastic denoising step per chunk), GAE over
# chunks, 4 epochs on each rollout stopped at approx_kl 0.05, 3 critic-only warm-up updates, no
# BC anchor. Rollouts of 64 chunks per env (1024 env steps on 4 envs, ~5 episodes) at actor lr
# 3e-5: at the reach testbeds' 1e-4 on 32-chunk rollouts (~2 episodes, most without a success)
# the first actor update (approx_kl 0.02) took the rollouts from 2/5 successes to 0/35
# (docs/rl-results.md §6).
RL: dict[str, Any] = {
    "algo": "ppo", "sampler": {"kind": "flow_sde"}, "chunks_per_rollout": 64, "critic_warmup": 3, "bc_coef": 0.0,
    "timeouts": "terminal",
    "ppo": {"actor_lr": 3e-5, "critic_lr": 1e-3, "minibatch": None, "micro_batch": 128, "epochs": 4, "target_kl": 0.05},
}

COLUMNS = ("update", "env_steps", "episodes", "successes", "rollout_success", "approx_kl", "clipfrac",
           "explained_variance", "seconds")
# The evaluations beside the curve (``*_eval.csv``): SFT's and the result's on the same episodes,
# and the result's gain over SFT paired on them.
EVAL_COLUMNS = ("task", "policy", "env_steps", "episodes", "success", "ci_low", "ci_high")


def task_overrides(task: int, envs: int) -> dict[str, Any]:
    """The SFT recipe narrowed to one task on ``envs`` envs."""
    return {"env_kwargs": {"task_ids": [task]}, "num_envs": envs}


def evaluate_policy(folder: Path, task: int, envs: int, episodes: int, *, as_rollouts: bool = False
                    ) -> list[dict[str, Any]]:
    """Evaluation records of the policy in ``folder`` on the task's first ``episodes`` episodes
    (the seed run_rl's own evaluation uses: the episodes pair up): ODE, or with ``as_rollouts``
    RL's stochastic sampler (``RL["sampler"]``), what the rollouts' success starts from."""
    from vlafast.rl.recipe import load_policy
    from vlafast.rl.sampler_spec import policy_sampler

    overrides = task_overrides(task, envs) | ({"rl": {"sampler": RL["sampler"]}} if as_rollouts else {})
    policy, recipe, env = load_policy(folder, overrides=overrides)
    try:
        return evaluate(policy, env, episodes=episodes, seed=recipe.seed + 100, num_steps=recipe.rl.sampler.num_steps,
                        sampler=policy_sampler(recipe.rl.sampler, policy) if as_rollouts else None,
                        progress=False)["records"]
    finally:
        env.close()


def success(records: list[dict[str, Any]]) -> dict[str, float]:
    k = sum(bool(r["success"]) for r in records)
    lo, hi = wilson_interval(k, len(records))
    return {"success": k / len(records), "ci_low": lo, "ci_high": hi, "episodes": len(records)}


def curve_rows(history: list[dict[str, float]]) -> list[dict[str, Any]]:
    """One row per update: env steps and wall seconds so far, the update's finished rollout
    episodes and successes, the PPO step's measurements."""
    rows, steps, seconds = [], 0.0, 0.0
    for i, h in enumerate(history):
        steps += h["env_steps"]
        seconds += h["env_steps"] / max(h["env_steps_per_s"], 1e-9) + h["update_s"]
        rows.append({"update": i + 1, "env_steps": int(steps), "episodes": h["episodes"],
                     "successes": round(h["success_rate"] * h["episodes"]) if h["episodes"] else 0,
                     "rollout_success": h["success_rate"], "approx_kl": h.get("approx_kl", math.nan),
                     "clipfrac": h.get("clipfrac", math.nan), "explained_variance": h.get("explained_variance", math.nan),
                     "seconds": seconds})
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path, columns: tuple[str, ...] = COLUMNS) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: f"{r[k]:.4g}" if isinstance(r[k], float) else r[k] for k in columns})
    atomic_write_text(path, buf.getvalue())


def eval_rows(task: int, env_steps: int, sft: dict[str, float], sft_rollouts: dict[str, float],
              final: dict[str, float], gain: dict[str, Any]) -> list[dict[str, Any]]:
    """SFT's (ODE, and sampled as the rollouts sample) and the result's success on the same
    episodes, then the result's paired gain over SFT (Newcombe 95%)."""
    lo, hi = gain["ci95"]
    return [{"task": task, "policy": "sft", "env_steps": 0, **sft},
            {"task": task, "policy": "sft_sampled_flow_sde", "env_steps": 0, **sft_rollouts},
            {"task": task, "policy": "ppo_flow_sde", "env_steps": env_steps, **final},
            {"task": task, "policy": "gain_paired", "env_steps": env_steps, "episodes": gain["episodes"],
             "success": gain["difference"], "ci_low": lo, "ci_high": hi}]


def windows(rows: list[dict[str, Any]], episodes: int) -> list[tuple[float, float, float, float]]:
    """(env steps at the window's end, success, Wilson low, high) over consecutive updates that
    finished at least ``episodes`` episodes together."""
    out, k, n = [], 0, 0
    for r in rows:
        k, n = k + r["successes"], n + r["episodes"]
        if n >= episodes:
            lo, hi = wilson_interval(k, n)
            out.append((r["env_steps"], k / n, lo, hi))
            k, n = 0, 0
    return out


def plot(rows: list[dict[str, Any]], sft: dict[str, float], sft_rollouts: dict[str, float] | None,
         final: dict[str, float] | None, title: str, path: Path, window: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    w = windows(rows, window)
    if w:
        x, y, lo, hi = map(np.array, zip(*w))
        ax.plot(x, y, "o-", color="C0", label=f"PPO Flow-SDE rollouts (>= {window} episodes per point)")
        ax.fill_between(x, lo, hi, color="C0", alpha=0.2)
    end = rows[-1]["env_steps"] if rows else 0
    for at, ev, colour, name in ((0, sft, "k", "SFT evaluated (ODE)"), (0, sft_rollouts, "C1", "SFT sampled as the rollouts"),
                                 (end, final, "C3", "after PPO evaluated (ODE)")):
        if ev is not None:
            ax.errorbar([at], [ev["success"]], yerr=[[ev["success"] - ev["ci_low"]], [ev["ci_high"] - ev["success"]]],
                        fmt="s", color=colour, capsize=4, label=f"{name}: {100 * ev['success']:.0f}% "
                        f"({ev['episodes']} episodes)")
    save_success_plot(fig, ax, path, xlabel="env steps", ylabel="success rate (Wilson 95%)", title=title,
                      legend="upper right")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.rl_libero", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="runs/rl_libero", help="sft/ and ppo/ run folders, the evaluations' records")
    p.add_argument("--task", type=int, default=6, help="libero_object task RL trains on")
    p.add_argument("--envs", type=int, default=4, help="training and evaluation envs (split over the workers)")
    p.add_argument("--workers", type=int, default=2, help="Ray rollout workers")
    p.add_argument("--env-steps", type=int, default=32_000, help="RL budget in env steps")
    p.add_argument("--episodes", type=int, default=32, help="evaluation episodes (init states) before and after RL")
    p.add_argument("--window", type=int, default=32, help="rollout episodes per point of the curve")
    p.add_argument("--resume", action="store_true", help="continue the PPO run in --work/ppo")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    p.add_argument("--out", default="bench/results/rl_libero.csv")
    args = p.parse_args(argv)
    if args.episodes % args.envs:
        p.error(f"--episodes must be a multiple of --envs ({args.envs}): every env evaluates as many init states")
    from vlafast.rl import jobs
    from vlafast.rl.dist import DistConfig
    from vlafast.rl.recipe import Recipe

    torch.set_num_threads(args.threads)
    work, out = Path(args.work), Path(args.out)
    sft_dir, ppo_dir = work / "sft", work / "ppo"
    if not (sft_dir / "policy").is_dir():
        t0 = time.perf_counter()
        s = jobs.run_sft(Recipe.from_json(SFT_RECIPE), sft_dir, overwrite=True, progress=False)
        print(f"sft: {s['demo_episodes']} demonstrations, {len(s['sft_loss'])} steps ({time.perf_counter() - t0:.0f} s)",
              flush=True)
    records, scores = {}, {}
    for name, as_rollouts in (("sft", False), ("sft_sampled", True)):  # kept in --work: a rerun reuses them
        f = work / f"{name}_task{args.task}.episodes.json"
        if not f.exists():
            atomic_write_text(f, json.dumps(evaluate_policy(sft_dir / "policy", args.task, args.envs, args.episodes,
                                                            as_rollouts=as_rollouts)))
        records[name] = json.loads(f.read_text())
        scores[name] = ev = success(records[name])
        print(f"{name} on task {args.task}: {100 * ev['success']:.1f}% [{100 * ev['ci_low']:.1f}, "
              f"{100 * ev['ci_high']:.1f}]", flush=True)
    sft, sft_rollouts = scores["sft"], scores["sft_sampled"]
    if (ppo_dir / "summary.json").exists() and not args.resume:  # a finished run: report it again
        summary = json.loads((ppo_dir / "summary.json").read_text())
    else:
        per_update = args.envs * RL["chunks_per_rollout"] * SFT_RECIPE["exec_horizon"]
        overrides = {**task_overrides(args.task, args.envs), "eval_episodes": args.episodes,
                     "rl": {**RL, "iterations": math.ceil(args.env_steps / per_update)}}
        summary = jobs.run_rl(None if args.resume else sft_dir / "policy", ppo_dir, recipe_overrides=overrides,
                              resume=args.resume, progress=False, dist=DistConfig(workers=args.workers))
    final_records = json.loads((ppo_dir / "episodes.json").read_text())
    final = success(final_records)
    gain = paired_difference(final_records, records["sft"])
    rows = curve_rows(summary["history"])
    write_csv(rows, out)
    write_csv(eval_rows(args.task, rows[-1]["env_steps"], sft, sft_rollouts, final, gain),
              out.with_name(f"{out.stem}_eval.csv"), EVAL_COLUMNS)
    title = (f"libero_object task {args.task}: PPO Flow-SDE from SFT, {rows[-1]['env_steps']} env steps, "
             f"{summary['seconds'] / 60:.0f} min on {args.workers} workers")
    plot(rows, sft, sft_rollouts, final, title, out.with_suffix(".png"), args.window)
    lo, hi = gain["ci95"]
    print(f"after PPO: {100 * final['success']:.1f}% [{100 * final['ci_low']:.1f}, {100 * final['ci_high']:.1f}], "
          f"gain {100 * gain['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] paired on {gain['episodes']} "
          f"episodes; {rows[-1]['env_steps']} env steps in {summary['seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
