"""``load_pi0``: pi0 / pi0.5 from a LeRobot or an openpi PyTorch checkpoint folder.

LeRobot: ``config.json`` (``"type": "pi0" | "pi05"``, ``chunk_size``, ``max_action_dim``,
``normalization_mapping``...), ``model.safetensors`` (keys ``model.paligemma_with_expert...``
or without the ``model.`` prefix) and the normaliser stats
(``policy_preprocessor_step_*_normalizer_processor.safetensors`` /
``policy_postprocessor_step_*_unnormalizer_processor.safetensors``, or legacy
``normalize_inputs.*`` buffers inside ``model.safetensors``).

openpi PyTorch: ``model.safetensors`` (keys ``paligemma_with_expert...``, ``time_mlp_in`` for
pi0.5) and ``assets/<id>/norm_stats.json`` (quantile for pi0.5, mean/std for pi0).

Also accepted: the pre-4.52 transformers layout (``paligemma.language_model.model.layers``), the
transformers-5 SigLIP layout (no ``vision_model.`` level),
``time_mlp_*`` names in a pi0 checkpoint (LeRobot renames them), a tied ``lm_head`` in place
of ``embed_tokens``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vlafast.models.checkpoint import (
    CheckpointError, TensorInfo, expected_tensors, load_into, plan_load, read_config, read_index, read_tensors,
    safetensors_files,
)
from vlafast.models.gemma import GemmaConfig
from vlafast.models.normalize import LEROBOT_MODES, Normalizer, StatsError
from vlafast.models.pi0 import Pi0Config, Pi0Policy
from vlafast.models.siglip import SiglipConfig

_PG = "paligemma_with_expert.paligemma."
# transformers' PaliGemma keys, older or newer naming -> the newer (>= 4.52) names this package's modules carry;
# shared with pi0-FAST, whose PaliGemma sits under another prefix
PALIGEMMA_RENAMES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    # transformers >= 5 drops the `vision_model.` level of the SigLIP tower
    ("model.vision_tower.embeddings.", "model.vision_tower.vision_model.embeddings."),
    ("model.vision_tower.encoder.", "model.vision_tower.vision_model.encoder."),
    ("model.vision_tower.post_layernorm.", "model.vision_tower.vision_model.post_layernorm."),
)
_LEGACY = tuple((_PG + old, _PG + new) for old, new in PALIGEMMA_RENAMES)
_EMBED = _PG + "model.language_model.embed_tokens.weight"
_LM_HEAD = _PG + "lm_head.weight"
_STATS_PREFIXES = ("normalize_inputs.", "normalize_targets.", "unnormalize_outputs.")
_VARIANTS = {"gemma_2b": GemmaConfig.gemma_2b, "gemma_300m": GemmaConfig.gemma_300m}


def _canonical(key: str, pi05: bool) -> str:
    if key.startswith("model."):
        key = key[len("model."):]
    for old, new in _LEGACY:
        if key.startswith(old):
            key = new + key[len(old):]
    if not pi05 and key.startswith("time_mlp_"):
        key = "action_" + key
    return key


def _rename_fn(index: dict[str, TensorInfo], pi05: bool):
    canon = {k: _canonical(k, pi05) for k in index}
    has_embed = _EMBED in canon.values()

    def rename(key: str) -> str | None:
        c = canon[key]
        if c.startswith(_STATS_PREFIXES):
            return None  # normaliser buffers: read by the stats loader
        if c == _LM_HEAD:
            return None if has_embed else _EMBED  # tied with the input embedding
        if c.startswith("paligemma_with_expert.gemma_expert.") and (".lm_head." in c or ".embed_tokens." in c):
            return None  # the expert has no vocabulary use
        return c

    return rename


def _lerobot_config(meta: dict, pi05: bool) -> Pi0Config:
    try:
        vlm = _VARIANTS[meta.get("paligemma_variant", "gemma_2b")]()
        expert = _VARIANTS[meta.get("action_expert_variant", "gemma_300m")]()
    except KeyError as exc:
        raise CheckpointError(f"unknown Gemma variant {exc} in config.json; known: {sorted(_VARIANTS)}; "
                              "pass config=Pi0Config(...) explicitly") from None
    res = meta.get("image_resolution", [224, 224])
    return Pi0Config(
        vision=SiglipConfig.so400m_14(image_size=int(res[0])), vlm=vlm, expert=expert, variant="pi05" if pi05 else "pi0",
        action_dim=int(meta.get("max_action_dim", 32)), state_dim=int(meta.get("max_state_dim", 32)),
        horizon=int(meta.get("chunk_size", 50)), num_steps=int(meta.get("num_inference_steps", 10)),
        min_period=float(meta.get("min_period", 4e-3)), max_period=float(meta.get("max_period", 4.0)),
    )


def lerobot_stats(path: Path, files: list[Path], legacy: dict[str, str], meta: dict, default: str) -> Normalizer:
    """A LeRobot folder's normaliser: modes from config.json's ``normalization_mapping`` (``default``
    where it is silent), statistics from the ``*normalizer_processor*.safetensors`` files and the
    legacy buffers ``legacy`` ({key in ``files``: its ``normalize_inputs.*`` name}) of the weights."""
    mapping = meta.get("normalization_mapping") or {}
    try:
        state_mode = LEROBOT_MODES[mapping.get("STATE", default)]
        action_mode = LEROBOT_MODES[mapping.get("ACTION", default)]
    except KeyError as exc:
        raise CheckpointError(f"unsupported normalization mode {exc} in {path / 'config.json'}; "
                              f"supported: {sorted(LEROBOT_MODES)}") from None
    tensors = {}
    for f in sorted(path.glob("*normalizer_processor*.safetensors")):
        tensors.update(read_tensors([f], read_index([f])))
    tensors.update({legacy[k]: v for k, v in read_tensors(files, list(legacy)).items()})
    if not tensors and (state_mode, action_mode) != ("identity", "identity"):
        raise StatsError(f"no normaliser statistics in {path}: looked for *normalizer_processor*.safetensors "
                         "(LeRobot processors) and normalize_inputs.* buffers in model.safetensors")
    return Normalizer.from_lerobot(tensors, state_mode=state_mode, action_mode=action_mode)


def openpi_stats(path: Path, asset_id: str | None, *, quantile: bool) -> Normalizer:
    """An openpi folder's normaliser: ``assets/<asset_id>/norm_stats.json`` (the only one when
    ``asset_id`` is None); asset ids may be nested (assets/physical-intelligence/libero/...)."""
    found = sorted(p.parent.relative_to(path / "assets").as_posix() for p in (path / "assets").rglob("norm_stats.json"))
    if asset_id is None:
        if len(found) != 1:
            where = f"assets/<id>/norm_stats.json under {path}"
            raise StatsError(f"no normaliser statistics: expected {where}" if not found else
                             f"several norm stats {found} under {path / 'assets'}: pass asset_id=")
        asset_id = found[0]
    stats = path / "assets" / asset_id / "norm_stats.json"
    if not stats.is_file():
        raise StatsError(f"no {stats} (available asset ids: {found})")
    return Normalizer.from_openpi(stats, quantile=quantile)


def load_pi0(
    path: str | os.PathLike,
    *,
    config: Pi0Config | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    asset_id: str | None = None,
    stats: Normalizer | None = None,
) -> Pi0Policy:
    """Load a pi0 / pi0.5 checkpoint folder (LeRobot or openpi layout) into a ``Pi0Policy``.

    ``config`` defaults to the published sizes (LeRobot: from config.json; openpi: pi0 or
    pi0.5 by the keys present); every floating tensor is converted to ``dtype``. ``asset_id``
    picks one of several openpi ``assets/<id>/norm_stats.json``; ``stats`` replaces the
    checkpoint's normaliser (base checkpoints ship none; a new robot needs its own). Raises
    one ``CheckpointError`` listing all missing / unexpected / mis-shaped / mistyped keys, or
    when the normaliser statistics are absent or unset (non-finite). Peak memory: the model
    plus one tensor.
    """
    path = Path(path)
    files = safetensors_files(path)
    index = read_index(files)
    meta_file = path / "config.json" if path.is_dir() else path.parent / "config.json"
    meta = read_config(meta_file)
    root = meta_file.parent
    if meta.get("type") in ("pi0", "pi05"):
        layout, pi05 = "lerobot", meta["type"] == "pi05"
    elif "type" in meta:
        raise CheckpointError(f"{meta_file}: type {meta['type']!r} is not a pi0 model (LeRobot writes 'pi0' or 'pi05')")
    else:
        canon = {_canonical(k, True) for k in index}
        layout, pi05 = "openpi", "time_mlp_in.weight" in canon and "state_proj.weight" not in canon
    if config is None and "vlafast_config" in meta:  # sizes other than the published ones (e.g. tiny test models)
        try:
            config = Pi0Config.from_json(meta["vlafast_config"])
        except (TypeError, KeyError, ValueError) as exc:
            raise CheckpointError(f"{meta_file}: vlafast_config is not a Pi0Config ({exc})") from None
    if config is None:
        config = _lerobot_config(meta, pi05) if layout == "lerobot" else (Pi0Config.pi05() if pi05 else Pi0Config.pi0())
    elif config.is_pi05 != pi05:
        raise CheckpointError(f"{path} holds a {'pi0.5' if pi05 else 'pi0'} checkpoint ({layout} layout) "
                              f"but config.variant={config.variant!r}")
    if stats is not None:
        normalizer = stats
    elif layout == "lerobot":
        legacy = {k: c for k in index if (c := _canonical(k, pi05)).startswith(_STATS_PREFIXES)}
        normalizer = lerobot_stats(root, files, legacy, meta, "QUANTILES" if pi05 else "MEAN_STD")
    else:
        normalizer = openpi_stats(root, asset_id, quantile=pi05)
    normalizer.check_finite(f"normaliser statistics of {path} (pass stats=Normalizer(...) to supply them)")
    with torch.device("meta"):
        policy = Pi0Policy(config, normalizer.to(device))
    plan = plan_load(expected_tensors(policy), index, _rename_fn(index, pi05), what=f"{layout} checkpoint {path}")
    load_into(policy, files, plan, dtype=dtype, device=device)
    return policy.eval()
