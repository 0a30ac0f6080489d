"""Rollout throughput: action chunks with exact log-probs per second.

GPU: real-size pi0 (random bf16 weights, 1 view, K=4): prefix encoding + Flow-SDE sampling
with log-probs through CUDA graphs (``GraphedSampler``) against the same loop run eagerly,
at batch 64 and 256 (docs/architecture.md §7 target: >= 200 chunks/s at batch 64).
CPU: the demo's tiny pi0 on the built-in UR5e task: Flow-SDE chunks with log-probs against
plain ODE chunks, and whole rollouts (policy + 16 MuJoCo envs) in env steps/s.
``--workers 1 2 ...``: the same rollouts spread over Ray workers (``vlafast.rl.dist``) on a local
cluster started here, against in-process collection in the same run (``_scaling_rows``).
"""

from __future__ import annotations

import argparse
import os

import torch

from vlafast import flow
from vlafast.bench.core import Row, time_ms


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", type=int, nargs="+", default=None, help="GPU batch sizes (default 64 256)")
    p.add_argument("--steps", type=int, default=4, help="denoise steps K (default 4, pi_RL's training K)")
    p.add_argument("--workers", type=int, nargs="+", default=None,
                   help="instead: PPO rollouts of the demo recipe on N Ray workers each (a local cluster started "
                        "here) vs in-process; env steps/s, chunks/s, scaling, weight-sync cost")
    p.add_argument("--envs", type=int, default=16, help="with --workers: envs in all (split among the workers)")
    p.add_argument("--chunks", type=int, default=4, help="with --workers: chunk steps per env per rollout")
    p.add_argument("--repeats", type=int, default=3, help="with --workers: timed rollouts per configuration")


def _gpu_rows(args: argparse.Namespace) -> list[Row]:
    from vlafast.flow import sampler as flow
    from vlafast.flow.graphs import GraphedSampler
    from vlafast.models import Pi0Config, Pi0Observation, Pi0Policy

    dev = torch.device("cuda")
    cfg = Pi0Config.pi0()
    with torch.device(dev):
        model = Pi0Policy(cfg)
    model = model.to(torch.bfloat16).eval()
    config = flow.flow_sde(a=0.5, hybrid=True, num_steps=args.steps)
    vfn = model.velocity_fn()
    mask = torch.zeros(cfg.horizon, cfg.action_dim, device=dev)
    mask[:10, :7] = 1.0  # executed part: 10 actions x 7 dims
    graphed = GraphedSampler(config, vfn)
    rows = []
    for B in args.batches or [64, 256]:
        g = torch.Generator(device=dev).manual_seed(0)
        s = cfg.vision.image_size
        obs = Pi0Observation(
            images=torch.rand(B, 1, 3, s, s, device=dev, generator=g, dtype=torch.bfloat16) * 2 - 1,
            image_masks=torch.ones(B, 1, dtype=torch.bool, device=dev),
            tokens=torch.randint(0, cfg.vocab_size, (B, 48), device=dev, generator=g),
            token_masks=torch.ones(B, 48, dtype=torch.bool, device=dev),
            state=torch.randn(B, cfg.state_dim, device=dev, generator=g),
        )
        noise = torch.randn(B, cfg.horizon, cfg.action_dim, device=dev, generator=g)

        def eager():
            with torch.no_grad():
                flow.sample(config, vfn, model.encode(obs), noise, action_mask=mask)

        def graph():
            with torch.no_grad():
                graphed(model.encode(obs), noise, action_mask=mask)

        ms_eager = time_ms(eager, device=dev, warmup=2, iters=10)
        ms_graph = time_ms(graph, device=dev, warmup=3, iters=20)
        rows.append(Row(bench="rollout", op="chunk+logprob pi0 (encode + Flow-SDE K=%d)" % args.steps,
                        shape=f"B={B} 1 view", dtype="bf16", backend="cuda-graph", median_ms=ms_graph,
                        baseline="eager", baseline_ms=ms_eager, achieved=B / (ms_graph / 1e3), unit="chunks/s",
                        extra={"eager_chunks_per_s": B / (ms_eager / 1e3), "graph_fallbacks": len(graphed.fallbacks)}))
    return rows


