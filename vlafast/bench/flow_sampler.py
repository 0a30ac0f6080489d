"""Flow sampler throughput: ODE vs Flow-SDE / Flow-Noise with log-probs, eager vs CUDA graph.

The velocity net is a stand-in for the pi0 action expert (gemma_300m: width 1024, d_ff 4096,
18 layers) made of its per-token parts only: action in-projection + time embedding, L
pre-norm gated-GELU MLP blocks, out-projection, bf16 weights; no attention over the prefix
(docs/architecture.md §3: the prefix KV cache is encoded once, outside this loop). Rows, per (B, K):

* ``<method>`` vs ``ode`` in the same mode (eager / graphed): the cost of sampling with
  exact log-probs over plain ODE sampling (``ratio - 1`` is the overhead; target <= 5%);
* ``<method>`` graphed vs the same method eager: what the CUDA graph buys;
* ``log_prob+backward <method>``: the PPO update's recomputation from a stored trace (one
  velocity call for hybrid Flow-SDE, K for Flow-Noise), against ODE sampling.
``achieved`` is chunks/s (B chunks per call). On the CPU the shapes are small and only the
eager rows run.
"""

from __future__ import annotations

import argparse
import math

import torch

from vlafast.bench.core import Row, device_name, time_ms

METHODS = ("flow_sde", "flow_noise")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, nargs="+", default=None, help="batch sizes (CUDA: 1 64 256; CPU: 1 8)")
    p.add_argument("--steps", type=int, nargs="+", default=None, help="denoise steps K (CUDA: 4 10; CPU: 4)")
    p.add_argument("--layers", type=int, default=None, help="MLP blocks (CUDA: 18 like gemma_300m; CPU: 2)")
    p.add_argument("--width", type=int, default=None, help="expert width (CUDA: 1024; CPU: 64)")
    p.add_argument("--horizon", type=int, default=None, help="chunk length T (CUDA: 50; CPU: 10)")
    p.add_argument("--action-dim", type=int, default=None, help="action dim A (CUDA: 32 padded; CPU: 7)")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph rows")


class ExpertMLP(torch.nn.Module):
    """Per-token stand-in for the pi0 expert: x [B, T, A], t [B] -> (v [B, T, A], h [B, T, D])."""

    def __init__(self, action_dim: int, width: int, ffn: int, layers: int) -> None:
        super().__init__()
        self.width = width
        self.inp = torch.nn.Linear(action_dim, width)
        self.time = torch.nn.Linear(width, width)
        self.norms = torch.nn.ModuleList(torch.nn.RMSNorm(width) for _ in range(layers))
        self.gate_up = torch.nn.ModuleList(torch.nn.Linear(width, 2 * ffn, bias=False) for _ in range(layers))
        self.down = torch.nn.ModuleList(torch.nn.Linear(ffn, width, bias=False) for _ in range(layers))
        self.final = torch.nn.RMSNorm(width)
        self.out = torch.nn.Linear(width, action_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx):
        dtype = self.inp.weight.dtype
        half = self.width // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
        ang = t.float()[:, None] * 1000.0 * freqs
        temb = torch.cat([ang.sin(), ang.cos()], dim=-1).to(dtype)       # [B, D]
        h = self.inp(x.to(dtype)) + self.time(temb)[:, None, :]
        for norm, gu, down in zip(self.norms, self.gate_up, self.down):
            g, u = gu(norm(h)).chunk(2, dim=-1)
            h = h + down(torch.nn.functional.gelu(g, approximate="tanh") * u)
        h = self.final(h)
        return self.out(h).float(), h


