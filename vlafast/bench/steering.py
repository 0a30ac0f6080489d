"""Steering overhead on a whole graphed pi0 chunk (prefix + K=10 expert steps) at batch 1 and 64.

On CUDA: published pi0 sizes, random bf16 weights, 2 camera views; one CUDA graph per variant
holding the whole ``sample_actions`` call (as ``vlafast bench pi0``'s graph-all):

* ``plain``: no plan (the baseline);
* ``SteeringPlan``: ``--neurons`` neurons clamped in every VLM layer that can move the actions
  (all but the last), all requests on;
* ``SteeringPlan mask=0``: the same graph after ``plan.set(mask=0)`` (no recapture);
* ``DirectionPlan``: a vector added after one VLM layer.

``achieved`` is the overhead in percent of the plain chunk and ``peak`` the 2 % budget
(docs/architecture.md §7), so ``pct_peak`` is the share of the budget used. Each graph's output is checked
against the eager run under the same plan. On a CPU the tiny config runs eagerly (no graphs):
the numbers only prove the path works.
"""

from __future__ import annotations

import argparse

import torch

from vlafast.bench.core import Row, time_ms

OVERHEAD_BUDGET_PCT = 2.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batch sizes (default 1 64)")
    p.add_argument("--neurons", type=int, default=64, help="neurons clamped per VLM layer (default 64)")
    p.add_argument("--steps", type=int, default=10, help="denoise steps K (default 10)")
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=48)


@torch.no_grad()
def _measure(policy, B: int, args: argparse.Namespace, device: torch.device, dtype: str) -> list[Row]:
    from vlafast import _backend
    from vlafast.bench.pi0 import _capture, _obs
    from vlafast.interp import DirectionPlan, SteeringPlan

    cuda = device.type == "cuda"
    cfg = policy.cfg
    K = args.steps
    obs = _obs(policy, B, args.views, args.prompt_tokens, device)
    noise = torch.randn(B, cfg.horizon, cfg.action_dim, device=device, generator=torch.Generator(device).manual_seed(1))
    chunk = lambda: policy.sample_actions(obs, noise=noise, num_steps=K)  # noqa: E731
    F = cfg.vlm.mlp_dim
    g = torch.Generator().manual_seed(2)
    layers = range(cfg.vlm.depth - 1)  # the last VLM MLP never reaches the actions
    neurons = [(l, int(i)) for l in layers for i in torch.randperm(F, generator=g)[: args.neurons]]
    clamp = SteeringPlan(neurons, alpha=4.0, max_batch=B)
    direction = DirectionPlan({cfg.vlm.depth // 2: torch.randn(cfg.vlm.width, generator=g) * 0.1}, max_batch=B)

    def build(plan):
        """(timed callable, output tensor, eager reference) for the chunk under ``plan``."""
        if plan is not None:
            plan.apply(policy)
        ref = chunk()
        if cuda:
            graph, out = _capture(chunk)
            fn = graph.replay
        else:
            fn, out = chunk, None
        return fn, out, ref

    quick = {} if cuda else {"warmup": 1, "iters": 3}
    times, errors = {}, {}
    plain_ref = None
    for name, plan in (("plain", None), ("SteeringPlan", clamp), ("DirectionPlan", direction)):
        fn, out, ref = build(plan)
        plain_ref = ref if plan is None else plain_ref
        if out is not None:
            fn()
            errors[name] = (out - ref).abs().max().item()
        times[name] = time_ms(fn, device=device, min_time_s=0.3, max_iters=300, **quick)
        if plan is clamp:  # the same graph with every request switched off through the device buffer
            clamp.set(mask=0.0)
            if out is not None:
                fn()
                errors[name + " mask=0"] = (out - plain_ref).abs().max().item()
            times[name + " mask=0"] = time_ms(fn, device=device, min_time_s=0.3, max_iters=300, **quick)
        if plan is not None:
            plan.remove(policy)
    worst = max(errors.values(), default=0.0)
    if worst > 1e-2:
        raise RuntimeError(f"a graphed chunk differs from its eager reference by {worst:.3g}: {errors}")

    rows = []
    shape = f"B={B} views={args.views} K={K} neurons={len(clamp)} ({args.neurons}/layer x {len(layers)})"
    for name in ("SteeringPlan", "SteeringPlan mask=0", "DirectionPlan"):
        over = 100.0 * (times[name] / times["plain"] - 1.0)
        rows.append(Row(
            bench="steering", op=f"pi0_chunk+{name}", shape=shape, dtype=dtype,
            backend=("graph+" if cuda else "eager+") + _backend.resolve("steer_correction", device),
            median_ms=times[name], baseline="plain chunk (same graph mode)", baseline_ms=times["plain"],
            achieved=over, unit="% overhead", peak=OVERHEAD_BUDGET_PCT,
            extra={"config": "real" if cuda else "tiny", "graph_vs_eager_max_err": errors.get(name)},
        ))
    return rows


def run(args: argparse.Namespace) -> list[Row]:
    from vlafast.bench.pi0 import _policy

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    policy, dtype = _policy("pi0", device)
    rows: list[Row] = []
    for B in args.batch:
        rows += _measure(policy, B, args, device, dtype)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows
