"""The one evaluator: ``run_episodes(policy, env, cfg)`` runs a fixed number of episodes per
task and ``summarise`` gives success rates with 95% Wilson intervals per task and overall;
``paired_difference`` compares two policies on the same episodes, and ``seed_streams`` gives
each run seed demonstration, training and evaluation episodes no other seed shares.

``vlafast eval``, ``vlafast train``'s evaluations, ``vlafast steer``'s behaviour runs and the
demo all call it. Episodes: each env runs a fixed quota of episodes (the first ones it
starts), so short (successful) episodes are not over-counted; quotas split each task's
episodes over the envs of that task (``env_quotas``). Sampling is deterministic (ODE, seeded
generator) unless a sampler is given. A few episodes can be kept as frames (one per chunk:
observations come at chunk ends; cameras side by side) for GIFs.

Axes: B envs, E executed actions per chunk, A_env the env's action dim.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from vlafast._io import atomic_path
from vlafast.envs.base import Obs
from vlafast.envs.reach_words import speed_of

Z95 = 1.959963984540054  # standard normal quantile at 0.975


# -- statistics ---------------------------------------------------------------------------------

def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (0, 1) for n = 0."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # the ends are exactly 0 at k = 0 and 1 at k = n (analytically; rounding would give 1 - 1e-16)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def paired_difference_interval(both: int, only_first: int, only_second: int, neither: int,
                               z: float = Z95) -> tuple[float, float, float]:
    """Success of a first policy minus that of a second on the same n episodes, from the paired
    counts (both succeeded, only the first, only the second, neither) -> (difference, lo, hi):
    Newcombe's hybrid score interval for paired proportions (his method 10: the two Wilson
    intervals combined with the phi correlation of the pairs), 95% by default. Pairing removes
    the between-episode variance that two separate Wilson intervals both carry."""
    counts = (both, only_first, only_second, neither)
    if any(c < 0 for c in counts):
        raise ValueError(f"paired counts must be >= 0, got {counts}")
    n = sum(counts)
    if n == 0:
        return 0.0, -1.0, 1.0
    p1, p2 = (both + only_first) / n, (both + only_second) / n
    l1, u1 = wilson_interval(both + only_first, n, z)
    l2, u2 = wilson_interval(both + only_second, n, z)
    margins = (both + only_first) * (only_second + neither) * (both + only_second) * (only_first + neither)
    phi = (both * neither - only_first * only_second) / math.sqrt(margins) if margins else 0.0
    d = p1 - p2
    lo = d - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    hi = d + math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return d, max(lo, -1.0), min(hi, 1.0)


def paired_difference(first: Sequence[dict], second: Sequence[dict], z: float = Z95) -> dict[str, Any]:
    """Success of ``first`` minus ``second``, two evaluations (``run_episodes`` records) of the
    same episodes, matched by (env, index) -> {"episodes", "difference", "ci95" ([lo, hi],
    ``paired_difference_interval``), "both", "only_first", "only_second", "neither"}. The two
    runs must have used the same env count, seed and quota (``evaluate`` with equal arguments):
    records that do not pair up are refused."""
    a = {(r["env"], r["index"]): r for r in first}
    b = {(r["env"], r["index"]): r for r in second}
    if a.keys() != b.keys() or len(a) != len(first) or len(b) != len(second):
        raise ValueError(f"paired_difference needs two evaluations of the same episodes (same env count, seed and "
                         f"episodes): got {len(first)} and {len(second)} records, {len(a.keys() & b.keys())} in common")
    differ = [k for k in a if a[k]["instruction"] != b[k]["instruction"]]
    if differ:
        raise ValueError(f"episode {differ[0]} has different instructions in the two evaluations "
                         f"({a[differ[0]]['instruction']!r} vs {b[differ[0]]['instruction']!r}): not the same episodes")
    both = sum(a[k]["success"] and b[k]["success"] for k in a)
    only_first = sum(a[k]["success"] and not b[k]["success"] for k in a)
    only_second = sum(b[k]["success"] and not a[k]["success"] for k in a)
    neither = len(a) - both - only_first - only_second
    d, lo, hi = paired_difference_interval(both, only_first, only_second, neither, z)
    return {"episodes": len(a), "difference": d, "ci95": [lo, hi], "both": both, "only_first": only_first,
            "only_second": only_second, "neither": neither}


# Episode streams of a run seed. A run seed s draws its demonstrations, training episodes and
# evaluation episodes from three disjoint blocks of env seeds, and no block is shared between
# run seeds: block 3 s + k (k = 0 demos, 1 training, 2 evaluation) holds env seeds
# [(3 s + k) * STREAM_STRIDE, (3 s + k + 1) * STREAM_STRIDE). A run uses few of them: a vector
# env resets env i with base + i, and training resets at base + 10_000 * iteration + i
# (``rl.train.reset_seeds``; episode-group GRPO at base + 1_000 * iteration + group), so runs
# of under 10_000 updates stay inside their block.
STREAM_STRIDE = 100_000_000


@dataclasses.dataclass(frozen=True)
class SeedStreams:
    """Base env seeds of one run seed's demonstration, training and evaluation episodes."""

    demos: int
    train: int
    eval: int


