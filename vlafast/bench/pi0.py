"""pi0 inference: one action chunk (prefix + K Euler steps of the expert) at batch 1 with
1/2/3 camera views, eager vs CUDA-graphed, and batched chunks/s.

On CUDA: the published pi0 sizes with random weights in bf16 (realtime-vla anchors on an RTX
4090: 20 / 27.3 / 36.8 ms for 1/2/3 views; docs/architecture.md §7 target <= 12 ms for 2 views on an H100).
Backends: ``eager`` (the baseline), ``graph-loop`` (prefix eager, the K expert steps replayed
from one CUDA graph reading static prefix K/V buffers) and ``graph-all`` (prefix and steps in
one graph). On CPU: the tiny config in fp32, eager only, so ``vlafast bench all`` stays quick.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

from vlafast.bench.core import Row, time_ms


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", choices=("pi0", "pi05"), default="pi0")
    p.add_argument("--views", type=int, nargs="+", default=[1, 2, 3], help="camera views for the batch-1 rows")
    p.add_argument("--batches", type=int, nargs="+", default=[8, 64], help="batch sizes for chunks/s (2 views)")
    p.add_argument("--steps", type=int, default=10, help="denoise steps K (default 10)")
    p.add_argument("--prompt-tokens", type=int, default=48, help="prompt length (default 48)")


def _policy(variant: str, device: torch.device):
    from vlafast.models import Pi0Config, Pi0Policy

    if device.type == "cuda":
        cfg = Pi0Config.pi05() if variant == "pi05" else Pi0Config.pi0()
        with torch.device(device):
            policy = Pi0Policy(cfg)  # random weights: timing only
        return policy.to(torch.bfloat16).eval(), "bf16"
    cfg = Pi0Config.tiny(pi05=variant == "pi05")
    return Pi0Policy(cfg).eval(), "fp32"


def _obs(policy, batch: int, views: int, tokens: int, device: torch.device):
    from vlafast.models import Pi0Observation

    cfg = policy.cfg
    g = torch.Generator(device=device).manual_seed(0)
    s = cfg.vision.image_size
    images = torch.rand(batch, views, 3, s, s, device=device, generator=g, dtype=policy.dtype) * 2 - 1
    return Pi0Observation(
        images=images,
        image_masks=torch.ones(batch, views, dtype=torch.bool, device=device),
        tokens=torch.randint(0, cfg.vocab_size, (batch, tokens), device=device, generator=g),
        token_masks=torch.ones(batch, tokens, dtype=torch.bool, device=device),
        state=None if cfg.is_pi05 else torch.randn(batch, cfg.state_dim, device=device, generator=g),
    )


def _capture(fn: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm up on a side stream, then capture ``fn`` into a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@torch.no_grad()
def _graph_loop(policy, obs, noise: torch.Tensor, K: int) -> Callable[[], torch.Tensor]:
    """Prefix eager, then the K Euler steps replayed from one graph over static buffers."""
    state = policy.prepare_state(obs.state)
    cache = policy.embed_prefix(obs.images, obs.image_masks, obs.tokens, obs.token_masks)  # static buffers
    x0 = noise.clone()
    B = noise.shape[0]

    def loop() -> torch.Tensor:
        x = x0.float()
        for k in range(K):
            t = torch.full((B,), 1.0 - k / K, device=x.device)
            x = x - policy.velocity(x, t, state, cache) / K
        return x

    graph, out = _capture(loop)

    def run() -> torch.Tensor:
        cache.copy_(policy.embed_prefix(obs.images, obs.image_masks, obs.tokens, obs.token_masks))
        graph.replay()
        return out

    return run


@torch.no_grad()
def _graph_all(policy, obs, noise: torch.Tensor, K: int) -> Callable[[], torch.Tensor]:
    graph, out = _capture(lambda: policy.sample_actions(obs, noise=noise, num_steps=K))

    def run() -> torch.Tensor:
        graph.replay()
        return out

    return run


def run(args: argparse.Namespace) -> list[Row]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy, dtype = _policy(args.variant, device)
    cuda = device.type == "cuda"
    K = args.steps
    cfg = policy.cfg
    rows: list[Row] = []

    def measure(batch: int, views: int) -> dict[str, float]:
        obs = _obs(policy, batch, views, args.prompt_tokens, device)
        noise = torch.randn(batch, cfg.horizon, cfg.action_dim, device=device)
        eager = lambda: policy.sample_actions(obs, noise=noise, num_steps=K)  # noqa: E731
        quick = {} if cuda else {"warmup": 1, "iters": 3}  # CPU: tiny config, a few calls
        times = {"eager": time_ms(eager, device=device, min_time_s=0.3, max_iters=200, **quick)}
        with torch.no_grad():
            prefix = lambda: policy.embed_prefix(obs.images, obs.image_masks, obs.tokens, obs.token_masks)  # noqa: E731
            times["prefix"] = time_ms(prefix, device=device, min_time_s=0.2, max_iters=200, **quick)
        if cuda:
            ref = eager()
            for name, build in (("graph-loop", _graph_loop), ("graph-all", _graph_all)):
                fn = build(policy, obs, noise, K)
                err = (fn() - ref).abs().max().item()  # replay must reproduce the eager chunk
                if not err < 1e-2 * max(1.0, ref.abs().max().item()):
                    raise RuntimeError(f"{name} replay differs from eager by {err:.3g}")
                times[name] = time_ms(fn, device=device, min_time_s=0.3, max_iters=500)
        return times

    for views in args.views:
        times = measure(1, views)
        prefix_len = views * cfg.vision.num_patches + args.prompt_tokens
        shape = f"B=1 views={views} K={K} P={prefix_len} T={cfg.horizon}"
        for backend in [b for b in ("eager", "graph-loop", "graph-all") if b in times]:
            base = backend != "eager"
            rows.append(Row(
                bench="pi0", op=f"{cfg.variant}_chunk", shape=shape, dtype=dtype, backend=backend,
                median_ms=times[backend], baseline="eager" if base else "", baseline_ms=times["eager"] if base else None,
                achieved=1e3 / times[backend], unit="chunks/s",
                extra={"prefix_ms": round(times["prefix"], 4), "config": "real" if cuda else "tiny"},
            ))
    for batch in args.batches:
        times = measure(batch, 2)
        best = "graph-all" if cuda else "eager"
        rows.append(Row(
            bench="pi0", op=f"{cfg.variant}_chunk", shape=f"B={batch} views=2 K={K} T={cfg.horizon}", dtype=dtype,
            backend=best, median_ms=times[best], baseline="eager" if cuda else "",
            baseline_ms=times["eager"] if cuda else None,
            achieved=batch * 1e3 / times[best], unit="chunks/s",
            extra={"prefix_ms": round(times["prefix"], 4), "eager_chunks_per_s": round(batch * 1e3 / times["eager"], 2),
                   "config": "real" if cuda else "tiny"},
        ))
    return rows
