"""Llama-2 decoder (OpenVLA's language model) with a static KV cache.

Attribute names follow the Hugging Face ``LlamaForCausalLM`` state dict (``model.embed_tokens``,
``model.layers.{i}.self_attn.q_proj``, ``mlp.down_proj``, ``model.norm``, ``lm_head``), so
checkpoints load by name. RMSNorm scales by ``w`` (not ``1 + w`` as Gemma), RoPE uses the
half-split layout, SwiGLU MLP.

The KV cache is preallocated (``KVCache``) and written at explicit positions held in a device
tensor, and attention always spans the whole cache with a ``key_pos <= query_pos`` mask, so
one decode step has fixed shapes and is CUDA-graph capturable; prefill and decode share it.

Axes: B batch, S tokens, D width, N MLP neurons (d_ff), H heads, G kv heads, E head dim,
M cache length, V vocab.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlafast.models.gemma import GatedMLP, apply_rope, rope_cos_sin


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    eps: float = 1e-6  # OpenVLA's text_config keeps transformers' LlamaConfig default
    rope_theta: float = 10_000.0

    @classmethod
    def llama2_7b(cls, vocab_size: int = 32_064) -> "LlamaConfig":
        return cls(width=4096, depth=32, mlp_dim=11_008, num_heads=32, num_kv_heads=32, vocab_size=vocab_size)

    @classmethod
    def tiny(cls, vocab_size: int = 384) -> "LlamaConfig":
        return cls(width=64, depth=2, mlp_dim=96, num_heads=4, num_kv_heads=2, vocab_size=vocab_size)

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    def __post_init__(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"width ({self.width}) must be a multiple of num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if (self.width // self.num_heads) % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.width // self.num_heads}")


class LlamaRMSNorm(nn.Module):
    """``w * (x * rsqrt(mean(x^2) + eps))``, normalised in fp32, cast back before the scale (as HF)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


class LlamaMLP(GatedMLP):
    """SwiGLU MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``, with the same steering slot
    as ``GemmaMLP`` (``vlafast.models.gemma.GatedMLP``)."""

    def act(self, x: Tensor) -> Tensor:
        return F.silu(x)


@dataclasses.dataclass
class KVCache:
    """Preallocated keys / values for every layer: k, v: [L, B, G, M, E]."""

    k: Tensor
    v: Tensor

    @classmethod
    def empty(cls, cfg: LlamaConfig, batch: int, max_len: int, *, dtype: torch.dtype,
              device: torch.device | str) -> "KVCache":
        shape = (cfg.depth, batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.width, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.width, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.width, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, k_cache: Tensor, v_cache: Tensor,
                allowed: Tensor) -> Tensor:
        """x: [B, S, D]; cos/sin: [B, S, E]; positions: [S] int64 (cache slots to write);
        k_cache/v_cache: [B, G, M, E] (written in place); allowed: [S, M] bool -> [B, S, D]."""
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache.index_copy_(2, positions, k.to(k_cache.dtype))
        v_cache.index_copy_(2, positions, v.to(v_cache.dtype))
        keys, values = k_cache, v_cache
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, keys.to(q.dtype), values.to(q.dtype), attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class LlamaLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(cfg.width, cfg.eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = LlamaRMSNorm(cfg.width, cfg.eps)
        self.mlp = LlamaMLP(cfg.width, cfg.mlp_dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, k_cache: Tensor, v_cache: Tensor,
                allowed: Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, k_cache, v_cache, allowed)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(LlamaLayer(cfg) for _ in range(cfg.depth))
        self.norm = LlamaRMSNorm(cfg.width, cfg.eps)


class LlamaLM(nn.Module):
    """``LlamaForCausalLM`` layout: ``model`` (embeddings, layers, final norm) and ``lm_head``."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)

    def embed(self, input_ids: Tensor) -> Tensor:
        """input_ids: [B, S] -> [B, S, D]."""
        return self.model.embed_tokens(input_ids)

    def forward(self, x: Tensor, positions: Tensor, cache: KVCache, *, hidden_states: list[Tensor] | None = None) -> Tensor:
        """Run the decoder over ``x`` at cache slots ``positions``; returns the final-normed hidden states.

        x: [B, S, D] input embeddings; positions: [S] int64 on x's device (the tokens' absolute
        positions, also their cache slots); cache: written in place. Token s attends every
        cached slot j <= positions[s] (causal). ``hidden_states``, if given, receives the
        residual stream after each layer (for layer-by-layer parity) -> [B, S, D].
        """
        B, S, _ = x.shape
        slots = torch.arange(cache.max_len, device=x.device)
        allowed = slots[None, :] <= positions[:, None]  # [S, M]
        cos, sin = rope_cos_sin(positions[None].expand(B, S), self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, positions, cache.k[i], cache.v[i], allowed)
            if hidden_states is not None:
                hidden_states.append(x)
        return self.model.norm(x)

    def logits(self, h: Tensor) -> Tensor:
        """h: [B, S, D] (final-normed) -> [B, S, V] in fp32."""
        return self.lm_head(h).float()
