"""Lazy access to the compiled core ``vlafast._C`` with an error that says how to build it."""

from __future__ import annotations

import functools
from types import ModuleType


@functools.lru_cache(maxsize=None)
def load_C() -> ModuleType:
    """Import ``vlafast._C``; raise ImportError naming the fix when it is not built."""
    try:
        from vlafast import _C
    except ImportError as exc:  # pragma: no cover - exercised only on broken installs
        raise ImportError(
            "vlafast._C (the compiled real-time core) is not built. Install the package with "
            "`pip install .` (or `make demo`), which compiles it with CMake + pybind11; a C++17 "
            f"compiler and CMake >= 3.18 are needed. Original error: {exc}"
        ) from exc
    return _C


def has_C() -> bool:
    """True when the compiled core imports."""
    try:
        load_C()
    except ImportError:
        return False
    return True
