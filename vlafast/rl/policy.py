"""A flow VLA as an RL actor-critic over ``VecEnv`` observations.

``VLAPolicy`` wraps a ``Pi0Policy``: it turns env observations (uint8 images, raw state,
instruction strings) into model inputs, samples action chunks with the flow sampler
(ODE / Flow-SDE / Flow-Noise, ``vlafast.flow``), recomputes their log-probs for the update
through the sampler's own ``evaluate``, and carries the critic (DESIGN §3: on the expert's
action tokens for pi0, on the mean VLM prefix for pi0.5) and the Flow-Noise head.

Axes: B batch, V camera views, T model horizon, A model action dim (padded), A_env the env's
action dim, E executed actions per chunk, K denoise steps.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from vlafast.envs.base import EnvSpec, Obs
from vlafast.flow import sampler as flow
from vlafast.flow.noise_head import NoiseHead
from vlafast.models.pi0 import Pi0Context, Pi0Observation, Pi0Policy, preprocess_images

PAD, UNK = "[PAD]", "[UNK]"


def build_word_tokenizer(words: Sequence[str]):
    """A word-level ``tokenizers.Tokenizer`` over ``words`` (lower-cased), id 0 = [PAD],
    1 = [UNK]; what the built-in tasks and tests use where no PaliGemma tokenizer can be had."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {PAD: 0, UNK: 1}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def words_of(texts: Sequence[str]) -> list[str]:
    """Sorted distinct words of ``texts`` (what ``build_word_tokenizer`` splits on)."""
    return sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})


