"""Rollout throughput: action chunks with exact log-probs per second.

GPU: real-size pi0 (random bf16 weights, 1 view, K=4): prefix encoding + Flow-SDE sampling
with log-probs through CUDA graphs (``GraphedSampler``) against the same loop run eagerly,
at batch 64 and 256 (DESIGN §7 target: >= 200 chunks/s at batch 64).
CPU: the demo's tiny pi0 on the built-in UR5e task: Flow-SDE chunks with log-probs against
plain ODE chunks, and whole rollouts (policy + 16 MuJoCo envs) in env steps/s.
"""

from __future__ import annotations

import argparse

import torch

from vlafast.bench.core import Row, time_ms


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batches", type=int, nargs="+", default=None, help="GPU batch sizes (default 64 256)")
    p.add_argument("--steps", type=int, default=4, help="denoise steps K (default 4, pi_RL's training K)")


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
    sde = policy.sampler_config("flow_sde", args.steps)
    ode = policy.sampler_config("ode", args.steps)
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


def run(args: argparse.Namespace) -> list[Row]:
    return _gpu_rows(args) if torch.cuda.is_available() else _cpu_rows(args)
