"""``load`` / ``save``: every supported checkpoint format into the same kind of policy object.

Formats ``load`` reads (``detect_format`` says which a path is):

* ``vlafast``: a folder written by ``save`` (``vlafast train``'s ``<run>/policy/``, or the
  run folder itself): ``policy.json`` (the ``PolicySpec``), ``model.safetensors`` (model
  weights, the RL heads under ``critic.`` / ``noise_head.``, the normaliser's statistics
  under ``normalizer.``) and ``tokenizer.json``; a pi0-FAST also its FAST codec in
  ``fast_tokenizer/`` (the codec's own saved layout, ``FASTTokenizer.save``);
* ``lerobot``: a LeRobot pi0 / pi0.5 / pi0-FAST folder (``config.json`` with ``"type": "pi0" |
  "pi05" | "pi0fast"``);
* ``openpi``: an openpi PyTorch pi0 / pi0.5 / pi0-FAST folder (``model.safetensors`` +
  ``assets/``); pi0-FAST is told from pi0 by its keys: the transformers PaliGemma at top level
  (``language_model.`` / ``model.language_model.``...) where pi0 has ``paligemma_with_expert.``;
* ``openvla``: a Hugging Face OpenVLA folder (``config.json`` with ``vision_backbone_id``).

Nothing is unpickled: weights are safetensors, everything else JSON. A ``policy.pt`` from an
older vlafast is refused with the command that converts it once.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch

from vlafast._io import atomic_path, atomic_write_text
from vlafast.models.checkpoint import CheckpointError
from vlafast.policies.base import PolicyError
from vlafast.policies.processors import (
    MAX_TOKENS, OpenVLAProcessor, Pi0Processor, ProcessorConfig, PromptTokenizer, as_prompt_tokenizer,
)
from vlafast.policies.spec import PolicySpec

SPEC_FILE, WEIGHTS_FILE, TOKENIZER_FILE = "policy.json", "model.safetensors", "tokenizer.json"
FAST_DIR = "fast_tokenizer"
FORMATS = ("vlafast", "lerobot", "openpi", "openvla")
EXEC_HORIZON = 5  # openpi's LIBERO example replans every 5 actions


def _policy_dir(path: Path) -> Path | None:
    """The folder holding policy.json: ``path`` itself or its ``policy/`` (a run folder)."""
    for d in (path, path / "policy"):
        if (d / SPEC_FILE).is_file():
            return d
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PolicyError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except OSError as exc:
        raise PolicyError(f"cannot read {path}: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise PolicyError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def detect_format(path: str | os.PathLike) -> str:
    """Which of ``FORMATS`` the checkpoint at ``path`` is; a PolicyError says what was found."""
    path = Path(path)
    if not path.exists():
        raise PolicyError(f"no checkpoint at {path}: pass a vlafast run folder, a LeRobot or openpi pi0 / pi0.5 "
                          "folder, or a Hugging Face OpenVLA folder")
    if path.is_file() and path.suffix == ".pt":
        raise PolicyError(f"{path} is a policy.pt from an older vlafast (a pickle, which is never loaded from a user's "
                          f"path): convert it once with `vlafast convert {path} <folder>`, then pass the folder")
    if path.is_file():
        raise PolicyError(f"{path} is a file; a policy is a folder (policy.json + model.safetensors, a LeRobot / "
                          "openpi pi0 folder, or a Hugging Face OpenVLA folder)")
    if _policy_dir(path) is not None:
        return "vlafast"
    meta = _read_json(path / "config.json") if (path / "config.json").is_file() else {}
    if meta.get("type") in ("pi0", "pi05", "pi0fast"):
        return "lerobot"
    if "type" in meta and "vision_backbone_id" not in meta:
        raise PolicyError(f"{path / 'config.json'}: type {meta['type']!r} is not a supported policy (LeRobot folders "
                          "say 'pi0', 'pi05' or 'pi0fast')")
    if "vision_backbone_id" in meta or "openvla" in str(meta.get("model_type", "")).lower():
        return "openvla"
    if (path / "assets").is_dir() and ((path / WEIGHTS_FILE).is_file() or (path / "model.safetensors.index.json").is_file()):
        return "openpi"
    found = sorted(p.name for p in path.iterdir())[:8]
    raise PolicyError(f"{path} is not a policy folder: expected policy.json (vlafast), config.json with type pi0 / pi05 / pi0fast "
                      f"(LeRobot), model.safetensors + assets/ (openpi) or config.json with vision_backbone_id "
                      f"(OpenVLA); found {found or 'nothing'}")


def _default_device(device: str | torch.device | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _tokenizer_for(path: Path, tokenizer: Any, what: str) -> PromptTokenizer:
    if tokenizer is not None:
        return as_prompt_tokenizer(tokenizer)
    beside = path / TOKENIZER_FILE
    if beside.is_file():
        return PromptTokenizer(beside)
    raise PolicyError(f"{path} has no {TOKENIZER_FILE}: pass tokenizer= (--tokenizer) with {what}")


def load(path: str | os.PathLike, tokenizer: Any = None, *, device: str | torch.device | None = None,
         dtype: torch.dtype | None = None, exec_horizon: int | None = None, unnorm_key: str | None = None,
         fast_tokenizer: str | os.PathLike | None = None):
    """The policy stored at ``path`` (any of ``FORMATS``), on ``device`` (default: CUDA when
    available) in ``dtype`` (default: bf16 on CUDA for published checkpoints, fp32 otherwise).

    ``tokenizer``: a tokenizer.json / sentencepiece .model path or a ``tokenizers.Tokenizer``
    (default: the folder's own tokenizer.json). ``exec_horizon``: actions executed per chunk
    (default: the saved one; 5 for published pi0 / pi0.5). ``unnorm_key``: OpenVLA's dataset
    statistics to unnormalise with. ``fast_tokenizer``: pi0-FAST's FAST processor folder
    (default: the checkpoint's own ``fast_tokenizer/``; LeRobot and openpi checkpoints name the
    hub's ``physical-intelligence/fast`` instead of shipping it: pass a local copy)."""
    path = Path(path)
    fmt = detect_format(path)
    device = _default_device(device)
    if fmt == "vlafast":
        return _load_vlafast(_policy_dir(path), tokenizer, device, dtype, exec_horizon, fast_tokenizer)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if fmt == "openvla":
        return _load_openvla(path, tokenizer, device, dtype, unnorm_key)
    if is_pi0fast(path, fmt):
        return _load_pi0fast(path, fmt, tokenizer, device, dtype, exec_horizon, fast_tokenizer)
    return _load_pi0(path, fmt, tokenizer, device, dtype, exec_horizon)


def is_pi0fast(path: Path, fmt: str) -> bool:
    """A LeRobot folder says its type; an openpi pi0-FAST has the transformers PaliGemma keys at
    top level, where pi0 / pi0.5 nest them under ``paligemma_with_expert.``."""
    if fmt == "lerobot":
        return _read_json(path / "config.json").get("type") == "pi0fast"
    from vlafast.models.checkpoint import read_index, safetensors_files

    try:
        keys = read_index(safetensors_files(path))
    except CheckpointError as exc:
        raise PolicyError(str(exc)) from None
    return not any(k.startswith(("paligemma_with_expert.", "model.paligemma_with_expert.")) for k in keys)


def _fast_codec(path: Path, fast_tokenizer: str | os.PathLike | None, where: Path):
    """The FAST codec: ``fast_tokenizer`` (a FAST processor folder) or ``path``'s own
    ``fast_tokenizer/``; a PolicyError names what to pass when there is neither."""
    from vlafast.models.fast_tokenizer import FASTTokenizer

    folder = Path(fast_tokenizer) if fast_tokenizer is not None else path / FAST_DIR
    if fast_tokenizer is None and not folder.is_dir():
        named = _read_json(path / "config.json").get("fast_tokenizer") if (path / "config.json").is_file() else None
        hint = f" (its config.json names {named!r}: pass a local copy)" if isinstance(named, str) else ""
        raise PolicyError(f"{where} has no {FAST_DIR}/ FAST processor folder{hint}: pass fast_tokenizer= "
                          "(--fast-tokenizer) with the folder of the FAST tokenizer it was trained with")
    try:
        return FASTTokenizer.load(folder)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise PolicyError(f"{folder} is not a FAST processor folder: {exc}") from None


def _load_pi0(path: Path, fmt: str, tokenizer: Any, device: torch.device, dtype: torch.dtype,
              exec_horizon: int | None):
    from vlafast.models.pi0_load import load_pi0
    from vlafast.policies.flow import FlowPolicy

    tok = _tokenizer_for(path, tokenizer, "PaliGemma's tokenizer.json or paligemma_tokenizer.model")
    model = load_pi0(path, dtype=dtype, device=device)
    family = model.cfg.variant
    spec = PolicySpec(family=family, model=model.cfg.to_json(),
                      processor=ProcessorConfig(prompt="paligemma", max_tokens=MAX_TOKENS[family]),
                      exec_horizon=min(exec_horizon or EXEC_HORIZON, model.cfg.horizon), source=f"{fmt}:{path}")
    return FlowPolicy(model, Pi0Processor(model, tok, spec.processor), spec, critic=False)


def _load_pi0fast(path: Path, fmt: str, tokenizer: Any, device: torch.device, dtype: torch.dtype,
                  exec_horizon: int | None, fast_tokenizer: str | os.PathLike | None):
    from vlafast.models.pi0fast_load import load_pi0fast
    from vlafast.policies.fast import MAX_TOKENS as FAST_MAX_TOKENS, FASTPolicy, FASTProcessor

    tok = _tokenizer_for(path, tokenizer, "PaliGemma's tokenizer.json or paligemma_tokenizer.model")
    fast = _fast_codec(path, fast_tokenizer, path)
    try:
        model = load_pi0fast(path, dtype=dtype, device=device)
    except CheckpointError as exc:
        raise PolicyError(str(exc)) from None
    spec = PolicySpec(family="pi0fast", model=model.cfg.to_json(),
                      processor=ProcessorConfig(prompt="paligemma", max_tokens=FAST_MAX_TOKENS),
                      exec_horizon=min(exec_horizon or EXEC_HORIZON, model.cfg.horizon), source=f"{fmt}:{path}")
    return FASTPolicy(model, FASTProcessor(model, tok, spec.processor), spec, fast, critic=False)


def _load_openvla(path: Path, tokenizer: Any, device: torch.device, dtype: torch.dtype, unnorm_key: str | None):
    from vlafast.models.openvla_load import load_openvla
    from vlafast.policies.openvla import OpenVLAChunkPolicy

    tok = _tokenizer_for(path, tokenizer, "the checkpoint's Llama-2 tokenizer.json")
    model = load_openvla(path, dtype=dtype, device=device)
    spec = PolicySpec(family="openvla", model=dataclasses.asdict(model.cfg), exec_horizon=1, action_space="ee_delta",
                      source=f"openvla:{path}")
    return OpenVLAChunkPolicy(model, OpenVLAProcessor(model, tok), spec, unnorm_key=unnorm_key)


# -- the vlafast format ----------------------------------------------------------------------------

_NORM = "normalizer."


def _normalizer_tensors(norm) -> dict[str, torch.Tensor]:
    out = {}
    for feat in ("state", "actions"):
        st = getattr(norm, feat)
        for f in dataclasses.fields(st):
            t = getattr(st, f.name)
            if t is not None:
                out[f"{_NORM}{feat}.{f.name}"] = t.detach().to("cpu", torch.float32, copy=True).contiguous()
    return out


def _normalizer_from(meta: dict[str, Any], tensors: dict[str, torch.Tensor]):
    from vlafast.models.normalize import FeatureStats, Normalizer

    def feat(name: str) -> FeatureStats:
        return FeatureStats(*(tensors.get(f"{_NORM}{name}.{f.name}") for f in dataclasses.fields(FeatureStats)))

    return Normalizer(feat("state"), feat("actions"), meta["state_mode"], meta["action_mode"], meta["convention"])


def save(policy, folder: str | os.PathLike) -> Path:
    """Write ``policy`` (a ``FlowPolicy`` or ``FASTPolicy``) as ``folder/policy.json`` +
    ``model.safetensors`` + ``tokenizer.json`` (+ ``fast_tokenizer/`` for pi0-FAST), each file
    written to a temporary file, fsynced and renamed into place; an OpenVLA policy as the
    Hugging Face folder ``load`` reads (``policies.openvla.save_openvla``)."""
    from safetensors.torch import save_file

    from vlafast.policies.fast import FASTPolicy
    from vlafast.policies.flow import FlowPolicy
    from vlafast.policies.openvla import OpenVLAChunkPolicy, save_openvla

    if isinstance(policy, OpenVLAChunkPolicy):
        return save_openvla(policy, folder)
    if not isinstance(policy, (FlowPolicy, FASTPolicy)):
        raise PolicyError(f"save writes flow policies (pi0 / pi0.5) and pi0-FAST; got {type(policy).__name__}")
    fast = getattr(policy, "fast", None)
    if isinstance(policy, FASTPolicy) and fast is None:
        raise PolicyError("this pi0-FAST has no FAST codec to save with it: fit it (fit_codec) or load one first")
    hf = policy.tokenizer.hf
    if hf is None:
        raise PolicyError("save needs a tokenizers (tokenizer.json) tokenizer; this policy has a sentencepiece model: "
                          "convert it to tokenizer.json first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = policy.spec
    # one CPU copy per key (safetensors refuses tensors that share storage, e.g. tied weights)
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in policy.state_dict().items()}
    meta: dict[str, Any] = {}
    norm = policy.model.normalizer
    if norm is not None:
        tensors.update(_normalizer_tensors(norm))
        meta["normalizer"] = json.dumps({"state_mode": norm.state_mode, "action_mode": norm.action_mode,
                                         "convention": norm.convention})
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata=meta or None)
    with atomic_path(folder / TOKENIZER_FILE) as tmp:
        hf.save(str(tmp))
    if fast is not None:
        fast.save(folder / FAST_DIR)
    atomic_write_text(folder / SPEC_FILE, json.dumps(spec.to_json(), indent=1) + "\n")
    return folder


def _load_vlafast(folder: Path, tokenizer: Any, device: torch.device, dtype: torch.dtype | None,
                  exec_horizon: int | None, fast_tokenizer: str | os.PathLike | None = None):
    from safetensors import SafetensorError, safe_open

    from vlafast.flow.noise_head import NoiseHead
    from vlafast.models.pi0 import Pi0Config, Pi0Policy
    from vlafast.models.pi0fast import Pi0FASTConfig, Pi0FASTPolicy
    from vlafast.policies.fast import FASTPolicy, FASTProcessor
    from vlafast.policies.flow import FlowPolicy

    spec_file = folder / SPEC_FILE
    try:
        spec = PolicySpec.from_json(_read_json(spec_file), where=str(spec_file))
    except ValueError as exc:
        raise PolicyError(str(exc)) from None
    if spec.family == "openvla":
        raise PolicyError(f"{spec_file}: OpenVLA runs are loaded from their Hugging Face folder")
    if exec_horizon is not None:
        spec = dataclasses.replace(spec, exec_horizon=exec_horizon)
    fast = _fast_codec(folder, fast_tokenizer, folder) if spec.family == "pi0fast" else None
    try:
        cfg = Pi0FASTConfig.from_json(spec.model) if fast is not None else Pi0Config.from_json(spec.model)
    except (TypeError, KeyError, ValueError) as exc:
        what = "pi0-FAST" if fast is not None else "pi0"
        raise PolicyError(f"{spec_file}: model is not a {what} config ({exc})") from None
    weights = folder / WEIGHTS_FILE
    try:
        with safe_open(str(weights), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
            meta = fh.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise PolicyError(f"{weights} cannot be read as safetensors ({exc}): the file is damaged or truncated") from None
    normalizer = None
    if "normalizer" in meta:
        normalizer = _normalizer_from(json.loads(meta["normalizer"]), tensors)
        tensors = {k: v for k, v in tensors.items() if not k.startswith(_NORM)}
    tok = _tokenizer_for(folder, tokenizer, "the policy's tokenizer")
    norm = None if normalizer is None else normalizer.to(device)
    if fast is not None:
        model = Pi0FASTPolicy(cfg, norm)
        try:
            policy = FASTPolicy(model, FASTProcessor(model, tok, spec.processor), spec, fast,
                                critic="critic" in spec.heads)
        except ValueError as exc:
            raise PolicyError(f"{folder}: {exc}") from None
    else:
        model = Pi0Policy(cfg, norm)
        noise_head = NoiseHead(cfg.expert.width, cfg.action_dim) if "noise_head" in spec.heads else None
        policy = FlowPolicy(model, Pi0Processor(model, tok, spec.processor), spec, noise_head=noise_head,
                            critic="critic" in spec.heads)
    check_finite(tensors, weights)
    try:
        policy.load_state_dict(tensors)
    except RuntimeError as exc:
        lines = [l.strip() for l in str(exc).splitlines() if l.strip()][1:]
        more = f" (and {len(lines) - 3} more)" if len(lines) > 3 else ""
        raise PolicyError(f"{weights} does not match {spec_file}: " + "; ".join(lines[:3]) + more) from None
    if dtype is not None:
        policy.model.to(dtype)
    return policy.to(device)


def check_finite(tensors: dict[str, torch.Tensor], where: Path) -> None:
    """Refuse NaN / inf weights (they would give NaN actions): name the first few tensors."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise PolicyError(f"{where} holds NaN / inf in {', '.join(sorted(bad)[:3])}{more}")


__all__ = ["FORMATS", "check_finite", "detect_format", "load", "save"]
