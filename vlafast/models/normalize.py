"""Input/output normalisation for flow policies: mean/std and quantile, in the two stats
layouts pi0 checkpoints ship with.

* openpi: ``assets/<id>/norm_stats.json`` = ``{"norm_stats": {"state": {"mean", "std", "q01",
  "q99"}, "actions": {...}}}``. mean/std: ``(x - mean) / (std + 1e-6)``; quantile:
  ``(x - q01) / (q99 - q01 + 1e-6) * 2 - 1``.
* LeRobot: safetensors with ``observation.state.mean`` / ``action.q01`` ... (processor files
  ``policy_preprocessor_step_*_normalizer_processor.safetensors`` and the unnormaliser, or
  legacy ``normalize_inputs.buffer_observation_state.mean`` buffers in ``model.safetensors``).
  MEAN_STD: ``(x - mean) / (std + 1e-8)`` (inverse ``x * std + mean``); QUANTILES: ``2 (x - q01) / (q99 - q01) - 1`` with a
  zero span replaced by 1e-8.

Axes: B batch, T horizon, A action dim, S state dim.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from vlafast.models.checkpoint import CheckpointError

Mode = Literal["identity", "mean_std", "quantile"]
Convention = Literal["openpi", "lerobot"]
MODES: tuple[Mode, ...] = ("identity", "mean_std", "quantile")
_EPS = {"openpi": 1e-6, "lerobot": 1e-8}


class StatsError(CheckpointError):
    """Normaliser statistics are absent or malformed."""


@dataclasses.dataclass(frozen=True)
class FeatureStats:
    """Per-dimension statistics of one feature; any may be None when the file lacks it."""

    mean: Tensor | None = None
    std: Tensor | None = None
    q01: Tensor | None = None
    q99: Tensor | None = None

    @classmethod
    def from_mapping(cls, m: dict) -> "FeatureStats":
        def get(name: str) -> Tensor | None:
            v = m.get(name)
            return None if v is None else torch.as_tensor(v, dtype=torch.float32).reshape(-1)

        return cls(mean=get("mean"), std=get("std"), q01=get("q01"), q99=get("q99"))

    @property
    def dim(self) -> int:
        for t in (self.mean, self.q01, self.std, self.q99):
            if t is not None:
                return t.shape[0]
        return 0


def _transform(x: Tensor, st: FeatureStats, mode: Mode, conv: Convention, name: str, inverse: bool) -> Tensor:
    if mode == "identity":
        return x
    need = ("mean", "std") if mode == "mean_std" else ("q01", "q99")
    vals = [getattr(st, n) for n in need]
    if any(v is None for v in vals):
        raise StatsError(f"{mode} normalisation of {name!r} needs stats {need}; the checkpoint has "
                         f"{[f.name for f in dataclasses.fields(st) if getattr(st, f.name) is not None]}")
    d = x.shape[-1]
    if vals[0].shape[0] < d:
        raise StatsError(f"{name!r} has {d} dims but its stats only {vals[0].shape[0]}")
    a, b = (v[:d].to(device=x.device, dtype=torch.float32) for v in vals)
    eps = _EPS[conv]
    xf = x.float()
    if mode == "mean_std":
        # LeRobot 0.4's inverse uses std without eps; openpi uses std + eps both ways.
        y = xf * (b + (eps if conv == "openpi" else 0.0)) + a if inverse else (xf - a) / (b + eps)
    else:
        span = b - a
        span = span + eps if conv == "openpi" else torch.where(span == 0, torch.full_like(span, eps), span)
        y = (xf + 1.0) * 0.5 * span + a if inverse else (xf - a) / span * 2.0 - 1.0
    return y.to(x.dtype)


@dataclasses.dataclass(frozen=True)
class Normalizer:
    """Normalises the state going in and unnormalises the actions coming out."""

    state: FeatureStats
    actions: FeatureStats
    state_mode: Mode
    action_mode: Mode
    convention: Convention

    def __post_init__(self) -> None:
        for m in (self.state_mode, self.action_mode):
            if m not in MODES:
                raise ValueError(f"normalisation mode must be one of {MODES}, got {m!r}")
        if self.convention not in _EPS:
            raise ValueError(f"convention must be 'openpi' or 'lerobot', got {self.convention!r}")

    def check_finite(self, what: str) -> None:
        """Raise StatsError when a statistic the modes use is NaN or inf (LeRobot stores inf
        in checkpoints trained without dataset stats)."""
        bad = []
        for name, st, mode in (("state", self.state, self.state_mode), ("actions", self.actions, self.action_mode)):
            need = () if mode == "identity" else ("mean", "std") if mode == "mean_std" else ("q01", "q99")
            bad += [f"{name}.{n}" for n in need if getattr(st, n) is not None and not torch.isfinite(getattr(st, n)).all()]
        if bad:
            raise StatsError(f"{what}: non-finite {bad}")

    def to(self, device: torch.device | str) -> "Normalizer":
        """A copy with the stats on ``device`` (keeps the hot path free of host copies)."""
        def mv(st: FeatureStats) -> FeatureStats:
            return FeatureStats(*(None if getattr(st, f.name) is None else getattr(st, f.name).to(device)
                                  for f in dataclasses.fields(st)))
        return dataclasses.replace(self, state=mv(self.state), actions=mv(self.actions))

    @property
    def action_dim(self) -> int:
        """Real (unpadded) action dimension, from the action stats."""
        return self.actions.dim

    def normalize_state(self, state: Tensor) -> Tensor:
        """state: [B, S] raw -> normalised."""
        return _transform(state, self.state, self.state_mode, self.convention, "state", inverse=False)

    def normalize_actions(self, actions: Tensor) -> Tensor:
        """actions: [B, T, A] raw -> normalised (training targets)."""
        return _transform(actions, self.actions, self.action_mode, self.convention, "actions", inverse=False)

    def unnormalize_actions(self, actions: Tensor) -> Tensor:
        """actions: [B, T, A] normalised -> raw; A must not exceed the stats' dimension."""
        return _transform(actions, self.actions, self.action_mode, self.convention, "actions", inverse=True)

    # -- loaders -------------------------------------------------------------------------

    @classmethod
    def from_openpi(cls, path: str | os.PathLike, *, quantile: bool) -> "Normalizer":
        """Read ``norm_stats.json`` (openpi); ``quantile`` as in openpi's ``use_quantile_norm``
        (True for pi0.5, False for pi0)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise StatsError(f"cannot read openpi norm stats {path}: {exc}") from exc
        stats = raw.get("norm_stats", raw)
        missing = [k for k in ("state", "actions") if k not in stats]
        if missing:
            raise StatsError(f"{path} lacks {missing} under 'norm_stats' (has {sorted(stats)})")
        mode: Mode = "quantile" if quantile else "mean_std"
        return cls(FeatureStats.from_mapping(stats["state"]), FeatureStats.from_mapping(stats["actions"]),
                   mode, mode, "openpi")

    @classmethod
    def from_lerobot(cls, tensors: dict[str, Tensor], *, state_mode: Mode, action_mode: Mode) -> "Normalizer":
        """From LeRobot stats tensors keyed ``observation.state.mean``, ``action.q99``, ...
        (processor layout) or ``..._inputs.buffer_observation_state.mean`` (legacy buffers)."""
        feats: dict[str, dict[str, Tensor]] = {"observation.state": {}, "action": {}}
        for key, value in tensors.items():
            k = key
            for prefix in ("normalize_inputs.buffer_", "normalize_targets.buffer_", "unnormalize_outputs.buffer_"):
                if k.startswith(prefix):
                    k = k[len(prefix):].replace("observation_state", "observation.state")
            feat, _, stat = k.rpartition(".")
            if feat in feats:
                feats[feat].setdefault(stat, value)
        st, ac = FeatureStats.from_mapping(feats["observation.state"]), FeatureStats.from_mapping(feats["action"])
        for name, s, mode in (("observation.state", st, state_mode), ("action", ac, action_mode)):
            if mode != "identity" and s.dim == 0:
                raise StatsError(f"no LeRobot stats for {name!r} (mode {mode}); keys seen: {sorted(tensors)[:8]}...")
        return cls(st, ac, state_mode, action_mode, "lerobot")


LEROBOT_MODES: dict[str, Mode] = {"IDENTITY": "identity", "MEAN_STD": "mean_std", "QUANTILES": "quantile"}
