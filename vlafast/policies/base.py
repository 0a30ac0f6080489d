"""The protocols every consumer codes against: ``Policy`` (eval, RL, the robot loop) and
``Steerable`` (the neuron dictionary and steering plans)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Iterator, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from vlafast.envs.base import EnvSpec, Obs

if TYPE_CHECKING:
    from vlafast.policies.spec import EnvBinding, PolicySpec


class PolicyError(ValueError):
    """A policy cannot do what it was asked (wrong env, wrong job, bad file): one sentence."""


class BoundPolicy:
    """What the policy classes share: the spec, the environment binding (checked, and undone
    when the check refuses it), the executed horizon, the recipe and the prompt tokenizer.

    A subclass sets ``_spec``, ``processor`` and ``critic``, and implements ``_check_binding``
    (raise ``PolicyError`` when an env does not fit); ``_bound(binding)`` runs after a
    successful bind (FlowPolicy rebuilds its action mask there)."""

    _spec: "PolicySpec"
    critic: nn.Module | None

    @property
    def env_spec(self) -> "EnvBinding":
        if self._spec.env is None:
            raise PolicyError("this policy is not bound to an environment yet: call policy.bind(env.spec)")
        return self._spec.env

    @property
    def exec_horizon(self) -> int:
        return self._spec.exec_horizon

    @property
    def tokenizer(self):
        """The prompt tokenizer (``PromptTokenizer``): what the neuron dictionary decodes
        vocabulary ids with."""
        return self.processor.tokenizer

    def _check_binding(self, env: "EnvBinding") -> None:
        raise NotImplementedError

    def _check_chunk_binding(self, env: "EnvBinding", what: str) -> None:
        """The checks every chunking model makes (``what`` names it): the checkpoint's state
        statistics fit the env's state, the executed horizon fits the chunk, there is a camera."""
        norm, horizon = self.model.normalizer, self.model.cfg.horizon
        if norm is not None and norm.state_mode != "identity" and norm.state.dim != env.state_dim:
            raise PolicyError(f"the checkpoint's state statistics have {norm.state.dim} dims but the env's state "
                              f"{env.state_dim}: this checkpoint was trained for another robot / benchmark")
        if not 1 <= self.exec_horizon <= horizon:
            raise PolicyError(f"exec_horizon must be in [1, horizon={horizon}], got {self.exec_horizon}")
        if not env.cameras:
            raise PolicyError(f"{what} needs camera images; this env has none (build it with render=True; "
                              "ManiSkill: obs_mode='rgb')")

    def _bound(self, env: "EnvBinding") -> None:
        """Called after a successful bind."""

    def bind(self, env: "EnvSpec | EnvBinding", *, exec_horizon: int | None = None):
        """Check ``env`` against the model and use its cameras and dims from now on."""
        from vlafast.policies.spec import EnvBinding

        binding = env if isinstance(env, EnvBinding) else EnvBinding.of(env)
        if self._spec.env is not None and self.critic is not None and binding.state_dim != self._spec.env.state_dim:
            raise PolicyError(f"the value head reads a {self._spec.env.state_dim}-dim state; this env's has "
                              f"{binding.state_dim}")
        spec = dataclasses.replace(self._spec, env=binding,
                                   exec_horizon=self._spec.exec_horizon if exec_horizon is None else exec_horizon)
        old, self._spec = self._spec, spec
        try:
            self._check_binding(binding)
        except PolicyError:
            self._spec = old
            raise
        self._bound(binding)
        return self

    def with_recipe(self, recipe: dict[str, Any] | None):
        """This policy, its spec carrying ``recipe`` (the built-in task's, for runs trained here)."""
        self._spec = dataclasses.replace(self._spec, recipe=recipe)
        return self


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


__all__ = ["BoundPolicy", "Policy", "PolicyError", "Steerable"]
