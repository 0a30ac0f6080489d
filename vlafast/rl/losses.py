"""Advantage estimation and policy-gradient losses for chunked flow policies (pi_RL).

One "step" here is one action chunk: rewards, values and done flags are per chunk, and the
log-prob of a chunk comes from the flow sampler's trace (Flow-SDE or Flow-Noise). Axes: N chunk
steps in a rollout, B environments, G group size (GRPO).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """PPO as RLinf runs it for pi_RL: optimiser batches of thousands of chunks (here the whole
    rollout, accumulated over micro-batches), a small actor lr, several epochs stopped early
    when approx_kl passes ``target_kl``."""

    clip: float = 0.2               # ratio clip
    value_clip: float = 0.2         # value-function clip around the rollout's values
    huber_delta: float = 10.0       # Huber value loss
    value_coef: float = 0.5
    entropy_coef: float = 0.005     # Flow-Noise entropy bonus, on the per-element mean entropy (0 for Flow-SDE)
    gamma: float = 0.99
    lam: float = 0.95
    actor_lr: float = 1e-5          # RLinf: 5e-6..1e-5 at optimiser batches of 2048-5120 chunks
    critic_lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    epochs: int = 4
    minibatch: int | None = None    # samples per optimiser step; None: the whole rollout (one step per epoch)
    micro_batch: int = 64           # samples per forward/backward (gradients accumulate up to ``minibatch``)
    target_kl: float | None = 0.05  # stop the epochs once an epoch's mean approx_kl exceeds it; None: never
    ratio: Literal["chunk", "element"] = "chunk"  # one ratio per chunk, or one per action element (token-level)
    max_grad_norm: float = 1.0

    def __post_init__(self):
        for name in ("clip", "value_clip", "huber_delta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PPOConfig.{name} must be > 0, got {getattr(self, name)}")
        if not (0 < self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"need 0 < gamma <= 1 and 0 <= lam <= 1, got {self.gamma}, {self.lam}")
        if self.epochs < 1 or self.micro_batch < 1 or (self.minibatch is not None and self.minibatch < 1):
            raise ValueError(f"epochs, micro_batch and minibatch (or None) must be >= 1, got "
                             f"{self.epochs}, {self.micro_batch}, {self.minibatch}")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ValueError(f"target_kl must be > 0 or None, got {self.target_kl}")
        if self.ratio not in ("chunk", "element"):
            raise ValueError(f"ratio must be 'chunk' or 'element', got {self.ratio!r}")


def gae(
    rewards: torch.Tensor,     # [N, B] reward of each chunk
    values: torch.Tensor,      # [N, B] V(s_n) at each chunk's observation
    dones: torch.Tensor,       # [N, B] episode ended during chunk n (terminated or truncated)
    last_value: torch.Tensor,  # [B] V of the observation after the last chunk
    gamma: float = 0.99,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over chunks -> (advantages [N, B], returns [N, B]).

    An episode that ends inside chunk n does not bootstrap from the next observation (it is the
    first of a new episode under auto-reset). Time limits are the collector's business
    (``rl.train.collect``): terminal by default (``RLConfig.timeouts``), or, with "bootstrap",
    gamma * V(final observation) added to that chunk's reward; here every end is terminal.
    """
    if rewards.shape != values.shape or rewards.shape != dones.shape or rewards.ndim != 2:
        raise ValueError(
            f"rewards, values, dones must all be [N, B]; got {list(rewards.shape)}, "
            f"{list(values.shape)}, {list(dones.shape)}"
        )
    if last_value.shape != rewards.shape[1:]:
        raise ValueError(f"last_value must be [B={rewards.shape[1]}], got {list(last_value.shape)}")
    not_done = 1.0 - dones.float()
    adv = torch.zeros_like(rewards, dtype=torch.float32)
    running = torch.zeros_like(last_value, dtype=torch.float32)
    next_value = last_value.float()
    for n in range(rewards.shape[0] - 1, -1, -1):
        delta = rewards[n] + gamma * next_value * not_done[n] - values[n]
        running = delta + gamma * lam * not_done[n] * running
        adv[n] = running
        next_value = values[n].float()
    return adv, adv + values.float()


