"""The policy layer every consumer uses: eval, steering, RL and the robot loop take a policy
from here, never a raw model.

    from vlafast import policies
    policy = policies.load("runs/sft")                      # or a LeRobot / openpi / OpenVLA folder
    policy.bind(env.spec)                                    # cameras, dims, checked once
    chunk = policy.act_obs(obs)                              # env actions [B, E, A_env]
    policies.save(policy, "runs/mine/policy")                # policy.json + safetensors, no pickle

``PolicySpec`` says what a policy is; ``Policy`` and ``Steerable`` are the protocols;
``FlowPolicy`` (pi0 / pi0.5), ``FASTPolicy`` (pi0-FAST) and ``OpenVLAChunkPolicy`` implement
them; the processors turn env observations into model inputs.
"""

from __future__ import annotations

from typing import Any

from vlafast.policies.base import Policy, PolicyError, Steerable
from vlafast.policies.fast import FASTPolicy, FASTProcessor
from vlafast.policies.flow import FlowPolicy
from vlafast.policies.io import FORMATS, detect_format, load, save
from vlafast.policies.openvla import OpenVLAChunkPolicy
from vlafast.policies.processors import (
    Batch, OpenVLAProcessor, Pi0Processor, ProcessorConfig, PromptTokenizer, build_word_tokenizer, words_of,
)
from vlafast.policies.spec import EnvBinding, PolicySpec


def flow_policy(model, tokenizer: Any, env_spec, *, exec_horizon: int, max_tokens: int = 16, prompt: str = "words",
                noise_head=None, critic: bool = True, recipe: dict | None = None,
                action_space: str = "unknown") -> FlowPolicy:
    """A ``FlowPolicy`` around ``model`` (a ``Pi0Policy``) bound to ``env_spec``: what the
    built-in tasks and the tests build (``prompt="words"``: a word-level tokenizer, fixed
    ``max_tokens``); ``critic`` builds the value head now (it draws from torch's RNG)."""
    processor_cfg = ProcessorConfig(prompt=prompt, max_tokens=max_tokens)
    spec = PolicySpec(family=model.cfg.variant, model=model.cfg.to_json(), processor=processor_cfg,
                      exec_horizon=exec_horizon, env=None if env_spec is None else EnvBinding.of(env_spec),
                      action_space=action_space, recipe=recipe)
    return FlowPolicy(model, Pi0Processor(model, tokenizer, processor_cfg), spec, noise_head=noise_head, critic=critic)


__all__ = [
    "Batch", "EnvBinding", "FASTPolicy", "FASTProcessor", "FORMATS", "FlowPolicy",
    "OpenVLAChunkPolicy", "OpenVLAProcessor", "Pi0Processor", "Policy",
    "PolicyError", "PolicySpec", "ProcessorConfig", "PromptTokenizer", "Steerable", "build_word_tokenizer",
    "detect_format", "flow_policy", "load", "save", "words_of",
]
