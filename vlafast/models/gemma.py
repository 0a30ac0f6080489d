"""Gemma building blocks for pi0 / pi0.5: RMSNorm ((1 + w) scale, optional adaRMS), RoPE,
GeGLU MLP with a steering slot, and the decoder layer (q/k/v/o projections, no biases).

Module attribute names follow the Hugging Face / LeRobot state-dict names
(``input_layernorm``, ``self_attn.q_proj``, ``mlp.down_proj``, ...) so checkpoints load by
name. The layer does not run attention itself: pi0 runs the VLM and the action expert
*jointly* (one softmax over the concatenated sequence), so ``vlafast.models.pi0`` drives the
pieces (``qkv`` -> attention -> ``finish``).

Axes: B batch, S tokens, D width, N MLP neurons (d_ff), H heads, G kv heads, E head dim.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SteerFn = Callable[[Tensor, Tensor], Tensor]
_SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa= arrived in 2.5


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """One Gemma stack (the PaliGemma language model or the action expert)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    eps: float = 1e-6
    rope_theta: float = 10_000.0

    @classmethod
    def gemma_2b(cls) -> "GemmaConfig":
        return cls(width=2048, depth=18, mlp_dim=16_384, num_heads=8, num_kv_heads=1, head_dim=256)

    @classmethod
    def gemma_300m(cls) -> "GemmaConfig":
        return cls(width=1024, depth=18, mlp_dim=4096, num_heads=8, num_kv_heads=1, head_dim=256)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")


class RMSNorm(nn.Module):
    """Gemma RMSNorm: ``x * rsqrt(mean(x^2) + eps) * (1 + weight)``, computed in fp32.

    With ``cond_dim`` set it is pi0.5's adaptive norm instead: ``dense`` (Linear cond_dim ->
    3 * dim) gives scale, shift, gate from the conditioning vector; the output is
    ``rmsnorm(x) * (1 + scale) + shift`` and the gate multiplies the residual branch.
    """

    def __init__(self, dim: int, eps: float, cond_dim: int | None = None) -> None:
        super().__init__()
        self.eps = eps
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(dim))
            self.dense = None
        else:
            self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x: [B, S, D], cond: [B, D_cond] (adaptive only) -> (y: [B, S, D], gate: [B, 1, D] | None)."""
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.dense is None:
            return (normed * (1.0 + self.weight.float())).to(x.dtype), None
        if cond is None:
            raise ValueError("adaptive RMSNorm needs the time conditioning `cond` [B, D_cond]")
        scale, shift, gate = self.dense(cond).unsqueeze(1).chunk(3, dim=-1)
        y = normed * (1.0 + scale.float()) + shift.float()
        return y.to(x.dtype), gate.to(x.dtype)


class GatedMLP(nn.Module):
    """Gated MLP ``down_proj(act(gate_proj(x)) * up_proj(x))`` with the steering slot; the
    subclasses (Gemma's GeGLU here, Llama's SwiGLU in ``llama.py``) choose ``act``.

    Steering slot: ``steer`` is None by default (costs one attribute test). When set to a
    callable ``steer(h, y) -> y'`` it receives the activations entering ``down_proj``
    (``h: [B, S, N]``, the neurons whose value vectors are the columns of
    ``down_proj.weight``) and the ``down_proj`` output (``y: [B, S, D]``) and returns the
    corrected output. Steering plans set and clear it; nothing else is patched, and with
    ``steer = None`` the forward is exactly the unsteered one.
    """

    def __init__(self, width: int, mlp_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(width, mlp_dim, bias=False)
        self.up_proj = nn.Linear(width, mlp_dim, bias=False)
        self.down_proj = nn.Linear(mlp_dim, width, bias=False)
        self.steer: Optional[SteerFn] = None

    def act(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def activations(self, x: Tensor) -> Tensor:
        """x: [B, S, D] -> h: [B, S, N], the input of ``down_proj``."""
        return self.act(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: Tensor) -> Tensor:
        h = self.activations(x)
        y = self.down_proj(h)
        if self.steer is not None:
            y = self.steer(h, y)
        return y


class GemmaMLP(GatedMLP):
    """GeGLU MLP: ``down_proj(gelu_tanh(gate_proj(x)) * up_proj(x))``, steering slot as ``GatedMLP``."""

    def act(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate="tanh")


class GemmaAttention(nn.Module):
    """Projections only; the attention itself is joint across stacks (see pi0.py)."""

    def __init__(self, cfg: GemmaConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)


class GemmaLayer(nn.Module):
    """One decoder layer, split into ``qkv`` (before attention) and ``finish`` (after)."""

    def __init__(self, cfg: GemmaConfig, cond_dim: int | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.width, cfg.eps, cond_dim)
        self.self_attn = GemmaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.width, cfg.eps, cond_dim)
        self.mlp = GemmaMLP(cfg.width, cfg.mlp_dim)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """x: [B, S, D]; cos/sin: [B, S, E] -> q [B, H, S, E], k/v [B, G, S, E] (RoPE applied), gate."""
        a = self.self_attn
        h, gate = self.input_layernorm(x, cond)
        B, S, _ = x.shape
        q = a.q_proj(h).view(B, S, a.num_heads, a.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(B, S, a.num_kv_heads, a.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(B, S, a.num_kv_heads, a.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v, gate

    def finish(self, x: Tensor, attn: Tensor, gate: Tensor | None, cond: Tensor | None) -> Tensor:
        """x: [B, S, D] residual stream, attn: [B, S, H*E] attention output -> [B, S, D]."""
        x = gated_residual(x, self.self_attn.o_proj(attn.to(x.dtype)), gate)
        h, gate2 = self.post_attention_layernorm(x, cond)
        return gated_residual(x, self.mlp(h), gate2)


def gated_residual(x: Tensor, y: Tensor, gate: Tensor | None) -> Tensor:
    return x + y if gate is None else x + y * gate


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions: [B, S] (int) -> cos, sin: [B, S, E] (half-split layout, as HF Gemma)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [B, H, S, E]; cos/sin: [B, S, E]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def mask_value(dtype: torch.dtype) -> float:
    """Large finite negative for additive masks: fully masked (padding) rows stay finite."""
    return -0.7 * torch.finfo(dtype).max


def attention_bias(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """allowed: [B, Sq, Sk] bool -> additive mask [B, 1, Sq, Sk] (0 or a large finite negative).

    Finite, not -inf: padded query rows stay finite, so a padded token can never poison valid
    ones through 0 * NaN. Built once per forward and shared by every layer.
    """
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, mask_value(dtype))[:, None]


def attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
    """Grouped-query attention with scale 1/sqrt(E).

    q: [B, H, Sq, E], k/v: [B, G, Sk, E], bias: [B, 1, Sq, Sk] from ``attention_bias`` -> [B, Sq, H*E].
    """
    B, H, Sq, E = q.shape
    G = k.shape[1]
    if G != H and _SDPA_GQA:  # reads the shared kv heads in place (no copy of the cached prefix K/V)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0 / math.sqrt(E), enable_gqa=True)
    else:
        if G != H:
            k = k.repeat_interleave(H // G, dim=1)
            v = v.repeat_interleave(H // G, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0 / math.sqrt(E))
    return out.transpose(1, 2).reshape(B, Sq, H * E)
