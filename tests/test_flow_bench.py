"""The flow-sampler benchmark runs at tiny shapes and emits schema rows."""

from __future__ import annotations

import argparse

import torch

from vlafast.bench import BENCHMARKS
from vlafast.bench import flow_sampler


def test_expert_mlp_shapes():
    net = flow_sampler.ExpertMLP(action_dim=5, width=16, ffn=32, layers=2)
    v, h = net(torch.randn(3, 4, 5), torch.rand(3), None)
    assert v.shape == (3, 4, 5) and v.dtype == torch.float32 and h.shape == (3, 4, 16)


def test_flow_sampler_bench_rows():
    assert BENCHMARKS["flow-sampler"].module == "vlafast.bench.flow_sampler"
    p = argparse.ArgumentParser()
    flow_sampler.add_arguments(p)
    args = p.parse_args("--batch 2 --steps 2 --layers 1 --width 16 --horizon 3 --action-dim 2".split())
    rows = flow_sampler.run(args)
    by_op = {(r.op, r.backend, r.baseline): r for r in rows}
    modes = {"eager"} | ({"graphed"} if torch.cuda.is_available() else set())
    assert {r.backend for r in rows} == modes
    for mode in modes:
        ode = by_op[("ode", mode, "")]
        for method in ("flow_sde", "flow_noise"):
            r = by_op[(method, mode, f"ode ({mode})")]
            assert r.baseline_ms == ode.median_ms and r.median_ms > 0
            assert abs(r.achieved - 2000.0 / r.median_ms) < 1e-9 and r.unit == "chunks/s"
            assert "logprob_overhead_pct" in r.extra
    for method in ("flow_sde", "flow_noise"):
        assert by_op[(f"log_prob+backward {method}", "eager", "ode (eager)")].median_ms > 0
