"""Guided real-time chunking (``flow.sample(flow.ode(K), ..., guidance=flow.RTCGuidance(...))``):
on flows whose exact velocity is known in closed form (Gaussian data), against a direct Jacobian
implementation on a nonlinear velocity, and against the guided loop written out step by step."""

import copy
import math

import pytest
import torch

from vlafast import flow
from vlafast.flow import RTCGuidance, prefix_weights


def guided_sample(velocity, noise, prefix, weights, num_steps=10, max_guidance=5.0):
    """The guided ODE sampler with a context-free ``velocity(x [B, T, A], t [B])``."""
    actions, _ = flow.sample(flow.ode(num_steps), lambda x, t, ctx: velocity(x, t), None, noise,
                             guidance=RTCGuidance(prefix, weights, max_guidance))
    return actions


def gaussian_velocity(mu, cov):
    """Exact flow velocity for data a ~ N(mu, cov) per action dim (cov: [T, T] over the horizon):
    x_t = (1 - t) a + t eps, v = E[eps - a | x_t] = (x_t - E[a | x_t]) / t."""
    T = cov.shape[0]
    eye = torch.eye(T, dtype=cov.dtype)

    def v(x, t):  # x: [B, T, A], t: [B]
        tt = float(t[0])
        gain = (1 - tt) * cov @ torch.linalg.inv((1 - tt) ** 2 * cov + tt**2 * eye)  # [T, T]
        mean_a = mu + torch.einsum("st,btA->bsA", gain, x - (1 - tt) * mu)
        return (x - mean_a) / tt

    return v


def test_prefix_weights_match_the_paper_schedule():
    w = prefix_weights(T=20, d=4, s=5)
    assert torch.all(w[:4] == 1) and torch.all(w[15:] == 0)
    assert torch.all(w[4:15] > 0) and torch.all(w[4:15] < 1) and torch.all(torch.diff(w[3:16]) <= 0)
    i = 9
    c = (20 - 5 - i) / (20 - 5 - 4 + 1)
    assert float(w[i]) == pytest.approx(c * math.expm1(c) / (math.e - 1), rel=1e-12)
    with pytest.raises(ValueError, match="0 <= d <= T - s"):
        prefix_weights(T=10, d=8, s=5)


