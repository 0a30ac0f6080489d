"""Guided real-time chunking (RTC) for flow policies: sample a new chunk whose prefix follows the
chunk still being executed, by inpainting with pseudo-inverse guidance (Black, Galliker, Levine,
"Real-Time Execution of Action Chunking Flow Policies", 2025).

Conventions (DESIGN §3): noise x at t = 1, actions at t = 0, K Euler steps x <- x - v / K, and
``velocity(x [B, T, A], t [B]) -> v [B, T, A]``. The paper runs tau = 1 - t from noise to data
with velocity -v; its one-step denoised estimate A + (1 - tau) v_paper is ours x - t v.

Each step adds ``c_tau * J^T diag(W) (Y - x0_hat)``, the vector-Jacobian product of the weighted
prefix error through the denoised estimate, with c_tau = min(beta, (1 - tau) / (tau r^2)),
r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2). W is 1 on the first d waypoints (executed while the
policy thinks), decays exponentially to 0 at T - s (the waypoints the next chunk replaces), and
is 0 after.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


def prefix_weights(T: int, d: int, s: int) -> torch.Tensor:
    """Soft inpainting mask W: [T]. d: waypoints executed during inference (frozen, W = 1);
    s: execution horizon (the last s waypoints get W = 0). Needs 0 <= d <= T - s, s >= 1."""
    if not (s >= 1 and 0 <= d <= T - s):
        raise ValueError(f"need s >= 1 and 0 <= d <= T - s, got T={T}, d={d}, s={s}")
    i = torch.arange(T, dtype=torch.float64)
    c = (T - s - i) / (T - s - d + 1)
    w = c * torch.expm1(c) / (math.e - 1)
    w = torch.where(i < d, torch.ones_like(w), w)
    return torch.where(i >= T - s, torch.zeros_like(w), w).clamp(0.0, 1.0)


def guided_sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                  prefix: torch.Tensor, weights: torch.Tensor, num_steps: int = 10,
                  max_guidance: float = 5.0) -> torch.Tensor:
    """Euler flow sampling from noise: [B, T, A] at t = 1 to actions at t = 0, guided so that
    the weighted part of the result follows prefix: [B, T, A]. weights: W as [T] (one mask for
    every row and action dim) or [B, T, A] (per row and dim: 0 on dims that must not be guided).
    ``max_guidance`` is the paper's beta (5 there). Returns actions: [B, T, A]. No host syncs:
    capturable in a CUDA graph with prefix and weights as static inputs."""
    if noise.shape != prefix.shape or noise.dim() != 3:
        raise ValueError(f"noise and prefix must both be [B, T, A], got {tuple(noise.shape)} and {tuple(prefix.shape)}")
    if weights.shape not in ((noise.shape[1],), noise.shape):
        raise ValueError(f"weights must be [T] = [{noise.shape[1]}] or [B, T, A] = {list(noise.shape)}, "
                         f"got {tuple(weights.shape)}")
    if num_steps < 1 or max_guidance < 0:
        raise ValueError(f"need num_steps >= 1 and max_guidance >= 0, got {num_steps}, {max_guidance}")
    B = noise.shape[0]
    w = weights.to(noise.dtype)
    w = w[None, :, None] if w.dim() == 1 else w
    delta = 1.0 / num_steps
    x = noise.detach()
    for k in range(num_steps):
        t = 1.0 - k * delta
        tau = 1.0 - t
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            v = velocity(xg, torch.full((B,), t, dtype=noise.dtype, device=noise.device))
            x0_hat = xg - t * v
            (g,) = torch.autograd.grad(x0_hat, xg, grad_outputs=(prefix - x0_hat.detach()) * w)
        r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
        c = max_guidance if tau == 0 else min(max_guidance, (1 - tau) / (tau * r2))
        x = (x - delta * v.detach() + delta * c * g).detach()
    return x
