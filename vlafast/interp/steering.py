"""Steering plans: clamp chosen MLP neurons (or add a direction) inside the model, without hooks.

``SteeringPlan`` clamps the activations h_S entering ``down_proj`` of a neuron set S to alpha.
Instead of editing h, it corrects the MLP output in place (docs/architecture.md §2):

    y' = W h  - W_S h_S + alpha W_S 1  =  y + W_S (alpha - h_S)

through ``steer_correction_`` (one fused kernel, the gather of h_S included) placed in each
touched MLP's ``steer`` slot (``GemmaMLP`` / ``LlamaMLP``): no Python forward hooks, nothing
else patched. ``DirectionPlan`` adds ``alpha * direction`` to a layer's MLP output (a
residual-stream steering vector, e.g. a mean difference of activations) via ``add_direction_``.

**Per request.** Each plan owns two device buffers, ``alpha`` [max_batch] and ``mask``
[max_batch] (1 on, 0 off); request b of a batch reads entry b. ``plan.set(alpha=..., mask=...)``
writes into them in place, so one batch can mix steered and unsteered requests, and a CUDA
graph captured with the plan applied follows the new values at its next replay without
re-capture. Applying or removing a plan changes the ``steer`` slots themselves: graphs
captured before must be captured again.

**Positions.** ``"all"``: every position the MLP sees. ``"prefix"``: only the pass over the
observation. pi0's VLM MLPs only ever run on the prefix (``embed_prefix``, or the prefix half
of the joint training forward), so there both mean the same; the expert's MLPs never see the
prefix, and ``"prefix"`` with an ``"expert.{l}"`` neuron is an error. OpenVLA runs its MLPs
over the prefill (image + prompt) and then once per decoded token; ``"prefix"`` steers the
prefill only (decode calls carry one token per request and are left as they are).

**Exactness.** With a plan removed the ``steer`` slots are None again and the forward is the
unsteered one bit for bit. The value vectors W_S are copied at ``apply``: re-apply after
changing weights. Plans are for inference (no gradient flows through the in-place correction).

Axes: B requests, S selected neurons, D width, F MLP neurons (d_ff).
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from vlafast.interp.dictionary import model_mlps
from vlafast.ops.steer import add_direction_, steer_correction_

POSITIONS = ("all", "prefix")


def layer_name(layer: int | str) -> str:
    """3 -> "vlm.3"; names ("vlm.3", "expert.0") pass through."""
    if isinstance(layer, bool) or not isinstance(layer, (int, str)):
        raise ValueError(f"a layer is an int (VLM layer index) or a name like 'vlm.3', got {layer!r}")
    return f"vlm.{layer}" if isinstance(layer, int) else layer


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    return float(alpha)


def _is_decoder(model: nn.Module) -> bool:
    inner = getattr(model, "model", None)
    inner = inner if inner is not None and hasattr(inner, "mlps") else model
    return hasattr(inner, "decode_step")


class _Plan:
    """Shared state of both plan kinds: the per-request buffers and the slots they occupy."""

    def __init__(self, alpha: float, positions: str, max_batch: int) -> None:
        if positions not in POSITIONS:
            raise ValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        self.alpha = _check_alpha(alpha)
        self.positions = positions
        self.max_batch = max_batch
        self._model: nn.Module | None = None
        self._slots: dict[str, nn.Module] = {}
        self.alpha_buf: Tensor | None = None  # [max_batch] fp32 on the model's device
        self.mask_buf: Tensor | None = None   # [max_batch] fp32 on the model's device

    # -- subclass surface ------------------------------------------------------------------
    def _steer_fns(self, mlps: dict[str, nn.Module], decoder: bool) -> dict[str, "_SteerFn"]:
        raise NotImplementedError

    # -- applying ----------------------------------------------------------------------------
    @property
    def is_applied(self) -> bool:
        return self._model is not None

    def apply(self, model: nn.Module) -> "_Plan":
        """Install the plan in ``model``'s MLP steer slots (all requests on, at ``self.alpha``)."""
        if self._model is not None:
            raise RuntimeError("this plan is already applied; call remove(model) first (or use another plan object)")
        mlps = model_mlps(model)
        fns = self._steer_fns(mlps, _is_decoder(model))
        for name in fns:
            if mlps[name].steer is not None:
                raise RuntimeError(f"MLP {name!r} already has a steer function (another plan?); remove that plan first")
        device = next(iter(mlps.values())).down_proj.weight.device
        self.alpha_buf = torch.full((self.max_batch,), self.alpha, dtype=torch.float32, device=device)
        self.mask_buf = torch.ones(self.max_batch, dtype=torch.float32, device=device)
        for name, fn in fns.items():
            fn.bind(self.alpha_buf, self.mask_buf)
            mlps[name].steer = fn
        self._model = model
        self._slots = {name: mlps[name] for name in fns}
        return self

    def remove(self, model: nn.Module) -> None:
        """Clear the slots this plan set; the model computes exactly as before ``apply``."""
        if self._model is None:
            raise RuntimeError("this plan is not applied")
        if model is not self._model:
            raise RuntimeError("this plan is applied to another model")
        for mlp in self._slots.values():
            mlp.steer = None
        self._model, self._slots = None, {}
        self.alpha_buf = self.mask_buf = None

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator["_Plan"]:
        """``with plan.applied(model): ...`` applies, then removes even if the block raises."""
        self.apply(model)
        try:
            yield self
        finally:
            self.remove(model)

    # -- per-request control -------------------------------------------------------------------
    def set(self, *, alpha: float | Sequence[float] | Tensor | None = None,
            mask: bool | float | Sequence[float] | Tensor | None = None) -> None:
        """Write per-request values into the device buffers in place (graph-safe: no realloc).

        A scalar fills every entry; a sequence / tensor of n values sets requests 0..n-1 and
        leaves the rest. alpha must be finite; mask is 1/True (on), 0/False (off) or a gain.
        """
        if self.alpha_buf is None:
            raise RuntimeError("apply the plan to a model before setting per-request values")
        for name, value, buf in (("alpha", alpha, self.alpha_buf), ("mask", mask, self.mask_buf)):
            if value is None:
                continue
            if isinstance(value, (bool, int, float)):
                v = float(value)
                if not math.isfinite(v):
                    raise ValueError(f"{name} must be finite, got {value!r}")
                buf.fill_(v)
                continue
            t = torch.as_tensor(value).to(torch.float32).reshape(-1)
            if t.numel() > self.max_batch:
                raise ValueError(f"{name} has {t.numel()} requests but the plan holds max_batch={self.max_batch}; "
                                 "build the plan with a larger max_batch")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} must be finite, got {t.tolist()}")
            buf[: t.numel()].copy_(t)


