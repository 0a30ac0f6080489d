"""The RL surface of autoregressive policies (pi0-FAST, OpenVLA): sampled action tokens and
their log-probs, as RLinf and SimpleVLA-RL train OpenVLA.

A token policy's ``act(batch, TokenSampler(...), generator)`` decodes one chunk per env by
sampling its action tokens and returns ``(env actions, TokenTrace, value)``;
``evaluate(batch, trace)`` recomputes the trace's log-probs (teacher forcing over the same
tokens) under the current parameters. With unchanged parameters the two agree to float
rounding, so PPO's first ratio is 1. ``TokenTrace`` plays the part ``flow.DenoiseTrace`` plays
for flow policies: rows are selected for minibatches and concatenated across chunk steps.
``value(batch)`` is the critic's V [B] of an observation batch (zeros without a value head). A
policy that also has ``evaluate_steps(batch, trace)`` -> (step log-probs [B, N], step entropies
[B, N], value [B]) can be trained with one PPO ratio per token (``PPOConfig.ratio = "element"``).

Axes: B rows (envs), N decode steps (fixed per policy, padded after a row's end).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class TokenSampler:
    """How RL samples action tokens: a categorical draw from ``softmax(logits / temperature)``.
    ``temperature`` 1 is the model's own distribution (the one its log-probs are of)."""

    temperature: float = 1.0

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")


@dataclasses.dataclass
class TokenTrace:
    """The sampled action tokens of B chunks.

    tokens: [B, N] long, the chosen ids (padding after a row's end);
    valid: [B, N] bool, the steps whose log-probs count (up to and including the end token);
    step_log_probs: [B, N] fp32 log-prob of each chosen token (0 where not valid);
    step_entropy: [B, N] fp32 entropy of each step's distribution (0 where not valid);
    log_prob: [B] the chunk's log-prob (the sum over valid steps);
    entropy: [B] the mean entropy per valid step (the bonus's scale, as RLinf's token mean).
    """

    config: TokenSampler
    tokens: Tensor
    valid: Tensor
    step_log_probs: Tensor
    step_entropy: Tensor
    log_prob: Tensor
    entropy: Tensor

    # rollouts mask nothing per element: every valid step counts (``trace.action_mask`` for the flow code)
    action_mask = None

    @classmethod
    def of(cls, config: TokenSampler, tokens: Tensor, valid: Tensor, step_log_probs: Tensor,
           step_entropy: Tensor) -> "TokenTrace":
        """A trace from per-step values (zeroed where not valid; chunk values summed / averaged)."""
        v = valid.bool()
        lp, ent = masked_steps(step_log_probs, step_entropy, v)
        return cls(config, tokens.long(), v, lp, ent, *chunk_values(lp, ent, v))

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def select(self, rows: Tensor | slice) -> "TokenTrace":
        """The trace of a subset of rows (PPO minibatches)."""
        if isinstance(rows, Tensor):
            rows = rows.to(self.tokens.device)
        return dataclasses.replace(self, **{f: getattr(self, f)[rows] for f in _PER_ROW})

    @staticmethod
    def cat(traces: Sequence["TokenTrace"]) -> "TokenTrace":
        """Traces of the same sampler along the row axis; decode lengths may differ (the shorter
        are padded with invalid steps)."""
        first = traces[0]
        if any(t.config != first.config for t in traces):
            raise ValueError("cannot concatenate token traces of different sampler configs")
        n = max(t.tokens.shape[1] for t in traces)

        def pad(x: Tensor) -> Tensor:
            return torch.nn.functional.pad(x, (0, n - x.shape[1])) if x.shape[1] < n else x

        fields = {f: torch.cat([pad(getattr(t, f)) for t in traces]) for f in _PER_STEP}
        fields |= {f: torch.cat([getattr(t, f) for t in traces]) for f in ("log_prob", "entropy")}
        return dataclasses.replace(first, **fields)

    def to(self, device: torch.device | str) -> "TokenTrace":
        return dataclasses.replace(self, **{f: getattr(self, f).to(device) for f in _PER_ROW})


_PER_STEP = ("tokens", "valid", "step_log_probs", "step_entropy")
_PER_ROW = _PER_STEP + ("log_prob", "entropy")


def masked_steps(step_log_probs: Tensor, step_entropy: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per-step log-probs and entropies [B, N] as fp32, 0 where ``valid`` [B, N] is False."""
    v = valid.bool().to(step_log_probs.device)
    zero = torch.zeros((), dtype=torch.float32, device=step_log_probs.device)
    return torch.where(v, step_log_probs.float(), zero), torch.where(v, step_entropy.float(), zero)


def chunk_values(step_log_probs: Tensor, step_entropy: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """A chunk's (log-prob, entropy) [B] from its valid steps: the sum of the log-probs, the mean
    entropy per valid step (``TokenTrace``'s reduction, which ``evaluate`` must match)."""
    lp, ent = masked_steps(step_log_probs, step_entropy, valid)
    n = valid.bool().to(lp.device).sum(-1).clamp_min(1).float()
    return lp.sum(-1), ent.sum(-1) / n


class StepScored:
    """``evaluate`` for a token policy that scores per step (``evaluate_steps``): the chunk's
    log-prob and entropy by ``chunk_values``, as the rollout's ``TokenTrace`` reduced them."""

    def evaluate_steps(self, batch, trace: "TokenTrace") -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def evaluate(self, batch, trace: "TokenTrace") -> tuple[Tensor, Tensor, Tensor]:
        """(log_prob [B], entropy [B], value [B]) of stored token chunks under the current
        parameters: the sum of the valid steps' log-probs, the mean valid-step entropy."""
        step_lp, step_ent, value = self.evaluate_steps(batch, trace)
        return (*chunk_values(step_lp, step_ent, trace.valid), value)


def token_log_probs(logits: Tensor, tokens: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """Per-step log-prob of ``tokens`` [B, N] under ``softmax(logits / temperature)`` (logits
    [B, N, V], position n scoring token n) and the entropy of each step's distribution: two
    [B, N] fp32 tensors, differentiable in ``logits``."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    chosen = logp.gather(-1, tokens.long()[..., None])[..., 0]
    entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


__all__ = ["StepScored", "TokenSampler", "TokenTrace", "chunk_values", "masked_steps", "token_log_probs"]
