"""The vector-env protocol every environment adapter implements (docs/architecture.md §5).

Axes: B environments, T actions per chunk, A action dim, S state dim, H x W images.

``reset(seed) -> obs`` and ``step(actions [B, T, A]) -> (obs, reward [B], terminated [B],
truncated [B], info)``; one ``step`` executes a whole action chunk per environment. An
environment whose episode ends inside a chunk ignores the rest of that chunk and is reset at
once ("same-step" auto-reset): the returned observation is the first of its next episode and
``info`` carries what ended (success, return, length, final state). A sub-environment that
raises is reset and reported in ``info["errors"]`` (truncated, zero reward); the batch goes on.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Protocol, Sequence, TypedDict, runtime_checkable

import numpy as np


class Obs(TypedDict):
    images: dict[str, np.ndarray]   # camera name -> uint8 [B, H, W, 3]
    state: np.ndarray               # float32 [B, S]
    instruction: list[str]          # B strings


class Rehearsal(NamedTuple):
    """What a simulator's ``rehearse(actions [M, T, A], rows, observe)`` returns, per rehearsed
    chunk [M]: chunk m run from a snapshot of env ``rows[m]``'s current state, which is then
    restored (GRPO over states). Only simulators can do this: it is not part of ``VecEnv``."""

    reward: np.ndarray       # float32, what ``step`` would pay
    steps: np.ndarray        # int64, control steps run (fewer when the episode ends)
    terminated: np.ndarray   # bool, the episode ended by success / failure
    truncated: np.ndarray    # bool, hit the time limit
    obs: "Obs | None" = None  # the observation each rehearsal ends in (``observe=True``)


def check_rehearsal(actions: np.ndarray, rows: Sequence[int], spec: "EnvSpec") -> tuple[np.ndarray, list[int]]:
    """Validate ``rehearse`` arguments: one chunk [T, A] per row, rows indexing the envs."""
    rows = [int(i) for i in rows]
    if np.ndim(actions) < 1 or len(actions) != len(rows):
        raise ValueError(f"rehearse needs actions [M={len(rows)}, T, A={spec.action_dim}] (one chunk per row), "
                         f"got {list(np.shape(actions))}")
    actions = check_actions(actions, dataclasses.replace(spec, num_envs=len(rows)))  # M chunks, as step checks B
    if any(not 0 <= i < spec.num_envs for i in rows):
        raise ValueError(f"rows must index the {spec.num_envs} envs, got {rows}")
    return actions, rows


def rows_by_env(rows: Sequence[int]) -> dict[int, list[int]]:
    """{env: the rehearsal indices m whose rows[m] is that env}, envs in first-seen order."""
    return {i: [m for m, r in enumerate(rows) if r == i] for i in dict.fromkeys(rows)}


def rehearsal_replies(replies: dict[int, dict], sim: str) -> dict[int, list[dict]]:
    """The per-env chunk replies of a ``rehearse`` command, read from every worker first (so
    none is left mid-protocol); one error naming every failed env if any failed."""
    failed = [f"env {i}: {r['error']}" for i, r in replies.items() if "error" in r]
    if failed:
        raise RuntimeError(f"{sim} rehearse failed: " + "; ".join(failed))
    return {i: r["rehearsals"] for i, r in replies.items()}


def gather_rehearsals(spec: "EnvSpec", mine: dict[int, list[int]], replies: dict[int, list[dict]],
                      instructions: Sequence[str], observe: bool) -> Rehearsal:
    """One ``Rehearsal`` from per-env worker replies: ``replies[i][j]`` is the j-th chunk env i ran
    (rehearsal ``mine[i][j]``), a dict with reward, steps, terminated, truncated and, when
    ``observe``, ``state`` [S] and ``images`` {camera: [H, W, 3] uint8}."""
    M = sum(len(ms) for ms in mine.values())
    out = Rehearsal(np.zeros(M, np.float32), np.zeros(M, np.int64), np.zeros(M, bool), np.zeros(M, bool))
    images = {c: np.zeros((M, *spec.image_size, 3), np.uint8) for c in spec.cameras}
    state = np.zeros((M, spec.state_dim), np.float32)
    instruction = [""] * M
    for i, ms in mine.items():
        for m, r in zip(ms, replies[i]):
            out.reward[m], out.steps[m], out.terminated[m], out.truncated[m] = (
                r["reward"], r["steps"], r["terminated"], r["truncated"])
            instruction[m] = instructions[i]
            if observe:
                state[m] = r["state"]
                for c in images:
                    images[c][m] = r["images"][c]
    if observe:
        out = out._replace(obs=Obs(images=images, state=state, instruction=instruction))
    return out


@dataclasses.dataclass(frozen=True)
class EnvSpec:
    """What a policy needs to know about an environment."""

    num_envs: int
    action_dim: int
    state_dim: int
    cameras: tuple[str, ...]
    image_size: tuple[int, int]     # (H, W)
    max_episode_steps: int          # control steps
    control_hz: float


@runtime_checkable
class VecEnv(Protocol):
    spec: EnvSpec

    def reset(self, seed: int | Sequence[int] | None = None) -> Obs: ...

    def step(self, actions: np.ndarray) -> tuple[Obs, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]: ...

    def close(self) -> None: ...


def env_seeds(seed: int | Sequence[int] | None, num_envs: int, rng: np.random.Generator) -> list[int]:
    """Per-environment seeds: ``seed + i`` for an int, the list itself, or fresh draws for None."""
    if seed is None:
        return [int(s) for s in rng.integers(0, 2**31 - 1, size=num_envs)]
    if isinstance(seed, (int, np.integer)):
        return [int(seed) + i for i in range(num_envs)]
    seeds = [int(s) for s in seed]
    if len(seeds) != num_envs:
        raise ValueError(f"reset(seed=[...]) needs one seed per environment ({num_envs}), got {len(seeds)}")
    return seeds


def step_outputs(spec: EnvSpec, instructions: list[str], **extra: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
    """Fresh (reward [B], terminated [B], truncated [B], info) for one ``step``, with the info
    keys every adapter reports: success, steps, episode_return / episode_length (set where an
    episode ended), instruction, final_state [B, S], errors; ``extra`` adds env-specific keys."""
    B = spec.num_envs
    info: dict[str, Any] = {
        "success": np.zeros(B, bool),
        "steps": np.zeros(B, np.int64),
        "episode_return": np.full(B, np.nan, np.float32),
        "episode_length": np.zeros(B, np.int64),
        "instruction": list(instructions),
        "final_state": np.zeros((B, spec.state_dim), np.float32),
        "errors": [None] * B,
        **extra,
    }
    return np.zeros(B, np.float32), np.zeros(B, bool), np.zeros(B, bool), info


def check_actions(actions: np.ndarray, spec: EnvSpec) -> np.ndarray:
    """Validate a chunk of actions: float [B, T, A] with B, A matching the env, all finite."""
    actions = np.asarray(actions)
    if actions.ndim != 3 or actions.shape[0] != spec.num_envs or actions.shape[2] != spec.action_dim:
        raise ValueError(
            f"actions must be [B={spec.num_envs}, T, A={spec.action_dim}], got {list(actions.shape)}"
        )
    if actions.shape[1] < 1:
        raise ValueError("actions must hold at least one step per chunk (T >= 1)")
    if not np.issubdtype(actions.dtype, np.floating):
        raise ValueError(f"actions must be floating point, got {actions.dtype}")
    if not np.isfinite(actions).all():
        bad = sorted({int(b) for b in np.argwhere(~np.isfinite(actions))[:, 0]})
        raise ValueError(f"actions hold NaN/inf for environments {bad}")
    return actions.astype(np.float64, copy=False)
