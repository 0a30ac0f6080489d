"""pi0-FAST in plain torch: PaliGemma (SigLIP + Gemma-2B, tied LM head) decoding FAST action
tokens autoregressively over a static KV cache (docs/architecture.md §4.3).

Semantics, as openpi (``pi0_fast.py``, ``tokenizer.py`` ``FASTTokenizer``) and LeRobot
(``modeling_pi0fast.py``) compute them:

* Prefix = image tokens (SigLIP -> projector, neither scaled nor divided) then the prompt's
  token embeddings * sqrt(width) (pi0's convention; the Gemma stack does not rescale). The
  prompt text is ``"Task: {task}, State: {bins};\\n"`` (task lower-cased, stripped, ``_`` ->
  space; the normalised state discretised into 256 bins over [-1, 1] as ``np.digitize``),
  tokenised with BOS.
* Postfix: ``"Action: "`` (tokenised without BOS) and then the decoded tokens. The prefix
  attends bidirectionally over its valid tokens; postfix tokens are causal (ar_mask 1) and see
  the whole valid prefix (big_vision's prefix-LM, ``make_att_2d_masks``). RoPE positions are
  ``cumsum(valid) - 1``, so padding anywhere (right-padded prompts, absent camera views) changes
  nothing for the valid tokens.
* Decoding: greedy (argmax) or sampled at a temperature, until PaliGemma's EOS (id 1) or
  ``max_decoding_steps``. Training sequences end ``<FAST tokens> "|" EOS``: the action tokens are
  those before the first ``"|"`` or EOS; they map back to FAST ids (``paligemma_to_fast``: id =
  vocab - 1 - 128 - fast id) and the FAST codec decodes them into ``[T, A]`` normalised actions;
  a stream that does not decode is counted (``FASTTokenizer.failures``) and its row is zeros
  with ``ok`` False, never an exception.

Choices where the references differ (said here so nobody has to rediscover them):

* openpi and LeRobot feed the prefix only and let the model generate ``"Action: "`` itself;
  here ``"Action: "`` is fed as the first postfix tokens (exactly the training sequence), so
  decoding starts at the action tokens, the greedy result is the same whenever the model would
  have produced ``"Action: "`` (a trained model does), sampling cannot wander off before the
  actions, and the returned log-probs are those of action tokens only. ``generate(postfix=None)``
  decodes openpi's way.
* openpi pads the normalised state with zeros to the model's 32 dims before discretising (32
  numbers in every prompt); LeRobot writes the state's real dims (cut at 32). ``pad_state`` picks
  one; the loaders set it per layout.
* openpi splits the decoded *text* at ``"Action: "`` and ``"|"`` and re-encodes it; here the
  token ids are cut at the first ``"|"`` id or EOS, which is the same for every stream the
  text round trip would not alter.
* Log-probs: of each chosen token under the distribution it was drawn from (``log_softmax(logits
  / temperature)``; greedy: temperature 1), fp32, per step, with a ``valid`` mask (steps up to
  and including a row's EOS). Finished rows keep emitting ``pad_token_id`` (log-prob 0, invalid);
  the loop always runs its fixed number of steps, so it is capturable.
* Sampling is Gumbel-max (``argmax(logits / T - log(-log u))``, u uniform from the caller's
  ``torch.Generator``): exact categorical sampling with one ``rand`` per step, graph-safe (Philox
  offsets, as ``vlafast.flow.graphs`` explains) and bitwise the same eager and graph-replayed.

Static cache and CUDA graphs (as ``openvla.py``): ``new_state`` preallocates the K/V cache
(``llama.KVCache``: [L, B, G, M, E], M = prefix + max steps - 1) and every per-step buffer;
``prefill`` runs the prefix and picks nothing; ``select`` picks one token from the current
logits into the output buffers; ``decode_step`` feeds it back at its cache slot. Both take fixed
shapes and never sync with the host, so ``GraphedDecoder`` captures ``decode_step + select``
once and replays it.

Module attribute paths equal LeRobot's keys without their ``model.`` prefix
(``pi0_paligemma.model.language_model.layers.3.mlp.down_proj.weight``, transformers >= 4.52
names); ``vlafast.models.pi0fast_load`` maps the other layouts. Axes: B batch, V camera views,
L prompt tokens, Q postfix tokens, P prefix length (V * patches + L + Q), N decode steps,
M cache slots, D width, T horizon, A action dim, S state dim.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlafast.models.fast_tokenizer import FASTTokenizer, paligemma_to_fast
from vlafast.models.gemma import GemmaConfig, GemmaLayer, GemmaMLP, RMSNorm, attention, attention_bias, rope_cos_sin
from vlafast.models.llama import KVCache
from vlafast.models.normalize import Normalizer
from vlafast.models.pi0 import _Box, discretize_state, make_att_2d_masks
from vlafast.models.siglip import Projector, SiglipConfig, SiglipVisionTower

log = logging.getLogger(__name__)

ACTION_PREFIX = "Action: "
ACTION_END = "|"


@dataclasses.dataclass(frozen=True)
class Pi0FASTConfig:
    """pi0-FAST: PaliGemma sizes, the FAST chunk shape, the prompt's state and the decoding ids.

    ``action_dim`` / ``horizon``: the chunk shape the FAST codec decodes (the padded action dim
    the actions were tokenised with, 32 for the published models); ``state_dim``: how many state
    values the prompt holds at most (padded with zeros to it when ``pad_state``);
    ``fast_skip_tokens``: PaliGemma ids above the FAST range (openpi's 128).
    """

    vision: SiglipConfig
    vlm: GemmaConfig
    vocab_size: int = 257_152
    action_dim: int = 32
    state_dim: int = 32
    pad_state: bool = True
    horizon: int = 10
    max_decoding_steps: int = 256
    fast_skip_tokens: int = 128
    eos_token_id: int = 1
    pad_token_id: int = 0

    @classmethod
    def pi0fast(cls, **overrides) -> "Pi0FASTConfig":
        """The published sizes: SigLIP So400m/14 at 224 px + Gemma-2B, vocabulary 257152."""
        base = dict(vision=SiglipConfig.so400m_14(), vlm=GemmaConfig.gemma_2b())
        base.update(overrides)
        return cls(**base)

    @classmethod
    def tiny(cls, **overrides) -> "Pi0FASTConfig":
        """Same structure at toy sizes (awkward on purpose). The vocabulary (521) leaves room
        for a fitted FAST vocabulary of up to 392 ids below the 128 skipped ones."""
        vision = SiglipConfig(image_size=24, patch_size=8, width=24, depth=2, mlp_dim=40, num_heads=3)
        vlm = GemmaConfig(width=48, depth=3, mlp_dim=80, num_heads=4, num_kv_heads=2, head_dim=12)
        base = dict(vision=vision, vlm=vlm, vocab_size=521, action_dim=3, state_dim=5, horizon=4,
                    max_decoding_steps=9)
        base.update(overrides)
        return cls(**base)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "action_dim", "state_dim", "horizon", "max_decoding_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.fast_skip_tokens < self.vocab_size - 1:
            raise ValueError(f"fast_skip_tokens must be in [0, vocab_size - 1), got {self.fast_skip_tokens}")
        for name in ("eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name} must be a token id in [0, {self.vocab_size}), got {getattr(self, name)}")

    @property
    def fast_top(self) -> int:
        """The PaliGemma id of FAST id 0 (``vocab_size - 1 - fast_skip_tokens``)."""
        return self.vocab_size - 1 - self.fast_skip_tokens

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Pi0FASTConfig":
        """The config from ``to_json``'s dict (a TypeError names an unknown or missing field)."""
        d = dict(d)
        return cls(vision=SiglipConfig(**d.pop("vision")), vlm=GemmaConfig(**d.pop("vlm")), **d)


@dataclasses.dataclass
class Pi0FASTObservation:
    """Inputs of ``predict_actions``: images [B, V, 3, H, W] float in [-1, 1], image_masks [B, V]
    bool (False = absent view), state [B, S'] raw (unnormalised), tasks: B instructions."""

    images: Tensor
    image_masks: Tensor
    state: Tensor
    tasks: Sequence[str]


@dataclasses.dataclass
class DecodeState:
    """Everything one decode loop reads and writes, preallocated (static for CUDA graphs).

    cache: K/V [L, B, G, M, E]; valid: [B, M] cache slots a row may attend (its valid prefix and
    every decode slot; causality comes from ``slot``); position: [B] RoPE position of the next
    fed token; slot: [1] its cache slot; step: [1] the next output column; logits: [B, V] fp32
    for the next token; token: [B] the last chosen token; done: [B] rows past their EOS;
    temperature: [1] (sampling only); tokens / log_probs / valid_steps: [B, N] outputs.
    """

    cache: KVCache
    valid: Tensor
    position: Tensor
    slot: Tensor
    step: Tensor
    logits: Tensor
    token: Tensor
    done: Tensor
    temperature: Tensor
    tokens: Tensor
    log_probs: Tensor
    valid_steps: Tensor

    @property
    def prefix_len(self) -> int:
        return self.cache.max_len - self.max_steps + 1

    @property
    def max_steps(self) -> int:
        return self.tokens.shape[1]

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]


