"""Generic safetensors loading into a module: validate everything first, then load tensor by
tensor straight into place.

* Headers are read without touching tensor data (``safe_open`` + ``get_slice``), so a bad
  checkpoint fails fast with ONE ``CheckpointError`` listing every missing, unexpected,
  mis-shaped and wrongly-typed key (with expected shapes).
* Build the module on the ``meta`` device (``with torch.device("meta"): Model(cfg)``): no
  memory is allocated until each tensor is read (memory-mapped) and assigned, already
  converted, so peak memory is the model plus one tensor, never twice the model.
* dtype conversion is explicit: every floating tensor is converted to the ``dtype`` argument;
  a non-floating tensor where the module has a floating parameter is an error, not a cast.

Model-specific key layouts are handled by the caller's ``rename`` function (checkpoint key ->
module key, or None to skip the key), e.g. ``vlafast.models.load_pi0``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

log = logging.getLogger(__name__)

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


SHOWN = 5  # problems listed per kind; the rest are counted


class CheckpointError(ValueError):
    """A checkpoint does not fit the module; the message lists every problem at once."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name, e.g. "BF16"
    file: Path


def safetensors_files(path: str | os.PathLike) -> list[Path]:
    """``path`` = a .safetensors file, or a folder with ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``."""
    path = Path(path)
    if path.is_file():
        return [path]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    raise CheckpointError(f"no model.safetensors (or model.safetensors.index.json) in {path}")


def read_config(path: Path) -> dict:
    """A checkpoint's config.json ({} when absent); a malformed one is a CheckpointError naming
    the file and the place."""
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    return meta


def read_index(files: Iterable[Path]) -> dict[str, TensorInfo]:
    """Key -> (shape, dtype, file) for every tensor, from the headers only."""
    from safetensors import safe_open

    out: dict[str, TensorInfo] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    sl = fh.get_slice(key)
                    out[key] = TensorInfo(key, tuple(sl.get_shape()), sl.get_dtype(), Path(f))
        except Exception as exc:  # SafetensorError / OSError: a truncated, damaged or missing file
            raise CheckpointError(f"{f} is not a readable safetensors file ({exc}): it is damaged, truncated or "
                                  "not a checkpoint") from None
    return out


def read_tensors(files: Iterable[Path], keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read the named tensors (small ones: stats, buffers) from whichever file holds them."""
    from safetensors import safe_open

    want = set(keys)
    out: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in want.intersection(fh.keys()):
                out[key] = fh.get_tensor(key)
    return out


def expected_tensors(module: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Module key -> (shape, dtype) of every parameter and persistent buffer."""
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict(keep_vars=True).items()}


def plan_load(
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
    index: dict[str, TensorInfo],
    rename: Callable[[str], str | None] = lambda k: k,
    *,
    what: str = "checkpoint",
) -> dict[str, TensorInfo]:
    """Match checkpoint keys to module keys; raise one CheckpointError listing all problems.

    Returns module key -> TensorInfo. A key that ``rename`` maps to None is skipped.
    """
    plan: dict[str, TensorInfo] = {}
    unexpected: list[str] = []
    duplicate: list[str] = []
    for key, info in index.items():
        target = rename(key)
        if target is None:
            continue
        if target not in expected:
            unexpected.append(key if target == key else f"{key} (as {target})")
        elif target in plan:
            duplicate.append(f"{target} <- {plan[target].key} and {key}")
        else:
            plan[target] = info
    missing = [f"{k} {list(s)}" for k, (s, _) in expected.items() if k not in plan]
    shapes, dtypes = [], []
    for target, info in plan.items():
        shape, dtype = expected[target]
        if info.shape != shape:
            shapes.append(f"{info.key}: checkpoint {list(info.shape)}, expected {list(shape)}")
        src = _ST_DTYPES.get(info.dtype)
        if src is None or (dtype.is_floating_point and not src.is_floating_point):
            dtypes.append(f"{info.key}: checkpoint {info.dtype}, expected a floating type")
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("mis-shaped keys", shapes), ("wrong dtypes", dtypes), ("duplicate sources", duplicate)):
        if items:
            shown = sorted(items)[:SHOWN]
            more = [f"  ... and {len(items) - SHOWN} more"] if len(items) > SHOWN else []
            problems.append(f"{len(items)} {title}:\n" + "\n".join([f"  {i}" for i in shown] + more))
    if problems:
        raise CheckpointError(f"{what} does not match the model:\n" + "\n".join(problems))
    return plan


def all_finite(t: torch.Tensor, block: int = 1 << 20) -> bool:
    """No NaN / inf in ``t``, checked ``block`` elements at a time (the check's temporaries stay
    a few MB, so loading still peaks at the model plus one tensor)."""
    return all(bool(torch.isfinite(part).all()) for part in t.reshape(-1).split(block))


def _assign(module: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if attr in owner._parameters:
        old = owner._parameters[attr]
        owner._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None else True)
    else:
        owner._buffers[attr] = tensor


@torch.no_grad()
def load_into(
    module: nn.Module,
    files: Iterable[Path],
    plan: dict[str, TensorInfo],
    *,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> None:
    """Read each planned tensor (memory-mapped), convert to ``dtype`` on ``device`` and assign
    it in place of the module's (possibly meta) tensor. One tensor in flight at a time."""
    from safetensors import safe_open

    device = torch.device(device)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for target, info in plan.items():
        by_file.setdefault(info.file, []).append((target, info.key))
    converted = 0
    non_finite: list[str] = []
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as fh:
            for target, key in by_file.get(Path(f), []):
                t = fh.get_tensor(key)
                if t.is_floating_point() and t.dtype != dtype:
                    converted += 1
                    t = t.to(device=device, dtype=dtype)
                if t.is_floating_point() and not all_finite(t):
                    non_finite.append(key)
                _assign(module, target, t.to(device))
                del t
    if non_finite:
        more = f" and {len(non_finite) - SHOWN} more" if len(non_finite) > SHOWN else ""
        raise CheckpointError(f"{', '.join(sorted(non_finite)[:SHOWN])}{more} hold NaN / inf values: the checkpoint "
                              "is damaged (it would give NaN actions)")
    if converted:
        log.info("converted %d floating tensors to %s while loading", converted, dtype)
