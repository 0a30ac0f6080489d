"""pi0 / pi0.5 in plain torch: SigLIP + PaliGemma (Gemma-2B) + a Gemma action expert.

Semantics (docs/architecture.md §4, as LeRobot / openpi PyTorch compute them):

* Prefix = image tokens (SigLIP -> projector, neither scaled nor divided) followed by language
  tokens (embedding * sqrt(width)); the Gemma stacks do NOT rescale their inputs. The prefix
  attends bidirectionally over its valid tokens.
* Suffix (the expert): pi0 = [state token, T action tokens], the action tokens being
  ``action_time_mlp(action_in_proj(x_t), sincos(t))``; pi0.5 = T action tokens
  ``action_in_proj(x_t)`` with the time embedding driving adaRMSNorm
  (``silu(time_mlp_out(silu(time_mlp_in(sincos(t)))))``) and the state entering the prompt as
  discrete tokens. Blocks (``make_att_2d_masks``): prefix sees prefix; pi0's state token sees
  prefix + itself; action tokens see everything valid.
* The two stacks share heads / kv heads / head_dim and attend jointly layer by layer over the
  concatenated sequence; RoPE positions run on from the prefix (``cumsum(valid) - 1``).
* Inference: the prefix is encoded once into a per-layer K/V cache (``embed_prefix``); each
  denoise step (``velocity``) reads it without appending. ``sample_actions`` runs Euler from
  t = 1 with dt = -1/K.

Module attribute paths equal the LeRobot / openpi state-dict keys
(``paligemma_with_expert.paligemma.model.language_model.layers.3.mlp.down_proj.weight``), so a
checkpoint loads by name. Axes: B batch, V camera views, L prompt tokens, P prefix tokens,
T horizon, A padded action dim, S state dim, D width, K denoise steps.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlafast import flow
from vlafast.models.gemma import GemmaConfig, GemmaLayer, GemmaMLP, RMSNorm, attention, attention_bias, rope_cos_sin
from vlafast.models.normalize import Normalizer
from vlafast.models.siglip import Projector, SiglipConfig, SiglipVisionTower


@dataclasses.dataclass(frozen=True)
class Pi0Config:
    """pi0 / pi0.5 architecture. ``action_dim`` / ``state_dim`` are the padded widths the
    projections use (32 for the published models); real robots use a prefix of them."""

    vision: SiglipConfig
    vlm: GemmaConfig
    expert: GemmaConfig
    variant: str = "pi0"  # "pi0" | "pi05"
    vocab_size: int = 257_152
    action_dim: int = 32
    state_dim: int = 32
    horizon: int = 50
    num_steps: int = 10
    min_period: float = 4e-3
    max_period: float = 4.0

    @classmethod
    def pi0(cls, **overrides) -> "Pi0Config":
        return cls(vision=SiglipConfig.so400m_14(), vlm=GemmaConfig.gemma_2b(), expert=GemmaConfig.gemma_300m(),
                   **overrides)

    @classmethod
    def pi05(cls, **overrides) -> "Pi0Config":
        return cls.pi0(variant="pi05", **overrides)

    @classmethod
    def tiny(cls, pi05: bool = False, **overrides) -> "Pi0Config":
        """Same structure at toy sizes (awkward on purpose): a forward takes milliseconds on CPU."""
        vision = SiglipConfig(image_size=24, patch_size=8, width=24, depth=2, mlp_dim=40, num_heads=3)
        vlm = GemmaConfig(width=48, depth=2, mlp_dim=80, num_heads=4, num_kv_heads=2, head_dim=12)
        expert = GemmaConfig(width=32, depth=2, mlp_dim=56, num_heads=4, num_kv_heads=2, head_dim=12)
        base = dict(vision=vision, vlm=vlm, expert=expert, variant="pi05" if pi05 else "pi0", vocab_size=97,
                    action_dim=6, state_dim=5,
                    horizon=7, num_steps=4)
        base.update(overrides)
        return cls(**base)

    def __post_init__(self) -> None:
        if self.variant not in ("pi0", "pi05"):
            raise ValueError(f"variant must be 'pi0' or 'pi05', got {self.variant!r}")
        v, e = self.vlm, self.expert
        if (v.num_heads, v.num_kv_heads, v.head_dim) != (e.num_heads, e.num_kv_heads, e.head_dim):
            raise ValueError("the VLM and the expert attend jointly: num_heads, num_kv_heads and head_dim must match, "
                             f"got {(v.num_heads, v.num_kv_heads, v.head_dim)} vs {(e.num_heads, e.num_kv_heads, e.head_dim)}")
        if v.depth != e.depth:
            raise ValueError(f"VLM and expert depth must match (joint layers), got {v.depth} and {e.depth}")
        if e.width % 2:
            raise ValueError(f"expert width must be even (sin/cos time embedding), got {e.width}")

    @property
    def is_pi05(self) -> bool:
        return self.variant == "pi05"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Pi0Config":
        """The config from ``to_json``'s dict (a TypeError names an unknown or missing field)."""
        d = dict(d)
        return cls(vision=SiglipConfig(**d.pop("vision")), vlm=GemmaConfig(**d.pop("vlm")),
                   expert=GemmaConfig(**d.pop("expert")), **d)

    @property
    def suffix_len(self) -> int:
        return self.horizon + (0 if self.is_pi05 else 1)


