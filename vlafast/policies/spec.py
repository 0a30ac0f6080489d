"""``PolicySpec``: everything but the weights needed to rebuild a policy, saved as JSON beside
its safetensors (``vlafast.policies.save``). Frozen, like every config here."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from vlafast.envs.base import EnvSpec
from vlafast.policies.processors import ProcessorConfig

Family = Literal["pi0", "pi05", "pi0fast", "openvla"]
ActionSpace = Literal["joint_position", "ee_delta", "unknown"]
FAMILIES = ("pi0", "pi05", "pi0fast", "openvla")
ACTION_SPACES = ("joint_position", "ee_delta", "unknown")
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class EnvBinding:
    """What a policy uses of an environment: camera order, action and state dims."""

    cameras: tuple[str, ...]
    action_dim: int
    state_dim: int

    @classmethod
    def of(cls, spec: EnvSpec) -> "EnvBinding":
        return cls(tuple(spec.cameras), int(spec.action_dim), int(spec.state_dim))

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EnvBinding":
        return cls(tuple(d["cameras"]), int(d["action_dim"]), int(d["state_dim"]))


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """family: pi0 | pi05 | pi0fast | openvla; model: the model config as JSON (``Pi0Config`` /
    ``Pi0FASTConfig`` / ``OpenVLAConfig`` fields); processor: how observations become inputs; exec_horizon:
    actions executed per chunk; env: the environment binding (None until bound);
    action_space: what the actions mean (a joint-space robot refuses a task-space policy);
    heads: RL heads saved with the weights; recipe: the built-in task's recipe for runs
    trained here (``vlafast.rl.recipe``), else None; source: where it was loaded from."""

    family: Family
    model: dict[str, Any]
    processor: ProcessorConfig = ProcessorConfig()
    exec_horizon: int = 5
    env: EnvBinding | None = None
    action_space: ActionSpace = "unknown"
    heads: tuple[str, ...] = ()
    recipe: dict[str, Any] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.action_space not in ACTION_SPACES:
            raise ValueError(f"action_space must be one of {ACTION_SPACES}, got {self.action_space!r}")
        if isinstance(self.exec_horizon, bool) or not isinstance(self.exec_horizon, int) or self.exec_horizon < 1:
            raise ValueError(f"exec_horizon must be an int >= 1, got {self.exec_horizon!r}")
        unknown = set(self.heads) - {"critic", "noise_head"}
        if unknown:
            raise ValueError(f"heads must be critic and/or noise_head, got {sorted(unknown)}")

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["format_version"] = FORMAT_VERSION
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], *, where: str = "policy.json") -> "PolicySpec":
        d = dict(d)
        version = d.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"{where}: format_version must be {FORMAT_VERSION}, got {version!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(known)}")
        try:
            if "processor" in d:
                d["processor"] = ProcessorConfig(**d["processor"])
            if d.get("env") is not None:
                d["env"] = EnvBinding.from_json(d["env"])
            d["heads"] = tuple(d.get("heads", ()))
            return cls(**d)
        except (TypeError, KeyError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None


__all__ = ["ActionSpace", "EnvBinding", "Family", "PolicySpec"]