@dataclasses.dataclass
class DecodeOutput:
    """tokens: [B, N] PaliGemma ids (``pad_token_id`` after a row's EOS); log_probs: [B, N] fp32
    log-prob of each chosen token (0 where not valid); valid: [B, N] bool, the steps up to and
    including the row's EOS."""

    tokens: Tensor
    log_probs: Tensor
    valid: Tensor


def pi0fast_prompt(task: str, state_bins: Tensor | Sequence[int]) -> str:
    """openpi's FAST prefix text for one sample: ``"Task: <task>, State: <b1 b2 ...>;\\n"`` (the
    task lower-cased and stripped, ``_`` -> space); tokenise it with BOS. state_bins: [S]."""
    cleaned = task.lower().strip().replace("_", " ")
    bins = state_bins.tolist() if isinstance(state_bins, Tensor) else list(state_bins)
    return f"Task: {cleaned}, State: {' '.join(str(int(b)) for b in bins)};\n"


def encode_text(tokenizer: Any, text: str, *, bos: bool) -> list[int]:
    """Ids of ``text`` from a tokenizer with ``encode(text, bos=...)`` (vlafast's prompt
    tokenizer) or a HF ``tokenizers.Tokenizer`` (``encode(text, add_special_tokens=...)``)."""
    from tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        return list(tokenizer.encode(text, add_special_tokens=bos).ids)
    return list(tokenizer.encode(text, bos=bos))


