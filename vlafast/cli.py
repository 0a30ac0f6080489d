"""Command line: `vlafast info | demo | bench`. The CLI only wires; the work lives in modules."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _cmd_info(args: argparse.Namespace) -> int:
    from vlafast import info

    print(info.render(info.collect()))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vlafast import demo

    return demo.main(args)


def _cmd_dictionary(args: argparse.Namespace) -> int:
    from vlafast.interp import commands

    return commands.main_dictionary(args)


def _cmd_steer(args: argparse.Namespace) -> int:
    from vlafast.interp import commands

    return commands.main_steer(args)


def _cmd_serve_robot(args: argparse.Namespace) -> int:
    from vlafast.robot import serve

    return serve.main(args)


def _cmd_fake_ur(args: argparse.Namespace) -> int:
    from vlafast.robot import fake_ur

    return fake_ur.main(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from vlafast.rl import jobs

    progress = not args.no_progress
    if args.phase == "sft":
        if args.init:
            raise SystemExit("vlafast train sft builds a fresh policy: drop --init")
        if args.workers:
            raise SystemExit("--workers applies to ppo/grpo (rollouts); sft trains on scripted demos in-process")
        recipe = jobs.recipe_from_file(args.config, env=args.env, seed=args.seed)
        summary = jobs.run_sft(recipe, args.out, progress=progress)
    else:
        if not args.init and not args.resume:
            raise SystemExit(f"vlafast train {args.phase} needs --init <policy.pt> (from `vlafast train sft`)")
        if args.env:
            raise SystemExit("--env applies to `train sft`; RL continues on the env of its --init policy")
        overrides: dict = json.loads(Path(args.config).read_text()) if args.config else {}
        rl = dict(overrides.pop("rl", {}))
        rl["algo"] = args.phase
        if args.phase == "ppo":  # PPO in RLinf's regime (PPOConfig's defaults), not the demo's GRPO tuning
            from dataclasses import asdict

            from vlafast.rl.losses import PPOConfig
            from vlafast.rl.train import RLConfig

            rl["ppo"] = {**asdict(PPOConfig()), **rl.get("ppo", {})}
            rl.setdefault("critic_warmup", RLConfig.critic_warmup)
        for key in ("method", "iterations", "grpo_groups"):
            if getattr(args, key) is not None:
                rl[key] = getattr(args, key)
        overrides["rl"] = rl
        init = args.init or Path(args.out) / "policy.pt"
        dist = None
        if (args.address or args.learners > 1) and not args.workers:
            raise SystemExit("--address and --learners are options of the Ray mode: give --workers N too")
        if args.workers:
            from vlafast.rl.dist import DistConfig

            dist = DistConfig(workers=args.workers, learners=args.learners, address=args.address,
                              cpus_per_worker=args.cpus_per_worker, gpus_per_worker=args.gpus_per_worker)
        summary = jobs.run_rl(init, args.out, recipe_overrides=overrides, resume=args.resume, progress=progress,
                              dist=dist)
    print(jobs.format_eval(args.phase, summary["eval"]))
    print(f"wrote {Path(args.out) / 'policy.pt'} and {Path(args.out) / 'summary.json'}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from vlafast.rl import checkpoint_eval

    if args.env:
        return checkpoint_eval.main(args)
    checkpoint_eval.reject_env_options(args)
    from vlafast.rl import jobs

    summary = jobs.run_eval(args.checkpoint, episodes=args.episodes, seed=args.seed, progress=not args.no_progress)
    print(jobs.format_eval("eval", summary))
    return 0


def _where_parser(prog: str = "vlafast bench all", add_help: bool = True) -> argparse.ArgumentParser:
    """Options shared by every benchmark run: where the results CSV goes."""
    p = argparse.ArgumentParser(prog=prog, add_help=add_help)
    p.add_argument("--results-dir", default="bench/results", help="where <device>.csv goes")
    p.add_argument("--out", default=None, help="explicit CSV path (overrides --results-dir)")
    return p


def _bench_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of one benchmark: its own options plus where results go."""
    from vlafast.bench import BENCHMARKS

    bench = BENCHMARKS[name]
    p = argparse.ArgumentParser(
        prog=f"vlafast bench {name}", description=bench.help, parents=[_where_parser(add_help=False)]
    )
    bench.load().add_arguments(p)
    return p


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from vlafast.bench import BENCHMARKS
    from vlafast.bench.core import default_results_path, format_table, write_rows

    if args.bench_cmd == "list":
        for b in BENCHMARKS.values():
            print(f"{b.name:16s} {'[gpu] ' if b.gpu_only else ''}{b.help}")
        return 0
    if args.bench_cmd == "plot":
        from vlafast.bench.plot import plot_results

        for path in plot_results(args.csv, args.out_dir or Path(args.csv).parent / "plots"):
            print(f"wrote {path}")
        return 0

    if args.bench_cmd == "all":
        # Each benchmark with its own defaults; only where results go is shared.
        where = _where_parser().parse_args(args.rest)
        runs = [(name, _bench_parser(name).parse_args([])) for name in BENCHMARKS]
        for _, ns in runs:
            ns.results_dir, ns.out = where.results_dir, where.out
    else:
        where = _bench_parser(args.bench_cmd).parse_args(args.rest)
        runs = [(args.bench_cmd, where)]

    rows = []
    for name, ns in runs:
        bench = BENCHMARKS[name]
        if bench.gpu_only and not torch.cuda.is_available():
            print(f"skip {name}: needs a CUDA device")
            continue
        missing = bench.missing()
        if missing:
            print(f"skip {name}: needs {', '.join(missing)} (pip install 'vlafast[robot,sim]')")
            continue
        print(f"== {name}: {bench.help}", flush=True)
        rows += bench.load().run(ns)
    if not rows:
        print("no benchmark rows produced")
        return 1
    print(format_table(rows))
    out = Path(where.out) if where.out else default_results_path(where.results_dir)
    write_rows(rows, out)
    print(f"wrote {len(rows)} row(s) to {out}")
    return 0


