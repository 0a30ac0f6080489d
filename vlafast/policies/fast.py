"""``FASTPolicy``: pi0-FAST as a policy every consumer uses (eval, steering, RL, robot).

An observation becomes a ``Batch`` (``FASTProcessor``): camera images, the model's own prompt
``"Task: <task>, State: <bins>;\\n"`` (``Pi0FASTPolicy.prompt_tokens``, the state normalised
and discretised into 256 bins) and the raw state. The policy then decodes FAST action tokens
after ``"Action: "`` and the FAST codec turns them into a normalised chunk, unnormalised to
env units. A stream the codec cannot decode exactly is counted in ``decode_failures`` (of
``decoded_chunks``) and
decoded relaxed, as LeRobot's pi0fast does (``relaxed_action_decoding``): a stream with the
wrong number of DCT symbols is cut or zero-padded to T * A (the symbols run frequency-major,
so what is cut or padded are the highest frequencies: a smoothed chunk); a stream that does
not decode at all (ids outside the codec, bytes that are not UTF-8) is zeros in normalised
space, unnormalised (openpi's behaviour; with mean/std statistics the dataset's mean action,
with the built-in task's [-1, 1] action range "stand still"). Nothing raises on what the
model emits.

RL (``vlafast.policies.tokens``): ``act`` samples the action tokens at the sampler's temperature
for a fixed ``max_decoding_steps`` (so traces of one policy always stack) and returns the
per-step log-probs and entropies; ``evaluate`` teacher-forces the same tokens after the same
prompt + ``"Action: "`` and scores them with the same function (``token_log_probs``). The critic
reads the mean of the valid prefix's (images + prompt) final hidden states and the raw state,
as ``FlowPolicy``'s pi0.5 critic does.

Axes: B envs, V camera views, L prompt tokens, Q ``"Action: "`` tokens, N decode steps, T model
horizon, A model action dim, A_env the env's action dim, E executed actions, S state dim,
D width.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlafast.envs.base import Obs
from vlafast.models.fast_tokenizer import FASTTokenizer, fast_to_paligemma
from vlafast.models.normalize import FeatureStats, Normalizer
from vlafast.models.pi0 import preprocess_images
from vlafast.models.pi0fast import ACTION_END, ACTION_PREFIX, DecodeOutput, Pi0FASTPolicy, encode_text
from vlafast.policies.base import BoundPolicy, PolicyError
from vlafast.policies.flow import value_head
from vlafast.policies.processors import Batch, ProcessorConfig, check_cameras, model_tokenizer
from vlafast.policies.spec import EnvBinding, PolicySpec
from vlafast.policies.tokens import StepScored, TokenSampler, TokenTrace, masked_steps, token_log_probs

log = logging.getLogger(__name__)

MAX_TOKENS = 200  # prompt tokens kept (openpi's pi0-FAST max_token_len is 180 for LIBERO, 250 for DROID with actions)


class FASTProcessor:
    """Env observation -> ``Batch`` for a pi0-FAST: the cameras in order, resized with padding
    to the model's image size; the prompt as the model builds it (``prompt_tokens``), cut at
    ``config.max_tokens`` (with a warning); the raw state. ``config.prompt`` must be
    ``"paligemma"``: pi0-FAST's prompt is its own, whatever the tokenizer."""

    def __init__(self, model: Pi0FASTPolicy, tokenizer: Any, config: ProcessorConfig) -> None:
        if config.prompt != "paligemma":
            raise ValueError(f"pi0-FAST builds its own prompt: the processor's prompt style must be 'paligemma', "
                             f"got {config.prompt!r}")
        self.model, self.config = model, config
        self.tokenizer = model_tokenizer(tokenizer, model.cfg.vocab_size, "pi0-FAST")

    def ids(self, text: str) -> list[int]:
        """Ids of a postfix piece (``"Action: "``, ``"|"``): without BOS."""
        return encode_text(self.tokenizer, text, bos=False)

    def __call__(self, obs: Obs, cameras: Sequence[str]) -> Batch:
        check_cameras(obs, cameras)
        model, dev = self.model, self.model.device
        frames = torch.from_numpy(np.stack([obs["images"][cam] for cam in cameras], axis=1))  # [B, V, H, W, 3]
        images = preprocess_images(frames, model.cfg.vision.image_size)  # [B, V, 3, H, W]
        state = torch.from_numpy(np.asarray(obs["state"], np.float32)).to(dev)
        tokens, masks, _ = model.prompt_tokens(list(obs["instruction"]), state, self.tokenizer)
        L = self.config.max_tokens
        if tokens.shape[1] > L:
            log.warning("pi0-FAST prompt of %d tokens cut to max_tokens=%d", tokens.shape[1], L)
            tokens, masks = tokens[:, :L], masks[:, :L]
        return Batch(images=images.to(dev, model.dtype),
                     image_masks=torch.ones(images.shape[:2], dtype=torch.bool, device=dev),
                     tokens=tokens, token_masks=masks, state=state)


