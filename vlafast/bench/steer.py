"""Cost of in-place steering inside a Gemma-2B MLP (D=2048, d_ff=16384, bf16), at batch 1 and 64.

Each variant is captured in one CUDA graph holding ``--layers`` MLP calls (a model's worth of
layers, so the graph's own launch cost does not dominate) and timed per layer:

* ``MLP``: gate/up projections, gelu-tanh gate, down_proj; ``down_proj``: the matmul alone;
* ``+ steer_correction_``: the same plus the correction ``y += mask * (alpha - h[..., S]) @ W_sel.T``
  with the gather done in the kernel (``index=``; alpha, mask in device buffers); ``extra`` also
  has the two-kernel form (``index_select`` then the correction) as ``*+gather+correction_ms``;
* ``+ add_direction_``: the MLP plus ``y += mask * alpha * direction``.

``achieved`` is the overhead in percent of the baseline and ``peak`` the 2 % budget
(docs/architecture.md §7), so ``pct_peak`` is the share of the budget used. On a CPU the variants run
eagerly at a tiny width (no graphs): the numbers only prove the path works.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

from vlafast.bench.core import Row, time_ms

OVERHEAD_BUDGET_PCT = 2.0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batch sizes, one token each (default 1 64)")
    p.add_argument("--selected", type=int, default=64, help="neurons clamped per layer, S (default 64)")
    p.add_argument("--layers", type=int, default=18, help="MLP calls per captured graph (default 18, Gemma-2B)")


def _graphed(fn: Callable[[], None], gpu: bool) -> Callable[[], None]:
    """fn captured in a CUDA graph (after warm-up on a side stream); fn itself on a CPU."""
    if not gpu:
        return fn
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _measure(B: int, S: int, layers: int, device: torch.device, gpu: bool) -> list[Row]:
    from vlafast import _backend
    from vlafast.ops.steer import add_direction_, steer_correction_

    D, F = (2048, 16384) if gpu else (64, 256)
    dt = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(dt)

    x = rand(B, 1, D)
    w_gate, w_up, w_down = rand(F, D, scale=D**-0.5), rand(F, D, scale=D**-0.5), rand(D, F, scale=F**-0.5)
    sel = torch.randperm(F, device=device, generator=g)[:S]
    w_sel = w_down[:, sel].contiguous()  # [D, S], gathered once when a plan is applied
    alpha = torch.full((B,), 4.0, device=device)
    mask = torch.ones(B, device=device)
    direction = rand(D)
    h = torch.empty(B, 1, F, device=device, dtype=dt)
    h_sel = torch.empty(B, 1, S, device=device, dtype=dt)
    y = torch.empty(B, 1, D, device=device, dtype=dt)

    def up() -> None:
        torch.mul(torch.nn.functional.gelu(x @ w_gate.T, approximate="tanh"), x @ w_up.T, out=h)

    def down() -> None:
        torch.matmul(h, w_down.T, out=y)

    def correct() -> None:
        steer_correction_(y, h, w_sel, alpha, mask, index=sel)

    def gather_correct() -> None:
        torch.index_select(h, 2, sel, out=h_sel)
        steer_correction_(y, h_sel, w_sel, alpha, mask)

    variants = {
        "mlp": [up, down],
        "mlp+correction": [up, down, correct],
        "mlp+direction": [up, down, lambda: add_direction_(y, direction, alpha, mask)],
        "down": [down],
        "down+correction": [down, correct],
        "mlp+gather+correction": [up, down, gather_correct],
        "down+gather+correction": [down, gather_correct],
    }
    up()
    ms = {}
    for name, steps in variants.items():
        def body(steps=steps) -> None:
            for _ in range(layers):
                for step in steps:
                    step()
        ms[name] = time_ms(_graphed(body, gpu), device=device) / layers

    shape = f"gemma-mlp B={B} T=1 D={D} F={F} S={S}"
    backend = f"{_backend.resolve('steer_correction', device)}{'+graph' if gpu else ''}"
    extra = {"layers_per_graph": layers, **{f"{k}_ms": v for k, v in ms.items()}}

    def row(op: str, ours: str, base: str, base_label: str) -> Row:
        overhead = 100.0 * (ms[ours] - ms[base]) / ms[base]
        return Row(bench="steer", op=op, shape=shape, dtype="bf16", backend=backend,
                   median_ms=ms[ours], baseline=base_label, baseline_ms=ms[base],
                   achieved=overhead, unit="% overhead", peak=OVERHEAD_BUDGET_PCT, extra=extra)

    return [
        row("steer_correction_", "mlp+correction", "mlp", "MLP (graph)"),
        row("steer_correction_", "down+correction", "down", "down_proj alone (graph)"),
        row("add_direction_", "mlp+direction", "mlp", "MLP (graph)"),
    ]


def run(args: argparse.Namespace) -> list[Row]:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    rows: list[Row] = []
    for B in args.batch:
        rows += _measure(B, args.selected, args.layers, device, gpu)
    return rows
