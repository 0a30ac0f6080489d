"""GraphedSampler: eager fallback on CPU (runs here) and CUDA-graph replay (-m gpu)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from vlafast import flow


class MLPVelocity(torch.nn.Module):
    def __init__(self, action_dim: int, width: int = 64) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(action_dim + 1, width)
        self.out = torch.nn.Linear(width, action_dim)

    def forward(self, x, t, ctx):
        tt = t[:, None, None].expand(-1, x.shape[1], 1).to(x.dtype)
        h = torch.tanh(self.inp(torch.cat([x, tt], dim=-1)) + ctx)
        return self.out(h), h


def test_cpu_falls_back_to_eager_with_a_logged_reason(caplog):
    B, T, A = 3, 5, 4
    vel = MLPVelocity(A, width=8)
    ctx = torch.randn(B, T, 8)
    noise = torch.randn(B, T, A)
    cfg = flow.flow_sde(num_steps=3)
    g = torch.Generator().manual_seed(11)
    runner = flow.GraphedSampler(cfg, vel, generator=g)
    with caplog.at_level(logging.WARNING, logger="vlafast.flow.graphs"):
        actions, trace = runner(ctx, noise)
        runner(ctx, noise)
    reasons = list(runner.fallbacks.values())
    assert len(reasons) == 1 and "CUDA graphs need a CUDA device" in reasons[0]
    assert sum("runs eagerly" in r.message for r in caplog.records) == 1  # logged once per layout
    assert runner.num_graphs == 0
    expect, _ = flow.sample(cfg, vel, ctx, noise, generator=torch.Generator().manual_seed(11))
    assert torch.equal(actions, expect)
    assert torch.equal(flow.log_prob(vel, ctx, trace), trace.log_prob)


@pytest.mark.parametrize("method", ["ode", "sde", "sde-joint", "noise"])
def test_loop_has_no_host_syncs(method):
    """What a CUDA graph needs from the loop, checked without a GPU: it runs on the meta device,
    where any .item(), bool(tensor) or data-dependent shape would raise."""
    from vlafast import _backend
    from vlafast.flow.sampler import _flat_mask, _grid_for, _sample_impl

    B, T, A = 3, 5, 4
    vel = MLPVelocity(A, width=8).to("meta")
    ctx = torch.empty(B, T, 8, device="meta")
    noise = torch.empty(B, T, A, device="meta")
    head = flow.NoiseHead(8, A).to("meta")
    cfg = {"ode": flow.ode(num_steps=3), "sde": flow.flow_sde(num_steps=3),
           "sde-joint": flow.flow_sde(hybrid=False, num_steps=3), "noise": flow.flow_noise(head, num_steps=3)}[method]
    mask = _flat_mask(torch.ones(T, A, device="meta"), noise.shape, noise.device)
    with _backend.override("torch"):  # the reference op; Triton launches are async by construction
        out = _sample_impl(cfg, vel, ctx, noise, mask, None, _grid_for(cfg, noise.device, noise.dtype))
    assert out["chain"].shape == (B, 4, T, A) and out["log_prob"].shape == (B,)


def test_bad_warmup():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        flow.GraphedSampler(flow.ode(), lambda x, t, c: x, warmup=0)


# ---------------------------------------------------------------------------------------------
# GPU


def _gpu_setup(method: str, B: int = 8, T: int = 10, A: int = 7, K: int = 4):
    dev = torch.device("cuda")
    torch.manual_seed(0)
    vel = MLPVelocity(A).to(dev)
    ctx = torch.randn(B, T, 64, device=dev)
    noise = torch.randn(B, T, A, device=dev)
    head = flow.NoiseHead(64, A).to(dev)
    cfg = {"ode": flow.ode(num_steps=K), "sde": flow.flow_sde(num_steps=K),
           "sde-joint": flow.flow_sde(hybrid=False, num_steps=K), "noise": flow.flow_noise(head, num_steps=K)}[method]
    return dev, vel, ctx, noise, cfg


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["ode", "sde", "sde-joint", "noise"])
@pytest.mark.parametrize("custom_generator", [False, True])
def test_graphed_equals_eager_for_the_same_noise_and_seed(method, custom_generator):
    dev, vel, ctx, noise, cfg = _gpu_setup(method)
    if custom_generator and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        pytest.skip("this torch cannot register a custom generator with a CUDA graph")
    g = torch.Generator(device=dev) if custom_generator else None
    runner = flow.GraphedSampler(cfg, vel, generator=g)
    mask = torch.zeros(10, 7, device=dev)
    mask[:5] = 1
    runner(ctx, noise, action_mask=mask)  # capture
    assert runner.num_graphs == 1, runner.fallbacks

    def seed(s):
        if g is not None:
            g.manual_seed(s)
        else:
            torch.cuda.manual_seed(s)

    seed(123)
    a_graph, tr_graph = runner(ctx, noise, action_mask=mask)
    seed(123)
    a_eager, tr_eager = flow.sample(cfg, vel, ctx, noise, generator=g, action_mask=mask)
    # Same kernels, same Philox seed and offsets (graph-safe RNG): expected bitwise; the
    # tolerance only allows cuBLAS picking another algorithm inside the capture.
    torch.testing.assert_close(a_graph, a_eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tr_graph.log_prob, tr_eager.log_prob, atol=1e-3, rtol=1e-5)
    if tr_graph.index is not None:
        assert torch.equal(tr_graph.index, tr_eager.index)
    if method != "ode":
        torch.testing.assert_close(flow.log_prob(vel, ctx, tr_graph), tr_graph.log_prob, atol=1e-3, rtol=1e-5)


@pytest.mark.gpu
def test_replay_uses_fresh_noise_and_caches_per_shape():
    dev, vel, ctx, noise, cfg = _gpu_setup("sde")
    runner = flow.GraphedSampler(cfg, vel)
    a1, _ = runner(ctx, noise)
    a2, _ = runner(ctx, noise)              # same initial noise, new step noise
    assert not torch.equal(a1, a2)
    a3, _ = runner(ctx, torch.randn_like(noise))
    assert not torch.equal(a2, a3)
    ode_runner = flow.GraphedSampler(flow.ode(num_steps=4), vel)
    b1, _ = ode_runner(ctx, noise)
    b2, _ = ode_runner(ctx, torch.randn_like(noise))
    assert not torch.equal(b1, b2)
    b3, _ = ode_runner(ctx, noise)
    assert torch.equal(b1, b3)              # deterministic: same noise, same actions
    runner(ctx[:3], noise[:3])              # another batch size: a second graph
    assert runner.num_graphs == 2 and not runner.fallbacks


@pytest.mark.gpu
def test_no_allocation_growth_over_1000_replays():
    dev, vel, ctx, noise, cfg = _gpu_setup("noise")
    runner = flow.GraphedSampler(cfg, vel)
    for _ in range(3):
        runner(ctx, noise)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(1000):
        actions, trace = runner(ctx, noise)
    del actions, trace
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before
    assert runner.num_graphs == 1


def test_ctx_layout_keys_and_static_copies():
    from vlafast.flow.graphs import _clone_ctx, _copy_ctx, _ctx_signature

    @dataclasses.dataclass(frozen=True)
    class Cache:
        keys: list
        pad: torch.Tensor
        n: int

    a = (torch.zeros(2, 3), Cache([torch.ones(2, 4)], torch.ones(2, dtype=torch.bool), 5))
    b = (torch.randn(2, 3), Cache([torch.randn(2, 4)], torch.zeros(2, dtype=torch.bool), 5))
    assert _ctx_signature(a) == _ctx_signature(b)  # a new cache object with the same layout: same graph
    assert _ctx_signature(a) != _ctx_signature((torch.zeros(3, 3), a[1]))
    assert _ctx_signature(a) != _ctx_signature((a[0], dataclasses.replace(a[1], n=6)))
    static = _clone_ctx(a)
    assert static[1].keys[0].data_ptr() != a[1].keys[0].data_ptr()
    _copy_ctx(static, b)
    assert torch.equal(static[0], b[0]) and torch.equal(static[1].keys[0], b[1].keys[0])
    assert torch.equal(static[1].pad, b[1].pad) and static[1].n == 5


@pytest.mark.gpu
def test_failed_capture_falls_back_to_eager_with_the_reason(caplog):
    dev, vel, ctx, noise, cfg = _gpu_setup("sde")

    def syncing_velocity(x, t, c):
        if float(t[0].item()) > 2.0:  # a host sync: legal eagerly, illegal inside a capture
            raise AssertionError("unreachable")
        return vel(x, t, c)

    runner = flow.GraphedSampler(cfg, syncing_velocity)
    with caplog.at_level(logging.WARNING, logger="vlafast.flow.graphs"):
        actions, trace = runner(ctx, noise)
    assert runner.num_graphs == 0
    (reason,) = runner.fallbacks.values()
    assert "capture failed" in reason
    assert any("runs eagerly" in r.message for r in caplog.records)
    assert actions.shape == noise.shape and torch.isfinite(trace.log_prob).all()
    torch.cuda.synchronize()  # the device is still usable


def _tiny_vla(dev: torch.device):
    """A tiny pi0 actor-critic for a made-up 2-camera env, and a batch of observations."""
    from vlafast.envs.base import EnvSpec
    from vlafast.models.gemma import GemmaConfig
    from vlafast.models.pi0 import Pi0Config, Pi0Policy
    from vlafast.models.siglip import SiglipConfig
    from vlafast.policies import Batch, FlowPolicy, build_word_tokenizer, flow_policy

    torch.manual_seed(0)
    tok = build_word_tokenizer(["pick", "the", "cube"])
    g = GemmaConfig(width=32, depth=1, mlp_dim=48, num_heads=2, num_kv_heads=1, head_dim=16)
    cfg = Pi0Config.tiny(vision=SiglipConfig(image_size=16, patch_size=8, width=24, depth=1, mlp_dim=32, num_heads=2),
                         vlm=g, expert=g, vocab_size=tok.get_vocab_size(), action_dim=8, state_dim=9, horizon=6,
                         num_steps=3)
    spec = EnvSpec(num_envs=5, action_dim=7, state_dim=9, cameras=("a", "b"), image_size=(16, 16), max_episode_steps=10,
                   control_hz=10.0)
    pol = flow_policy(Pi0Policy(cfg), tok, spec, exec_horizon=4, max_tokens=6).to(dev)
    B = spec.num_envs
    batch = Batch(images=torch.rand(B, 2, 3, 16, 16, device=dev) * 2 - 1, image_masks=torch.ones(B, 2, dtype=torch.bool, device=dev),
                  tokens=torch.randint(2, 5, (B, 6), device=dev), token_masks=torch.ones(B, 6, dtype=torch.bool, device=dev),
                  state=torch.randn(B, 9, device=dev))
    return pol, batch


def _act_twice(dev: torch.device, graphs: bool):
    pol, batch = _tiny_vla(dev)
    pol.use_cuda_graphs(graphs)
    gen = torch.Generator(device=dev).manual_seed(7)
    cfg = flow.flow_sde(num_steps=3)
    return pol, batch, [pol.act(batch, cfg, gen) for _ in range(2)]


def test_policy_graphs_are_eager_off_cuda():
    """use_cuda_graphs on a CPU policy changes nothing: the same chunks for the same seed."""
    _, _, eager = _act_twice(torch.device("cpu"), False)
    _, _, graphed = _act_twice(torch.device("cpu"), True)
    for (a, tr, v), (b, tr2, v2) in zip(eager, graphed):
        assert (a == b).all() and torch.equal(tr.log_prob, tr2.log_prob) and torch.equal(v, v2)


@pytest.mark.gpu
def test_policy_act_through_graphs_matches_eager_and_its_own_update():
    """A GPU rollout worker's sampling (FlowPolicy.use_cuda_graphs): the graphed chunks equal the
    eager ones for the same generator seed, draw fresh noise per call, and the update path
    recomputes their log-probs (ratio 1)."""
    dev = torch.device("cuda")
    _, _, eager = _act_twice(dev, False)
    pol, batch, graphed = _act_twice(dev, True)
    assert len(pol._graphed) == 1 and not next(iter(pol._graphed.values())).fallbacks
    for (a, tr, _), (b, tr2, _) in zip(eager, graphed):
        torch.testing.assert_close(torch.as_tensor(b), torch.as_tensor(a), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(tr2.log_prob, tr.log_prob, atol=1e-3, rtol=1e-5)
    assert not torch.equal(graphed[0][1].chain, graphed[1][1].chain)  # fresh noise each replay
    logp, _, _ = pol.evaluate(batch, graphed[1][1])
    torch.testing.assert_close(logp, graphed[1][1].log_prob, atol=1e-3, rtol=1e-5)
