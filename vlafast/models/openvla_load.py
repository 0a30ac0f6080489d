"""``load_openvla``: OpenVLA from a Hugging Face folder (``openvla/openvla-7b`` layout).

The folder holds ``config.json`` (``vision_backbone_id``, ``text_config``, ``n_action_bins``,
``pad_to_multiple_of``, often ``norm_stats``), ``model.safetensors.index.json`` with its
shards (or one ``model.safetensors``) and ``dataset_statistics.json``
(``{unnorm_key: {"action": {"q01", "q99", "mask", ...}}}``).

Keys: ``vision_backbone.featurizer.*`` / ``vision_backbone.fused_featurizer.*`` (timm ViTs;
LayerScale as ``ls1.scale_factor``, timm's ``ls1.gamma`` also accepted), ``projector.fc1/2/3``,
``language_model.model.*``, ``language_model.lm_head.weight``. Weights the model never runs are
skipped: each featurizer's last block, final ``norm``, SigLIP's ``attn_pool`` and any ``head``
(OpenVLA reads the second-to-last block), and ``rotary_emb.inv_freq`` buffers.

Loading uses ``vlafast.models.checkpoint``: every header is checked first (one
``CheckpointError`` lists all missing / unexpected / mis-shaped / mistyped keys), then the
model, built on the meta device, is filled shard by shard, tensor by tensor (memory-mapped,
converted to ``dtype`` on the way): peak memory is the model plus one tensor.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from vlafast.models.action_tokenizer import ActionStats, load_dataset_statistics, parse_dataset_statistics
from vlafast.models.checkpoint import (
    CheckpointError, expected_tensors, load_into, plan_load, read_config, read_index, safetensors_files,
)
from vlafast.models.llama import LlamaConfig
from vlafast.models.normalize import StatsError
from vlafast.models.openvla import OpenVLAConfig, OpenVLAPolicy, ViTConfig

SUPPORTED_BACKBONE = "dinosiglip-vit-so-224px"
_TOWERS = ("vision_backbone.featurizer.", "vision_backbone.fused_featurizer.")


def config_from_json(meta: dict) -> OpenVLAConfig:
    """``config.json`` of an OpenVLA checkpoint -> ``OpenVLAConfig`` (sizes of the published model;
    ``text_config`` entries override the Llama-2-7B defaults)."""
    backbone = meta.get("vision_backbone_id", SUPPORTED_BACKBONE)
    if backbone != SUPPORTED_BACKBONE:
        raise CheckpointError(f"vision_backbone_id {backbone!r} is not supported (only {SUPPORTED_BACKBONE!r}, "
                              "the openvla-7b featurizer); pass config=OpenVLAConfig(...) explicitly")
    if meta.get("use_fused_vision_backbone") is False:
        raise CheckpointError("use_fused_vision_backbone=false is not supported: OpenVLA-7B fuses DINOv2 + SigLIP")
    sizes = meta.get("image_sizes", [224, 224])
    text = meta.get("text_config") or {}
    base = LlamaConfig.llama2_7b()
    llm = LlamaConfig(
        width=int(text.get("hidden_size", base.width)), depth=int(text.get("num_hidden_layers", base.depth)),
        mlp_dim=int(text.get("intermediate_size", base.mlp_dim)),
        num_heads=int(text.get("num_attention_heads", base.num_heads)),
        num_kv_heads=int(text.get("num_key_value_heads", text.get("num_attention_heads", base.num_kv_heads))),
        vocab_size=int(text.get("vocab_size", base.vocab_size)), eps=float(text.get("rms_norm_eps", base.eps)),
        rope_theta=float(text.get("rope_theta", base.rope_theta)),
    )
    return OpenVLAConfig(
        ViTConfig.dinov2_l14_reg4(int(sizes[0])), ViTConfig.siglip_so400m_14(int(sizes[-1])), llm,
        pad_to_multiple_of=int(meta.get("pad_to_multiple_of", 64)), n_bins=int(meta.get("n_action_bins", 256)),
    )


def _rename_fn(cfg: OpenVLAConfig):
    skip = []
    for prefix, vit in zip(_TOWERS, (cfg.vision, cfg.fused_vision)):
        p = re.escape(prefix)
        skip.append(rf"{p}blocks\.{vit.depth - 1}\.")  # the last block: features come from the one before
        skip.append(rf"{p}(norm|fc_norm|attn_pool|head)\.")
    skip.append(r".*\.rotary_emb\.inv_freq$")
    skipped = re.compile("|".join(f"(?:{s})" for s in skip))

    def rename(key: str) -> str | None:
        if skipped.match(key):
            return None
        if key.startswith(_TOWERS) and key.endswith((".ls1.gamma", ".ls2.gamma")):
            return key[: -len("gamma")] + "scale_factor"  # timm's name; HF checkpoints say scale_factor
        return key

    return rename


def _stats(root: Path, meta: dict) -> dict[str, ActionStats]:
    file = root / "dataset_statistics.json"
    if file.is_file():
        return load_dataset_statistics(file)
    if meta.get("norm_stats"):
        return parse_dataset_statistics(meta["norm_stats"], where=f"{root / 'config.json'} norm_stats")
    raise StatsError(f"no action statistics: expected {file} (or norm_stats in config.json); OpenVLA "
                     "needs q01/q99 per unnorm_key to unnormalise its actions")


def load_openvla(
    path: str | os.PathLike,
    *,
    config: OpenVLAConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> OpenVLAPolicy:
    """Load an OpenVLA checkpoint folder into an ``OpenVLAPolicy`` (``dtype`` for every floating tensor).

    Raises one ``CheckpointError`` listing every key problem, or a ``StatsError`` when the
    dataset statistics are absent or malformed.
    """
    path = Path(path)
    root = path if path.is_dir() else path.parent
    meta_file = root / "config.json"
    meta = read_config(meta_file)
    if config is None and "vlafast_config" in meta:  # sizes other than the published ones (e.g. tiny test models)
        try:
            config = OpenVLAConfig.from_json(meta["vlafast_config"])
        except (TypeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{meta_file}: vlafast_config is not an OpenVLAConfig ({exc})") from None
    if config is None:
        if not meta:
            raise CheckpointError(f"no config.json in {root}: pass config=OpenVLAConfig.openvla_7b() (or your sizes)")
        config = config_from_json(meta)
    stats = _stats(root, meta)
    wrong = {k: s.action_dim for k, s in stats.items() if s.action_dim != config.action_dim}
    if wrong:
        raise StatsError(f"action statistics must have {config.action_dim} dims (the decoded tokens), got {wrong}")
    files = safetensors_files(path)
    index = read_index(files)
    with torch.device("meta"):
        policy = OpenVLAPolicy(config, stats)
    plan = plan_load(expected_tensors(policy), index, _rename_fn(config), what=f"OpenVLA checkpoint {path}")
    load_into(policy, files, plan, dtype=dtype, device=device)
    return policy.eval()