@dataclasses.dataclass
class PrefixCache:
    """The encoded observation: per-layer K/V of the prefix (RoPE applied) and its mask.

    keys / values: L x [B, G, P, E]; pad_mask: [B, P] bool (valid tokens); hidden: [B, P, D]
    final (normed) VLM output, e.g. for a value head; hidden_states: L+1 x [B, P, D] residual
    stream before each layer and after the last (un-normed), only when asked for.
    """

    keys: list[Tensor]
    values: list[Tensor]
    pad_mask: Tensor
    hidden: Tensor
    hidden_states: list[Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return self.pad_mask.shape[0]

    def copy_(self, other: "PrefixCache") -> "PrefixCache":
        """Copy ``other`` into these tensors in place (same shapes): refreshes the static
        buffers a captured CUDA graph reads, without re-capturing."""
        for dst, src in zip(self.keys + self.values + [self.pad_mask, self.hidden],
                            other.keys + other.values + [other.pad_mask, other.hidden]):
            dst.copy_(src)
        return self


@dataclasses.dataclass
class Pi0Context:
    """One encoded observation, the ``ctx`` a flow sampler passes to ``Pi0Policy.velocity_fn``:
    state [B, state_dim] normalised and padded (None for pi0.5) and the prefix cache."""

    state: Tensor | None
    cache: PrefixCache


@dataclasses.dataclass
class Pi0Observation:
    """Model inputs for one batch.

    images: [B, V, 3, H, W] float in [-1, 1]; image_masks: [B, V] bool (False = absent view);
    tokens: [B, L] long (pi0.5: the prompt already holds the discretised state, see
    ``pi05_state_prompt``); token_masks: [B, L] bool; state: [B, S'] raw (unnormalised) robot
    state with S' <= state_dim, None for pi0.5.
    """

    images: Tensor
    image_masks: Tensor
    tokens: Tensor
    token_masks: Tensor
    state: Tensor | None = None


class _Box(nn.Module):
    """A named container so attribute paths match the reference state-dict keys."""

    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


def make_att_2d_masks(pad_masks: Tensor, att_masks: Tensor) -> Tensor:
    """big_vision block masks: token i sees valid token j iff cumsum(att)[j] <= cumsum(att)[i].

    pad_masks: [B, N] bool, att_masks: [B, N] int (1 starts a new block) -> [B, N, N] bool.
    """
    c = torch.cumsum(att_masks.long(), dim=1)
    return (c[:, None, :] <= c[:, :, None]) & pad_masks[:, None, :] & pad_masks[:, :, None]


def sincos_time_embedding(t: Tensor, dim: int, min_period: float, max_period: float) -> Tensor:
    """t: [B] -> [B, dim] = [sin(2 pi t / p), cos(2 pi t / p)], periods log-spaced in
    [min_period, max_period]; computed in float64 as openpi does, returned in fp32."""
    frac = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** frac
    arg = (2 * math.pi / period)[None, :] * t.double()[:, None]
    return torch.cat([arg.sin(), arg.cos()], dim=1).float()


class Pi0Policy(nn.Module):
    """pi0 / pi0.5 policy. Build with ``Pi0Policy(cfg)`` (random init) or ``load_pi0(path)``.

    Steering access: ``policy.mlps()`` yields ``(name, GemmaMLP)`` for every layer of both
    stacks; each ``GemmaMLP`` has ``gate_proj`` / ``up_proj`` / ``down_proj`` and a ``steer``
    slot (see ``vlafast.models.gemma.GemmaMLP``).
    """

    def __init__(self, cfg: Pi0Config, normalizer: Normalizer | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.normalizer = normalizer
        lm = _Box(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.vlm.width),
            layers=nn.ModuleList(GemmaLayer(cfg.vlm) for _ in range(cfg.vlm.depth)),
            norm=RMSNorm(cfg.vlm.width, cfg.vlm.eps),
        )
        paligemma = _Box(model=_Box(
            vision_tower=SiglipVisionTower(cfg.vision),
            multi_modal_projector=Projector(cfg.vision.width, cfg.vlm.width),
            language_model=lm,
        ))
        cond = cfg.expert.width if cfg.is_pi05 else None
        expert = _Box(model=_Box(
            layers=nn.ModuleList(GemmaLayer(cfg.expert, cond) for _ in range(cfg.expert.depth)),
            norm=RMSNorm(cfg.expert.width, cfg.expert.eps, cond),
        ))
        self.paligemma_with_expert = _Box(paligemma=paligemma, gemma_expert=expert)
        w = cfg.expert.width
        self.action_in_proj = nn.Linear(cfg.action_dim, w)
        self.action_out_proj = nn.Linear(w, cfg.action_dim)
        if cfg.is_pi05:
            self.time_mlp_in = nn.Linear(w, w)
            self.time_mlp_out = nn.Linear(w, w)
        else:
            self.state_proj = nn.Linear(cfg.state_dim, w)
            self.action_time_mlp_in = nn.Linear(2 * w, w)
            self.action_time_mlp_out = nn.Linear(w, w)

    # -- named parts ---------------------------------------------------------------------

    @property
    def vision_tower(self) -> SiglipVisionTower:
        return self.paligemma_with_expert.paligemma.model.vision_tower

    @property
    def projector(self) -> Projector:
        return self.paligemma_with_expert.paligemma.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        """The PaliGemma Gemma stack: ``embed_tokens`` (tied with the LM head), ``layers``, ``norm``."""
        return self.paligemma_with_expert.paligemma.model.language_model

    @property
    def expert(self) -> nn.Module:
        """The action expert Gemma stack: ``layers``, ``norm``."""
        return self.paligemma_with_expert.gemma_expert.model

    def mlps(self) -> Iterator[tuple[str, GemmaMLP]]:
        """("vlm.{l}" | "expert.{l}", mlp) for every layer: the steering surface.

        VLM MLPs run once per observation (``embed_prefix``), expert MLPs at every denoise step.
        The last VLM layer's MLP only feeds the prefix output (``PrefixCache.hidden``), never
        the cached K/V the expert reads, so steering it cannot move the actions.
        """
        for l, layer in enumerate(self.language_model.layers):
            yield f"vlm.{l}", layer.mlp
        for l, layer in enumerate(self.expert.layers):
            yield f"expert.{l}", layer.mlp

    @property
    def dtype(self) -> torch.dtype:
        return self.action_in_proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.action_in_proj.weight.device

    # -- prefix ----------------------------------------------------------------------------

    def _prefix_embeddings(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor) -> tuple[Tensor, Tensor]:
        """-> (emb: [B, P, D], pad: [B, P] bool), P = V * patches + L."""
        B, V = images.shape[:2]
        img = self.projector(self.vision_tower(images.reshape(B * V, *images.shape[2:])))
        n = img.shape[1]
        img = img.reshape(B, V * n, -1)
        img_pad = image_masks.bool()[:, :, None].expand(B, V, n).reshape(B, V * n)
        lang = self.language_model.embed_tokens(tokens) * math.sqrt(self.cfg.vlm.width)
        emb = torch.cat([img.to(lang.dtype), lang], dim=1)
        return emb, torch.cat([img_pad, token_masks.bool()], dim=1)

    def _check_prefix_inputs(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor) -> None:
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

    def embed_prefix(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor, *,
                     keep_hidden_states: bool = False) -> PrefixCache:
        """Encode the observation once: images [B, V, 3, H, W], image_masks [B, V], tokens [B, L],
        token_masks [B, L] -> PrefixCache (per-layer K/V for the denoise steps)."""
        self._check_prefix_inputs(images, image_masks, tokens, token_masks)
        x, pad = self._prefix_embeddings(images, image_masks, tokens, token_masks)
        bias = attention_bias(pad[:, None, :] & pad[:, :, None], x.dtype)
        cos, sin = rope_cos_sin(torch.cumsum(pad.long(), dim=1) - 1, self.cfg.vlm.head_dim, self.cfg.vlm.rope_theta, x.dtype)
        keys, values, states = [], [], []
        for layer in self.language_model.layers:
            if keep_hidden_states:
                states.append(x)
            q, k, v, gate = layer.qkv(x, cos, sin, None)
            keys.append(k)
            values.append(v)
            x = layer.finish(x, attention(q, k, v, bias), gate, None)
        if keep_hidden_states:
            states.append(x)
        hidden, _ = self.language_model.norm(x)
        return PrefixCache(keys, values, pad, hidden, states if keep_hidden_states else None)

    # -- suffix ----------------------------------------------------------------------------

    def _suffix_embeddings(self, x_t: Tensor, t: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """-> (emb: [B, T(+1), D_e], att: [T(+1)] block starts, cond: [B, D_e] | None)."""
        cfg = self.cfg
        dt = self.dtype
        temb = sincos_time_embedding(t, cfg.expert.width, cfg.min_period, cfg.max_period).to(dt)
        act = self.action_in_proj(x_t.to(dt))
        # block starts built on the device (no host->device copy: CUDA-graph capturable)
        starts = torch.zeros(cfg.suffix_len, dtype=torch.long, device=act.device)
        starts[:cfg.suffix_len - cfg.horizon + 1] = 1
        if cfg.is_pi05:
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(temb))))
            return act, starts, cond
        h = torch.cat([act, temb[:, None, :].expand_as(act)], dim=2)
        act = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(h)))
        emb = torch.cat([self.state_proj(state.to(dt))[:, None, :], act], dim=1)
        return emb, starts, None

    def _check_suffix_inputs(self, x_t: Tensor, t: Tensor, state: Tensor | None, batch: int) -> None:
        cfg = self.cfg
        if tuple(x_t.shape) != (batch, cfg.horizon, cfg.action_dim):
            raise ValueError(f"x_t must be [B, T, A] = [{batch}, {cfg.horizon}, {cfg.action_dim}], got {list(x_t.shape)}")
        if tuple(t.shape) != (batch,):
            raise ValueError(f"t must be [B] = [{batch}], got {list(t.shape)}")
        if cfg.is_pi05:
            if state is not None:
                raise ValueError("pi0.5 takes the state as discrete prompt tokens (pi05_state_prompt); pass state=None")
        elif state is None or tuple(state.shape) != (batch, cfg.state_dim):
            got = None if state is None else list(state.shape)
            raise ValueError(f"pi0 needs the normalised, padded state [B, S] = [{batch}, {cfg.state_dim}], got {got}")

    def _head(self, x: Tensor, cond: Tensor | None, return_hidden: bool) -> Tensor | tuple[Tensor, Tensor]:
        out, _ = self.expert.norm(x, cond)
        out = out[:, -self.cfg.horizon:]
        v = self.action_out_proj(out).float()
        return (v, out) if return_hidden else v

    def velocity(self, x_t: Tensor, t: Tensor, state: Tensor | None, prefix_cache: PrefixCache, *,
                 return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """One denoise step of the expert over the cached prefix.

        x_t: [B, T, A] (any float dtype), t: [B] flow time in (0, 1], state: [B, S] normalised
        and padded (pi0) or None (pi0.5) -> v: [B, T, A] fp32; with ``return_hidden`` also the
        expert's final (normed) hidden states of the action tokens [B, T, D_expert] (model
        dtype), the input of the Flow-Noise head. Graph-safe: no host syncs.
        """
        self._check_suffix_inputs(x_t, t, state, prefix_cache.batch_size)
        x, starts, cond = self._suffix_embeddings(x_t, t, state)
        B, S = x.shape[:2]
        pad = prefix_cache.pad_mask
        suffix_pad = torch.ones(B, S, dtype=torch.bool, device=x.device)
        bias = attention_bias(torch.cat([pad[:, None, :].expand(B, S, pad.shape[1]),
                                         make_att_2d_masks(suffix_pad, starts[None].expand(B, S))], dim=2), x.dtype)
        pos = pad.sum(dim=1, keepdim=True) + torch.arange(S, device=x.device)[None]
        cos, sin = rope_cos_sin(pos, self.cfg.expert.head_dim, self.cfg.expert.rope_theta, x.dtype)
        for l, layer in enumerate(self.expert.layers):
            q, k, v, gate = layer.qkv(x, cos, sin, cond)
            k = torch.cat([prefix_cache.keys[l], k], dim=2)
            v = torch.cat([prefix_cache.values[l], v], dim=2)
            x = layer.finish(x, attention(q, k, v, bias), gate, cond)
        return self._head(x, cond, return_hidden)

    def joint_velocity(self, obs: Pi0Observation, x_t: Tensor, t: Tensor, state: Tensor | None, *,
                       return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The uncached path (training): prefix and suffix in one pass, layer by layer over the
        concatenated sequence. Same result as ``velocity(.., embed_prefix(..))``. ``state`` is
        normalised and padded, as for ``velocity``; ``obs.state`` is ignored."""
        self._check_prefix_inputs(obs.images, obs.image_masks, obs.tokens, obs.token_masks)
        self._check_suffix_inputs(x_t, t, state, obs.images.shape[0])
        xp, pad = self._prefix_embeddings(obs.images, obs.image_masks, obs.tokens, obs.token_masks)
        xs, starts, cond = self._suffix_embeddings(x_t, t, state)
        B, P = pad.shape
        S = xs.shape[1]
        full_pad = torch.cat([pad, torch.ones(B, S, dtype=torch.bool, device=pad.device)], dim=1)
        att = torch.cat([torch.zeros(P, dtype=starts.dtype, device=pad.device), starts])[None].expand(B, P + S)
        bias = attention_bias(make_att_2d_masks(full_pad, att), xp.dtype)
        cos, sin = rope_cos_sin(torch.cumsum(full_pad.long(), dim=1) - 1, self.cfg.vlm.head_dim,
                                self.cfg.vlm.rope_theta, xp.dtype)
        for vl, el in zip(self.language_model.layers, self.expert.layers):
            qp, kp, vp, gp = vl.qkv(xp, cos[:, :P], sin[:, :P], None)
            qs, ks, vs, gs = el.qkv(xs, cos[:, P:], sin[:, P:], cond)
            out = attention(torch.cat([qp, qs], 2), torch.cat([kp, ks], 2), torch.cat([vp, vs], 2), bias)
            xp = vl.finish(xp, out[:, :P], gp, None)
            xs = el.finish(xs, out[:, P:], gs, cond)
        return self._head(xs, cond, return_hidden)

    def flow_matching_loss(self, obs: Pi0Observation, actions: Tensor, *, noise: Tensor, time: Tensor) -> Tensor:
        """Training loss (SFT), per element: ``(v(x_t, t) - (noise - actions))^2`` with
        ``x_t = t noise + (1 - t) actions``, through the uncached joint forward.

        actions: [B, T, A'] raw (normalised here when the policy has a normaliser, zero-padded
        to A); noise: [B, T, A]; time: [B] in (0, 1] -> loss [B, T, A'] (padding dims dropped,
        as LeRobot does).
        """
        cfg = self.cfg
        B = obs.images.shape[0]
        if actions.ndim != 3 or actions.shape[:2] != (B, cfg.horizon) or actions.shape[2] > cfg.action_dim:
            raise ValueError(f"actions must be [B, T, A'] = [{B}, {cfg.horizon}, <= {cfg.action_dim}], got {list(actions.shape)}")
        real = actions.shape[2]
        if self.normalizer is not None:
            actions = self.normalizer.normalize_actions(actions)
        actions = F.pad(actions.float(), (0, cfg.action_dim - real))
        t = time.float()[:, None, None]
        x_t = t * noise + (1 - t) * actions
        v = self.joint_velocity(obs, x_t, time, self.prepare_state(obs.state))
        return ((v - (noise - actions)) ** 2)[..., :real]

    # -- inference -------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, obs: Pi0Observation) -> Pi0Context:
        """The per-observation work done once: state normalisation and the prefix cache."""
        return Pi0Context(self.prepare_state(obs.state),
                          self.embed_prefix(obs.images, obs.image_masks, obs.tokens, obs.token_masks))

    def velocity_fn(self, *, return_hidden: bool = False) -> Callable[[Tensor, Tensor, Pi0Context], Tensor | tuple[Tensor, Tensor]]:
        """``(x_t [B, T, A], t [B], ctx: Pi0Context) -> v`` (or ``(v, hidden)``), the signature
        of ``vlafast.flow`` samplers; ``return_hidden`` for Flow-Noise."""
        def fn(x_t: Tensor, t: Tensor, ctx: Pi0Context) -> Tensor | tuple[Tensor, Tensor]:
            return self.velocity(x_t, t, ctx.state, ctx.cache, return_hidden=return_hidden)
        return fn

    def prepare_state(self, state: Tensor | None) -> Tensor | None:
        """Raw state [B, S'] -> normalised and zero-padded [B, state_dim] (pi0); None for pi0.5."""
        if self.cfg.is_pi05:
            return None
        if state is None or state.ndim != 2 or state.shape[1] > self.cfg.state_dim:
            got = None if state is None else list(state.shape)
            raise ValueError(f"pi0 needs obs.state [B, S'] with S' <= {self.cfg.state_dim}, got {got}")
        if self.normalizer is not None:
            state = self.normalizer.normalize_state(state)
        return F.pad(state.float(), (0, self.cfg.state_dim - state.shape[1]))

    def _rtc_targets(self, prefix: Tensor, weights: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        """RTC inputs in the sampler's space: prefix [B, T, A_out] (output space) -> normalised
        and zero-padded [B, T, A]; weights [T] or [B, T] -> [B, T, A], 0 on padded dims."""
        T, A = self.cfg.horizon, self.cfg.action_dim
        out_dim = self.normalizer.action_dim if self.normalizer is not None else A
        dims_ok = prefix.dim() == 3 and (prefix.shape[2] == out_dim if self.normalizer is not None
                                         else 1 <= prefix.shape[2] <= out_dim)
        if not dims_ok or prefix.shape[0] != batch or prefix.shape[1] != T:
            want = f"A_out={out_dim}" if self.normalizer is not None else f"A_out <= {out_dim}"
            raise ValueError(f"prefix must be [B={batch}, T={T}, {want}] in the policy's output action space, "
                             f"got {list(prefix.shape)}")
        if tuple(weights.shape) not in ((T,), (batch, T)):
            raise ValueError(f"prefix_weights must be [T={T}] or [B={batch}, T={T}], got {list(weights.shape)}")
        a_out = prefix.shape[2]
        target = prefix.float()
        if self.normalizer is not None:
            target = self.normalizer.normalize_actions(target)
        target = F.pad(target, (0, A - a_out))
        dims = (torch.arange(A, device=prefix.device) < a_out).float()
        w = weights.float().to(prefix.device).expand(batch, T)[..., None] * dims
        return target, w

    @torch.no_grad()
    def sample_actions(self, obs: Pi0Observation, *, noise: Tensor | None = None,
                       generator: torch.Generator | None = None, num_steps: int | None = None,
                       prefix: Tensor | None = None, prefix_weights: Tensor | None = None,
                       max_guidance: float = 5.0) -> Tensor:
        """Plain Euler inference from t = 1 (noise) to t = 0, dt = -1/K: ``flow.sample`` with
        ``flow.ode(K)`` over ``velocity_fn()`` and ``encode(obs)``.

        noise: [B, T, A] (default: standard normal from ``generator``) -> actions [B, T, A_out]
        unnormalised when the policy has a normaliser (A_out = the stats' action dim), else the
        model's normalised, padded actions.

        Real-time chunking (RTC): with ``prefix`` [B, T, A_out] (the chunk the robot is executing,
        resampled at this chunk's waypoint times, in the output space above) and
        ``prefix_weights`` [T] or [B, T] (the soft mask ``vlafast.flow.prefix_weights(T, d,
        s)``: 1 on the d waypoints the robot executes while this call runs, measured by the
        caller, decaying to 0 at T - s; 0 where the executing plan has run out), every Euler step
        is guided towards the prefix (``flow.RTCGuidance``, pseudo-inverse
        guidance capped at ``max_guidance``), in the model's normalised space and on the output's
        action dims only. Tensor ops only: capturable in a CUDA graph with static inputs.
        """
        K = self.cfg.num_steps if num_steps is None else num_steps  # 0 or -3 is refused by the sampler, not replaced
        B = obs.images.shape[0]
        shape = (B, self.cfg.horizon, self.cfg.action_dim)
        if noise is None:
            noise = torch.randn(shape, generator=generator, device=self.device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must be [B, T, A] = {list(shape)}, got {list(noise.shape)}")
        if (prefix is None) != (prefix_weights is None):
            raise ValueError("real-time chunking needs both prefix [B, T, A_out] and prefix_weights [T] or [B, T]")
        ctx = self.encode(obs)
        guidance = None
        if prefix is not None:
            target, weights = self._rtc_targets(prefix, prefix_weights, B)
            guidance = flow.RTCGuidance(target, weights, max_guidance)
        x, _ = flow.sample(flow.ode(K), self.velocity_fn(), ctx, noise.float(), guidance=guidance)
        if self.normalizer is None:
            return x.contiguous()  # a view of the trace's chain [B, K+1, T, A]
        return self.normalizer.unnormalize_actions(x[..., : self.normalizer.action_dim])


def preprocess_images(images: Tensor, size: int = 224) -> Tensor:
    """Camera frames -> model images, as openpi / LeRobot prepare them.

    images: [B, V, H, W, 3] uint8 -> [B, V, 3, size, size] float32 in [-1, 1]. Frames that are
    not ``size`` x ``size`` are resized keeping their aspect ratio (bilinear) and padded
    black (-1) symmetrically (``resize_with_pad``).
    """
    if images.ndim != 5 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 [B, V, H, W, 3], got {images.dtype} {list(images.shape)}")
    B, V, H, W, _ = images.shape
    x = images.reshape(B * V, H, W, 3).permute(0, 3, 1, 2).float() / 255.0
    if (H, W) != (size, size):
        ratio = max(W / size, H / size)
        h, w = int(H / ratio), int(W / ratio)
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
        top, left = (size - h) // 2, (size - w) // 2
        x = F.pad(x, (left, size - w - left, top, size - h - top), value=0.0)
    return (x * 2.0 - 1.0).reshape(B, V, 3, size, size)


def discretize_state(state: Tensor, bins: int = 256) -> Tensor:
    """pi0.5 state tokens: normalised state [B, state_dim] (zero-padded like LeRobot / openpi)
    in [-1, 1] -> bin ids [B, state_dim], exactly ``np.digitize(state, linspace(-1, 1, bins +
    1)[:-1]) - 1`` (so a value below -1 gives -1, as there)."""
    edges = torch.linspace(-1.0, 1.0, bins + 1, dtype=torch.float64, device=state.device)[:-1]
    return torch.bucketize(state.double(), edges, right=True) - 1


def pi05_state_prompt(task: str, state_bins: Tensor) -> str:
    """The pi0.5 prompt text for one sample (tokenise it with the PaliGemma tokenizer):
    ``"Task: <task>, State: <b1 b2 ...>;\\nAction: "``; state_bins: [S] from ``discretize_state``."""
    cleaned = task.strip().replace("_", " ").replace("\n", " ")
    return f"Task: {cleaned}, State: {' '.join(str(int(b)) for b in state_bins.tolist())};\nAction: "
