"""Lean OpenVLA (``openvla/openvla-7b``): fused DINOv2 + SigLIP featurizer, MLP projector,
Llama-2 decoder, greedy decoding of the action tokens, de-tokenisation, unnormalisation.

Semantics (``modeling_prismatic.py``):

* ``pixel_values: [B, 6, 224, 224]`` stacks two preprocessings of one image on channels: the
  first 3 for DINOv2 (ImageNet mean/std), the last 3 for SigLIP (mean = std = 0.5).
* Each featurizer is a timm ViT whose *second-to-last* block output is used
  (``get_intermediate_layers(n={depth - 2})``: no final norm, prefix tokens dropped), so the
  last block, ``norm`` and SigLIP's ``attn_pool`` are never run and are not built here.
  DINOv2-L/14 with 4 registers: class + register tokens are prepended after adding the
  patch-only position embedding; LayerScale (``ls1/ls2.scale_factor``, HF's rename of
  timm's ``gamma``). SigLIP So400m/14: no prefix tokens, no LayerScale. Both use exact GELU
  and LayerNorm eps 1e-6. Patch features are concatenated on channels (1024 + 1152 = 2176).
* Projector: ``fc1`` (2176 -> 8704), GELU, ``fc2`` (-> 4096), GELU, ``fc3`` (-> 4096).
* The projected patches are inserted after the BOS token: ``[bos, patches, rest of prompt]``;
  positions run 0..S-1 over that sequence. The prompt must end with token 29871 (the empty
  token after "Out:"); ``predict_action`` appends it when absent, as OpenVLA does.
* Greedy decoding of ``action_dim`` tokens by argmax over the full (padded) vocabulary.

Axes: B batch, P patches, C vision width, S tokens, D LLM width, A action dim, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlafast.models.action_tokenizer import ActionStats, ActionTokenizer, select_stats
from vlafast.models.llama import KVCache, LlamaConfig, LlamaLM, LlamaMLP

EMPTY_TOKEN = 29871  # Llama's "" piece after "Out:"; OpenVLA appends it when missing
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def openvla_prompt(instruction: str) -> str:
    """The prompt OpenVLA-7B was trained with (tokenise it with the Llama-2 tokenizer, BOS first)."""
    return f"In: What action should the robot take to {instruction}?\nOut:"


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """A timm ViT as OpenVLA builds it; ``depth`` is the full depth (the last block is unused)."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    class_token: bool
    reg_tokens: int
    layer_scale: bool

    @classmethod
    def dinov2_l14_reg4(cls, image_size: int = 224) -> "ViTConfig":
        return cls(image_size, 14, width=1024, depth=24, mlp_dim=4096, num_heads=16, class_token=True, reg_tokens=4,
                   layer_scale=True)

    @classmethod
    def siglip_so400m_14(cls, image_size: int = 224) -> "ViTConfig":
        return cls(image_size, 14, width=1152, depth=27, mlp_dim=4304, num_heads=16, class_token=False, reg_tokens=0,
                   layer_scale=False)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_prefix(self) -> int:
        return int(self.class_token) + self.reg_tokens

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"vision width {self.width} must be a multiple of num_heads {self.num_heads}")
        if self.depth < 2:
            raise ValueError(f"depth must be >= 2 (features come from the second-to-last block), got {self.depth}")