@pytest.mark.parametrize("T,A,d", [(1, 1, 1), (13, 6, 3), (32, 7, 8)])
def test_guidance_pulls_the_frozen_prefix_and_leaves_unweighted_dims_alone(T, A, d):
    torch.manual_seed(0)
    B, s = 64, max(1, T // 4)
    d = min(d, T - s) if T > 1 else 0
    mu = torch.zeros(1, T, A, dtype=torch.float64)
    cov = torch.eye(T, dtype=torch.float64)  # independent waypoints: the Jacobian is diagonal
    vel = gaussian_velocity(mu, cov)
    noise = torch.randn(B, T, A, dtype=torch.float64)
    prefix = torch.full((B, T, A), 1.5, dtype=torch.float64)
    w = prefix_weights(T, d, s)
    plain = guided_sample(vel, noise, prefix, torch.zeros(T, dtype=torch.float64), num_steps=10)
    guided = guided_sample(vel, noise, prefix, w, num_steps=10)
    # With W = 0 it is the plain Euler sampler, x <- x - v / K from t = 1.
    x = noise.clone()
    for k in range(10):
        x = x - vel(x, torch.full((B,), 1 - k / 10, dtype=torch.float64)) / 10
    torch.testing.assert_close(plain, x, rtol=0, atol=1e-12)  # measured 0 (same operations)
    if d:
        err_plain = (plain[:, :d] - 1.5).abs().mean()
        err_guided = (guided[:, :d] - 1.5).abs().mean()
        assert err_guided < 0.1 * err_plain, (err_guided, err_plain)  # measured 0.028x
    # W = 0 waypoints of an independent distribution are untouched, bit for bit.
    torch.testing.assert_close(guided[:, T - s:], plain[:, T - s:], rtol=0, atol=0)


def test_guidance_carries_over_to_correlated_waypoints():
    """Smooth trajectories (squared-exponential covariance over time): freezing the prefix also
    bends the waypoints right after it towards it, as conditioning would."""
    torch.manual_seed(1)
    T, A, B, d, s = 16, 2, 256, 4, 4
    i = torch.arange(T, dtype=torch.float64)
    cov = torch.exp(-0.5 * ((i[:, None] - i[None, :]) / 3.0) ** 2) + 1e-4 * torch.eye(T, dtype=torch.float64)
    vel = gaussian_velocity(torch.zeros(1, T, A, dtype=torch.float64), cov)
    noise = torch.randn(B, T, A, dtype=torch.float64)
    prefix = torch.ones(B, T, A, dtype=torch.float64)
    w = prefix_weights(T, d, s)
    w_hard = torch.zeros(T, dtype=torch.float64)
    w_hard[:d] = 1
    guided = guided_sample(vel, noise, prefix, w_hard, num_steps=20)
    # Exact conditional mean of waypoint d given the prefix = 1 (Gaussian conditioning).
    k = cov[d, :d] @ torch.linalg.inv(cov[:d, :d])
    want = float(k.sum())
    assert float(guided[:, d].mean()) == pytest.approx(want, abs=0.15)  # measured |err| 0.075
    plain = guided_sample(vel, noise, prefix, torch.zeros(T, dtype=torch.float64), num_steps=20)
    err_plain = float((plain[:, :d] - 1).abs().mean())
    err_hard = float((guided[:, :d] - 1).abs().mean())
    soft = guided_sample(vel, noise, prefix, w, num_steps=20)
    err_soft = float((soft[:, :d] - 1).abs().mean())
    assert err_hard < 0.15 * err_plain and err_soft < 0.15 * err_plain  # measured 0.065x, 0.043x


def test_guided_sample_validates_shapes():
    x = torch.zeros(2, 5, 3)
    with pytest.raises(ValueError, match=r"must both be \[B, T, A\]"):
        guided_sample(lambda x, t: x, x, torch.zeros(2, 5, 4), torch.ones(5))
    with pytest.raises(ValueError, match=r"weights must be \[T\] = \[5\]"):
        guided_sample(lambda x, t: x, x, x, torch.ones(4))


def test_guidance_rejects_stochastic_configs_and_bad_arguments():
    x = torch.zeros(2, 5, 3)
    guidance = RTCGuidance(x, torch.ones(5))
    vel = lambda x, t, ctx: x  # noqa: E731
    for config in (flow.flow_sde(num_steps=3), flow.flow_sde(hybrid=False, num_steps=3)):
        with pytest.raises(ValueError, match=r"ODE sampler only, got FlowSDEConfig: .* flow.ode\(num_steps=3\)"):
            flow.sample(config, vel, None, x, guidance=guidance)
    with pytest.raises(TypeError, match="guidance must be a vlafast.flow.RTCGuidance"):
        flow.sample(flow.ode(3), vel, None, x, guidance=(x, torch.ones(5)))
    with pytest.raises(ValueError, match=r"max_guidance \(beta\) must be a finite float >= 0"):
        RTCGuidance(x, torch.ones(5), max_guidance=-1.0)
    with pytest.raises(ValueError, match=r"weights must be \[T\] = \[5\] or \[B, T, A\] = \[2, 5, 3\]"):
        flow.sample(flow.ode(3), vel, None, x, guidance=RTCGuidance(x, torch.ones(2, 5)))


class MixingVelocity(torch.nn.Module):
    """A nonlinear velocity that mixes waypoints and action dims, so J is dense: [B, T, A] -> [B, T, A]."""

    def __init__(self, T: int, A: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.time = torch.nn.Parameter(torch.randn(T, T, generator=g, dtype=torch.float64) / T**0.5)
        self.dims = torch.nn.Parameter(torch.randn(A, A, generator=g, dtype=torch.float64) / A**0.5)

    def forward(self, x, t, ctx):
        tt = t[:, None, None].to(x.dtype)
        h = torch.tanh(torch.einsum("st,btA,AC->bsC", self.time, x, self.dims) + tt)
        return h * (1 + tt) - ctx * x


def direct_guided_sample(velocity, ctx, noise, prefix, weights, steps, beta):
    """RTC written out, row by row: the full Jacobian J of the denoised estimate x - t v(x)
    (autograd.functional.jacobian) and the step x <- x - v / K + c_tau / K * J^T (W * (Y - x0_hat)),
    c_tau = min(beta, (1 - tau) / (tau r^2)), tau = 1 - t."""
    x = noise.clone()
    for k in range(steps):
        t = 1.0 - k / steps
        tau = 1.0 - t
        rows = []
        for b in range(x.shape[0]):
            def denoised(xb):
                return xb - t * velocity(xb[None], torch.full((1,), t, dtype=xb.dtype), ctx[b:b + 1])[0]

            xb = x[b]
            J = torch.autograd.functional.jacobian(denoised, xb, vectorize=True)  # [T, A, T, A]: d x0_hat / d x
            x0 = denoised(xb)
            v = (xb - x0) / t
            g = torch.einsum("ijkl,ij->kl", J, weights[b] * (prefix[b] - x0))
            r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
            c = beta if tau == 0 else min(beta, (1 - tau) / (tau * r2))
            rows.append(xb - v / steps + c / steps * g)
        x = torch.stack(rows)
    return x.detach()


def vjp_guided_loop(velocity, ctx, noise, prefix, weights, num_steps, max_guidance):
    """The guided Euler loop as ``vlafast.robot.rtc.guided_sample`` wrote it before RTC became
    an option of the flow sampler (one autograd VJP per step)."""
    B = noise.shape[0]
    w = weights.to(noise.dtype)
    w = w[None, :, None] if w.dim() == 1 else w
    delta = 1.0 / num_steps
    x = noise.detach()
    for k in range(num_steps):
        t = 1.0 - k / num_steps
        tau = 1.0 - t
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            v = velocity(xg, torch.full((B,), t, dtype=noise.dtype, device=noise.device), ctx)
            x0_hat = xg - t * v
            (g,) = torch.autograd.grad(x0_hat, xg, grad_outputs=(prefix - x0_hat.detach()) * w)
        r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
        c = max_guidance if tau == 0 else min(max_guidance, (1 - tau) / (tau * r2))
        x = (x - delta * v.detach() + delta * c * g).detach()
    return x


@pytest.mark.parametrize("B,T,A,K", [(1, 1, 1, 1), (3, 7, 5, 4), (2, 13, 3, 10)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("per_dim", [False, True])
def test_guided_ode_matches_a_direct_jacobian_and_the_step_by_step_loop(B, T, A, K, dtype, per_dim):
    g = torch.Generator().manual_seed(B * 100 + T)
    velocity = MixingVelocity(T, A).to(dtype)
    ctx = torch.rand(B, 1, 1, generator=g, dtype=torch.float64).to(dtype)
    noise = torch.randn(B, T, A, generator=g, dtype=torch.float64).to(dtype)
    prefix = torch.randn(B, T, A, generator=g, dtype=torch.float64).to(dtype)
    s = max(1, T // 3)
    w = prefix_weights(T, min(2, T - s), s) if T > 1 else torch.ones(1, dtype=torch.float64)  # T = 1: a hard mask
    if per_dim:  # per row and dim: one row unguided, the last dim never guided
        w = (w[None, :, None] * torch.rand(B, 1, A, generator=g, dtype=torch.float64)).to(dtype)
        w[-1, ..., -1] = 0
    got, trace = flow.sample(flow.ode(K), velocity, ctx, noise, guidance=RTCGuidance(prefix, w, 3.0))
    loop = vjp_guided_loop(velocity, ctx, noise, prefix, w, K, 3.0)
    torch.testing.assert_close(got, loop, rtol=0, atol=0)  # the same operations, bit for bit
    torch.testing.assert_close(trace.chain[:, 0], noise, rtol=0, atol=0)
    torch.testing.assert_close(trace.means, trace.chain[:, 1:], rtol=0, atol=0)
    W = (w[None, :, None] if w.dim() == 1 else w).expand(B, T, A).double()
    ref = direct_guided_sample(copy.deepcopy(velocity).double(), ctx.double(), noise.double(), prefix.double(), W, K,
                               3.0)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=tol)  # measured max 4.4e-15 (fp64), 1.9e-6 (fp32)
    unguided, _ = flow.sample(flow.ode(K), velocity, ctx, noise)
    zero, _ = flow.sample(flow.ode(K), velocity, ctx, noise, guidance=RTCGuidance(prefix, torch.zeros_like(w)))
    torch.testing.assert_close(zero, unguided, rtol=0, atol=0)  # W = 0: the plain ODE sampler, bit for bit
