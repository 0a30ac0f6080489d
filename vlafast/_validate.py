"""One-sentence checks for values crossing an API boundary: the argument, the value, what is allowed."""

from __future__ import annotations

import math
from typing import Any


def number(name: str, value: Any, *, low: float | None = None, high: float | None = None, integer: bool = False,
           low_open: bool = False, optional: bool = False) -> None:
    """Raise ValueError unless ``value`` is a (finite) number in range; bools are not numbers."""
    if optional and value is None:
        return
    kind = "an integer" if integer else "a finite number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok = ok_type and not isinstance(value, bool) and (integer or math.isfinite(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>' if low_open else '>='} {low:g}")
        if high is not None:
            bounds.append(f"<= {high:g}")
        allowed = kind + (" " + " and ".join(bounds) if bounds else "") + (" (or null)" if optional else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def of_type(name: str, value: Any, kind: type | tuple[type, ...], what: str) -> None:
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool) and bool not in
                                       (kind if isinstance(kind, tuple) else (kind,))):
        raise ValueError(f"{name} must be {what}, got {value!r}")