def fit_normalizer(chunks: np.ndarray, states: np.ndarray, action_low: float = -1.0,
                   action_high: float = 1.0) -> Normalizer:
    """Quantile statistics for a policy trained here: the state's q01 / q99 over ``states``
    [N, S] (so the prompt's 256 bins span what the robot visits), the actions' range fixed to
    [``action_low``, ``action_high``] per dim of ``chunks`` [N, T, A_env] (the built-in tasks'
    actions are already in [-1, 1], so normalising them is the identity and a zero chunk is
    "stand still")."""
    s = torch.as_tensor(np.asarray(states, np.float32))
    A = int(np.asarray(chunks).shape[-1])
    state = FeatureStats(q01=torch.quantile(s, 0.01, dim=0), q99=torch.quantile(s, 0.99, dim=0))
    actions = FeatureStats(q01=torch.full((A,), float(action_low)), q99=torch.full((A,), float(action_high)))
    return Normalizer(state, actions, "quantile", "quantile", "lerobot")


class FASTPolicy(StepScored, BoundPolicy, nn.Module):
    """A pi0-FAST bound to an environment's observation and action spaces.

    ``fast``: the FAST codec the model was trained with (None only for a policy about to be
    trained here: ``fit_codec`` fits it); ``critic``: build the value head now (RL).
    ``fast_vocab`` / ``fast_scale``: the codec ``fit_codec`` fits: at most that many tokens (the
    ids the model reserves for them), coefficients scaled by ``fast_scale`` before rounding.
    """

    def __init__(self, model: Pi0FASTPolicy, processor: FASTProcessor, spec: PolicySpec,
                 fast: FASTTokenizer | None, *, critic: bool = True, fast_vocab: int | None = None,
                 fast_scale: float = 10.0) -> None:
        super().__init__()
        self.model, self.processor, self._spec = model, processor, spec
        self.fast = fast
        self.fast_vocab, self.fast_scale = fast_vocab, fast_scale
        self.critic: nn.Module | None = None
        self.decode_failures = 0  # chunks whose tokens did not decode since construction
        self.decoded_chunks = 0   # chunks decoded since construction (failed ones included)
        cfg = model.cfg
        postfix = processor.ids(ACTION_PREFIX)
        end = processor.ids(ACTION_END)
        if not postfix or not end:
            raise ValueError(f"the tokenizer gives no ids for {ACTION_PREFIX!r} or {ACTION_END!r}: pass the tokenizer the "
                             "checkpoint was trained with")
        self.end_ids = end[:1]  # the piece that follows the actions
        self.register_buffer("postfix", torch.tensor(postfix, dtype=torch.long, device=model.device), persistent=False)
        if fast is not None:
            self._check_codec(fast)
        if not cfg.eos_token_id < cfg.vocab_size:
            raise ValueError(f"eos_token_id {cfg.eos_token_id} is outside the vocabulary")
        if spec.env is not None:
            self._check_binding(spec.env)
            if critic:
                self.attach_value_head()

    # -- spec and binding ------------------------------------------------------------------

    @property
    def spec(self) -> PolicySpec:
        return dataclasses.replace(self._spec, heads=("critic",) if self.critic is not None else ())

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def action_out_dim(self) -> int:
        """Action dims the model outputs in env units: the normaliser's, else the codec's."""
        norm = self.model.normalizer
        return norm.action_dim if norm is not None and norm.action_dim else self.model.cfg.action_dim

    def _check_codec(self, fast: FASTTokenizer) -> None:
        cfg = self.model.cfg
        if fast.vocab_size > cfg.fast_top + 1:
            raise PolicyError(f"the FAST codec has {fast.vocab_size} tokens but the model maps at most "
                              f"{cfg.fast_top + 1} (vocab {cfg.vocab_size} less 1 and {cfg.fast_skip_tokens} skipped)")

    def _check_binding(self, env: EnvBinding) -> None:
        if env.action_dim > self.action_out_dim:
            raise PolicyError(f"the env has {env.action_dim} action dims but this pi0-FAST outputs {self.action_out_dim}")
        self._check_chunk_binding(env, "pi0-FAST")

    def attach_value_head(self) -> nn.Module:
        """The critic on the mean valid prefix hidden state + raw state (built once; drawn from
        torch's global RNG)."""
        if self.critic is None:
            self.critic = value_head(self.model.cfg.vlm.width, self.env_spec.state_dim).to(self.device)
        return self.critic

    def _codec(self) -> FASTTokenizer:
        if self.fast is None:
            raise PolicyError("this pi0-FAST has no FAST codec: load it with fast_tokenizer= (--fast-tokenizer) or fit "
                              "one on demonstrations (fit_codec)")
        return self.fast

    # -- observations ----------------------------------------------------------------------

    def observe(self, obs: Obs) -> Batch:
        """Env observation -> model inputs on the policy's device."""
        return self.processor(obs, self.env_spec.cameras)

    def _prefix_len(self, batch: Batch) -> int:
        """Image tokens + prompt tokens (the part before ``"Action: "``)."""
        return batch.images.shape[1] * self.model.cfg.vision.num_patches + batch.tokens.shape[1]

    def _prefix_mask(self, batch: Batch) -> Tensor:
        """[B, V * patches + L] bool: the valid image and prompt tokens."""
        B, V = batch.image_masks.shape
        n = self.model.cfg.vision.num_patches
        img = batch.image_masks.bool()[:, :, None].expand(B, V, n).reshape(B, V * n)
        return torch.cat([img, batch.token_masks.bool()], dim=1)

    # -- critic ----------------------------------------------------------------------------

    def _value(self, hidden: Tensor, batch: Batch) -> Tensor:
        """hidden [B, >= P0, D] (final-normed, the prefix first) -> value [B] (zeros without a
        head). Features are detached: the value loss trains the head only."""
        if self.critic is None:
            return torch.zeros(batch.size, device=self.device)
        mask = self._prefix_mask(batch)
        h = hidden[:, : mask.shape[1]].detach().float()
        m = mask[..., None].float()
        feat = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.critic(torch.cat([feat, batch.state.float()], dim=-1)).squeeze(-1)

    def value(self, batch: Batch) -> Tensor:
        """Critic [B] of an observation batch: the mean valid prefix hidden state + raw state."""
        if self.critic is None:
            return torch.zeros(batch.size, device=self.device)
        with torch.no_grad():
            h, _ = self.model.forward_hidden(batch.images, batch.image_masks, batch.tokens, batch.token_masks)
        return self._value(h, batch)

    # -- actions ---------------------------------------------------------------------------

    def to_env(self, out: DecodeOutput) -> np.ndarray:
        """Decoded tokens -> env actions [B, E, A_env] numpy (unnormalised); rows that do not
        decode are counted in ``decode_failures`` (their chunk: see the module docstring)."""
        actions, ok = self.model.decode_actions(out, self._codec(), self.end_ids, relaxed=True)
        self.decode_failures += int((~ok).sum())
        self.decoded_chunks += len(ok)
        return actions[:, : self.exec_horizon, : self.env_spec.action_dim].double().cpu().numpy()

    @torch.no_grad()
    def act_obs(self, obs: Obs, *, generator: torch.Generator | None = None, num_steps: int | None = None) -> np.ndarray:
        """One greedy chunk per env: env actions [B, E, A_env] (the evaluator's call).
        ``generator`` and ``num_steps`` (denoise steps of flow policies) do not apply."""
        batch = self.observe(obs)
        out = self.model.generate(batch.images, batch.image_masks, batch.tokens, batch.token_masks, self.postfix,
                                  temperature=0.0, stop_check=4)
        return self.to_env(out)

    @torch.no_grad()
    def act(self, batch: Batch, sampler: TokenSampler, generator: torch.Generator | None = None
            ) -> tuple[np.ndarray, TokenTrace, Tensor]:
        """Sample one chunk per env -> (env actions [B, E, A_env] numpy, trace, value [B]).

        Always ``max_decoding_steps`` steps (rows past their EOS emit padding, invalid), so the
        traces of one policy have one width. Log-probs and entropies come from
        ``token_log_probs`` on each step's logits, the function ``evaluate`` scores with."""
        if not isinstance(sampler, TokenSampler):
            raise TypeError(f"a token policy samples with a TokenSampler, got {type(sampler).__name__}")
        model, T = self.model, sampler.temperature
        model._check_sampling(T, generator)
        N = model.cfg.max_decoding_steps
        P = self._prefix_len(batch) + self.postfix.shape[0]
        st = model.new_state(batch.size, P, N)
        st.temperature.fill_(T)
        hidden = model.prefill(batch.images, batch.image_masks, batch.tokens, batch.token_masks, self.postfix, st)
        log_probs = torch.zeros(batch.size, N, device=self.device)
        entropy = torch.zeros_like(log_probs)
        for s in range(N):
            if s:
                model.decode_step(st)
            logits = st.logits.clone()  # [B, V]: what select draws from
            token = model.select(st, sample=True, generator=generator)
            lp, ent = token_log_probs(logits[:, None], token[:, None], T)
            log_probs[:, s], entropy[:, s] = lp[:, 0], ent[:, 0]
        out = DecodeOutput(st.tokens.clone(), st.log_probs.clone(), st.valid_steps.clone())
        trace = TokenTrace.of(sampler, out.tokens, out.valid, log_probs, entropy)
        return self.to_env(out), trace, self._value(hidden, batch)

    def _scored_logits(self, batch: Batch, tokens: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher forcing: prompt + ``"Action: "`` + tokens [B, N] -> (logits [B, N, V] fp32,
        logits n scoring token n; the hidden states [B, P, D] for the critic)."""
        post = torch.cat([self.postfix.expand(batch.size, -1), tokens.to(self.device)], dim=1)
        h, _ = self.model.forward_hidden(batch.images, batch.image_masks, batch.tokens, batch.token_masks, post)
        first = self._prefix_len(batch) + self.postfix.shape[0] - 1  # the last "Action: " token predicts token 0
        return self.model.logits(h[:, first: first + tokens.shape[1]]), h

    def evaluate_steps(self, batch: Batch, trace: TokenTrace) -> tuple[Tensor, Tensor, Tensor]:
        """(step log-probs [B, N], step entropies [B, N], value [B]) of stored token chunks under
        the current parameters, one teacher-forced pass (0 where not valid): per-token PPO ratios."""
        logits, h = self._scored_logits(batch, trace.tokens)
        lp, ent = token_log_probs(logits, trace.tokens.to(self.device), trace.config.temperature)
        return (*masked_steps(lp, ent, trace.valid), self._value(h, batch))

    # -- supervised training ---------------------------------------------------------------

    def action_targets(self, actions: Tensor) -> tuple[Tensor, Tensor]:
        """Expert chunks [B, T, A_env] (env units) -> the training sequences ``<FAST tokens> "|"
        EOS`` as PaliGemma ids [B, N'] (right-padded with ``pad_token_id``) and their mask [B, N']."""
        cfg = self.model.cfg
        if actions.ndim != 3 or actions.shape[1] != cfg.horizon or actions.shape[2] > cfg.action_dim:
            raise ValueError(f"actions must be [B, T={cfg.horizon}, A <= {cfg.action_dim}], got {list(actions.shape)}")
        x = actions.float().to(self.device)
        norm = self.model.normalizer
        if norm is not None:
            x = norm.normalize_actions(x[..., : norm.action_dim or None])
        x = F.pad(x, (0, cfg.action_dim - x.shape[-1]))
        streams = self._codec().encode(x.detach().cpu().double().numpy())
        rows = [fast_to_paligemma(s, paligemma_vocab_size=cfg.vocab_size, skip_tokens=cfg.fast_skip_tokens).tolist()
                + self.end_ids + [cfg.eos_token_id] for s in streams]
        N = max(len(r) for r in rows)
        ids = torch.full((len(rows), N), cfg.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), N, dtype=torch.bool)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r)
            mask[b, : len(r)] = True
        return ids.to(self.device), mask.to(self.device)

    def sft_loss(self, batch: Batch, actions: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Next-token cross-entropy on the expert chunk's FAST tokens + ``"|"`` + EOS, teacher
        forced after the prompt and ``"Action: "``; the mean over the target tokens.
        ``generator`` is unused (the loss has no noise); it keeps the SFT call of every policy."""
        targets, mask = self.action_targets(actions)
        logits, _ = self._scored_logits(batch, targets)
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, N']
        return (nll * mask).sum() / mask.sum()

    def fit_codec(self, chunks: np.ndarray, states: np.ndarray) -> FASTTokenizer:
        """Fit the normaliser (``fit_normalizer``) and the FAST codec (BPE over the normalised
        chunks, at most ``fast_vocab`` tokens, scale ``fast_scale``) on demonstrations: chunks [N, T, A_env], states
        [N, S]. What a pi0-FAST trained here does before SFT, as FAST fits its BPE on the
        training set."""
        if self.fast_vocab is None:
            raise PolicyError("fit_codec needs fast_vocab (the ids the model reserves for FAST tokens)")
        cfg = self.model.cfg
        norm = fit_normalizer(chunks, states)
        x = norm.normalize_actions(torch.as_tensor(np.asarray(chunks, np.float32)))
        x = F.pad(x, (0, cfg.action_dim - x.shape[-1]))
        fast = FASTTokenizer.fit(x.double().numpy(), scale=self.fast_scale, vocab_size=self.fast_vocab)
        self._check_codec(fast)
        self.model.normalizer = norm.to(self.device)
        self.fast = fast
        return fast

    def rl_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(actor, critic) for RL: the Gemma stack (its tied embedding is the LM head that scores
        the action tokens) and the projector; the vision tower stays frozen (as OpenVLA RL
        recipes keep the vision backbone fixed: its features are shared by every action and
        the cheapest part to keep stable). Attaches the value head if there is none."""
        actor = list(self.model.language_model.parameters()) + list(self.model.projector.parameters())
        return actor, list(self.attach_value_head().parameters())

    # -- steering surface --------------------------------------------------------------------

    def mlps(self):
        """The model's (name, MLP) pairs: what steering plans and the neuron dictionary use."""
        return self.model.mlps()

    def action_layers(self) -> list[str]:
        """Every Gemma layer: the action tokens are read from the last layer's output at each
        decode step, so every MLP, the last one included, can change them (unlike pi0, where the
        last VLM layer's MLP feeds nothing the expert reads)."""
        return [name for name, _ in self.model.mlps()]


__all__ = ["FASTPolicy", "FASTProcessor", "MAX_TOKENS", "fit_normalizer"]