@dataclasses.dataclass(frozen=True)
class OpenVLAConfig:
    vision: ViTConfig  # DINOv2 (``vision_backbone.featurizer``)
    fused_vision: ViTConfig  # SigLIP (``vision_backbone.fused_featurizer``)
    llm: LlamaConfig
    pad_to_multiple_of: int = 64  # the embedding rows added after the tokenizer's vocabulary
    n_bins: int = 256
    action_dim: int = 7

    @classmethod
    def openvla_7b(cls) -> "OpenVLAConfig":
        return cls(ViTConfig.dinov2_l14_reg4(), ViTConfig.siglip_so400m_14(), LlamaConfig.llama2_7b())

    @classmethod
    def tiny(cls) -> "OpenVLAConfig":
        """2-layer ViTs on 28 px images (4 patches), a 2-layer width-64 Llama with the real vocabulary
        (32064), so token ids (action bins, the empty token 29871) are the published ones."""
        dino = ViTConfig(28, 14, width=32, depth=3, mlp_dim=64, num_heads=2, class_token=True, reg_tokens=4,
                         layer_scale=True)
        siglip = ViTConfig(28, 14, width=24, depth=3, mlp_dim=40, num_heads=2, class_token=False, reg_tokens=0,
                           layer_scale=False)
        return cls(dino, siglip, LlamaConfig.tiny(vocab_size=32_064))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "OpenVLAConfig":
        """The config from ``to_json``'s dict (a TypeError names an unknown or missing field)."""
        d = dict(d)
        return cls(ViTConfig(**d.pop("vision")), ViTConfig(**d.pop("fused_vision")), LlamaConfig(**d.pop("llm")), **d)

    @property
    def vision_dim(self) -> int:
        return self.vision.width + self.fused_vision.width

    @property
    def num_patches(self) -> int:
        return self.vision.num_patches

    @property
    def tokenizer_vocab(self) -> int:
        """Vocabulary of the tokenizer (32000): action token = tokenizer_vocab - bin."""
        return self.llm.vocab_size - self.pad_to_multiple_of

    def __post_init__(self) -> None:
        if self.vision.image_size != self.fused_vision.image_size or self.vision.patch_size != self.fused_vision.patch_size:
            raise ValueError("the two featurizers must see the same image size and patch size (patches are "
                             f"concatenated on channels), got {self.vision} and {self.fused_vision}")
        if not 0 < self.n_bins <= self.tokenizer_vocab:
            raise ValueError(f"n_bins {self.n_bins} must fit in the tokenizer vocabulary {self.tokenizer_vocab}")


# ---------------------------------------------------------------------------------------------
# vision


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)


class _Attention(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        B, P, C = x.shape
        q, k, v = self.qkv(x).view(B, P, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, P, C))