def run(args: argparse.Namespace) -> list[Row]:
    from vlafast import flow

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    batches = args.batch or ([1, 64, 256] if cuda else [1, 8])
    steps = args.steps or ([4, 10] if cuda else [4])
    layers = args.layers or (18 if cuda else 2)
    width = args.width or (1024 if cuda else 64)
    T = args.horizon or (50 if cuda else 10)
    A = args.action_dim or (32 if cuda else 7)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    net = ExpertMLP(A, width, 4 * width, layers).to(dev, dtype).eval()
    head = flow.NoiseHead(width, A).to(dev)
    mask = torch.zeros(T, A, device=dev)
    mask[: min(5, T), : min(7, A)] = 1.0  # pi_RL: the first 5 actions x 7 dims are executed
    # CPU: a fixed, small number of calls so `vlafast bench all` stays quick on a loaded machine.
    timing = dict(device=dev, min_time_s=0.5, max_iters=200) if cuda else dict(device=dev, warmup=1, iters=5)
    modes = ["eager"] + (["graphed"] if cuda and not args.no_graph else [])
    rows: list[Row] = []
    for K in steps:
        configs = {"ode": flow.ode(num_steps=K), "flow_sde": flow.flow_sde(num_steps=K),
                   "flow_noise": flow.flow_noise(head, num_steps=K)}
        for B in batches:
            noise = torch.randn(B, T, A, device=dev)
            ms: dict[tuple[str, str], float] = {}
            for mode in modes:
                for name, cfg in configs.items():
                    m = None if name == "ode" else mask
                    if mode == "eager":
                        fn = lambda cfg=cfg, m=m: flow.sample(cfg, net, None, noise, action_mask=m)  # noqa: E731
                    else:
                        runner = flow.GraphedSampler(cfg, net)
                        fn = lambda runner=runner, m=m: runner(None, noise, action_mask=m)  # noqa: E731
                        fn()
                        if runner.fallbacks:
                            raise RuntimeError(f"graph capture failed: {runner.fallbacks}")
                    with torch.no_grad():
                        ms[(mode, name)] = time_ms(fn, **timing)
            # the PPO update's side: recompute the log-prob of a stored trace, forward + backward
            for name in METHODS:
                _, trace = flow.sample(configs[name], net, None, noise, action_mask=mask)

                def update(trace=trace) -> None:
                    flow.log_prob(net, None, trace).sum().backward()

                ms[("eager", f"log_prob-{name}")] = time_ms(update, **timing)
                net.zero_grad(set_to_none=True)
                head.zero_grad(set_to_none=True)
            shape = f"B={B} K={K} T={T} A={A} L={layers} D={width}"
            dt = str(dtype).replace("torch.", "")
            for name in METHODS:
                t = ms[("eager", f"log_prob-{name}")]
                rows.append(Row(
                    bench="flow-sampler", op=f"log_prob+backward {name}", shape=shape, dtype=dt, backend="eager",
                    median_ms=t, baseline="ode (eager)", baseline_ms=ms[("eager", "ode")],
                    achieved=1000.0 * B / t, unit="chunks/s", extra={"B": B, "K": K},
                ))
            for mode in modes:
                for name in ("ode", *METHODS):
                    base = None if name == "ode" else ms[(mode, "ode")]
                    t = ms[(mode, name)]
                    extra = {"B": B, "K": K, "device": device_name()}
                    if base is not None:
                        extra["logprob_overhead_pct"] = round(100.0 * (t / base - 1.0), 2)
                    rows.append(Row(
                        bench="flow-sampler", op=name, shape=shape, dtype=dt, backend=mode, median_ms=t,
                        baseline="" if base is None else f"ode ({mode})", baseline_ms=base,
                        achieved=1000.0 * B / t, unit="chunks/s", extra=extra,
                    ))
                    if mode == "graphed":
                        eager = ms[("eager", name)]
                        rows.append(Row(
                            bench="flow-sampler", op=name, shape=shape, dtype=dt, backend="graphed",
                            median_ms=t, baseline=f"{name} (eager)", baseline_ms=eager,
                            achieved=1000.0 * B / t, unit="chunks/s",
                            extra={"B": B, "K": K, "speedup": round(eager / t, 3)},
                        ))
    return rows
