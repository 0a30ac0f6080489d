"""``FlowPolicy``: a pi0 / pi0.5 as a policy every consumer uses (eval, steering, RL, robot).

It turns env observations into model inputs (``Pi0Processor``), encodes the prefix once
(``context``), samples action chunks with the flow sampler (ODE / Flow-SDE / Flow-Noise,
``vlafast.flow``), maps them to the env's action space (unnormalise, keep the executed part
and the env's dims), recomputes their log-probs for RL through the sampler's own
``evaluate``, and carries the optional RL heads: the critic (on the expert's action tokens for
pi0, on the mean VLM prefix for pi0.5) and the Flow-Noise head. Both heads save with it.

Axes: B batch, V camera views, T model horizon, A model action dim (padded), A_env the env's
action dim, E executed actions per chunk, K denoise steps, S env state dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from vlafast.envs.base import Obs
from vlafast.flow import sampler as flow
from vlafast.flow.noise_head import NoiseHead
from vlafast.models.pi0 import Pi0Context, Pi0Policy
from vlafast.policies.base import BoundPolicy, PolicyError
from vlafast.policies.processors import Batch, Pi0Processor
from vlafast.policies.spec import EnvBinding, PolicySpec


def value_head(width: int, state_dim: int) -> nn.Module:
    """The critic MLP: model features [B, width] + raw state [B, S] -> [B, 1]."""
    return nn.Sequential(nn.Linear(width + state_dim, 64), nn.Tanh(), nn.Linear(64, 1))


class FlowPolicy(BoundPolicy, nn.Module):
    """A flow VLA (pi0 / pi0.5) bound to an environment's observation and action spaces.

    ``spec.env`` holds the binding (cameras, env action / state dims); ``bind(env.spec)``
    checks an environment against the model and (re)binds. ``critic``: build the value head
    now (RL); ``attach_value_head`` / ``attach_noise_head`` add them later.
    """

    def __init__(self, model: Pi0Policy, processor: Pi0Processor, spec: PolicySpec, *,
                 noise_head: NoiseHead | None = None, critic: bool = True) -> None:
        super().__init__()
        self.model, self.processor = model, processor
        self.noise_head = noise_head
        self.critic: nn.Module | None = None
        self._spec = spec
        self.critic_input: Literal["expert", "prefix"] = "prefix" if model.cfg.is_pi05 else "expert"
        self._graphed: dict[tuple, Any] | None = None  # (sampler config, generator) -> GraphedSampler
        if spec.env is not None:
            self._check_binding(spec.env)
            self._set_mask(spec.env)
            if critic:
                self.attach_value_head()

    # -- spec and binding ------------------------------------------------------------------

    @property
    def spec(self) -> PolicySpec:
        heads = tuple(n for n, m in (("critic", self.critic), ("noise_head", self.noise_head)) if m is not None)
        return dataclasses.replace(self._spec, heads=heads)

    def _check_binding(self, env: EnvBinding) -> None:
        cfg = self.model.cfg
        out_dim = self.action_out_dim
        if env.action_dim > out_dim:
            raise PolicyError(f"the env has {env.action_dim} action dims but this {cfg.variant} outputs {out_dim}")
        if not cfg.is_pi05 and env.state_dim > cfg.state_dim:
            raise PolicyError(f"the env's state has {env.state_dim} dims but this pi0 takes at most {cfg.state_dim}")
        self._check_chunk_binding(env, "pi0")

    def _bound(self, env: EnvBinding) -> None:
        self._set_mask(env)

    def _set_mask(self, env: EnvBinding) -> None:
        cfg = self.model.cfg
        mask = torch.zeros(cfg.horizon, cfg.action_dim, device=self.model.device)
        mask[: self.exec_horizon, : env.action_dim] = 1.0
        self.register_buffer("action_mask", mask, persistent=False)  # [T, A] executed part

    def attach_value_head(self) -> nn.Module:
        """The critic (built once; drawn from torch's global RNG)."""
        if self.critic is None:
            cfg = self.model.cfg
            width = cfg.vlm.width if self.critic_input == "prefix" else cfg.expert.width
            self.critic = value_head(width, self.env_spec.state_dim).to(self.model.device)
        return self.critic

    def attach_noise_head(self) -> NoiseHead:
        """The Flow-Noise head (built once; drawn from torch's global RNG)."""
        if self.noise_head is None:
            cfg = self.model.cfg
            self.noise_head = NoiseHead(cfg.expert.width, cfg.action_dim).to(self.model.device)
        return self.noise_head

    @property
    def action_out_dim(self) -> int:
        """Action dims the model outputs in env units: the normaliser's, else the padded width."""
        norm = self.model.normalizer
        return norm.action_dim if norm is not None and norm.action_dim else self.model.cfg.action_dim

    # -- observations ----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.device

    def observe(self, obs: Obs) -> Batch:
        """Env observation -> model inputs on the policy's device."""
        return self.processor(obs, self.env_spec.cameras)

    # -- model calls -------------------------------------------------------------------------

    def model_inputs(self, obs: Obs):
        """Env observation -> the model's ``Pi0Observation`` (pi0.5: the state is in the prompt)."""
        return self.observe(obs).as_pi0(with_state=not self.model.cfg.is_pi05)

    def context(self, batch: Batch) -> Pi0Context:
        """Encode the prefix once (no gradient: the VLM is frozen in RL)."""
        return self.model.encode(batch.as_pi0(with_state=not self.model.cfg.is_pi05))

    def velocity_fn(self, x: Tensor, t: Tensor, ctx: Pi0Context) -> tuple[Tensor, Tensor]:
        """The sampler's velocity function: (v [B, T, A] fp32, expert hidden [B, T, D])."""
        return self.model.velocity(x, t, ctx.state, ctx.cache, return_hidden=True)

    def value(self, ctx: Pi0Context, state: Tensor) -> Tensor:
        """Critic: [B] from the raw state [B, S] and model features: pi0 reads the expert's
        action tokens at the first denoise step (t=1) taken at the noise's mean (x = 0), so
        the value is a function of the observation alone; pi0.5 the mean of the valid VLM
        prefix outputs. Features are detached: the value loss trains the critic head only.
        Zeros when the policy has no value head (evaluation)."""
        if self.critic is None:
            return torch.zeros(state.shape[0], device=self.device)
        with torch.no_grad():
            if self.critic_input == "prefix":
                h, m = ctx.cache.hidden, ctx.cache.pad_mask[..., None].to(ctx.cache.hidden.dtype)
                feat = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
            else:
                cfg = self.model.cfg
                B = ctx.cache.batch_size
                x = torch.zeros(B, cfg.horizon, cfg.action_dim, device=self.device)
                _, h = self.velocity_fn(x, torch.ones(B, device=self.device), ctx)
                feat = h.mean(dim=1)
        return self.critic(torch.cat([feat.float(), state.float()], dim=-1)).squeeze(-1)

    def use_cuda_graphs(self, enabled: bool = True) -> "FlowPolicy":
        """Sample through CUDA graphs (``flow.graphs.GraphedSampler``: one graph per sampler
        config, generator and batch layout) when the policy is on a CUDA device; elsewhere ``act``
        stays eager. Replays draw the same noise as the eager loop after the same seed and update
        in place with the optimiser, so rollout log-probs still match the update's."""
        self._graphed = {} if enabled else None
        return self

    def _sampler(self, config: flow.SamplerConfig, generator: torch.Generator | None):
        """``flow.sample``'s contract: eager, or the cached graph runner on CUDA."""
        if self._graphed is None or self.device.type != "cuda":
            return lambda ctx, noise: flow.sample(config, self.velocity_fn, ctx, noise, generator=generator,
                                                  action_mask=self.action_mask)
        from vlafast.flow.graphs import GraphedSampler

        key = (config, id(generator))
        if key not in self._graphed:
            self._graphed[key] = GraphedSampler(config, self.velocity_fn, generator=generator)
        graphed = self._graphed[key]
        return lambda ctx, noise: graphed(ctx, noise, action_mask=self.action_mask)

    def to_env(self, actions: Tensor) -> np.ndarray:
        """Model actions [B, T, A] (normalised, padded) -> env actions [B, E, A_env] numpy:
        unnormalised, the executed part, the env's dims."""
        norm = self.model.normalizer
        if norm is not None:
            actions = norm.unnormalize_actions(actions[..., : norm.action_dim])
        return actions[:, : self.exec_horizon, : self.env_spec.action_dim].double().cpu().numpy()

    @torch.no_grad()
    def act(
        self, batch: Batch, config: flow.SamplerConfig, generator: torch.Generator | None = None
    ) -> tuple[np.ndarray, flow.DenoiseTrace, Tensor]:
        """Sample one chunk per env -> (env actions [B, E, A_env] numpy, trace, value [B])."""
        cfg = self.model.cfg
        ctx = self.context(batch)
        noise = torch.randn(batch.size, cfg.horizon, cfg.action_dim, generator=generator, device=self.device)
        actions, trace = self._sampler(config, generator)(ctx, noise)
        return self.to_env(actions), trace, self.value(ctx, batch.state)

    def evaluate(self, batch: Batch, trace: flow.DenoiseTrace) -> tuple[Tensor, Tensor, Tensor]:
        """(log_prob [B], entropy [B], value [B]) of stored chunks under current parameters."""
        ctx = self.context(batch)
        out = flow.evaluate(self.velocity_fn, ctx, trace)
        return out.log_prob, out.entropy, self.value(ctx, batch.state)

    def flow_matching_loss(self, batch: Batch, actions: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """SFT loss: actions [B, T, A_env] (the expert's chunk) -> mean squared velocity error
        on the linear path x_t = t * noise + (1 - t) * a, target noise - a; t ~ Beta(1.5, 1)
        as in pi0, restricted to the env's action dims."""
        cfg = self.model.cfg
        B = batch.size
        noise = torch.randn(B, cfg.horizon, cfg.action_dim, generator=generator, device=self.device)
        u = torch.rand(B, generator=generator, device=self.device)
        t = (u ** (1.0 / 1.5)) * 0.999 + 0.001  # inverse CDF of Beta(1.5, 1)
        return self.model.flow_matching_loss(batch.as_pi0(with_state=not self.model.cfg.is_pi05), actions.to(self.device),
                                             noise=noise, time=t).mean()

    def sft_loss(self, batch: Batch, actions: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The SFT loss every policy has: here ``flow_matching_loss``."""
        return self.flow_matching_loss(batch, actions, generator)

    def rl_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(actor, critic) parameters for RL: the expert side of pi0 (+ noise head); the VLM
        and vision tower stay frozen. Attaches the value head if there is none."""
        frozen = {id(p) for m in (self.model.vision_tower, self.model.projector, self.model.language_model)
                  for p in m.parameters()}
        actor = [p for p in self.model.parameters() if id(p) not in frozen]
        if self.noise_head is not None:
            actor += list(self.noise_head.parameters())
        return actor, list(self.attach_value_head().parameters())

    # -- steering surface --------------------------------------------------------------------

    def mlps(self):
        """The model's (name, MLP) pairs: what steering plans and the neuron dictionary use."""
        return self.model.mlps()

    def action_layers(self) -> list[str]:
        """VLM layers whose MLPs can change the actions: all but the last (whose MLP only feeds
        the prefix output, never the K/V the expert reads; see ``Pi0Policy.mlps``)."""
        return [f"vlm.{l}" for l in range(self.model.cfg.vlm.depth - 1)]

    # -- chunks for other consumers ------------------------------------------------------------

    @torch.no_grad()
    def act_obs(self, obs: Obs, *, generator: torch.Generator | None = None, num_steps: int | None = None,
                sampler: flow.SamplerConfig | None = None) -> np.ndarray:
        """One deterministic (ODE) chunk per env: env actions [B, E, A_env] (the evaluator's call)."""
        config = sampler or flow.ode(num_steps or self.model.cfg.num_steps)
        return self.act(self.observe(obs), config, generator)[0]


__all__ = ["FlowPolicy", "value_head"]
