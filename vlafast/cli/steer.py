"""`vlafast steer --policy PATH [--env NAME]`: clamp keyword clusters of neurons and compare the
behaviour (speed, success) with the unsteered policy on the same episodes, with intervals."""

from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("steer", help="clamp keyword clusters; print steered vs unsteered behaviour on the same episodes")
    p.add_argument("--policy", "--checkpoint", dest="policy", default=None,
                   help="any supported policy folder (default: train the tiny built-in policy now)")
    p.add_argument("--env", default=None, help="libero:<suite> | maniskill:<task> (default: the policy's own task)")
    p.add_argument("--tokenizer", default=None, help="the model's tokenizer (default: the policy folder's own)")
    p.add_argument("--fast-tokenizer", default=None,
                   help="pi0-FAST: its FAST processor folder (default: the policy folder's fast_tokenizer/)")
    p.add_argument("--tasks", default=None, help="with a LIBERO --env: task ids, comma separated")
    p.add_argument("--unnorm-key", default=None, help="OpenVLA: the dataset statistics to unnormalise with")
    p.add_argument("--max-episode-steps", type=int, default=None, help="with --env: step budget per episode")
    p.add_argument("--dictionary", default=None, help="a dictionary of this policy (default: build it, k=--k)")
    p.add_argument("--cluster", nargs="+", default=None,
                   help="ready keyword sets (fast slow up down care) to clamp, one run each (default fast slow); "
                        "with --cluster-file: names of its clusters (default all)")
    p.add_argument("--cluster-file", default=None,
                   help="clusters in the steering paper's form: YAML / JSON of name: [flat id = layer * d_ff + neuron, ...]")
    p.add_argument("--alpha", type=float, default=4.0, help="the constant the neurons are clamped to (default 4; the paper: 10)")
    p.add_argument("--max-neurons", type=int, default=None, help="keep the strongest N neurons of each cluster (default all)")
    p.add_argument("-k", "--k", type=int, default=3, help="top-k of the dictionary built here (default 3: a ~40-word vocabulary)")
    p.add_argument("--direction", type=float, default=None,
                   help="also run the mean-difference direction baseline (quickly - slowly) at +-this alpha; 0: skip "
                        "(default 1 on the built-in task, 0 elsewhere)")
    p.add_argument("--controls", type=int, default=0,
                   help="random neuron sets of each cluster's size to run as controls (default 0)")
    p.add_argument("--episodes", type=int, default=32, help="episodes per run (a multiple of the env count)")
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--json", default=None, help="also write the result as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import math

    from vlafast._io import atomic_write_text
    from vlafast.cli.eval import parse_tasks, positive
    from vlafast.interp import NeuronDictionary
    from vlafast.interp import behaviour as bh

    positive("episodes", args.episodes)
    positive("controls", args.controls, 0)
    positive("k", args.k)
    positive("max_neurons", args.max_neurons)
    positive("max_episode_steps", args.max_episode_steps)
    if not math.isfinite(args.alpha):
        raise ValueError(f"--alpha must be a finite number, got {args.alpha}")
    if args.cluster_file and args.dictionary:
        raise ValueError("--cluster-file names its neurons itself; drop --dictionary")
    names = args.cluster or (None if args.cluster_file else ["fast", "slow"])
    given = [f"--{k.replace('_', '-')}" for k in ("tokenizer", "fast_tokenizer", "tasks", "unnorm_key", "max_episode_steps")
             if getattr(args, k) is not None]
    if given and not args.env:
        raise ValueError(f"{', '.join(given)} apply with --env libero:<suite> | maniskill:<task>")
    if args.env:
        from vlafast import policies
        from vlafast.eval import benchmark_env, check_env_name

        if not args.policy:
            raise ValueError("--env needs --policy (the built-in policy trains on its own task)")
        check_env_name(args.env)
        tasks = parse_tasks(args.tasks)
        policy = policies.load(args.policy, args.tokenizer, unnorm_key=args.unnorm_key, fast_tokenizer=args.fast_tokenizer)
        overrides = {} if args.max_episode_steps is None else {"max_episode_steps": args.max_episode_steps}
        env, _ = benchmark_env(args.env, seed=args.seed, tasks=tasks, overrides=overrides)
    elif args.policy:
        from vlafast.rl.recipe import load_policy

        policy, _, env = load_policy(args.policy)
    else:
        print("no --policy: training the tiny built-in policy (SFT on scripted demos) ...", flush=True)
        from vlafast.rl.recipe import train_tiny_policy

        policy, env = train_tiny_policy(progress=True)
    try:
        if args.env:
            policy.bind(env.spec)
        policy.eval()
        from vlafast.policies import FlowPolicy

        flow = isinstance(policy, FlowPolicy)
        if args.direction and not flow:
            raise ValueError(f"--direction reads pi0's prefix activations; this {policy.spec.family} policy has none of "
                             "that kind: drop --direction (or pass 0)")
        # the direction baseline reads pi0's prefix activations (interp.behaviour.prefix_activations)
        direction = args.direction if args.direction is not None else (0.0 if args.env or not flow else 1.0)
        d = None
        if args.dictionary:
            d = NeuronDictionary.load(args.dictionary)
            if not d.matches(policy):
                raise ValueError(f"--dictionary {args.dictionary} was built from other weights than this policy")
        plans = bh.default_plans(policy, env, dictionary=d, clusters=names, alpha=args.alpha, k=args.k,
                                 max_neurons=args.max_neurons, direction_alpha=direction, controls=args.controls,
                                 cluster_file=args.cluster_file)
        for name in names or ():
            if name not in plans:
                print(f"cluster {name!r}: no neuron of layers {bh.action_layers(policy)} has its words in its top-k")
        result = bh.steering_comparison(policy, env, plans, episodes=args.episodes, seed=args.seed)
    finally:
        env.close()
    print(bh.format_comparison(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
    return 0