class _Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _LayerScale(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale_factor = nn.Parameter(torch.ones(width))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale_factor


class _Block(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = _Attention(cfg)
        self.ls1 = _LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = _Mlp(cfg)
        self.ls2 = _LayerScale(cfg.width) if cfg.layer_scale else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class TimmViT(nn.Module):
    """timm ``VisionTransformer`` up to its second-to-last block; images: [B, 3, H, W] -> [B, P, C]."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = _PatchEmbed(cfg)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.width))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, cfg.width)) if cfg.reg_tokens else None
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth - 1))

    def forward(self, images: Tensor) -> Tensor:
        x = self.patch_embed.proj(images.to(self.pos_embed.dtype)).flatten(2).transpose(1, 2)  # [B, P, C]
        x = x + self.pos_embed
        B = x.shape[0]
        prefix = [t.expand(B, -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        x = torch.cat(prefix + [x], dim=1)
        for block in self.blocks:
            x = block(x)
        return x[:, self.cfg.num_prefix:]


class FusedVisionBackbone(nn.Module):
    """pixel_values: [B, 6, H, W] (DINOv2 channels, then SigLIP channels) -> [B, P, C1 + C2]."""

    def __init__(self, cfg: OpenVLAConfig) -> None:
        super().__init__()
        self.featurizer = TimmViT(cfg.vision)
        self.fused_featurizer = TimmViT(cfg.fused_vision)

    def forward(self, pixel_values: Tensor) -> Tensor:
        img, img_fused = torch.split(pixel_values, [3, 3], dim=1)
        return torch.cat([self.featurizer(img), self.fused_featurizer(img_fused)], dim=2)


class OpenVLAProjector(nn.Module):
    """[B, P, C] -> [B, P, D]: fc1 (C -> 4C), GELU, fc2 (-> D), GELU, fc3 (D -> D)."""

    def __init__(self, vision_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(vision_dim, 4 * vision_dim)
        self.fc2 = nn.Linear(4 * vision_dim, llm_dim)
        self.fc3 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


def openvla_pixel_values(images: Tensor, image_size: int = 224) -> Tensor:
    """uint8 images [B, H, W, 3] -> pixel_values [B, 6, S, S] (DINOv2 then SigLIP normalisation).

    Resizing (when H, W != S) is bicubic with antialiasing in torch (timm's interpolation for
    both towers), close to but not bit-identical with OpenVLA's PIL resize; feed S x S images
    for exact parity.
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {list(images.shape)}")
    x = images.permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp(0.0, 1.0)  # bicubic overshoots; PIL clips to the uint8 range
    mean = torch.tensor(IMAGENET_MEAN, device=x.device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=x.device)[:, None, None]
    return torch.cat([(x - mean) / std, (x - 0.5) / 0.5], dim=1)


# ---------------------------------------------------------------------------------------------
# policy


class OpenVLAPolicy(nn.Module):
    """OpenVLA: ``vision_backbone`` -> ``projector`` -> ``language_model`` (Llama-2) -> 7 action tokens.

    ``stats`` maps an ``unnorm_key`` (dataset name) to its action statistics; without it the
    policy still predicts normalised actions and tokens.
    """

    def __init__(self, cfg: OpenVLAConfig, stats: dict[str, ActionStats] | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_backbone = FusedVisionBackbone(cfg)
        self.projector = OpenVLAProjector(cfg.vision_dim, cfg.llm.width)
        self.language_model = LlamaLM(cfg.llm)
        self.stats = dict(stats or {})
        self.action_tokenizer = ActionTokenizer(cfg.tokenizer_vocab, cfg.n_bins)

    # -- parts exposed for the neuron dictionary and steering ------------------------------------
    def mlps(self) -> Iterator[tuple[str, LlamaMLP]]:
        """("vlm.{l}", mlp) for every Llama layer: the steering surface (same names and
        ``steer(h, y)`` slot as ``Pi0Policy.mlps``). Neuron i's value vector is
        ``mlp.down_proj.weight[:, i]``. All MLPs run for the prefix and for every decoded token."""
        for l, layer in enumerate(self.language_model.model.layers):
            yield f"vlm.{l}", layer.mlp

    @property
    def lm_head(self) -> nn.Linear:
        """The output projection (OpenVLA's is not tied to the input embedding)."""
        return self.language_model.lm_head

    @property
    def output_embedding(self) -> Tensor:
        """E: [V, D], the matrix value vectors are projected onto for the neuron dictionary."""
        return self.language_model.lm_head.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device

    def action_stats(self, unnorm_key: str | None = None) -> ActionStats:
        return select_stats(self.stats, unnorm_key)

    # -- forward pieces ----------------------------------------------------------------------------
    def embed_prefix(self, pixel_values: Tensor, input_ids: Tensor) -> Tensor:
        """pixel_values: [B, 6, H, W]; input_ids: [B, S_text] (BOS first) -> [B, 1 + P + S_text - 1, D]."""
        patches = self.projector(self.vision_backbone(pixel_values))  # [B, P, D]
        text = self.language_model.embed(input_ids)
        return torch.cat([text[:, :1], patches.to(text.dtype), text[:, 1:]], dim=1)

    def _check_inputs(self, pixel_values: Tensor, input_ids: Tensor) -> None:
        s = self.cfg.vision.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (6, s, s):
            raise ValueError(f"pixel_values must be [B, 6, {s}, {s}] (DINOv2 and SigLIP channels stacked; "
                             f"see openvla_pixel_values), got {list(pixel_values.shape)}")
        if input_ids.ndim != 2 or input_ids.shape[0] != pixel_values.shape[0] or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids must be [B, S] with B = {pixel_values.shape[0]} and S >= 1 (BOS first), "
                             f"got {list(input_ids.shape)}")
        if input_ids.is_floating_point():
            raise ValueError(f"input_ids must be integer token ids, got {input_ids.dtype}")

    def prefix_len(self, text_len: int) -> int:
        return text_len + self.cfg.num_patches

    def new_cache(self, batch: int, text_len: int, *, device: torch.device | str | None = None) -> KVCache:
        """A cache holding the prefix and the action tokens (the last one is never fed back)."""
        max_len = self.prefix_len(text_len) + self.cfg.action_dim - 1
        return KVCache.empty(self.cfg.llm, batch, max_len, dtype=self.dtype, device=device or self.device)

    def prefill(self, pixel_values: Tensor, input_ids: Tensor, cache: KVCache) -> Tensor:
        """Encode image + prompt into ``cache``; returns the first greedy token [B] (int64)."""
        x = self.embed_prefix(pixel_values, input_ids)
        positions = torch.arange(x.shape[1], device=x.device)
        h = self.language_model(x, positions, cache)
        return self.language_model.logits(h[:, -1]).argmax(-1)

    def decode_step(self, token: Tensor, position: Tensor, cache: KVCache) -> Tensor:
        """token: [B] int64, position: [1] int64 (device tensor) -> next greedy token [B].

        Fixed shapes and no host sync: this is what ``GraphedDecoder`` captures.
        """
        x = self.language_model.embed(token[:, None])
        h = self.language_model(x, position, cache)
        return self.language_model.logits(h[:, -1]).argmax(-1)

    @torch.no_grad()
    def predict_action_tokens(self, pixel_values: Tensor, input_ids: Tensor, *, decoder: "GraphedDecoder | None" = None) -> Tensor:
        """Greedy decoding: pixel_values [B, 6, H, W], input_ids [B, S] (ending with 29871) -> tokens [B, A].

        Rows share one prompt length (no padding: OpenVLA's own ``predict_action`` is batch 1).
        ``decoder`` (a ``GraphedDecoder`` built for this batch and length) replays the decode steps.
        """
        self._check_inputs(pixel_values, input_ids)
        if decoder is not None:
            return decoder(pixel_values, input_ids)
        B, S = input_ids.shape
        cache = self.new_cache(B, S, device=input_ids.device)
        token = self.prefill(pixel_values, input_ids, cache)
        tokens = [token]
        position = torch.tensor([self.prefix_len(S)], device=input_ids.device)
        for _ in range(self.cfg.action_dim - 1):
            token = self.decode_step(token, position, cache)
            tokens.append(token)
            position += 1
        return torch.stack(tokens, dim=1)

    @torch.no_grad()
    def predict_action(self, pixel_values: Tensor, input_ids: Tensor, unnorm_key: str | None = None, *,
                       decoder: "GraphedDecoder | None" = None) -> Tensor:
        """pixel_values: [B, 6, H, W], input_ids: [B, S] (BOS first) -> actions [B, A] in dataset units.

        Appends the empty token 29871 when the prompt does not end with it (as OpenVLA does).
        """
        stats = self.action_stats(unnorm_key)
        if stats.action_dim != self.cfg.action_dim:
            raise ValueError(f"statistics have {stats.action_dim} action dims, the policy decodes {self.cfg.action_dim}")
        if not bool((input_ids[:, -1] == EMPTY_TOKEN).all()):
            empty = torch.full((input_ids.shape[0], 1), EMPTY_TOKEN, dtype=input_ids.dtype, device=input_ids.device)
            input_ids = torch.cat([input_ids, empty], dim=1)
        tokens = self.predict_action_tokens(pixel_values, input_ids, decoder=decoder)
        return stats.unnormalize(self.action_tokenizer.decode(tokens))


class GraphedDecoder:
    """Greedy decoding with the per-token decode step captured once as a CUDA graph.

    Built for one (batch, prompt length); prefill runs eagerly into a static KV cache, then each
    of the remaining ``action_dim - 1`` tokens is one graph replay (no host sync in between).
    The ``mlp.steer`` slots are baked in at capture: a steering plan set before building the
    decoder can change its device buffers (alpha, on/off mask) between calls without recapture;
    setting or clearing a slot afterwards needs a new decoder. Off CUDA the same static-buffer
    step runs eagerly (no capture), so CPU tests exercise the code the graph replays.
    """

    def __init__(self, policy: OpenVLAPolicy, batch: int, text_len: int) -> None:
        self.policy, self.batch, self.text_len = policy, batch, text_len
        device = policy.device
        self.cache = policy.new_cache(batch, text_len)
        self.token = torch.zeros(batch, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        if device.type != "cuda":
            return
        start = policy.prefix_len(text_len)
        with torch.no_grad():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm up (allocator, kernels) off the capture
                for _ in range(2):
                    self.position.fill_(start)
                    self._step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._step()
        self.graph = graph

    def _step(self) -> None:
        """What one replay does: next token from (token, position), then advance both in place."""
        nxt = self.policy.decode_step(self.token, self.position, self.cache)
        self.position.add_(1)
        self.token.copy_(nxt)

    def replay(self) -> None:
        if self.graph is None:
            self._step()
        else:
            self.graph.replay()

    def __call__(self, pixel_values: Tensor, input_ids: Tensor) -> Tensor:
        B, S = input_ids.shape
        if (B, S) != (self.batch, self.text_len):
            raise ValueError(f"this decoder was captured for batch {self.batch} and prompt length {self.text_len}, "
                             f"got input_ids {list(input_ids.shape)}; build another GraphedDecoder")
        policy = self.policy
        first = policy.prefill(pixel_values, input_ids, self.cache)
        self.token.copy_(first)
        self.position.fill_(policy.prefix_len(S))
        tokens = [first]
        for _ in range(policy.cfg.action_dim - 1):
            self.replay()
            tokens.append(self.token.clone())
        return torch.stack(tokens, dim=1)


def num_params(cfg: OpenVLAConfig) -> int:
    """Parameter count of the built model (the unused last ViT blocks and heads excluded)."""
    with torch.device("meta"):
        return sum(p.numel() for p in OpenVLAPolicy(cfg).parameters())


__all__ = [
    "EMPTY_TOKEN", "FusedVisionBackbone", "GraphedDecoder", "OpenVLAConfig", "OpenVLAPolicy", "OpenVLAProjector",
    "TimmViT", "ViTConfig", "num_params", "openvla_prompt", "openvla_pixel_values",
]
