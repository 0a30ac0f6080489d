"""Rollout storage: per-chunk observations, denoise traces, values, rewards and done flags.

Axes: N chunk steps, B environments; flattened, M = N * B samples for the update.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import Tensor

from vlafast.flow.sampler import DenoiseTrace
from vlafast.rl.policy import Batch

# DenoiseTrace fields indexed by sample (dim 0); the rest (config, action_mask unless
# per-sample) are shared by every chunk of a rollout.
_PER_SAMPLE = ("chain", "means", "sigmas", "stochastic", "index", "step_log_probs", "step_entropy",
               "log_prob", "entropy")


def trace_cat(traces: Sequence[DenoiseTrace]) -> DenoiseTrace:
    """Concatenate traces of the same sampler config along the sample axis."""
    first = traces[0]
    if any(t.config != first.config for t in traces):
        raise ValueError("cannot concatenate traces of different sampler configs")
    fields = {
        name: torch.cat([getattr(t, name) for t in traces])
        for name in _PER_SAMPLE if getattr(first, name) is not None
    }
    if first.action_mask is not None and first.action_mask.ndim == 3:
        fields["action_mask"] = torch.cat([t.action_mask for t in traces])
    return dataclasses.replace(first, **fields)


@dataclasses.dataclass
class Rollout:
    """N chunk steps of B environments."""

    batches: list[Batch] = dataclasses.field(default_factory=list)        # N x [B]
    traces: list[DenoiseTrace] = dataclasses.field(default_factory=list)  # N x [B]
    values: list[Tensor] = dataclasses.field(default_factory=list)        # N x [B]
    rewards: list[Tensor] = dataclasses.field(default_factory=list)       # N x [B]
    dones: list[Tensor] = dataclasses.field(default_factory=list)         # N x [B]
    valid: list[Tensor] = dataclasses.field(default_factory=list)         # N x [B] bool (GRPO: env still in its episode)
    envs: list[Tensor] = dataclasses.field(default_factory=list)          # N x [B] long: which env each sample came from

    def add(self, batch: Batch, trace: DenoiseTrace, value: Tensor, reward: Tensor, done: Tensor, valid: Tensor,
            envs: Tensor | None = None) -> None:
        """One chunk step; ``envs`` (default 0..B-1) names each sample's env (GRPO over states
        holds G samples per env)."""
        self.envs.append(torch.arange(len(valid)) if envs is None else envs.long())
        self.batches.append(batch)
        self.traces.append(trace)
        self.values.append(value.detach().float())
        self.rewards.append(reward.float())
        self.dones.append(done.float())
        self.valid.append(valid.bool())

    def __len__(self) -> int:
        return len(self.traces)

    def stacked(self) -> dict[str, Tensor]:
        """values, rewards, dones, valid, envs: [N, B]."""
        return {k: torch.stack(getattr(self, k)) for k in ("values", "rewards", "dones", "valid", "envs")}

    def flat(self) -> tuple[Batch, DenoiseTrace]:
        """All samples, chunk-major: sample n * B + b."""
        return Batch.cat(self.batches), trace_cat(self.traces)
