"""Guided real-time chunking (RTC) for flow policies: sample a new chunk whose prefix follows the
chunk still being executed, by inpainting with pseudo-inverse guidance (Black, Galliker, Levine,
"Real-Time Execution of Action Chunking Flow Policies", 2025).

It is an option of the ODE sampler, not a sampler of its own:

    from vlafast import flow
    guidance = flow.RTCGuidance(prefix, flow.prefix_weights(T, d, s), max_guidance=5.0)
    actions, _ = flow.sample(flow.ode(K), velocity_fn, ctx, noise, guidance=guidance)

Conventions (those of ``vlafast.flow.sampler``): noise x at t = 1, actions at t = 0, K Euler
steps x <- x - v / K, ``velocity_fn(x [B, T, A], t [B], ctx) -> v [B, T, A]``. The paper runs
tau = 1 - t from noise to data with velocity -v; its one-step denoised estimate
A + (1 - tau) v_paper is ours x - t v.

Each step adds ``c_tau / K * J^T diag(W) (Y - x0_hat)``, the vector-Jacobian product of the
weighted prefix error through the denoised estimate x0_hat = x - t v(x), with
c_tau = min(beta, (1 - tau) / (tau r^2)), r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2). W is 1 on
the first d waypoints (executed while the policy thinks), decays exponentially to 0 at T - s
(the waypoints the next chunk replaces), and is 0 after. Tensor ops only (one autograd VJP per
step, no host syncs): capturable in a CUDA graph with prefix and weights as static inputs.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True, eq=False)
class RTCGuidance:
    """Pseudo-inverse guidance towards ``prefix``: the ``guidance=`` option of ``flow.sample``
    with an ODE config.

    prefix: [B, T, A] the chunk being executed, resampled at the new chunk's waypoint times, in
    the sampler's space. weights: W as [T] (one mask for every row and action dim) or [B, T, A]
    (per row and dim: 0 on dims that must not be guided). max_guidance: the paper's beta (5
    there), the cap on c_tau. W = 0 everywhere gives the plain ODE sampler.
    """

    prefix: torch.Tensor
    weights: torch.Tensor
    max_guidance: float = 5.0

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, torch.Tensor) or not isinstance(self.weights, torch.Tensor):
            raise TypeError(f"RTCGuidance needs tensors prefix [B, T, A] and weights [T] or [B, T, A], got "
                            f"{type(self.prefix).__name__} and {type(self.weights).__name__}")
        beta = self.max_guidance
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
            raise ValueError(f"max_guidance (beta) must be a finite float >= 0 (the paper uses 5), got {beta!r}")

    def check(self, noise: torch.Tensor) -> None:
        """Validate against the chunk being sampled, noise: [B, T, A]."""
        if noise.shape != self.prefix.shape or noise.dim() != 3:
            raise ValueError(f"noise and prefix must both be [B, T, A], got {tuple(noise.shape)} and "
                             f"{tuple(self.prefix.shape)}")
        if self.weights.shape not in ((noise.shape[1],), noise.shape):
            raise ValueError(f"weights must be [T] = [{noise.shape[1]}] or [B, T, A] = {list(noise.shape)}, "
                             f"got {tuple(self.weights.shape)}")
        for name, tensor in (("prefix", self.prefix), ("weights", self.weights)):
            if tensor.device != noise.device:
                raise ValueError(f"guidance {name} is on {tensor.device} but the noise is on {noise.device}; "
                                 f"move it with .to({str(noise.device)!r})")

    def targets(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(prefix [B, T, A], weights [B | 1, T, A | 1]) in the chain's dtype, for ``guided_step``."""
        w = self.weights.to(dtype)
        return self.prefix.to(dtype), (w[None, :, None] if w.dim() == 1 else w)


def guidance_scale(t: float, max_guidance: float) -> float:
    """c_tau = min(beta, (1 - tau) / (tau r^2)) at tau = 1 - t (beta at tau = 0, i.e. t = 1)."""
    tau = 1.0 - t
    if tau == 0:
        return max_guidance
    r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
    return min(max_guidance, (1 - tau) / (tau * r2))


def guided_step(velocity: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, t: float, delta: float,
                prefix: torch.Tensor, weights: torch.Tensor, max_guidance: float) -> torch.Tensor:
    """One guided Euler step from x: [B, T, A] at time t (a python float; ``velocity`` closes over
    the matching [B] tensor): x - delta v + delta c_tau J^T (W (Y - x0_hat)), x0_hat = x - t v(x).
    prefix Y: [B, T, A] and weights W (broadcastable to it) as ``RTCGuidance.targets`` gives them.
    Returns x at t - delta, detached. Runs one backward pass, under grad mode whatever the caller's."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        v = velocity(xg)
        x0_hat = xg - t * v
        (g,) = torch.autograd.grad(x0_hat, xg, grad_outputs=(prefix - x0_hat.detach()) * weights)
    c = guidance_scale(t, max_guidance)
    return (x - delta * v.detach() + delta * c * g).detach()