def group_advantages(returns: torch.Tensor, group_size: int, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: normalise returns [B] within consecutive groups of ``group_size`` (same task and
    seed, or same simulator state) by the group's mean and sample std -> (advantages [B],
    informative [B] bool). A degenerate group (all returns equal, e.g. all failed or all
    succeeded) carries no signal: its advantages are 0 and it is marked uninformative, so the
    update drops it rather than diluting the batch."""
    if group_size < 2 or returns.ndim != 1 or returns.numel() % group_size != 0:
        raise ValueError(f"returns must be [B] with B a multiple of group_size={group_size} >= 2, got {list(returns.shape)}")
    g = returns.float().view(-1, group_size)
    std = g.std(dim=1, keepdim=True, unbiased=True)
    informative = (g.max(dim=1, keepdim=True).values > g.min(dim=1, keepdim=True).values).expand_as(g)
    adv = torch.where(informative, (g - g.mean(dim=1, keepdim=True)) / (std + eps), torch.zeros_like(g))
    return adv.reshape(-1), informative.reshape(-1)


def ppo_loss(
    logp: torch.Tensor,        # [M] chunk log-prob under the current policy, or [M, N] per element
    old_logp: torch.Tensor,    # same shape: recorded at rollout
    advantages: torch.Tensor,  # [M]
    cfg: PPOConfig,
    *,
    element_mask: torch.Tensor | None = None,  # [N] or [M, N]: elements that count (per-element ratio)
    values: torch.Tensor | None = None,      # [M] current critic
    old_values: torch.Tensor | None = None,  # [M] critic at rollout
    returns: torch.Tensor | None = None,     # [M]
    entropy: torch.Tensor | None = None,     # [M] Flow-Noise step entropy
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO objective -> (total loss, named terms for logging).

    Terms: policy_loss, value_loss (clipped Huber, when a critic is given), entropy,
    approx_kl (the k3 estimator, E[(r - 1) - log r]), clipfrac. With [M, N] log-probs each
    element has its own ratio, the chunk's advantage is broadcast over its elements and every
    mean runs over the elements of ``element_mask`` (RLinf's token-level ratio).
    """
    if logp.shape != old_logp.shape or logp.shape[0] != advantages.shape[0] or logp.ndim not in (1, 2):
        raise ValueError(f"logp and old_logp must both be [M] or [M, N] with M = len(advantages) = "
                         f"{advantages.shape[0]}, got {list(logp.shape)}, {list(old_logp.shape)}")
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    adv = advantages if logp.ndim == 1 else advantages[:, None]
    weight = None
    if logp.ndim == 2:
        weight = torch.ones_like(logp) if element_mask is None else element_mask.to(logp.dtype).expand_as(logp)

    def mean(x: torch.Tensor) -> torch.Tensor:
        return x.mean() if weight is None else (x * weight).sum() / weight.sum().clamp_min(1.0)

    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - cfg.clip, 1.0 + cfg.clip) * adv
    policy_loss = -mean(torch.minimum(unclipped, clipped))
    total = policy_loss
    terms: dict[str, torch.Tensor] = {"policy_loss": policy_loss.detach()}
    if values is not None:
        if old_values is None or returns is None:
            raise ValueError("a value loss needs values, old_values and returns together")
        v_clipped = old_values + (values - old_values).clamp(-cfg.value_clip, cfg.value_clip)
        loss_unclipped = F.huber_loss(values, returns, reduction="none", delta=cfg.huber_delta)
        loss_clipped = F.huber_loss(v_clipped, returns, reduction="none", delta=cfg.huber_delta)
        value_loss = torch.maximum(loss_unclipped, loss_clipped).mean()
        total = total + cfg.value_coef * value_loss
        terms["value_loss"] = value_loss.detach()
    if entropy is not None:
        ent = entropy.mean()
        total = total - cfg.entropy_coef * ent
        terms["entropy"] = ent.detach()
    with torch.no_grad():
        terms["approx_kl"] = mean((ratio - 1.0) - log_ratio)
        terms["clipfrac"] = mean(((ratio - 1.0).abs() > cfg.clip).to(ratio.dtype))
        terms["ratio_mean"] = mean(ratio)
    return total, terms


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns]; nan when returns are constant."""
    var = returns.float().var(unbiased=False)
    if var.item() == 0:
        return float("nan")
    return float(1.0 - (returns.float() - values.float()).var(unbiased=False) / var)
