"""The protocols every consumer codes against: ``Policy`` (eval, RL, the robot loop) and
``Steerable`` (the neuron dictionary and steering plans)."""

from __future__ import annotations

from typing import Iterator, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from vlafast.envs.base import EnvSpec, Obs


class PolicyError(ValueError):
    """A policy cannot do what it was asked (wrong env, wrong job, bad file): one sentence."""


@runtime_checkable
class Policy(Protocol):
    """An env observation in, an action chunk for that env out.

    ``spec`` (a ``PolicySpec``) says what the policy is; ``bind(env.spec)`` checks an
    environment and adopts its cameras and dims; ``act_obs(obs)`` returns one deterministic
    chunk per env, env actions [B, E, A_env] (E executed actions); ``exec_horizon`` is E.
    Flow policies add ``observe`` / ``context`` / ``act`` / ``evaluate`` (RL with traces).
    """

    exec_horizon: int

    def bind(self, env: EnvSpec) -> "Policy": ...

    def act_obs(self, obs: Obs, *, generator: torch.Generator | None = None,
                num_steps: int | None = None) -> np.ndarray: ...


@runtime_checkable
class Steerable(Protocol):
    """What ``vlafast.interp`` uses: the (name, MLP) pairs whose ``steer`` slot a plan fills,
    the layers that can move the actions, and the tokenizer the dictionary decodes with."""

    def mlps(self) -> Iterator[tuple[str, nn.Module]]: ...

    def action_layers(self) -> list[str]: ...

    @property
    def tokenizer(self): ...


__all__ = ["Policy", "PolicyError", "Steerable"]