class _SteerFn:
    """What a plan puts in ``mlp.steer``: ``(h [B, T, F], y [B, T, D]) -> y`` corrected in place."""

    def __init__(self, prefix_only: bool) -> None:
        self.prefix_only = prefix_only
        self.alpha: Tensor | None = None
        self.mask: Tensor | None = None

    def bind(self, alpha: Tensor, mask: Tensor) -> None:
        self.alpha, self.mask = alpha, mask

    def _skip(self, h: Tensor, y: Tensor) -> bool:
        if y.requires_grad:
            raise RuntimeError("steering plans are for inference: run the model under torch.no_grad()")
        if h.shape[0] > self.alpha.shape[0]:
            raise ValueError(f"batch of {h.shape[0]} requests exceeds the plan's max_batch={self.alpha.shape[0]}")
        return self.prefix_only and h.shape[1] == 1  # an OpenVLA decode step


class _Clamp(_SteerFn):
    def __init__(self, index: Tensor, W_sel: Tensor, prefix_only: bool) -> None:
        super().__init__(prefix_only)
        self.index, self.W_sel = index, W_sel  # [S] int64, [D, S]

    def __call__(self, h: Tensor, y: Tensor) -> Tensor:
        if self._skip(h, y):
            return y
        B = h.shape[0]
        return steer_correction_(y, h, self.W_sel, self.alpha[:B], self.mask[:B], index=self.index)


class _Add(_SteerFn):
    def __init__(self, direction: Tensor, prefix_only: bool) -> None:
        super().__init__(prefix_only)
        self.direction = direction  # [D] fp32

    def __call__(self, h: Tensor, y: Tensor) -> Tensor:
        if self._skip(h, y):
            return y
        B = h.shape[0]
        return add_direction_(y, self.direction, self.alpha[:B], self.mask[:B])


def _check_layer(name: str, mlps: dict[str, nn.Module], positions: str) -> None:
    if name not in mlps:
        names = list(mlps)
        raise ValueError(f"unknown layer {name!r}; this model has {names[:4]}{' ...' if len(names) > 4 else ''} "
                         f"({len(names)} MLPs)")
    if positions == "prefix" and name.startswith("expert."):
        raise ValueError(f"layer {name!r} is in the action expert, which never sees the prefix; use positions='all' "
                         "to steer it at every denoise step")


