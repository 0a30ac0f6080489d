"""``load_pi0fast``: pi0-FAST from a LeRobot or a PyTorch openpi checkpoint folder.

LeRobot (``"type": "pi0fast"``): ``config.json`` (``chunk_size``, ``max_action_dim``,
``max_state_dim``, ``fast_skip_tokens``, ``max_decoding_steps``, ``normalization_mapping``,
default MEAN_STD), ``model.safetensors`` with the transformers PaliGemma under
``model.pi0_paligemma.`` (either transformers naming: < 4.52 ``language_model.model.layers``,
``language_model.lm_head``, ``vision_tower.vision_model``, ``multi_modal_projector``; >= 4.52
``model.language_model.layers``, ``model.vision_tower``, ``lm_head``; transformers 5 drops
``vision_model.``), and the normaliser statistics as processor files
(``*normalizer_processor*.safetensors``) or legacy ``normalize_inputs.*`` buffers. LeRobot writes
the state's real dims into the prompt (``pad_state=False``).

openpi: its pi0_fast checkpoints are JAX / orbax; what loads here is a PyTorch conversion with
the transformers PaliGemma keys at top level (no ``model.pi0_paligemma.`` prefix, either naming)
plus ``assets/<id>/norm_stats.json``, normalised with quantiles as openpi does for every model
but pi0, the state zero-padded to 32 dims in the prompt (``pad_state=True``). Such a folder has no
chunk size: the default is 10 (openpi's LIBERO / DROID pi0-FAST configs); pass ``config=`` for
others. Either layout may carry ``vlafast_config`` in config.json (the exact ``Pi0FASTConfig``,
e.g. tiny test models). The tied LM head may stand in for the input embedding.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vlafast.models.checkpoint import (
    CheckpointError, TensorInfo, expected_tensors, load_into, plan_load, read_config, read_index,
    safetensors_files,
)
from vlafast.models.normalize import Normalizer
from vlafast.models.pi0_load import PALIGEMMA_RENAMES, lerobot_stats, openpi_stats
from vlafast.models.pi0fast import Pi0FASTConfig, Pi0FASTPolicy
from vlafast.models.siglip import SiglipConfig

_ROOT = "pi0_paligemma."
_LEROBOT_PREFIXES = ("model.pi0_paligemma.", "pi0_paligemma.")
_EMBED = _ROOT + "model.language_model.embed_tokens.weight"
_LM_HEAD = _ROOT + "lm_head.weight"
_STATS_PREFIXES = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")


def _canonical(key: str, lerobot: bool) -> str:
    """Checkpoint key -> module key (``pi0_paligemma.model...``); stats keys pass unchanged."""
    if key.startswith(_STATS_PREFIXES):
        return key
    if lerobot:
        for prefix in _LEROBOT_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        else:
            return key  # not PaliGemma: reported as unexpected
    for old, new in PALIGEMMA_RENAMES:
        if key.startswith(old):
            key = new + key[len(old):]
    return _ROOT + key


def _rename_fn(index: dict[str, TensorInfo], lerobot: bool):
    canon = {k: _canonical(k, lerobot) for k in index}
    has_embed = _EMBED in canon.values()

    def rename(key: str) -> str | None:
        c = canon[key]
        if c.startswith(_STATS_PREFIXES):
            return None  # normaliser buffers: read by the stats loader
        if c == _LM_HEAD:
            return None if has_embed else _EMBED  # tied with the input embedding
        return c

    return rename


def _lerobot_config(meta: dict) -> Pi0FASTConfig:
    res = meta.get("resize_imgs_with_padding") or [224, 224]
    return Pi0FASTConfig.pi0fast(
        vision=SiglipConfig.so400m_14(image_size=int(res[0])),
        action_dim=int(meta.get("max_action_dim", 32)), state_dim=int(meta.get("max_state_dim", 32)), pad_state=False,
        horizon=int(meta.get("chunk_size", 10)), max_decoding_steps=int(meta.get("max_decoding_steps", 256)),
        fast_skip_tokens=int(meta.get("fast_skip_tokens", 128)),
    )


def load_pi0fast(
    path: str | os.PathLike,
    *,
    config: Pi0FASTConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    asset_id: str | None = None,
    stats: Normalizer | None = None,
) -> Pi0FASTPolicy:
    """Load a pi0-FAST checkpoint folder (LeRobot or PyTorch openpi layout) into a ``Pi0FASTPolicy``.

    ``config`` defaults to config.json's ``vlafast_config``, else the published sizes (LeRobot:
    chunk size and dims from config.json); every floating tensor becomes ``dtype``. ``asset_id``
    picks one of several openpi ``assets/<id>/norm_stats.json``; ``stats`` replaces the
    checkpoint's normaliser. Raises one ``CheckpointError`` listing all missing / unexpected /
    mis-shaped / mistyped keys, or a ``StatsError`` when the statistics are absent or not finite.
    """
    path = Path(path)
    files = safetensors_files(path)
    index = read_index(files)
    meta_file = path / "config.json" if path.is_dir() else path.parent / "config.json"
    meta = read_config(meta_file)
    root = meta_file.parent
    if meta.get("type") not in (None, "pi0fast"):
        raise CheckpointError(f"{meta_file} describes a {meta['type']!r} policy, not pi0fast: load it with its own "
                              "loader (vlafast.policies.load detects the format)")
    lerobot = meta.get("type") == "pi0fast" or any(k.startswith(_LEROBOT_PREFIXES) for k in index)
    layout = "lerobot" if lerobot else "openpi"
    if config is None and "vlafast_config" in meta:
        try:
            config = Pi0FASTConfig.from_json(meta["vlafast_config"])
        except (TypeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{meta_file}: vlafast_config is not a Pi0FASTConfig ({exc})") from None
    if config is None:
        config = _lerobot_config(meta) if lerobot else Pi0FASTConfig.pi0fast()
    if stats is not None:
        normalizer = stats
    elif lerobot:
        normalizer = lerobot_stats(root, files, {k: k for k in index if k.startswith(_STATS_PREFIXES)}, meta, "MEAN_STD")
    else:
        normalizer = openpi_stats(root, asset_id, quantile=True)
    normalizer.check_finite(f"normaliser statistics of {path} (pass stats=Normalizer(...) to supply them)")
    with torch.device("meta"):
        policy = Pi0FASTPolicy(config, normalizer.to(device))
    plan = plan_load(expected_tensors(policy), index, _rename_fn(index, lerobot), what=f"{layout} checkpoint {path}")
    load_into(policy, files, plan, dtype=dtype, device=device)
    return policy.eval()


__all__ = ["load_pi0fast"]
