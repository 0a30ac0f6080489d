"""`vlafast train sft | ppo | grpo`: SFT of the tiny built-in policy on scripted demonstrations,
then PPO / GRPO from a flow policy (pi_RL on denoising log-probs: a run trained here or a
LeRobot / openpi pi0 / pi0.5 folder) or an autoregressive one (on the log-probs of its sampled
action tokens: an OpenVLA Hugging Face folder), given the env to train on."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train a VLA on a VecEnv: sft (scripted demos) | ppo | grpo (pi_RL, token RL)")
    p.add_argument("phase", choices=["sft", "ppo", "grpo"])
    p.add_argument("--out", required=True, help="run folder (policy/, metrics.json, summary.json)")
    p.add_argument("--config", default=None, help="recipe JSON (partial; see vlafast/rl/recipe.py)")
    p.add_argument("--env", default=None,
                   help="sft: the built-in task (default ur5e-reach); ppo/grpo: the env for a policy not trained here")
    p.add_argument("--init", default=None,
                   help="ppo/grpo: the policy to start from (a run folder, a LeRobot / openpi pi0 / pi0.5 folder, "
                        "or a Hugging Face OpenVLA folder)")
    p.add_argument("--method", choices=["flow_sde", "flow_noise", "tokens"], default=None,
                   help="ppo/grpo sampler: flow_sde / flow_noise for flow policies (default flow_sde), tokens for "
                        "OpenVLA (its default)")
    p.add_argument("--unnorm-key", default=None,
                   help="ppo/grpo from an OpenVLA folder: the dataset statistics its actions are unnormalised with")
    p.add_argument("--iterations", type=int, default=None, help="ppo/grpo updates")
    p.add_argument("--groups", dest="grpo_groups", choices=["episode", "state"], default=None,
                   help="grpo: groups of whole episodes from one seed, or of chunks from one simulator state")
    p.add_argument("--resume", action="store_true", help="ppo/grpo: continue the run in --out from its checkpoint.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--workers", type=int, default=0,
                   help="ppo/grpo: collect rollouts on N Ray actors, each a slice of the envs (needs vlafast[dist])")
    p.add_argument("--learners", type=int, default=1,
                   help="with --workers: data-parallel learner ranks (this process + L-1 Ray actors; gloo on CPU, "
                        "nccl on GPU)")
    p.add_argument("--address", default=None,
                   help="with --workers: a Ray cluster to join ('auto', 'ray://host:10001'); default: a local one")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="with --workers: CPUs each worker reserves")
    p.add_argument("--gpus-per-worker", type=float, default=0.0,
                   help="with --workers: GPU share per worker (its policy replica samples there)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _read_config(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {p} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--config {p} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {p} must hold a JSON object of recipe keys, got {type(data).__name__}")
    return data


def run(args: argparse.Namespace) -> int:
    from vlafast.cli.eval import positive
    from vlafast.rl import jobs

    positive("iterations", args.iterations)
    positive("workers", args.workers, 0)
    positive("learners", args.learners)
    progress = not args.no_progress
    if args.phase == "sft":
        if args.init:
            raise ValueError("vlafast train sft builds a fresh policy: drop --init")
        if args.workers:
            raise ValueError("--workers applies to ppo/grpo (rollouts); sft trains on scripted demos in-process")
        if args.unnorm_key:
            raise ValueError("--unnorm-key applies to ppo/grpo from an OpenVLA folder; sft builds a fresh flow policy")
        data = _read_config(args.config)
        data.update({k: v for k, v in (("env", args.env), ("seed", args.seed)) if v is not None})
        recipe = jobs.Recipe.from_json(data)
        if args.resume:
            raise ValueError("--resume applies to ppo/grpo; an sft run is short: start it again with --overwrite")
        summary = jobs.run_sft(recipe, args.out, overwrite=args.overwrite, progress=progress)
    else:
        if not args.init and not args.resume:
            raise ValueError(f"vlafast train {args.phase} needs --init <policy folder> (e.g. a `vlafast train sft` run)")
        overrides: dict = _read_config(args.config)
        if args.env:
            overrides["env"] = args.env
        if args.seed is not None:
            overrides["seed"] = args.seed
        rl = dict(overrides.pop("rl", {}))
        rl["algo"] = args.phase
        if args.phase == "ppo" and not args.resume:  # PPO in RLinf's regime (PPOConfig's defaults), not the demo's GRPO tuning
            from dataclasses import asdict

            from vlafast.rl.losses import PPOConfig
            from vlafast.rl.train import RLConfig

            rl["ppo"] = {**asdict(PPOConfig()), **rl.get("ppo", {})}
            rl.setdefault("critic_warmup", RLConfig.critic_warmup)
        for key in ("method", "iterations", "grpo_groups"):
            if getattr(args, key) is not None:
                rl[key] = getattr(args, key)
        overrides["rl"] = rl
        dist = None
        if (args.address or args.learners > 1) and not args.workers:
            raise ValueError("--address and --learners are options of the Ray mode: give --workers N too")
        if args.workers:
            from vlafast.rl.dist import DistConfig

            dist = DistConfig(workers=args.workers, learners=args.learners, address=args.address,
                              cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker)
        summary = jobs.run_rl(args.init, args.out, recipe_overrides=overrides, resume=args.resume,
                              overwrite=args.overwrite, progress=progress, dist=dist, unnorm_key=args.unnorm_key)
    print(jobs.format_eval(args.phase, summary["eval"]))
    print(f"wrote {Path(args.out) / 'policy'} and {Path(args.out) / 'summary.json'}")
    return 0
