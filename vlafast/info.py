"""`vlafast info`: versions, devices, the backend ops would take, and whether _C is built."""

from __future__ import annotations

import platform
import sys

import torch

from vlafast import __version__, _backend
from vlafast._ext import load_C


def collect() -> dict[str, str]:
    facts: dict[str, str] = {
        "vlafast": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "torch": f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})",
    }
    try:
        import triton

        facts["triton"] = triton.__version__
    except Exception as exc:
        facts["triton"] = f"not importable ({type(exc).__name__})"
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            facts[f"cuda:{i}"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
    else:
        facts["cuda"] = "no CUDA device"
    facts["cpu threads"] = str(torch.get_num_threads())
    for dev in (["cuda"] if torch.cuda.is_available() else []) + ["cpu"]:
        backend, reason = _backend.describe(dev)
        facts[f"ops on {dev}"] = f"{backend or 'unavailable'} ({reason})"
    try:
        C = load_C()
        facts["_C"] = f"built ({C.__file__})"
    except ImportError as exc:
        facts["_C"] = f"NOT built: {exc}"
    facts["extras"] = ", ".join(f"{name} {_version(dist)}" for name, dist in EXTRAS)
    return facts


# optional dependencies (pyproject extras): (import name shown, distribution name)
EXTRAS = (("mujoco", "mujoco"), ("mani_skill", "mani-skill"), ("ray", "ray"), ("ur_rtde", "ur-rtde"),
          ("transformers", "transformers"))


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def render(facts: dict[str, str]) -> str:
    width = max(len(k) for k in facts)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in facts.items())
