"""The fused "SDE step + Gaussian log-prob" op against its reference and torch.distributions."""

from __future__ import annotations

import pytest
import torch

from vlafast import _backend
from vlafast.ops.gaussian_step import gaussian_step, gaussian_step_ref

# N covers 1, primes, a non-multiple of the 1024 block, and pi_RL's 50 x 32 chunk.
SIZES = [(1, 1), (3, 7), (5, 350), (2, 1031), (4, 1600)]


def _inputs(B, N, dtype, per_row, mask_kind, device):
    mean = torch.randn(B, N, device=device).to(dtype)
    sigma = (torch.rand(B, 1 if per_row else N, device=device) * 0.5 + 0.05).to(dtype)
    eps = torch.randn(B, N, device=device).to(dtype)
    mask = None
    if mask_kind == "flat":
        mask = torch.rand(N, device=device) < 0.6
    elif mask_kind == "batch":
        mask = (torch.rand(B, N, device=device) < 0.6).float()
    return mean, sigma, eps, mask


@pytest.mark.parametrize("B,N", SIZES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_row", [True, False])
@pytest.mark.parametrize("mask_kind", [None, "flat", "batch"])
def test_kernel_matches_reference(B, N, dtype, per_row, mask_kind, device):
    mean, sigma, eps, mask = _inputs(B, N, dtype, per_row, mask_kind, device)
    x, lp, h = gaussian_step(mean, sigma, mask, eps=eps)
    x_ref, _, _ = gaussian_step_ref(mean, sigma, mask, eps=eps)
    _, lp_ref, h_ref = gaussian_step_ref(mean, sigma, mask, x_next=x)  # same x': isolates the log-prob
    assert x.dtype == dtype and lp.dtype == torch.float32 and h.dtype == torch.float32
    # x' = mean + sigma*eps in fp32, then one rounding to the output dtype. fp32: identical up
    # to fma contraction. bf16: Triton's interpreter rounds fp32->bf16 differently from torch's
    # round-to-nearest-even on some ties, so allow one bf16 ulp (2^-8 relative).
    if dtype == torch.float32:
        torch.testing.assert_close(x, x_ref, atol=1e-6, rtol=0)  # measured max 0
    else:
        torch.testing.assert_close(x.float(), x_ref.float(), atol=0, rtol=2**-7)  # measured max 7.75e-3 rel (1 ulp)
    # Sums of up to 1600 terms of size ~1; only the summation order differs.
    torch.testing.assert_close(lp, lp_ref, atol=1e-3, rtol=1e-5)  # measured max 1.2e-4 abs, 3.4e-7 rel
    torch.testing.assert_close(h, h_ref, atol=1e-3, rtol=1e-5)  # measured max 2.4e-4 abs
    _, lp_eval, h_eval = gaussian_step(mean, sigma, mask, x_next=x)
    assert torch.equal(lp_eval, lp), "evaluate mode must reproduce sample mode's log-prob bitwise"
    assert torch.equal(h_eval, h)


@pytest.mark.parametrize("B,N", [(1, 1), (3, 13), (2, 350)])
def test_log_prob_matches_torch_distributions(B, N, device):
    mean = torch.randn(B, N, device=device, dtype=torch.float64)
    sigma = torch.rand(B, N, device=device, dtype=torch.float64) + 0.1
    x = torch.randn(B, N, device=device, dtype=torch.float64)
    mask = torch.rand(N, device=device) < 0.5
    normal = torch.distributions.Normal(mean, sigma)
    expect = (normal.log_prob(x) * mask).sum(-1)
    expect_h = (normal.entropy() * mask).sum(-1)
    _, lp, h = gaussian_step(mean, sigma, mask, x_next=x)
    torch.testing.assert_close(lp, expect, atol=1e-12, rtol=1e-12)  # fp64: measured max 2.3e-13 (|lp| ~ 400)
    torch.testing.assert_close(h, expect_h, atol=1e-12, rtol=1e-12)  # fp64: measured 0
    # fp32 through the kernel (when the backend is Triton) against the same fp64 answer
    _, lp32, h32 = gaussian_step(mean.float(), sigma.float(), mask, x_next=x.float())
    torch.testing.assert_close(lp32.double(), expect, atol=1e-4, rtol=1e-5)  # measured max 1.3e-4 abs at |lp| ~ 400
    torch.testing.assert_close(h32.double(), expect_h, atol=1e-4, rtol=1e-5)  # measured max 5.2e-6


def test_zero_sigma_is_a_deterministic_step(device):
    mean = torch.randn(3, 9, device=device)
    sigma = torch.tensor([[0.0], [0.3], [0.0]], device=device)
    eps = torch.randn(3, 9, device=device)
    x, lp, h = gaussian_step(mean, sigma, None, eps=eps)
    assert torch.equal(x[0], mean[0]) and torch.equal(x[2], mean[2])
    assert lp[0].item() == 0.0 and lp[2].item() == 0.0 and h[0].item() == 0.0 and h[2].item() == 0.0
    expect = torch.distributions.Normal(mean[1], 0.3).log_prob(x[1]).sum()
    torch.testing.assert_close(lp[1], expect, atol=1e-5, rtol=1e-6)  # measured 9.5e-7


@pytest.mark.parametrize("per_row", [True, False])
def test_backward_matches_autograd_of_reference(per_row, device):
    B, N = 4, 37
    mean = torch.randn(B, N, device=device, requires_grad=True)
    sigma = (torch.rand(B, 1 if per_row else N, device=device) * 0.5 + 0.1).requires_grad_()
    x = torch.randn(B, N, device=device, requires_grad=True)
    mask = (torch.rand(B, N, device=device) < 0.7).float()
    w, w_h = torch.randn(B, device=device), torch.randn(B, device=device)
    grads = {}
    for name in ("auto", "torch"):
        with _backend.override(name):
            _, lp, h = gaussian_step(mean, sigma, mask, x_next=x)
            grads[name] = torch.autograd.grad((lp * w).sum() + (h * w_h).sum(), (mean, sigma, x))
    for got, ref in zip(grads["auto"], grads["torch"]):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)  # measured max 2.4e-4 abs on sigma grads ~1e2


def test_gradcheck_reference_fp64():
    mean = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    sigma = (torch.rand(2, 5, dtype=torch.float64) + 0.2).requires_grad_()
    x = torch.randn(2, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda m, s: gaussian_step(m, s, None, x_next=x)[1:], (mean, sigma))


def test_bad_inputs_raise_clear_errors(device):
    mean = torch.randn(2, 6, device=device)
    sig = torch.ones(2, 1, device=device)
    with pytest.raises(ValueError, match="exactly one of eps"):
        gaussian_step(mean, sig, None)
    with pytest.raises(ValueError, match="exactly one of eps"):
        gaussian_step(mean, sig, None, eps=mean, x_next=mean)
    with pytest.raises(ValueError, match=r"mean must be \[B, N\]"):
        gaussian_step(mean[None], sig, None, eps=mean[None])
    with pytest.raises(ValueError, match=r"sigma must be \[B, N\] or \[B, 1\]"):
        gaussian_step(mean, torch.ones(2, 3, device=device), None, eps=mean)
    with pytest.raises(ValueError, match=r"mask must be \[N\] or \[B, N\]"):
        gaussian_step(mean, sig, torch.ones(5, device=device), eps=mean)
    with pytest.raises(ValueError, match=r"x_next must be \[B, N\]"):
        gaussian_step(mean, sig, None, x_next=mean[:, :3])