def sample_gumbel(logits: Tensor, temperature: Tensor, generator: torch.Generator | None) -> Tensor:
    """One categorical draw per row from ``softmax(logits / temperature)`` by Gumbel-max.
    logits: [B, V] fp32, temperature: [1] -> [B] int64."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    return (logits / temperature - torch.log(-torch.log(u))).argmax(-1)


class Pi0FASTPolicy(nn.Module):
    """pi0-FAST. Build with ``Pi0FASTPolicy(cfg)`` (random init) or ``load_pi0fast(path)``.

    Steering access: ``mlps()`` yields ``("vlm.{l}", GemmaMLP)``; each MLP runs over the prefix
    (prefill, S > 1) and once per decoded token (S == 1), with the ``steer`` slot of
    ``vlafast.models.gemma.GatedMLP``.
    """

    def __init__(self, cfg: Pi0FASTConfig, normalizer: Normalizer | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.normalizer = normalizer
        lm = _Box(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.vlm.width),
            layers=nn.ModuleList(GemmaLayer(cfg.vlm) for _ in range(cfg.vlm.depth)),
            norm=RMSNorm(cfg.vlm.width, cfg.vlm.eps),
        )
        self.pi0_paligemma = _Box(model=_Box(
            vision_tower=SiglipVisionTower(cfg.vision),
            multi_modal_projector=Projector(cfg.vision.width, cfg.vlm.width),
            language_model=lm,
        ))

    # -- named parts ---------------------------------------------------------------------

    @property
    def vision_tower(self) -> SiglipVisionTower:
        return self.pi0_paligemma.model.vision_tower

    @property
    def projector(self) -> Projector:
        return self.pi0_paligemma.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        """The Gemma stack: ``embed_tokens`` (also the LM head, tied), ``layers``, ``norm``."""
        return self.pi0_paligemma.model.language_model

    def mlps(self) -> Iterator[tuple[str, GemmaMLP]]:
        """("vlm.{l}", mlp) for every Gemma layer: the steering surface. Neuron i's value vector
        is ``mlp.down_proj.weight[:, i]``, projected onto the tied embedding."""
        for l, layer in enumerate(self.language_model.layers):
            yield f"vlm.{l}", layer.mlp

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.embed_tokens.weight.device

    def prefix_len(self, views: int, text_len: int, postfix_len: int) -> int:
        """P: image tokens + prompt tokens + postfix tokens."""
        return views * self.cfg.vision.num_patches + text_len + postfix_len

    # -- prompt ----------------------------------------------------------------------------

    def prompt_state(self, state: Tensor) -> Tensor:
        """Raw state [B, S'] -> the values the prompt shows: normalised (when the policy has a
        normaliser), cut to ``state_dim`` and, with ``pad_state``, zero-padded to it."""
        if state.ndim != 2:
            raise ValueError(f"state must be [B, S'], got {list(state.shape)}")
        if self.normalizer is not None:
            state = self.normalizer.normalize_state(state)
        state = state.float()[:, : self.cfg.state_dim]
        if self.cfg.pad_state:
            state = F.pad(state, (0, self.cfg.state_dim - state.shape[1]))
        return state

    def prompt_tokens(self, tasks: Sequence[str], state: Tensor, tokenizer: Any) -> tuple[Tensor, Tensor, Tensor]:
        """The prompt as ids: tasks (B strings), raw state [B, S'] and the PaliGemma tokenizer
        -> tokens [B, L] (right-padded with ``pad_token_id``), token_masks [B, L] bool,
        postfix [Q] (``"Action: "`` without BOS), all on the policy's device."""
        if len(tasks) != state.shape[0]:
            raise ValueError(f"got {len(tasks)} tasks for a state batch of {state.shape[0]}")
        bins = discretize_state(self.prompt_state(state)).cpu()
        rows = [encode_text(tokenizer, pi0fast_prompt(t, b), bos=True) for t, b in zip(tasks, bins)]
        L = max(len(r) for r in rows)
        tokens = torch.full((len(rows), L), self.cfg.pad_token_id, dtype=torch.long)
        masks = torch.zeros(len(rows), L, dtype=torch.bool)
        for b, r in enumerate(rows):
            tokens[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            masks[b, : len(r)] = True
        postfix = torch.tensor(encode_text(tokenizer, ACTION_PREFIX, bos=False), dtype=torch.long)
        bad = [i for r in rows + [postfix.tolist()] for i in r if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"the tokenizer gives ids outside the model's vocabulary [0, {self.cfg.vocab_size}) "
                             f"(e.g. {bad[0]}): pass the tokenizer the checkpoint was trained with")
        d = self.device
        return tokens.to(d), masks.to(d), postfix.to(d)

    # -- prefix ----------------------------------------------------------------------------

    def _check_inputs(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor,
                      postfix: Tensor | None) -> None:
        size = self.cfg.vision.image_size
        if images.ndim != 5 or images.shape[2:] != (3, size, size):
            raise ValueError(f"images must be [B, V, 3, {size}, {size}] in [-1, 1], got {list(images.shape)}")
        B, V = images.shape[:2]
        if tuple(image_masks.shape) != (B, V):
            raise ValueError(f"image_masks must be [B, V] = [{B}, {V}], got {list(image_masks.shape)}")
        if tokens.ndim != 2 or tokens.shape[0] != B or tokens.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"tokens must be [B, L] integer ids with B = {B}, got {list(tokens.shape)} {tokens.dtype}")
        if token_masks.shape != tokens.shape:
            raise ValueError(f"token_masks must match tokens {list(tokens.shape)}, got {list(token_masks.shape)}")
        if postfix is not None and (postfix.ndim not in (1, 2) or (postfix.ndim == 2 and postfix.shape[0] != B)
                                    or postfix.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"postfix must be [Q] or [B, Q] integer ids with B = {B}, got {list(postfix.shape)}")

    def embed_prefix(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor,
                     postfix: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """images [B, V, 3, H, W], image_masks [B, V], tokens / token_masks [B, L], postfix [Q]
        or [B, Q] (causal tokens after the prompt, e.g. ``"Action: "``; None for none)
        -> (emb [B, P, D], pad [B, P] bool, ar [B, P] long: 1 on the postfix)."""
        self._check_inputs(images, image_masks, tokens, token_masks, postfix)
        B, V = images.shape[:2]
        img = self.projector(self.vision_tower(images.reshape(B * V, *images.shape[2:])))
        n = img.shape[1]
        img = img.reshape(B, V * n, -1)
        img_pad = image_masks.bool()[:, :, None].expand(B, V, n).reshape(B, V * n)
        ids, pad = tokens, token_masks.bool()
        Q = 0
        if postfix is not None:
            post = postfix.expand(B, -1) if postfix.ndim == 1 else postfix
            Q = post.shape[1]
            ids = torch.cat([tokens, post.to(tokens.dtype)], dim=1)
            pad = torch.cat([pad, torch.ones(B, Q, dtype=torch.bool, device=pad.device)], dim=1)
        lang = self.language_model.embed_tokens(ids) * math.sqrt(self.cfg.vlm.width)
        emb = torch.cat([img.to(lang.dtype), lang], dim=1)
        pad = torch.cat([img_pad, pad], dim=1)
        ar = torch.zeros(pad.shape, dtype=torch.long, device=pad.device)
        if Q:
            ar[:, -Q:] = 1
        return emb, pad, ar

    def logits(self, h: Tensor) -> Tensor:
        """Final-normed hidden states [..., D] -> logits [..., V] fp32 (the tied embedding)."""
        return F.linear(h, self.language_model.embed_tokens.weight).float()

    def forward_logits(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor,
                       postfix: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The uncached pass over the prefix + postfix (teacher forcing): -> (logits [B, P, V]
        fp32, where position i predicts token i + 1; pad [B, P])."""
        h, pad = self.forward_hidden(images, image_masks, tokens, token_masks, postfix)
        return self.logits(h), pad

    def forward_hidden(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor,
                       postfix: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """As ``forward_logits``, stopping before the LM head: (final-normed hidden states
        [B, P, D], pad [B, P])."""
        emb, pad, ar = self.embed_prefix(images, image_masks, tokens, token_masks, postfix)
        return self._run_prefix(emb, pad, ar, None), pad

    def _run_prefix(self, x: Tensor, pad: Tensor, ar: Tensor, cache: KVCache | None) -> Tensor:
        """emb [B, P, D], pad / ar [B, P] -> final-normed hidden states [B, P, D]; writes the
        prefix K/V (RoPE applied) into cache slots [0, P) when a cache is given."""
        bias = attention_bias(make_att_2d_masks(pad, ar), x.dtype)
        cos, sin = rope_cos_sin(torch.cumsum(pad.long(), dim=1) - 1, self.cfg.vlm.head_dim, self.cfg.vlm.rope_theta,
                                x.dtype)
        P = x.shape[1]
        for l, layer in enumerate(self.language_model.layers):
            q, k, v, gate = layer.qkv(x, cos, sin, None)
            if cache is not None:
                cache.k[l, :, :, :P].copy_(k)
                cache.v[l, :, :, :P].copy_(v)
            x = layer.finish(x, attention(q, k, v, bias), gate, None)
        h, _ = self.language_model.norm(x)
        return h

    # -- decoding: static state, prefill, one step -------------------------------------------

    def new_state(self, batch: int, prefix_len: int, max_steps: int | None = None, *,
                  device: torch.device | str | None = None) -> DecodeState:
        """Preallocated buffers for one decode loop of ``max_steps`` (default the config's)
        tokens after a prefix of ``prefix_len`` (``prefix_len(views, L, Q)``)."""
        N = max_steps or self.cfg.max_decoding_steps
        device = torch.device(device or self.device)
        g = self.cfg.vlm
        M = prefix_len + N - 1  # the last chosen token is never fed back
        shape = (g.depth, batch, g.num_kv_heads, M, g.head_dim)
        cache = KVCache(torch.zeros(shape, dtype=self.dtype, device=device),
                        torch.zeros(shape, dtype=self.dtype, device=device))

        def z(*s, dtype=torch.long):
            return torch.zeros(s, dtype=dtype, device=device)

        return DecodeState(cache=cache, valid=z(batch, M, dtype=torch.bool), position=z(batch), slot=z(1), step=z(1),
                           logits=z(batch, self.cfg.vocab_size, dtype=torch.float32), token=z(batch),
                           done=z(batch, dtype=torch.bool), temperature=torch.ones(1, device=device),
                           tokens=z(batch, N), log_probs=z(batch, N, dtype=torch.float32),
                           valid_steps=z(batch, N, dtype=torch.bool))

    def prefill(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor,
                postfix: Tensor | None, state: DecodeState) -> Tensor:
        """Run the prefix into ``state`` (cache slots [0, P), the first logits) and reset its
        counters and outputs. Inputs as ``embed_prefix``; P must equal the state's prefix length.
        -> the prefix's final-normed hidden states [B, P, D] (a critic's features)."""
        emb, pad, ar = self.embed_prefix(images, image_masks, tokens, token_masks, postfix)
        B, P = pad.shape
        if (B, P) != (state.batch_size, state.prefix_len):
            raise ValueError(f"this decode state holds batch {state.batch_size} and prefix length {state.prefix_len}, "
                             f"the inputs give batch {B} and prefix length {P}; build another with new_state")
        h = self._run_prefix(emb, pad, ar, state.cache)
        idx = torch.arange(P, device=pad.device)
        last = torch.where(pad, idx, -1).amax(dim=1)  # the last valid token predicts the first decoded one
        state.logits.copy_(self.logits(h[torch.arange(B, device=h.device), last.clamp_min(0)]))
        state.valid[:, :P].copy_(pad)
        state.valid[:, P:] = True
        state.position.copy_(pad.sum(dim=1))
        state.slot.fill_(P)
        state.step.zero_()
        state.token.fill_(self.cfg.pad_token_id)
        state.done.zero_()
        state.tokens.fill_(self.cfg.pad_token_id)
        state.log_probs.zero_()
        state.valid_steps.zero_()
        return h

    def decode_step(self, state: DecodeState) -> Tensor:
        """Feed ``state.token`` [B] at ``state.slot`` / ``state.position`` and set the next
        logits [B, V] (returned); advances slot and position in place. Fixed shapes, no host
        sync: what ``GraphedDecoder`` captures."""
        cfg = self.cfg.vlm
        x = self.language_model.embed_tokens(state.token[:, None]) * math.sqrt(cfg.width)  # [B, 1, D]
        slots = torch.arange(state.cache.max_len, device=x.device)
        allowed = state.valid & (slots[None, :] <= state.slot)  # [B, M]
        bias = attention_bias(allowed[:, None, :], x.dtype)  # [B, 1, 1, M]
        cos, sin = rope_cos_sin(state.position[:, None], cfg.head_dim, cfg.rope_theta, x.dtype)
        for l, layer in enumerate(self.language_model.layers):
            q, k, v, gate = layer.qkv(x, cos, sin, None)
            state.cache.k[l].index_copy_(2, state.slot, k.to(state.cache.k.dtype))
            state.cache.v[l].index_copy_(2, state.slot, v.to(state.cache.v.dtype))
            x = layer.finish(x, attention(q, state.cache.k[l], state.cache.v[l], bias), gate, None)
        h, _ = self.language_model.norm(x)
        state.logits.copy_(self.logits(h[:, 0]))
        state.slot.add_(1)
        state.position.add_(1)
        return state.logits

    def select(self, state: DecodeState, *, sample: bool, generator: torch.Generator | None = None) -> Tensor:
        """Choose the next token from ``state.logits`` (argmax, or a draw at ``state.temperature``
        with ``generator``), record it and its log-prob at ``state.step``, mark rows that hit EOS;
        finished rows get ``pad_token_id``. -> token [B] (also ``state.token``). No host sync."""
        logits = state.logits
        if sample:
            token = sample_gumbel(logits, state.temperature, generator)
            logp = torch.log_softmax(logits / state.temperature, dim=-1)
        else:
            token = logits.argmax(-1)
            logp = torch.log_softmax(logits, dim=-1)
        live = ~state.done
        lp = logp.gather(1, token[:, None])[:, 0]
        token = torch.where(live, token, torch.full_like(token, self.cfg.pad_token_id))
        state.tokens.index_copy_(1, state.step, token[:, None])
        state.log_probs.index_copy_(1, state.step, torch.where(live, lp, torch.zeros_like(lp))[:, None])
        state.valid_steps.index_copy_(1, state.step, live[:, None])
        state.done.logical_or_(token == self.cfg.eos_token_id)
        state.token.copy_(token)
        state.step.add_(1)
        return state.token

    def _check_sampling(self, temperature: float, generator: torch.Generator | None) -> bool:
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
        if generator is not None and generator.device.type != self.device.type:
            raise ValueError(f"generator is on {generator.device} but the policy on {self.device}; "
                             f"pass torch.Generator(device={str(self.device)!r})")
        return temperature > 0

    @torch.no_grad()
    def generate(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor,
                 postfix: Tensor | None = None, *, max_steps: int | None = None, temperature: float = 0.0,
                 generator: torch.Generator | None = None, stop_check: int = 0,
                 decoder: "GraphedDecoder | None" = None) -> DecodeOutput:
        """Decode up to ``max_steps`` (default ``max_decoding_steps``) tokens after the prefix.

        Inputs as ``embed_prefix`` (``postfix`` = the ``"Action: "`` ids, see the module note);
        ``temperature`` 0 is greedy, > 0 samples with ``generator``. ``stop_check`` k > 0 reads
        "every row finished?" back every k steps (one host sync each) and stops early; the
        outputs are the same as without (the remaining steps would only emit padding), only the
        generator advances less. ``decoder`` replays the steps as a CUDA graph.
        """
        sample = self._check_sampling(temperature, generator)
        if decoder is not None:
            if max_steps is not None and max_steps != decoder.state.max_steps:
                raise ValueError(f"the decoder was built for {decoder.state.max_steps} steps, got max_steps={max_steps}")
            return decoder(images, image_masks, tokens, token_masks, postfix, temperature=temperature,
                           stop_check=stop_check)
        self._check_inputs(images, image_masks, tokens, token_masks, postfix)
        V, L = images.shape[1], tokens.shape[1]
        Q = 0 if postfix is None else postfix.shape[-1]
        state = self.new_state(images.shape[0], self.prefix_len(V, L, Q), max_steps, device=images.device)
        state.temperature.fill_(temperature if sample else 1.0)
        self.prefill(images, image_masks, tokens, token_masks, postfix, state)
        self.select(state, sample=sample, generator=generator)
        for s in range(1, state.max_steps):
            if stop_check and s % stop_check == 0 and bool(state.done.all()):
                break
            self.decode_step(state)
            self.select(state, sample=sample, generator=generator)
        return DecodeOutput(state.tokens, state.log_probs, state.valid_steps)

    # -- actions ---------------------------------------------------------------------------

    def action_tokens(self, out: DecodeOutput, end_ids: Sequence[int] = ()) -> list[list[int]]:
        """Each row's FAST ids: the decoded tokens before the first EOS or ``end_ids`` (the
        ``"|"`` ids), mapped back from the PaliGemma vocabulary. Ids that are not FAST tokens map
        outside [0, FAST vocab) and make the FAST decode fail (counted), never raise."""
        stop = {self.cfg.eos_token_id, *(int(i) for i in end_ids)}
        rows = []
        for toks, ok in zip(out.tokens.tolist(), out.valid.tolist()):
            row = []
            for t, v in zip(toks, ok):
                if not v or t in stop:
                    break
                row.append(t)
            rows.append(row)
        return [paligemma_to_fast(np.asarray(r, dtype=np.int64), paligemma_vocab_size=self.cfg.vocab_size,
                                  skip_tokens=self.cfg.fast_skip_tokens).tolist() for r in rows]

    def decode_actions(self, out: DecodeOutput, fast: FASTTokenizer, end_ids: Sequence[int] = (), *,
                       relaxed: bool = False) -> tuple[Tensor, Tensor]:
        """Decoded tokens -> (actions [B, T, A'] fp32 on the policy's device, unnormalised to the
        stats' A' dims when the policy has a normaliser, else normalised [B, T, A]; ok [B] bool).
        Streams FAST cannot decode give zeros (``relaxed``: cut / padded, as LeRobot) and count
        in ``fast.failures``."""
        acts, ok = fast.decode(self.action_tokens(out, end_ids), time_horizon=self.cfg.horizon,
                               action_dim=self.cfg.action_dim, relaxed=relaxed)
        actions = torch.as_tensor(acts, dtype=torch.float32, device=self.device)
        if self.normalizer is not None:
            actions = self.normalizer.unnormalize_actions(actions[..., : self.normalizer.action_dim])
        return actions, torch.as_tensor(ok, device=self.device)

    @torch.no_grad()
    def predict_actions(self, obs: Pi0FASTObservation, tokenizer: Any, fast: FASTTokenizer, *,
                        temperature: float = 0.0, generator: torch.Generator | None = None,
                        max_steps: int | None = None, stop_check: int = 0, relaxed: bool = False,
                        decoder: "GraphedDecoder | None" = None) -> tuple[Tensor, Tensor]:
        """One chunk per row: obs -> (actions [B, T, A'], ok [B] bool).

        ``tokenizer`` is the PaliGemma text tokenizer (``encode(text, bos=...)`` or a HF
        ``tokenizers.Tokenizer``); ``fast`` the FAST codec the checkpoint was trained with.
        Builds the prompt (``prompt_tokens``), decodes (``generate``) and decodes the FAST
        tokens (``decode_actions``); a row that fails is zeros (then unnormalised) with ok False.
        """
        tokens, masks, postfix = self.prompt_tokens(obs.tasks, obs.state, tokenizer)
        out = self.generate(obs.images, obs.image_masks, tokens, masks, postfix, max_steps=max_steps,
                            temperature=temperature, generator=generator, stop_check=stop_check, decoder=decoder)
        end_ids = encode_text(tokenizer, ACTION_END, bos=False)
        return self.decode_actions(out, fast, end_ids[:1], relaxed=relaxed)  # the piece that follows the actions


class GraphedDecoder:
    """The decode loop of a ``Pi0FASTPolicy`` with one step (``decode_step`` + ``select``)
    captured as a CUDA graph and replayed ``max_steps - 1`` times over a static ``DecodeState``.

    Built for one (batch, prefix length, max steps, greedy or sampled); the prefill and the first
    ``select`` run eagerly into the same static buffers. ``temperature`` is a device buffer, so
    one sampled decoder serves any temperature > 0. A ``generator`` (CUDA) is registered with the
    graph (``CUDAGraph.register_generator_state``); the graph then draws the same numbers as the
    eager loop after the same seed. Steering slots are baked in at capture (a plan's buffers may
    change between calls; setting or clearing a slot needs a new decoder). Off CUDA the same
    static-buffer step runs eagerly, so CPU tests exercise the code the graph replays.
    """

    def __init__(self, policy: Pi0FASTPolicy, batch: int, prefix_len: int, max_steps: int | None = None, *,
                 sample: bool = False, generator: torch.Generator | None = None) -> None:
        self.policy, self.sample, self.generator = policy, sample, generator
        self.state = policy.new_state(batch, prefix_len, max_steps)
        self.graph: torch.cuda.CUDAGraph | None = None
        if policy.device.type != "cuda":
            return
        if generator is not None and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            log.warning("GraphedDecoder runs eagerly: torch %s cannot register a custom generator with a CUDA "
                        "graph; pass generator=None to use the default CUDA generator", torch.__version__)
            return
        st = self.state
        with torch.no_grad():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up (allocator, kernels) off the capture
                for _ in range(2):
                    st.slot.fill_(prefix_len)
                    st.step.zero_()
                    self._step()
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            if generator is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)  # a no-op where torch registers lazily
                    graph.register_generator_state(generator)
            with torch.cuda.graph(graph):
                self._step()
        self.graph = graph

    def _step(self) -> None:
        self.policy.decode_step(self.state)
        self.policy.select(self.state, sample=self.sample, generator=self.generator)

    def __call__(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor,
                 postfix: Tensor | None = None, *, temperature: float = 0.0, stop_check: int = 0) -> DecodeOutput:
        policy, st = self.policy, self.state
        if policy._check_sampling(temperature, self.generator) != self.sample:
            raise ValueError(f"this decoder was captured for {'sampling' if self.sample else 'greedy decoding'}, "
                             f"got temperature {temperature}; build a GraphedDecoder with sample={not self.sample}")
        st.temperature.fill_(temperature if self.sample else 1.0)
        policy.prefill(images, image_masks, tokens, token_masks, postfix, st)  # checks batch and prefix length
        policy.select(st, sample=self.sample, generator=self.generator)
        for s in range(1, st.max_steps):
            if stop_check and s % stop_check == 0 and bool(st.done.all()):
                break
            if self.graph is None:
                self._step()
            else:
                self.graph.replay()
        return DecodeOutput(st.tokens.clone(), st.log_probs.clone(), st.valid_steps.clone())


__all__ = [
    "ACTION_END", "ACTION_PREFIX", "DecodeOutput", "DecodeState", "GraphedDecoder", "Pi0FASTConfig",
    "Pi0FASTObservation", "Pi0FASTPolicy", "encode_text", "pi0fast_prompt", "sample_gumbel",
]