def _cmd_bench_import(rest: list[str]) -> int:
    from vlafast.bench.harvest import import_run

    q = argparse.ArgumentParser(prog="vlafast bench import",
                                description="file a `make gpu-check OUT=DIR` run into bench/results and the README")
    q.add_argument("dir", help="the OUT folder of gpu-check")
    q.add_argument("--results-dir", default="bench/results")
    q.add_argument("--readme", default="README.md", help="README whose bench-table is rewritten ('' for none)")
    q.add_argument("--no-plots", action="store_true")
    a = q.parse_args(rest)
    for path in import_run(a.dir, a.results_dir, a.readme or None, plots=not a.no_plots):
        print(f"wrote {path}")
    return 0


def _cmd_bench_entry(args: argparse.Namespace) -> int:
    if args.bench_cmd == "import":
        return _cmd_bench_import(args.rest)
    if args.bench_cmd == "plot":
        q = argparse.ArgumentParser(prog="vlafast bench plot", description="turn a results CSV into PNGs")
        q.add_argument("csv")
        q.add_argument("-o", "--out-dir", default=None, help="default: <csv folder>/plots")
        args = argparse.Namespace(**vars(args), **vars(q.parse_args(args.rest)))
    return _cmd_bench(args)


def build_parser() -> argparse.ArgumentParser:
    from vlafast import __version__
    from vlafast.bench import BENCHMARKS

    parser = argparse.ArgumentParser(prog="vlafast", description="fast vision-language-action models")
    parser.add_argument("--version", action="version", version=f"vlafast {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logging")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("info", help="versions, devices, backends, whether _C is built")
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("demo", help="the built-in demo (CPU, no downloads)")
    p.add_argument("--out", default="runs", help="runs folder; the report goes to <out>/<date>/ (default runs)")
    p.add_argument("--seconds", type=float, default=2.0, help="servo-timing duration")
    p.add_argument("--quick", action="store_true", help="smoke-test budget (seconds, not minutes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", help="train a flow VLA on a VecEnv: sft (scripted demos) | ppo | grpo (pi_RL)")
    p.add_argument("phase", choices=["sft", "ppo", "grpo"])
    p.add_argument("--out", required=True, help="run folder (policy.pt, metrics.json, summary.json)")
    p.add_argument("--config", default=None, help="recipe JSON (partial; see vlafast/rl/recipe.py)")
    p.add_argument("--env", default=None, help="sft: environment name (default ur5e-reach)")
    p.add_argument("--init", default=None, help="ppo/grpo: policy.pt to start from")
    p.add_argument("--method", choices=["flow_sde", "flow_noise"], default=None, help="ppo/grpo sampler")
    p.add_argument("--iterations", type=int, default=None, help="ppo/grpo updates")
    p.add_argument("--groups", dest="grpo_groups", choices=["episode", "state"], default=None,
                   help="grpo: groups of whole episodes from one seed, or of chunks from one simulator state")
    p.add_argument("--resume", action="store_true", help="ppo/grpo: continue from <out>/checkpoint.pt")
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
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="evaluate a policy.pt on fixed seeds, or a pi0 / pi0.5 checkpoint on --env "
                                     "(success rate with a 95% interval)")
    p.add_argument("--checkpoint", required=True, help="policy.pt; with --env: a LeRobot / openpi pi0 / pi0.5 folder")
    p.add_argument("--episodes", type=int, default=None, help="with --env: per task (default 10)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    from vlafast.rl import checkpoint_eval

    checkpoint_eval.add_arguments(p)
    p.set_defaults(func=_cmd_eval)

    from vlafast.interp import commands as interp_commands

    p = sub.add_parser("dictionary", help="neuron dictionary: build (value vectors -> vocab top-k) | search | explain")
    interp_commands.add_dictionary_arguments(p)
    p.set_defaults(func=_cmd_dictionary)

    p = sub.add_parser("steer", help="clamp keyword clusters on the built-in task; print steered vs unsteered speed")
    interp_commands.add_steer_arguments(p)
    p.set_defaults(func=_cmd_steer)

    from vlafast.robot import fake_ur, serve

    p = sub.add_parser("robot", help="real-time UR5e control: run (servo loop + policy) | fake-ur (loopback controller)")
    robot_sub = p.add_subparsers(dest="robot_cmd", required=True)
    r = robot_sub.add_parser("run", help="async loop: inference thread + C++ servo on mujoco | ur-rtde | null; "
                             "scripted or pi0-reach policy (RTC, ensembling); per-cycle report")
    serve.add_arguments(r)
    r.set_defaults(func=_cmd_serve_robot)
    r = robot_sub.add_parser("fake-ur", help="a UR controller on loopback (RTDE, dashboard, script ports) that ur_rtde "
                             "drives: try `robot run --backend ur-rtde --host 127.0.0.1` against it")
    fake_ur.add_arguments(r)
    r.set_defaults(func=_cmd_fake_ur)
    p = sub.add_parser("serve-robot", help="old name of `vlafast robot run`")
    serve.add_arguments(p)
    p.set_defaults(func=_cmd_serve_robot)

    p = sub.add_parser(
        "bench", help="run benchmarks; results go to bench/results/<device>.csv",
        description="vlafast bench list | plot CSV | import DIR | all | <name> [options]  (see `vlafast bench <name> -h`)",
    )
    p.add_argument("bench_cmd", choices=["list", "plot", "import", "all", *BENCHMARKS],
                   metavar="{list,plot,import,all,<name>}")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    p.set_defaults(func=_cmd_bench_entry)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