@dataclasses.dataclass
class Batch:
    """Model-ready observations: images [B, V, 3, H, W] in [-1, 1], image_masks [B, V],
    tokens / token_masks [B, L], state [B, S] raw."""

    images: Tensor
    image_masks: Tensor
    tokens: Tensor
    token_masks: Tensor
    state: Tensor

    @property
    def size(self) -> int:
        return self.images.shape[0]

    def index(self, idx: Tensor) -> "Batch":
        return Batch(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))

    @staticmethod
    def cat(batches: Sequence["Batch"]) -> "Batch":
        return Batch(*(torch.cat([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(Batch)))

    def as_pi0(self) -> Pi0Observation:
        return Pi0Observation(self.images, self.image_masks, self.tokens, self.token_masks, self.state)


class VLAPolicy(nn.Module):
    """Actor-critic around a pi0 / pi0.5 model for a given environment spec."""

    def __init__(
        self,
        model: Pi0Policy,
        tokenizer: Any,
        spec: EnvSpec,
        *,
        exec_horizon: int,
        max_tokens: int = 16,
        noise_head: NoiseHead | None = None,
    ) -> None:
        super().__init__()
        cfg = model.cfg
        if spec.action_dim > cfg.action_dim:
            raise ValueError(f"env action dim {spec.action_dim} exceeds the model's padded action dim {cfg.action_dim}")
        if not cfg.is_pi05 and spec.state_dim > cfg.state_dim:
            raise ValueError(f"env state dim {spec.state_dim} exceeds the model's state dim {cfg.state_dim}")
        if not 1 <= exec_horizon <= cfg.horizon:
            raise ValueError(f"exec_horizon must be in [1, horizon={cfg.horizon}], got {exec_horizon}")
        if not spec.cameras:
            raise ValueError("the policy needs at least one camera: build the env with render=True")
        vocab = tokenizer.get_vocab_size()
        if vocab > cfg.vocab_size:
            raise ValueError(f"tokenizer has {vocab} tokens but the model's vocab is {cfg.vocab_size}")
        self.model, self.tokenizer, self.spec = model, tokenizer, spec
        self.exec_horizon, self.max_tokens = exec_horizon, max_tokens
        self.noise_head = noise_head
        self.critic_input: Literal["expert", "prefix"] = "prefix" if cfg.is_pi05 else "expert"
        width = cfg.vlm.width if self.critic_input == "prefix" else cfg.expert.width
        # The critic reads the model's features and the raw proprio state.
        self.critic = nn.Sequential(nn.Linear(width + spec.state_dim, 64), nn.Tanh(), nn.Linear(64, 1))
        mask = torch.zeros(cfg.horizon, cfg.action_dim)
        mask[:exec_horizon, : spec.action_dim] = 1.0
        self.register_buffer("action_mask", mask, persistent=False)  # [T, A] executed part
        self._graphed: dict[tuple, Any] | None = None  # (sampler config, generator) -> GraphedSampler

    # -- observations ----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.device

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """texts -> tokens [B, L], masks [B, L] (L = max_tokens, right-padded with id 0)."""
        L = self.max_tokens
        tokens = torch.zeros(len(texts), L, dtype=torch.long)
        for i, enc in enumerate(self.tokenizer.encode_batch(list(texts))):
            ids = enc.ids[:L]
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return tokens, tokens != 0

    def observe(self, obs: Obs) -> Batch:
        """Env observation -> model inputs on the policy's device."""
        frames = torch.from_numpy(np.stack([obs["images"][cam] for cam in self.spec.cameras], axis=1))
        images = preprocess_images(frames, self.model.cfg.vision.image_size)  # [B, V, 3, H, W]
        tokens, token_masks = self.tokenize(obs["instruction"])
        dev = self.device
        return Batch(
            images=images.to(dev, self.model.dtype),
            image_masks=torch.ones(images.shape[:2], dtype=torch.bool, device=dev),
            tokens=tokens.to(dev),
            token_masks=token_masks.to(dev),
            state=torch.from_numpy(np.asarray(obs["state"], np.float32)).to(dev),
        )

    # -- model calls -------------------------------------------------------------------------

    def context(self, batch: Batch) -> Pi0Context:
        """Encode the prefix once (no gradient: the VLM is frozen in RL)."""
        return self.model.encode(batch.as_pi0())

    def velocity_fn(self, x: Tensor, t: Tensor, ctx: Pi0Context) -> tuple[Tensor, Tensor]:
        """The sampler's velocity function: (v [B, T, A] fp32, expert hidden [B, T, D])."""
        return self.model.velocity(x, t, ctx.state, ctx.cache, return_hidden=True)

    def value(self, ctx: Pi0Context, state: Tensor) -> Tensor:
        """Critic: [B] from the raw state [B, S] and model features: pi0 reads the expert's
        action tokens at the first denoise step (t=1) taken at the noise's mean (x = 0), so
        the value is a function of the observation alone; pi0.5 the mean of the valid VLM
        prefix outputs. Features are detached: the value loss trains the critic head only."""
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

    def sampler_config(self, method: str, num_steps: int, a: float = 0.5, hybrid: bool = True) -> flow.SamplerConfig:
        if method == "ode":
            return flow.ode(num_steps)
        if method == "flow_sde":
            return flow.flow_sde(a=a, hybrid=hybrid, num_steps=num_steps)
        if method == "flow_noise":
            if self.noise_head is None:
                raise ValueError("flow_noise needs a policy built with noise_head=NoiseHead(...)")
            return flow.flow_noise(self.noise_head, num_steps=num_steps)
        raise ValueError(f"sampling method must be ode | flow_sde | flow_noise, got {method!r}")

    def use_cuda_graphs(self, enabled: bool = True) -> "VLAPolicy":
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

    @torch.no_grad()
    def act(
        self, batch: Batch, config: flow.SamplerConfig, generator: torch.Generator | None = None
    ) -> tuple[np.ndarray, flow.DenoiseTrace, Tensor]:
        """Sample one chunk per env -> (env actions [B, E, A_env] numpy, trace, value [B])."""
        cfg = self.model.cfg
        ctx = self.context(batch)
        noise = torch.randn(batch.size, cfg.horizon, cfg.action_dim, generator=generator, device=self.device)
        actions, trace = self._sampler(config, generator)(ctx, noise)
        value = self.value(ctx, batch.state)
        env_actions = actions[:, : self.exec_horizon, : self.spec.action_dim].float().cpu().numpy()
        return env_actions, trace, value

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
        return self.model.flow_matching_loss(batch.as_pi0(), actions.to(self.device), noise=noise, time=t).mean()

    def rl_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(actor, critic) parameters for RL: the expert side of pi0 (+ noise head); the VLM
        and vision tower stay frozen."""
        frozen = {id(p) for m in (self.model.vision_tower, self.model.projector, self.model.language_model)
                  for p in m.parameters()}
        actor = [p for p in self.model.parameters() if id(p) not in frozen]
        if self.noise_head is not None:
            actor += list(self.noise_head.parameters())
        return actor, list(self.critic.parameters())
