"""``OpenVLAChunkPolicy``: OpenVLA as a policy for eval, steering and the robot loop.

OpenVLA decodes one action (7 tokens, greedy) per observation from the first camera; the
chunk it returns is that one action, [B, 1, A_env], in the dataset's units (q01 / q99
unnormalisation of the ``unnorm_key`` statistics). OpenVLA decodes without padding, so the
rows of a batch are decoded in groups of equal prompt length.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import nn

from vlafast.envs.base import EnvSpec, Obs
from vlafast.policies.base import PolicyError
from vlafast.policies.processors import OpenVLAProcessor
from vlafast.policies.spec import EnvBinding, PolicySpec


class OpenVLAChunkPolicy(nn.Module):
    def __init__(self, model, processor: OpenVLAProcessor, spec: PolicySpec, *, unnorm_key: str | None = None):
        super().__init__()
        self.model, self.processor, self._spec = model, processor, spec
        self.unnorm_key = unnorm_key
        self.model.action_stats(unnorm_key)  # fails now, with the keys there are, when the key is wrong
        if spec.env is not None:
            self._check_binding(spec.env)

    @property
    def spec(self) -> PolicySpec:
        return self._spec

    @property
    def exec_horizon(self) -> int:
        return 1

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _check_binding(self, env: EnvBinding) -> None:
        if env.action_dim > self.model.cfg.action_dim:
            raise PolicyError(f"the env has {env.action_dim} action dims but OpenVLA decodes {self.model.cfg.action_dim}")
        if not env.cameras:
            raise PolicyError("OpenVLA needs a camera image; this env has none")

    def bind(self, env: EnvSpec | EnvBinding, **_) -> "OpenVLAChunkPolicy":
        binding = env if isinstance(env, EnvBinding) else EnvBinding.of(env)
        self._check_binding(binding)
        self._spec = dataclasses.replace(self._spec, env=binding)
        return self

    @torch.no_grad()
    def act_obs(self, obs: Obs, *, generator: torch.Generator | None = None, num_steps: int | None = None) -> np.ndarray:
        """Env actions [B, 1, A_env]: one greedy action per env (``generator`` is unused: greedy)."""
        env = self._spec.env
        if env is None:
            raise PolicyError("this policy is not bound to an environment yet: call policy.bind(env.spec)")
        pixels = self.processor.pixel_values(obs, env.cameras[0])
        prompts = [self.processor.prompt_ids(t) for t in obs["instruction"]]
        out = np.zeros((len(prompts), 1, env.action_dim))
        for length in sorted({len(p) for p in prompts}):
            rows = [i for i, p in enumerate(prompts) if len(p) == length]
            ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=self.device)
            actions = self.model.predict_action(pixels[rows], ids, self.unnorm_key)  # [b, A]
            out[rows, 0] = actions[:, : env.action_dim].double().cpu().numpy()
        return out

    def mlps(self):
        return self.model.mlps()

    def action_layers(self) -> list[str]:
        """Every LLM layer feeds the action tokens."""
        return [name for name, _ in self.model.mlps()]


__all__ = ["OpenVLAChunkPolicy"]
