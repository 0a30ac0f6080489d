"""`vlafast eval --policy PATH [--env libero:<suite> | maniskill:<task>]`: success rates with
95% Wilson intervals per task and overall.

Without ``--env`` the policy's own task is used (a run trained here carries its recipe); with
it any supported checkpoint (a vlafast run, a LeRobot / openpi pi0 / pi0.5 / pi0-FAST, an OpenVLA folder)
is evaluated on the benchmark and the run folder gets summary.json, summary.md and GIFs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

ENV_OPTIONS = ("tokenizer", "fast_tokenizer", "tasks", "num_envs", "videos", "out", "steps", "exec_horizon", "max_episode_steps",
               "unnorm_key")  # --overwrite goes with --out


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a policy (success rate with a 95%% Wilson interval), on its own task "
                                    "or a benchmark --env")
    p.add_argument("--policy", "--checkpoint", dest="policy", required=True,
                   help="a run folder from `vlafast train`, a LeRobot / openpi pi0 / pi0.5 / pi0-FAST folder, an OpenVLA "
                        "folder")
    p.add_argument("--episodes", type=int, default=None, help="per task (default: 10 with --env, else the recipe's)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("benchmark envs (--env)")
    g.add_argument("--env", default=None, help="libero:<suite> (e.g. libero:libero_10) | maniskill:<task> "
                                                "(e.g. maniskill:PickCube-v1)")
    g.add_argument("--tokenizer", default=None, help="the model's tokenizer.json or sentencepiece .model "
                                                     "(default: the policy folder's own)")
    g.add_argument("--fast-tokenizer", default=None,
                   help="pi0-FAST: its FAST processor folder (default: the policy folder's fast_tokenizer/)")
    g.add_argument("--tasks", default=None, help="LIBERO task ids, comma separated (default: the whole suite)")
    g.add_argument("--num-envs", type=int, default=None, help="parallel envs (default: LIBERO one per task, ManiSkill 1)")
    g.add_argument("--videos", type=int, default=None, help="episodes saved as GIFs (default 2)")
    g.add_argument("--out", default=None, help="run folder (default runs/eval-<env>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="replace what is already in --out")
    g.add_argument("--steps", type=int, default=None, help="denoise steps (default: the checkpoint's)")
    g.add_argument("--exec-horizon", type=int, default=None,
                   help="actions executed per chunk before replanning (default 5, as openpi's LIBERO example)")
    g.add_argument("--max-episode-steps", type=int, default=None, help="step budget per episode (default: the env's)")
    g.add_argument("--unnorm-key", default=None, help="OpenVLA: the dataset statistics to unnormalise with")
    p.set_defaults(func=run)


def positive(name: str, value, low: int = 1):
    """``value`` unless it is below ``low``: then the one-sentence error the CLI prints."""
    if value is not None and value < low:
        raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    return value


def parse_tasks(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        tasks = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--tasks must be comma-separated integers, got {text!r}") from None
    if not tasks or min(tasks) < 0:
        raise ValueError(f"--tasks must be task ids >= 0, got {text!r}")
    return tasks


def run(args: argparse.Namespace) -> int:
    from vlafast import policies
    from vlafast.eval import EvalConfig, check_env_name, evaluate_on_env, format_summary

    for name in ("episodes", "num_envs", "steps", "exec_horizon", "max_episode_steps"):
        positive(name, getattr(args, name))
    positive("videos", args.videos, 0)
    positive("seed", args.seed, 0)
    if not args.env:
        given = [f"--{k.replace('_', '-')}" for k in ENV_OPTIONS if getattr(args, k, None) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to benchmark envs: add --env libero:<suite> | maniskill:<task>")
        from vlafast.rl import jobs

        summary = jobs.run_eval(args.policy, episodes=args.episodes, seed=args.seed, progress=not args.no_progress)
        print(jobs.format_eval("eval", summary))
        return 0
    check_env_name(args.env)
    tasks = parse_tasks(args.tasks)
    if args.out and Path(args.out).exists() and any(Path(args.out).iterdir()) and not args.overwrite:
        raise ValueError(f"--out {args.out} is not empty: choose a new folder or add --overwrite")
    policy = policies.load(args.policy, args.tokenizer, exec_horizon=args.exec_horizon, unnorm_key=args.unnorm_key,
                           fast_tokenizer=args.fast_tokenizer)
    cfg = EvalConfig(episodes=args.episodes or 10, num_steps=args.steps,
                     videos=2 if args.videos is None else args.videos, seed=args.seed or 0)
    overrides = {} if args.max_episode_steps is None else {"max_episode_steps": args.max_episode_steps}
    summary = evaluate_on_env(policy, args.env, cfg=cfg, out=args.out, tasks=tasks, num_envs=args.num_envs,
                              env_overrides=overrides, progress=not args.no_progress)
    print(format_summary(summary), end="")
    print(f"wrote {Path(summary['out']) / 'summary.md'}, summary.json and {len(summary['videos'])} GIF(s)")
    return 0
