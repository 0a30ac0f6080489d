"""Rollout storage: per-chunk observations, traces (a flow policy's denoise traces or an
autoregressive policy's token traces), values, rewards and done flags.

Axes: N chunk steps, B environments; flattened, M = N * B samples for the update.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence, TypeVar

import torch
from torch import Tensor

from vlafast.flow.sampler import DenoiseTrace
from vlafast.policies import Batch
from vlafast.policies.tokens import TokenTrace

D = TypeVar("D")


def tensors_to(obj: D, device: torch.device | str, **changes: Any) -> D:
    """A copy of the dataclass ``obj`` (a ``Batch``, a trace) with every tensor field
    moved to ``device`` and ``changes`` applied."""
    moved = {f.name: getattr(obj, f.name).to(device) for f in dataclasses.fields(obj)
             if isinstance(getattr(obj, f.name), Tensor)}
    return dataclasses.replace(obj, **(moved | changes))


# DenoiseTrace fields indexed by sample (dim 0); the rest (config, action_mask unless
# per-sample) are shared by every chunk of a rollout.
_PER_SAMPLE = ("chain", "means", "sigmas", "stochastic", "index", "step_log_probs", "step_entropy",
               "log_prob", "entropy")


def trace_cat(traces: Sequence[DenoiseTrace | TokenTrace]) -> DenoiseTrace | TokenTrace:
    """Concatenate traces of the same sampler config along the sample axis."""
    first = traces[0]
    if isinstance(first, TokenTrace):
        return TokenTrace.cat(traces)
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

    batches: list[Batch] = dataclasses.field(default_factory=list)        # N x [B] (or the policy's batch type)
    traces: list[DenoiseTrace | TokenTrace] = dataclasses.field(default_factory=list)  # N x [B]
    values: list[Tensor] = dataclasses.field(default_factory=list)        # N x [B]
    rewards: list[Tensor] = dataclasses.field(default_factory=list)       # N x [B]
    dones: list[Tensor] = dataclasses.field(default_factory=list)         # N x [B]
    valid: list[Tensor] = dataclasses.field(default_factory=list)         # N x [B] bool (GRPO: env still in its episode)
    envs: list[Tensor] = dataclasses.field(default_factory=list)          # N x [B] long: which env each sample came from

    def add(self, batch: Batch, trace: DenoiseTrace | TokenTrace, value: Tensor, reward: Tensor, done: Tensor, valid: Tensor,
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

    def flat(self) -> tuple[Batch, DenoiseTrace | TokenTrace]:
        """All samples, chunk-major: sample n * B + b."""
        return batch_cat(self.batches), trace_cat(self.traces)


def batch_cat(batches: Sequence[Any]) -> Any:
    """Concatenate observation batches along B with their own type's ``cat`` (a ``Batch``, or
    an autoregressive policy's batch type)."""
    return type(batches[0]).cat(batches)


Slice = tuple[Rollout, Tensor, "Tensor | None"]


def pool_slices(parts: Sequence[Slice], device: torch.device | str, config: Any) -> Slice:
    """Rollouts of disjoint env slices (Ray workers'), each with its advantages and critic
    targets [N_i, B_i] (or None), as one rollout of a single step over all their samples: each
    part chunk-major (sample n * B_i + b), part after part. The update reads samples flat, so
    N_i (GRPO episodes end at different steps) and B_i may differ; one part gives exactly
    ``part.flat()``. Batches and traces move to ``device``; each trace's sampler config becomes
    ``config`` (the learner's: a Flow-Noise config holds the noise head being trained, not a
    worker's copy)."""
    if not parts:
        raise ValueError("no rollout slices to pool")
    if len({p[2] is None for p in parts}) != 1:
        raise ValueError("either every slice has critic targets or none has")
    flats = [p[0].flat() for p in parts]
    stacked = [p[0].stacked() for p in parts]
    out = Rollout(batches=[tensors_to(batch_cat([b for b, _ in flats]), device)],
                  traces=[tensors_to(trace_cat([dataclasses.replace(t, config=config) for _, t in flats]), device)])
    for key in ("values", "rewards", "dones", "valid", "envs"):
        setattr(out, key, [torch.cat([st[key].reshape(-1) for st in stacked])])
    adv = torch.cat([p[1].reshape(-1) for p in parts])[None]
    ret = None if parts[0][2] is None else torch.cat([p[2].reshape(-1) for p in parts])[None]
    return out, adv, ret
