"""SigLIP vision tower (So400m/14 for pi0) and the PaliGemma projector.

Attribute names follow the Hugging Face state dict (``vision_model.embeddings.patch_embedding``,
``encoder.layers.{i}.self_attn.q_proj``, ``post_layernorm``, ...). Images are float
``[B, 3, H, W]`` in [-1, 1]; the output is one token per patch, no pooling head (PaliGemma
uses the full sequence). Axes: B batch, P patches (tokens), C vision width.
"""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    image_size: int
    patch_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    eps: float = 1e-6

    @classmethod
    def so400m_14(cls, image_size: int = 224) -> "SiglipConfig":
        return cls(image_size=image_size, patch_size=14, width=1152, depth=27, mlp_dim=4304, num_heads=16)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"vision width {self.width} must be a multiple of num_heads {self.num_heads}")


class _Embeddings(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, cfg.width)

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embedding(images.to(self.patch_embedding.weight.dtype))  # [B, C, h, w]
        x = x.flatten(2).transpose(1, 2)  # [B, P, C]
        return x + self.position_embedding.weight[None]


class _Attention(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        B, P, C = x.shape
        H = self.num_heads

        def split(t: Tensor) -> Tensor:
            return t.view(B, P, H, C // H).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(B, P, C))


class _MLP(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class _Layer(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.self_attn = _Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = _MLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _Encoder(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.depth))


class _VisionModel(nn.Module):
    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.embeddings = _Embeddings(cfg)
        self.encoder = _Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)


class SiglipVisionTower(nn.Module):
    """images: [B, 3, H, W] in [-1, 1] -> tokens: [B, P, C]."""

    def __init__(self, cfg: SiglipConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_model = _VisionModel(cfg)

    def forward(self, images: Tensor) -> Tensor:
        size = self.cfg.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2:] != (size, size):
            raise ValueError(f"images must be [B, 3, {size}, {size}] in [-1, 1], got {list(images.shape)}")
        vm = self.vision_model
        x = vm.embeddings(images)
        for layer in vm.encoder.layers:
            x = layer(x)
        return vm.post_layernorm(x)


class Projector(nn.Module):
    """PaliGemma ``multi_modal_projector``: one Linear, vision width -> VLM width."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)
