"""Advantage estimation and policy-gradient losses for chunked flow policies (pi_RL).

One "step" here is one action chunk: rewards, values and done flags are per chunk, and the
log-prob of a chunk comes from the flow sampler's trace (Flow-SDE or Flow-Noise). Axes: N chunk
steps in a rollout, B environments, G group size (GRPO).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    clip: float = 0.2               # ratio clip
    value_clip: float = 0.2         # value-function clip around the rollout's values
    huber_delta: float = 10.0       # Huber value loss
    value_coef: float = 0.5
    entropy_coef: float = 0.005     # Flow-Noise entropy bonus (0 for Flow-SDE)
    gamma: float = 0.99
    lam: float = 0.95
    actor_lr: float = 5e-6
    critic_lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    epochs: int = 1
    minibatch: int = 64
    max_grad_norm: float = 1.0

    def __post_init__(self):
        for name in ("clip", "value_clip", "huber_delta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PPOConfig.{name} must be > 0, got {getattr(self, name)}")
        if not (0 < self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ValueError(f"need 0 < gamma <= 1 and 0 <= lam <= 1, got {self.gamma}, {self.lam}")


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
    first of a new episode under auto-reset). Truncations are treated as terminal, as the
    built-in and LIBERO envs return no final observation to bootstrap from.
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


def group_advantages(returns: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: normalise episode returns [B] within consecutive groups of ``group_size`` (same
    task and seed) -> advantages [B]. A group whose returns are all equal gets zeros."""
    if returns.ndim != 1 or returns.numel() % group_size != 0:
        raise ValueError(f"returns must be [B] with B a multiple of group_size={group_size}, got {list(returns.shape)}")
    g = returns.float().view(-1, group_size)
    adv = (g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, keepdim=True, unbiased=False) + eps)
    return adv.view(-1)


def ppo_loss(
    logp: torch.Tensor,        # [M] log-prob of the stored chunk under the current policy
    old_logp: torch.Tensor,    # [M] log-prob recorded at rollout
    advantages: torch.Tensor,  # [M]
    cfg: PPOConfig,
    *,
    values: torch.Tensor | None = None,      # [M] current critic
    old_values: torch.Tensor | None = None,  # [M] critic at rollout
    returns: torch.Tensor | None = None,     # [M]
    entropy: torch.Tensor | None = None,     # [M] Flow-Noise step entropy
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO objective -> (total loss, named terms for logging).

    Terms: policy_loss, value_loss (clipped Huber, when a critic is given), entropy,
    approx_kl (the k3 estimator, E[(r - 1) - log r]), clipfrac.
    """
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - cfg.clip, 1.0 + cfg.clip) * advantages
    policy_loss = -torch.minimum(unclipped, clipped).mean()
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
        terms["approx_kl"] = ((ratio - 1.0) - log_ratio).mean()
        terms["clipfrac"] = ((ratio - 1.0).abs() > cfg.clip).float().mean()
        terms["ratio_mean"] = ratio.mean()
    return total, terms


def explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """1 - Var[returns - values] / Var[returns]; nan when returns are constant."""
    var = returns.float().var(unbiased=False)
    if var.item() == 0:
        return float("nan")
    return float(1.0 - (returns.float() - values.float()).var(unbiased=False) / var)