def seed_streams(seed: int) -> SeedStreams:
    """The independent episode streams of run seed ``seed`` (see ``STREAM_STRIDE``)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    base = 3 * seed * STREAM_STRIDE
    return SeedStreams(demos=base, train=base + STREAM_STRIDE, eval=base + 2 * STREAM_STRIDE)


def env_quotas(task_of_env: Sequence[Any], episodes: int) -> list[int]:
    """Episodes each env runs so that every task gets ``episodes``: split across the envs of
    that task in order (env r of P gets episodes // P, plus one for r < episodes % P)."""
    quotas, seen = [], {}
    peers = {t: sum(1 for u in task_of_env if u == t) for t in task_of_env}
    for t in task_of_env:
        r = seen.get(t, 0)
        seen[t] = r + 1
        quotas.append(episodes // peers[t] + (1 if r < episodes % peers[t] else 0))
    return quotas


# -- the episode loop -----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EvalConfig:
    episodes: int = 10                  # per task
    num_steps: int | None = None        # denoise steps (None: the model's)
    videos: int = 0                     # episodes kept as frames (GIFs)
    seed: int = 0

    def __post_init__(self):
        for name, low in (("episodes", 1), ("videos", 0), ("seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
        if self.num_steps is not None and (isinstance(self.num_steps, bool) or not isinstance(self.num_steps, int)
                                           or self.num_steps < 1):
            raise ValueError(f"num_steps must be an integer >= 1, got {self.num_steps!r}")


def _frame(obs: Obs, cameras: Sequence[str], i: int) -> np.ndarray:
    return np.concatenate([obs["images"][c][i] for c in cameras], axis=1)  # [H, V*W, 3]


@torch.no_grad()
def run_episodes(policy, env, cfg: EvalConfig = EvalConfig(), *, sampler=None,
                 progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Run every env's quota of episodes with ``policy`` (bound to ``env`` here). Returns
    (episodes, videos): one record per counted episode (env, index: the env's n-th episode,
    task_id, instruction, success, length, return, speed: mean end-effector displacement per
    step where the env reports it (NaN elsewhere), action_norm: mean norm of the first three
    action dims over the chunks sent in the episode (a speed proxy for delta end-effector
    actions; the chunk that ends an episode counts whole), error) in completion order, and up to ``cfg.videos``
    {"env", "task_id", "success", "frames": [H, W', 3] list} of the first episodes of envs
    0, 1, .... ``sampler``: a flow sampler config instead of the deterministic ODE."""
    spec = env.spec
    policy.bind(spec)
    if hasattr(policy, "eval"):
        policy.eval()
    B = spec.num_envs
    task_ids = [int(t) for t in getattr(env, "task_ids", [0] * B)]
    quotas = env_quotas(task_ids, cfg.episodes)
    started = [0] * B
    moved, executed = np.zeros(B), np.zeros(B)  # per env: action norm (first 3 dims) summed, actions sent
    gen = torch.Generator(device=getattr(policy, "device", torch.device("cpu"))).manual_seed(cfg.seed)
    kw = {} if sampler is None else {"sampler": sampler}
    obs = env.reset(seed=cfg.seed)
    filming = {i: [_frame(obs, spec.cameras, i)] for i in range(min(cfg.videos, B)) if quotas[i] > 0}
    videos: list[dict] = []
    records: list[dict] = []
    total = sum(quotas)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="episodes", unit="ep", leave=False)
    try:
        while len(records) < total:
            chunk = policy.act_obs(obs, generator=gen, num_steps=cfg.num_steps, **kw)
            moved += np.linalg.norm(np.asarray(chunk)[:, :, :3], axis=-1).sum(axis=1)
            executed += chunk.shape[1]
            instructions = list(obs["instruction"])
            obs, _, terminated, truncated, info = env.step(chunk)
            errors = info.get("errors") or [None] * B
            speeds = info.get("episode_speed", np.full(B, np.nan))
            for i in range(B):
                ended = bool(terminated[i] or truncated[i])
                if i in filming and not ended:
                    filming[i].append(_frame(obs, spec.cameras, i))
                if not ended:
                    continue
                started[i] += 1
                action_norm = moved[i] / max(executed[i], 1.0)
                moved[i] = executed[i] = 0.0
                if started[i] > quotas[i]:
                    continue
                rec = {"env": i, "index": started[i] - 1, "task_id": task_ids[i],
                       "instruction": info["instruction"][i] if "instruction" in info else instructions[i],
                       "success": bool(info["success"][i]), "length": int(info["episode_length"][i]),
                       "return": float(info["episode_return"][i]), "speed": float(speeds[i]),
                       "action_norm": float(action_norm), "error": errors[i]}
                records.append(rec)
                if bar is not None:
                    bar.update(1)
                if i in filming:
                    videos.append({"env": i, "task_id": task_ids[i], "success": rec["success"], "frames": filming.pop(i)})
    finally:
        if bar is not None:
            bar.close()
    return records, videos


def evaluate(policy, env, *, episodes: int, seed: int, num_steps: int | None = None, sampler=None,
             progress: bool = True) -> dict[str, Any]:
    """``episodes`` per task on fixed seeds -> {"episodes", "success_rate", "success_ci95" (Wilson
    [lo, hi]), "return", "records"}: what training runs, the demo and steering report."""
    records, _ = run_episodes(policy, env, EvalConfig(episodes=episodes, num_steps=num_steps, seed=seed),
                              sampler=sampler, progress=progress)
    o = summarise(records)["overall"]
    return {"episodes": o["episodes"], "success_rate": o["success_rate"], "success_ci95": o["ci95"],
            "return": o["return"], "records": records}


def speed_word(instruction: str) -> str:
    """The speed the instruction asks for: "slowly", "quickly" (its last word or a synonym,
    ``envs.reach_words.SPEED_SYNONYMS``) or "(none)"."""
    words = instruction.split()
    return (speed_of(words[-1]) if words else "") or "(none)"


def speed_by_word(records: list[dict[str, Any]], key: str = "speed") -> dict[str, float]:
    """Mean end-effector displacement per step (or another per-episode ``key``, e.g.
    ``action_norm``), grouped by the instruction's speed word."""
    groups: dict[str, list[float]] = {"slowly": [], "(none)": [], "quickly": []}
    for r in records:
        if np.isfinite(r[key]):
            groups[speed_word(r["instruction"])].append(r[key])
    return {k: float(np.mean(v)) if v else float("nan") for k, v in groups.items()}


# -- summaries ----------------------------------------------------------------------------------

def summarise(records: Sequence[dict]) -> dict[str, Any]:
    """Per-task and overall success with 95% Wilson intervals, mean return and speed."""
    tasks: dict[int, dict] = {}
    for r in records:
        t = tasks.setdefault(r["task_id"], {"task_id": r["task_id"], "instruction": r["instruction"],
                                            "episodes": 0, "successes": 0, "errors": 0, "lengths": []})
        t["episodes"] += 1
        t["successes"] += int(r["success"])
        t["errors"] += int(r["error"] is not None)
        t["lengths"].append(r["length"])
    rows = []
    for t in sorted(tasks.values(), key=lambda t: t["task_id"]):
        lo, hi = wilson_interval(t["successes"], t["episodes"])
        rows.append({"task_id": t["task_id"], "instruction": t["instruction"], "episodes": t["episodes"],
                     "successes": t["successes"], "success_rate": t["successes"] / t["episodes"],
                     "ci95": [lo, hi], "mean_length": float(np.mean(t["lengths"])), "errors": t["errors"]})
    n, s = sum(r["episodes"] for r in rows), sum(r["successes"] for r in rows)
    lo, hi = wilson_interval(s, n)
    returns = [r["return"] for r in records]
    return {"tasks": rows, "overall": {"episodes": n, "successes": s, "success_rate": s / n if n else 0.0,
                                       "ci95": [lo, hi], "return": float(np.mean(returns)) if returns else math.nan}}


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def format_summary(summary: dict[str, Any], title: str = "") -> str:
    """A markdown table: one row per task and an overall row."""
    lines = [f"## {title}", ""] if title else []
    lines += ["| task | instruction | episodes | success | 95% CI (Wilson) | mean length |",
              "|---:|---|---:|---:|---|---:|"]
    for r in summary["tasks"]:
        lines.append(f"| {r['task_id']} | {r['instruction']} | {r['episodes']} | {pct(r['success_rate'])} "
                     f"({r['successes']}) | {pct(r['ci95'][0])} - {pct(r['ci95'][1])} | {r['mean_length']:.0f} |")
    o = summary["overall"]
    lines.append(f"| all | | {o['episodes']} | {pct(o['success_rate'])} ({o['successes']}) | "
                 f"{pct(o['ci95'][0])} - {pct(o['ci95'][1])} | |")
    return "\n".join(lines) + "\n"


def write_gif(path: str | os.PathLike, frames: Sequence[np.ndarray], frame_s: float) -> Path:
    """frames: uint8 [H, W, 3] each -> an endlessly looping GIF, written atomically."""
    from PIL import Image

    images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=max(20, int(round(1000 * frame_s))), loop=0)
    return Path(path)


# -- benchmark envs ------------------------------------------------------------------------------

ENV_PREFIXES = ("libero:", "maniskill:")


def check_env_name(name: str) -> None:
    if not isinstance(name, str) or not name.startswith(ENV_PREFIXES) or not name.split(":", 1)[1]:
        raise ValueError(f"--env must be libero:<suite> (e.g. libero:libero_10) or maniskill:<task> "
                         f"(e.g. maniskill:PickCube-v1), got {name!r}; built-in tasks are evaluated "
                         "from their own run folder without --env")


def benchmark_env(env_name: str, *, seed: int, tasks: Sequence[int] | None = None, num_envs: int | None = None,
                  overrides: dict[str, Any] | None = None):
    """(env, make_env overrides used) for ``libero:<suite>`` (one env per task by default) or
    ``maniskill:<task>`` (RGB observations); names and task ids are checked before any env starts."""
    from vlafast.envs import make_env

    check_env_name(env_name)
    if num_envs is not None and (isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs < 1):
        raise ValueError(f"num_envs must be an integer >= 1, got {num_envs!r}")
    overrides = dict(overrides or {})
    kind, name = env_name.split(":", 1)
    if kind == "libero":
        from vlafast.envs.libero import NUM_TASKS

        if tasks is None and name not in NUM_TASKS:
            raise ValueError(f"unknown LIBERO suite {name!r}: known {', '.join(NUM_TASKS)} (or pass --tasks)")
        task_list = list(tasks) if tasks is not None else list(range(NUM_TASKS[name]))
        overrides["task_ids"] = task_list
        n = num_envs or len(task_list)
    else:
        if tasks is not None:
            raise ValueError("--tasks applies to LIBERO suites; a ManiSkill env name is one task")
        overrides.setdefault("obs_mode", "rgb")
        n = num_envs or 1
    return make_env(env_name, n, seed=seed, **overrides), overrides


def evaluate_on_env(policy, env_name: str, *, cfg: EvalConfig = EvalConfig(videos=2), out: str | os.PathLike | None = None,
                    tasks: Sequence[int] | None = None, num_envs: int | None = None,
                    env_overrides: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run ``policy`` on a benchmark env (``benchmark_env``), ``cfg.episodes`` per task; write
    ``summary.json``, ``summary.md`` and GIFs into ``out``; returns the summary."""
    import datetime as _dt
    import json

    from vlafast._io import atomic_write_text

    check_env_name(env_name)
    out = Path(out) if out is not None else Path("runs") / f"eval-{env_name.replace(':', '-')}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    env, overrides = benchmark_env(env_name, seed=cfg.seed, tasks=tasks, num_envs=num_envs, overrides=env_overrides)
    try:
        records, videos = run_episodes(policy, env, cfg, progress=progress)
        control_hz, n = env.spec.control_hz, env.spec.num_envs
    finally:
        env.close()
    summary = summarise(records)
    spec = getattr(policy, "spec", None)
    summary["config"] = {"policy": getattr(spec, "source", ""), "env": env_name, "family": getattr(spec, "family", ""),
                         "exec_horizon": policy.exec_horizon, "num_envs": n, **dataclasses.asdict(cfg),
                         "env_overrides": overrides}
    summary["episodes"] = records
    summary["videos"] = []
    for v in videos:
        name = f"task{v['task_id']:02d}_env{v['env']:02d}_{'success' if v['success'] else 'failure'}.gif"
        write_gif(out / "videos" / name, v["frames"], policy.exec_horizon / control_hz)
        summary["videos"].append(f"videos/{name}")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    atomic_write_text(out / "summary.md", format_summary(summary, env_name))
    summary["out"] = str(out)
    return summary


__all__ = ["EvalConfig", "SeedStreams", "benchmark_env", "paired_difference", "paired_difference_interval",
           "seed_streams", "speed_by_word", "speed_word", "check_env_name", "evaluate_on_env", "env_quotas", "evaluate", "format_summary", "run_episodes", "summarise", "wilson_interval", "write_gif"]