class SteeringPlan(_Plan):
    """Clamp neurons ``[(layer, index), ...]`` to ``alpha`` (see the module docstring).

    layer: int (VLM layer, "vlm.{l}") or a name from ``model.mlps()``; index in [0, d_ff).
    Duplicates are dropped. ``max_batch`` bounds the requests per forward (buffer size).
    """

    def __init__(self, neurons: Iterable[tuple[int | str, int]], alpha: float = 4.0, positions: str = "all",
                 *, max_batch: int = 256) -> None:
        super().__init__(alpha, positions, max_batch)
        by_layer: dict[str, set[int]] = {}
        for item in neurons:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise ValueError(f"neurons must be (layer, index) pairs, got {item!r}")
            layer, idx = item
            if isinstance(idx, bool) or not isinstance(idx, int) or idx < 0:
                raise ValueError(f"neuron index must be an int >= 0, got {idx!r} in {item!r}")
            by_layer.setdefault(layer_name(layer), set()).add(idx)
        if not by_layer:
            raise ValueError("a steering plan needs at least one (layer, neuron) pair")
        self.neurons: dict[str, tuple[int, ...]] = {k: tuple(sorted(v)) for k, v in by_layer.items()}

    def __len__(self) -> int:
        return sum(len(v) for v in self.neurons.values())

    def _steer_fns(self, mlps, decoder):
        fns = {}
        for name, idx in self.neurons.items():
            _check_layer(name, mlps, self.positions)
            W = mlps[name].down_proj.weight  # [D, F]
            if idx[-1] >= W.shape[1]:
                raise ValueError(f"neuron {idx[-1]} is out of range for {name!r}, which has {W.shape[1]} neurons")
            index = torch.tensor(idx, dtype=torch.int64, device=W.device)
            fns[name] = _Clamp(index, W.detach()[:, index].clone(), self.positions == "prefix" and decoder)
        return fns


class DirectionPlan(_Plan):
    """Add ``alpha * direction[layer]`` to the MLP output of each given layer (a residual-stream
    steering vector). directions: {layer: [D] tensor}."""

    def __init__(self, directions: dict[int | str, Tensor], alpha: float = 1.0, positions: str = "all",
                 *, max_batch: int = 256) -> None:
        super().__init__(alpha, positions, max_batch)
        if not directions:
            raise ValueError("a direction plan needs at least one {layer: direction [D]}")
        self.directions: dict[str, Tensor] = {}
        for layer, d in directions.items():
            if not isinstance(d, Tensor) or d.dim() != 1 or not d.is_floating_point():
                raise ValueError(f"direction for layer {layer!r} must be a float [D] tensor, got "
                                 f"{list(d.shape) if isinstance(d, Tensor) else type(d).__name__}")
            if not bool(torch.isfinite(d).all()):
                raise ValueError(f"direction for layer {layer!r} has NaN or inf entries")
            self.directions[layer_name(layer)] = d.detach().float()

    @classmethod
    def mean_difference(cls, layer: int | str, acts_a: Tensor, acts_b: Tensor, alpha: float = 1.0,
                        positions: str = "all", *, max_batch: int = 256) -> "DirectionPlan":
        """direction = mean(acts_a) - mean(acts_b); acts_*: [N, D] residual-stream activations
        (after ``layer``) for two prompt sets, e.g. "... quickly" vs "... slowly". alpha = 1
        moves set b's mean onto set a's."""
        for name, a in (("acts_a", acts_a), ("acts_b", acts_b)):
            if not isinstance(a, Tensor) or a.dim() != 2 or a.shape[0] == 0:
                raise ValueError(f"{name} must be a non-empty [N, D] tensor, got "
                                 f"{list(a.shape) if isinstance(a, Tensor) else type(a).__name__}")
        if acts_a.shape[1] != acts_b.shape[1]:
            raise ValueError(f"acts_a and acts_b must share D, got {acts_a.shape[1]} and {acts_b.shape[1]}")
        direction = acts_a.float().mean(0) - acts_b.float().mean(0)
        return cls({layer: direction}, alpha, positions, max_batch=max_batch)

    def _steer_fns(self, mlps, decoder):
        fns = {}
        for name, d in self.directions.items():
            _check_layer(name, mlps, self.positions)
            W = mlps[name].down_proj.weight
            if d.shape[0] != W.shape[0]:
                raise ValueError(f"direction for {name!r} must be [D] = [{W.shape[0]}], got [{d.shape[0]}]")
            fns[name] = _Add(d.to(W.device), self.positions == "prefix" and decoder)
        return fns
