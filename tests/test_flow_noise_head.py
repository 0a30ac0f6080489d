"""NoiseHead: architecture, midpoint initialisation, bounded log-variance."""

from __future__ import annotations

import math

import pytest
import torch

from vlafast import flow


def test_architecture_matches_pi_rl():
    head = flow.NoiseHead(1024, 32)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1024, 128), (128, 64), (64, 32)]
    assert sum(isinstance(m, torch.nn.Tanh) for m in head.mlp) == 2
    assert head.logvar_bounds == pytest.approx((math.log(0.08**2), math.log(0.16**2)))


@pytest.mark.parametrize("B,T", [(1, 1), (3, 50)])
def test_sigma_starts_at_the_bounds_midpoint(B, T):
    head = flow.NoiseHead(24, 7)
    sigma = head.std(torch.randn(B, T, 24) * 10)
    assert sigma.shape == (B, T, 7)
    mid = math.exp(0.5 * 0.5 * (math.log(0.08**2) + math.log(0.16**2)))  # = sqrt(0.08 * 0.16)
    torch.testing.assert_close(sigma, torch.full_like(sigma, mid), atol=1e-7, rtol=0)  # measured 0


def test_log_variance_stays_in_bounds_for_extreme_inputs():
    head = flow.NoiseHead(8, 3, logvar_bounds=(-4.0, -1.0))
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 3.0)
    logvar = head(torch.randn(64, 5, 8) * 1e4)
    assert (logvar >= -4.0).all() and (logvar <= -1.0).all()
    assert logvar.min() < -3.9 and logvar.max() > -1.1  # saturates at both ends, so the bound is the tanh's
    assert set(head.state_dict()) >= {"logvar_lo", "logvar_hi"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="lo < hi"):
        flow.NoiseHead(8, 3, logvar_bounds=(-1.0, -4.0))
    with pytest.raises(ValueError, match=r"expects hidden states \[..., 8\]"):
        flow.NoiseHead(8, 3)(torch.randn(2, 4, 9))
