"""OpenVLA's action tokens and action statistics.

Tokenisation (as ``prismatic/vla/action_tokenizer.py``): each action dimension, clipped to
[-1, 1], is digitised against 256 uniform bin *edges* ``linspace(-1, 1, 256)``
(``np.digitize``: index i with ``edges[i-1] <= a < edges[i]``, so 1..256 after clipping) and
becomes token ``vocab_size - i`` with ``vocab_size = 32000`` (the Llama tokenizer's size, the
model's 32064 minus its padding to a multiple of 64). Decoding inverts the map, shifts by one
and clips the index into the 255 bin *centres* (``a = 1`` decodes to the last centre).

Unnormalisation (``predict_action``): ``0.5 (a + 1) (q99 - q01) + q01`` on the dimensions
where the statistics' ``mask`` is true (the gripper is usually left as is).

Axes: B batch, A action dim.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vlafast.models.normalize import StatsError


class ActionTokenizer:
    """Continuous actions in [-1, 1] <-> token ids at the end of the vocabulary."""

    def __init__(self, vocab_size: int = 32_000, n_bins: int = 256, min_action: float = -1.0,
                 max_action: float = 1.0) -> None:
        if n_bins < 2 or n_bins > vocab_size:
            raise ValueError(f"n_bins must be in [2, vocab_size={vocab_size}], got {n_bins}")
        if not min_action < max_action:
            raise ValueError(f"need min_action < max_action, got {min_action} >= {max_action}")
        self.vocab_size = vocab_size
        self.n_bins = n_bins
        self.min_action, self.max_action = float(min_action), float(max_action)
        # numpy's linspace (float64) so bin edges are bit-identical to OpenVLA's.
        edges = np.linspace(min_action, max_action, n_bins)
        self.bins = torch.from_numpy(edges)  # [n_bins] edges, float64
        self.bin_centers = torch.from_numpy((edges[:-1] + edges[1:]) / 2.0)  # [n_bins - 1], float64

    @property
    def first_token(self) -> int:
        """Smallest id an encoded action can have (``vocab_size - n_bins``)."""
        return self.vocab_size - self.n_bins

    def encode(self, actions: Tensor) -> Tensor:
        """actions: [..., A] float (clipped to [min, max]) -> token ids: [..., A] int64."""
        if not actions.is_floating_point():
            raise ValueError(f"actions must be a floating tensor, got {actions.dtype}")
        if torch.isnan(actions).any():
            raise ValueError("actions contain NaN; the action tokenizer cannot discretise NaN "
                             "(check the normalisation statistics / the policy output)")
        a = actions.detach().to("cpu", torch.float64).clamp(self.min_action, self.max_action)
        digit = torch.bucketize(a, self.bins, right=True)  # == np.digitize(a, bins): 1..n_bins
        return (self.vocab_size - digit).to(actions.device)

    def decode(self, token_ids: Tensor) -> Tensor:
        """token ids: [..., A] int -> actions in [min, max]: [..., A] float32 (bin centres).

        Ids outside the action range (a greedy decode may pick any token) clip to the nearest
        end bin, exactly as OpenVLA does.
        """
        if token_ids.is_floating_point():
            raise ValueError(f"token_ids must be integers, got {token_ids.dtype}")
        centers = self.bin_centers.to(token_ids.device)
        idx = (self.vocab_size - token_ids.long() - 1).clamp(0, centers.numel() - 1)
        return centers[idx].float()


@dataclasses.dataclass(frozen=True)
class ActionStats:
    """Per-dimension action statistics of one dataset (``unnorm_key``)."""

    q01: Tensor  # [A]
    q99: Tensor  # [A]
    mask: Tensor  # [A] bool: unnormalise this dimension

    def __post_init__(self) -> None:
        if self.q01.ndim != 1 or self.q01.shape != self.q99.shape or self.q01.shape != self.mask.shape:
            raise StatsError(f"q01, q99 and mask must be [A] vectors of one length, got "
                             f"{list(self.q01.shape)}, {list(self.q99.shape)}, {list(self.mask.shape)}")

    @property
    def action_dim(self) -> int:
        return self.q01.numel()

    @classmethod
    def from_dict(cls, d: dict, *, where: str = "statistics") -> "ActionStats":
        """From a ``dataset_statistics.json`` entry's ``"action"`` dict (q01, q99, optional mask)."""
        missing = [k for k in ("q01", "q99") if k not in d]
        if missing:
            raise StatsError(f"{where}: action statistics lack {missing} (have {sorted(d)})")
        q01 = torch.tensor(d["q01"], dtype=torch.float64)
        q99 = torch.tensor(d["q99"], dtype=torch.float64)
        mask = torch.tensor(d["mask"], dtype=torch.bool) if "mask" in d else torch.ones(q01.shape, dtype=torch.bool)
        return cls(q01, q99, mask)

    def unnormalize(self, actions: Tensor) -> Tensor:
        """actions: [..., A] in [-1, 1] -> [..., A] in dataset units (float32)."""
        if actions.shape[-1] != self.action_dim:
            raise ValueError(f"actions must be [..., {self.action_dim}], got {list(actions.shape)}")
        a = actions.double()
        lo, hi, m = (t.to(actions.device) for t in (self.q01, self.q99, self.mask))
        return torch.where(m, 0.5 * (a + 1.0) * (hi - lo) + lo, a).float()


def parse_dataset_statistics(stats: dict, *, where: str = "dataset_statistics.json") -> dict[str, ActionStats]:
    """``{unnorm_key: {"action": {...}, ...}}`` -> ``{unnorm_key: ActionStats}``."""
    if not isinstance(stats, dict) or not stats:
        raise StatsError(f"{where} holds no datasets (expected {{unnorm_key: {{'action': {{q01, q99, mask}}}}}})")
    out = {}
    for key, entry in stats.items():
        if not isinstance(entry, dict) or "action" not in entry:
            raise StatsError(f"{where}: entry {key!r} has no 'action' statistics")
        out[key] = ActionStats.from_dict(entry["action"], where=f"{where}[{key!r}]")
    return out


def load_dataset_statistics(path: str | os.PathLike) -> dict[str, ActionStats]:
    path = Path(path)
    return parse_dataset_statistics(json.loads(path.read_text()), where=str(path))


def select_stats(stats: dict[str, ActionStats], unnorm_key: str | None) -> ActionStats:
    """The statistics for ``unnorm_key``; None picks the only dataset (error if several)."""
    if not stats:
        raise StatsError("this policy has no action statistics; load it with dataset_statistics.json "
                         "or pass stats= to OpenVLAPolicy")
    if unnorm_key is None:
        if len(stats) != 1:
            raise StatsError(f"the policy was trained on {len(stats)} datasets: pass unnorm_key=, one of {sorted(stats)}")
        return next(iter(stats.values()))
    if unnorm_key not in stats:
        raise StatsError(f"unknown unnorm_key {unnorm_key!r}; available: {sorted(stats)}")
    return stats[unnorm_key]