def _cpu_rows(args: argparse.Namespace) -> list[Row]:
    import time

    from vlafast.rl import train as T
    from vlafast.rl.recipe import Recipe, build_env, build_policy

    recipe = Recipe()
    env = build_env(recipe)
    policy = build_policy(recipe, env.spec).eval()
    obs = env.reset(seed=0)
    batch = policy.observe(obs)
    gen = torch.Generator().manual_seed(0)
    sde = flow.flow_sde(num_steps=args.steps)
    ode = flow.ode(args.steps)
    B = env.spec.num_envs
    ms_sde = time_ms(lambda: policy.act(batch, sde, gen), warmup=2, iters=15)
    ms_ode = time_ms(lambda: policy.act(batch, ode, gen), warmup=2, iters=15)
    rows = [Row(bench="rollout", op=f"act tiny pi0 (Flow-SDE K={args.steps} + log-prob + value)", shape=f"B={B}",
                dtype="fp32", backend="torch-cpu", median_ms=ms_sde, baseline="ODE sampling", baseline_ms=ms_ode,
                achieved=B / (ms_sde / 1e3), unit="chunks/s")]
    stats = T.new_stats()
    t0 = time.perf_counter()
    n_chunks = 6
    T.collect(policy, env, obs, n_chunks, sde, gen, stats)
    dt = time.perf_counter() - t0
    steps = sum(stats["env_steps"])
    t1 = time.perf_counter()
    for _ in range(n_chunks):
        env.step(env.expert_chunk(recipe.exec_horizon))
    dt_env = time.perf_counter() - t1
    rows.append(Row(bench="rollout", op=f"rollout {recipe.env} + tiny pi0", shape=f"B={B} x {n_chunks} chunks",
                    dtype="fp32", backend="torch-cpu", median_ms=dt * 1e3 / n_chunks, baseline="env + scripted expert",
                    baseline_ms=dt_env * 1e3 / n_chunks, achieved=steps / dt, unit="env steps/s",
                    extra={"env_only_steps_per_s": n_chunks * B * recipe.exec_horizon / dt_env}))
    env.close()
    return rows


def _scaling_rows(args: argparse.Namespace) -> list[Row]:
    """The demo recipe's PPO rollouts (collection only: sampling with log-probs, values, env
    steps) in-process vs on N Ray workers, same env count, same run: a rollout's median wall
    time, env steps/s, chunks/s; the speed-up over in-process and its efficiency (speed-up / N);
    the per-update weight sync (put + every worker loads) and its size."""
    import dataclasses
    import functools
    import statistics
    import time

    import ray

    from vlafast.rl import train as T
    from vlafast.rl.dist import DistConfig, RayCollector, ensure_cluster, trainable_names
    from vlafast.rl.recipe import Recipe, build_policy, env_slice

    rl = dataclasses.replace(Recipe().rl, algo="ppo", chunks_per_rollout=args.chunks, critic_warmup=1)
    recipe = dataclasses.replace(Recipe(), num_envs=args.envs, rl=rl)
    env = env_slice(recipe, 0, args.envs)
    policy = build_policy(recipe, env.spec).eval()
    gpu = torch.cuda.is_available()
    if gpu:
        policy = policy.cuda()

    def timed(collector) -> tuple[float, float, float]:
        """(median ms per rollout, env steps/s, chunks/s) over args.repeats rollouts after one warm-up."""
        collector.collect(policy, 0, T.new_stats())
        times, steps, chunks = [], 0, 0
        for it in range(1, args.repeats + 1):
            stats = T.new_stats()
            t0 = time.perf_counter()
            collector.collect(policy, it, stats)
            times.append(time.perf_counter() - t0)
            steps, chunks = steps + sum(stats["env_steps"]), chunks + sum(stats["chunks"])
        return statistics.median(times) * 1e3, steps / sum(times), chunks / sum(times)

    gen = torch.Generator(device=policy.device).manual_seed(0)
    base_ms, base_steps, base_chunks = timed(T.LocalCollector(env, rl, 0, gen))
    env.close()
    weight_bytes = sum(p.numel() * p.element_size() for n, p in policy.named_parameters()
                       if n in set(trainable_names(policy)))
    rows = []
    own = ensure_cluster(DistConfig(workers=max(args.workers)))  # a private loopback cluster unless one runs
    try:
        for n in args.workers:
            dist = DistConfig(workers=n, gpus_per_worker=1.0 / n if gpu else 0.0)
            with RayCollector(policy, functools.partial(env_slice, recipe), functools.partial(build_policy, recipe), rl,
                              dist, seed=0, num_envs=args.envs) as col:
                ms, steps_s, chunks_s = timed(col)
                sync_ms = statistics.median(col.sync(policy) for _ in range(5)) * 1e3
            rows.append(Row(
                bench="rollout", op=f"PPO rollout on Ray ({recipe.env}, tiny pi0, Flow-SDE K={rl.sampler.num_steps})",
                shape=f"B={args.envs} x {args.chunks} chunks, {n} worker{'s' * (n > 1)}", dtype="fp32",
                backend=f"ray-{n}w", median_ms=ms, baseline="in-process", baseline_ms=base_ms, achieved=steps_s,
                unit="env steps/s",
                extra={"workers": n, "chunks_per_s": chunks_s, "baseline_env_steps_per_s": base_steps,
                       "baseline_chunks_per_s": base_chunks, "speedup": base_ms / ms, "efficiency": base_ms / ms / n,
                       "weight_sync_ms": sync_ms, "weight_bytes": weight_bytes, "cpus": os.cpu_count()}))
    finally:
        if own:
            ray.shutdown()
    return rows


def run(args: argparse.Namespace) -> list[Row]:
    if args.workers:
        return _scaling_rows(args)
    return _gpu_rows(args) if torch.cuda.is_available() else _cpu_rows(args)
