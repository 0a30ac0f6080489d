"""Guided real-time chunking on flows whose exact velocity is known in closed form (Gaussian data)."""

import math

import pytest
import torch

from vlafast.robot.rtc import guided_sample, prefix_weights


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
