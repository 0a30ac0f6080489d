"""The Flow-Noise network: per action element, a bounded log-variance from the expert's hidden
states (pi_RL: MLP width -> 128 -> 64 -> action dim, tanh; log-variance in
[log 0.08^2, log 0.16^2])."""

from __future__ import annotations

import math

import torch
from torch import nn

DEFAULT_LOGVAR_BOUNDS = (2.0 * math.log(0.08), 2.0 * math.log(0.16))


class NoiseHead(nn.Module):
    """hidden: [B, T, D] -> log-variance [B, T, A] in ``logvar_bounds``.

    ``logvar = lo + (hi - lo) * (tanh(mlp(hidden)) + 1) / 2``; the std the sampler uses is
    ``exp(logvar / 2)``. The last layer starts at zero, so every sigma starts at the bounds'
    midpoint in log-variance (sigma = sqrt(0.08 * 0.16) = 0.113 for the defaults). The bounds
    live here, as buffers, so they travel with the head's state_dict.
    """

    def __init__(
        self,
        width: int,
        action_dim: int,
        *,
        hidden: tuple[int, ...] = (128, 64),
        logvar_bounds: tuple[float, float] = DEFAULT_LOGVAR_BOUNDS,
    ) -> None:
        super().__init__()
        lo, hi = (float(b) for b in logvar_bounds)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"logvar_bounds must be finite (lo, hi) with lo < hi, got {logvar_bounds}")
        if width < 1 or action_dim < 1 or any(h < 1 for h in hidden):
            raise ValueError(f"width, action_dim and hidden sizes must be >= 1, got {width}, {action_dim}, {hidden}")
        dims = (width, *hidden, action_dim)
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < len(dims) - 2:
                layers.append(nn.Tanh())
        self.mlp = nn.Sequential(*layers)
        self.width, self.action_dim = width, action_dim
        self.register_buffer("logvar_lo", torch.tensor(lo))
        self.register_buffer("logvar_hi", torch.tensor(hi))
        self.reset_to_midpoint()

    @property
    def logvar_bounds(self) -> tuple[float, float]:
        return float(self.logvar_lo), float(self.logvar_hi)

    def reset_to_midpoint(self) -> None:
        """Zero the last layer: every log-variance becomes (lo + hi) / 2."""
        last = self.mlp[-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, D] -> logvar: [B, T, A] (float32 or hidden's dtype)."""
        if hidden.shape[-1] != self.width:
            raise ValueError(f"noise head expects hidden states [..., {self.width}], got {list(hidden.shape)}")
        u = torch.tanh(self.mlp(hidden.to(self.mlp[0].weight.dtype)))
        return self.logvar_lo + (self.logvar_hi - self.logvar_lo) * (u + 1.0) * 0.5

    def std(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, T, D] -> sigma: [B, T, A] = exp(logvar / 2)."""
        return torch.exp(0.5 * self.forward(hidden))
