"""Backend resolver: decides once per (op, device type) how an op runs.

Backends:
  ``triton``            compiled Triton kernels on a CUDA device.
  ``triton-interpret``  the same kernels run by Triton's CPU interpreter; only when the
                        environment has ``TRITON_INTERPRET=1`` (tests).
  ``torch``             the op's plain-PyTorch ``*_ref`` (the oracle and the CPU fallback).

``VLAFAST_BACKEND=torch|triton|auto`` overrides the automatic choice for every op;
``override(...)`` does the same for a block of code. An explicit request that cannot be met
raises ``BackendUnavailable`` with the reason. Each choice and its reason is logged once at
debug level.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from typing import Iterator, Literal

import torch

Backend = Literal["triton", "triton-interpret", "torch"]
Request = Literal["auto", "triton", "torch"]

BACKENDS: tuple[Backend, ...] = ("triton", "triton-interpret", "torch")
REQUESTS: tuple[Request, ...] = ("auto", "triton", "torch")
ENV_VAR = "VLAFAST_BACKEND"

log = logging.getLogger(__name__)

_lock = threading.Lock()
_logged: set[tuple[str, str, str]] = set()
_override: list[Request] = []


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run here."""


@functools.lru_cache(maxsize=None)
def triton_import_error() -> str | None:
    """None when Triton imports, else the reason it does not."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return f"triton does not import ({type(exc).__name__}: {exc})"
    return None


def interpret_mode() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def requested() -> Request:
    """The active request: innermost ``override``, else ``VLAFAST_BACKEND``, else ``auto``."""
    if _override:
        return _override[-1]
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in REQUESTS:
        raise ValueError(f"{ENV_VAR} must be one of {'|'.join(REQUESTS)}, got {value!r}")
    return value  # type: ignore[return-value]


@contextlib.contextmanager
def override(request: Request) -> Iterator[None]:
    """Force a backend for the ops called inside the block (tests, benchmarks)."""
    if request not in REQUESTS:
        raise ValueError(f"backend request must be one of {'|'.join(REQUESTS)}, got {request!r}")
    _override.append(request)
    try:
        yield
    finally:
        _override.pop()


def _decide(device: torch.device, request: Request) -> tuple[Backend, str]:
    """Pure decision logic: (backend, reason). Raises BackendUnavailable for unmet requests."""
    if request == "torch":
        return "torch", f"{ENV_VAR} or override requested torch"
    problem = triton_import_error()
    if device.type == "cuda":
        if problem is None:
            return "triton", "CUDA tensor and triton imports"
        if request == "triton":
            raise BackendUnavailable(f"triton requested but {problem}")
        return "torch", f"CUDA tensor but {problem}; using the torch reference"
    if interpret_mode():
        if problem is None:
            return "triton-interpret", f"{device.type} tensor and TRITON_INTERPRET=1"
        if request == "triton":
            raise BackendUnavailable(f"triton requested but {problem}")
        return "torch", f"TRITON_INTERPRET=1 but {problem}; using the torch reference"
    if request == "triton":
        raise BackendUnavailable(
            f"triton requested but the tensor is on {device.type}, not a CUDA device "
            "(set TRITON_INTERPRET=1 before importing vlafast to run kernels in the interpreter)"
        )
    return "torch", f"{device.type} tensor without TRITON_INTERPRET=1; using the torch reference"


def resolve(op: str, device: torch.device | str) -> Backend:
    """Pick the backend for ``op`` on tensors living on ``device``; log the reason once."""
    device = torch.device(device)
    backend, reason = _decide(device, requested())
    key = (op, device.type, backend)
    if key not in _logged:
        with _lock:
            if key not in _logged:
                _logged.add(key)
                log.debug("vlafast op %s on %s -> %s (%s)", op, device.type, backend, reason)
    return backend


def describe(device: torch.device | str) -> tuple[Backend | None, str]:
    """(backend, reason) for ops on ``device`` under the current request, for `vlafast info`."""
    try:
        return _decide(torch.device(device), requested())
    except BackendUnavailable as exc:
        return None, str(exc)
