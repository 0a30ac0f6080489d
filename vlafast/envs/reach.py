"""UR5eReach: language-conditioned reaching with speed words, B MuJoCo arms in one process.

Each episode places three coloured balls in front of the arm and asks, e.g., "touch the red
ball slowly". The arm must bring its tool site within ``reach_radius`` of the named ball(s),
and the speed word is part of success: "slowly" caps the mean end-effector displacement per
control step, "quickly" sets a deadline. ``num_targets=2`` is the harder variant ("touch the red
ball then the blue ball": a waypoint first). A scripted expert (``expert_chunk``) produces
demonstrations at the instructed speed. The reward is shaped (2 per metre of approach, a
penalty for speeding under "slowly", 1 for success) or pi_RL's sparse 0/1 success
(``ReachConfig(reward="sparse")``); success is the same in both.

Axes: B envs, T actions per chunk, A = 3 (end-effector delta, default) or 6 (joint delta).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
from typing import Any, Literal, Sequence

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; read when mujoco is imported
import mujoco  # noqa: E402

from vlafast.envs.base import (  # noqa: E402
    EnvSpec, Obs, Rehearsal, check_actions, check_rehearsal, env_seeds, step_outputs,
)
from vlafast.envs.reach_words import COLOURS, SPEED_SYNONYMS, SPEEDS, VERBS  # noqa: E402,F401 (re-exported)
from vlafast.envs.ur5e import EE_SITE, HOME_QPOS, NUM_JOINTS, build_model  # noqa: E402

log = logging.getLogger(__name__)


def _with_rows(obs: Obs, rows: dict[int, Obs]) -> Obs:
    """A copy of the batched ``obs`` with row i replaced by the one-row ``rows[i]``."""
    out = Obs(images={c: v.copy() for c, v in obs["images"].items()}, state=obs["state"].copy(),
              instruction=list(obs["instruction"]))
    for i, o in rows.items():
        for c in out["images"]:
            out["images"][c][i] = o["images"][c][0]
        out["state"][i] = o["state"][0]
        out["instruction"][i] = o["instruction"][0]
    return out


STATE_DIM = NUM_JOINTS + 3  # joint positions, end-effector position
_SLOTS = (np.array([0.25, 0.45, 0.25]), np.array([0.0, 0.55, 0.3]), np.array([-0.25, 0.45, 0.25]))


@dataclasses.dataclass(frozen=True)
class ReachConfig:
    num_targets: int = 1                  # 1: reach; 2: via a waypoint (the harder variant)
    action_mode: Literal["ee_delta", "joint_delta"] = "ee_delta"
    max_ee_step: float = 0.04             # m per control step at action 1 (ee_delta)
    max_joint_step: float = 0.1           # rad per control step at action 1 (joint_delta)
    control_hz: float = 10.0
    max_episode_steps: int = 50
    reach_radius: float = 0.05            # m
    slow_cap: float = 0.55                # "slowly": mean step displacement <= slow_cap * max_ee_step
    fast_deadline: int = 20               # "quickly": each target reached within this many steps
    # "shaped": progress_reward per metre of approach, the speed penalty, and 1 for success;
    # "sparse": pi_RL's 0/1 success reward (1 on the step that succeeds, 0 on every other)
    reward: Literal["shaped", "sparse"] = "shaped"
    progress_reward: float = 2.0          # shaping per metre of approach (success pays 1); "shaped" only
    speed_penalty: float = 4.0            # "slowly": cost per metre a step moves beyond the slow cap; "shaped" only
    slot_jitter: float | None = None      # None: balls anywhere; else each colour in its own slot +- this (m)
    # True: the instruction names its speed with one of SPEED_SYNONYMS' words, drawn per
    # episode ("touch the red ball fast"); the speed itself, success and the expert are unchanged
    speed_synonyms: bool = False
    image_size: int = 64
    cameras: tuple[str, ...] = ("base",)  # "base" (fixed, facing the arm) and/or "wrist"
    render: bool = True

    def __post_init__(self):
        if self.num_targets not in (1, 2):
            raise ValueError(f"num_targets must be 1 or 2, got {self.num_targets}")
        if self.action_mode not in ("ee_delta", "joint_delta"):
            raise ValueError(f"action_mode must be 'ee_delta' or 'joint_delta', got {self.action_mode!r}")
        unknown = set(self.cameras) - {"base", "wrist"}
        if unknown or not self.cameras:
            raise ValueError(f"cameras must be a non-empty subset of ('base', 'wrist'), got {self.cameras}")
        if self.slot_jitter is not None and not 0 <= self.slot_jitter <= 0.1:
            raise ValueError(f"slot_jitter must be None or in [0, 0.1] m, got {self.slot_jitter}")
        if self.reward not in ("shaped", "sparse"):
            raise ValueError(f"reward must be 'shaped' (progress, speed penalty, success) or 'sparse' (0/1 success), "
                             f"got {self.reward!r}")
        if self.progress_reward < 0 or self.speed_penalty < 0:
            raise ValueError(f"progress_reward and speed_penalty must be >= 0, got {self.progress_reward}, {self.speed_penalty}")
        if not isinstance(self.speed_synonyms, bool):
            raise ValueError(f"speed_synonyms must be true or false, got {self.speed_synonyms!r}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")

    @property
    def action_dim(self) -> int:
        return 3 if self.action_mode == "ee_delta" else NUM_JOINTS


def _add_scene(spec: mujoco.MjSpec) -> None:
    """Three mocap balls (moved per episode) and the fixed "base" camera facing the arm."""
    for name, rgb in COLOURS.items():
        body = spec.worldbody.add_body(name=f"ball_{name}", mocap=True, pos=[0, 0.5, 0.2])
        body.add_geom(type=mujoco.mjtGeom.mjGEOM_SPHERE, size=[0.035, 0, 0], rgba=[*rgb, 1.0], contype=0, conaffinity=0)
    spec.worldbody.add_camera(name="base", pos=[0, 1.45, 0.75], xyaxes=[-1, 0, 0, 0, -0.45, 0.9], fovy=50)


@dataclasses.dataclass
class _Episode:
    """Per-environment episode state."""

    rng: np.random.Generator
    targets: list[str] = dataclasses.field(default_factory=list)   # colour names in order
    speed_word: str = ""
    instruction: str = ""
    steps: int = 0
    next_target: int = 0
    reached_at: int = -1
    path_length: float = 0.0
    ret: float = 0.0
    prev_dist: float = 0.0


class UR5eReach:
    """B simulated UR5e arms; see the module docstring. Implements ``vlafast.envs.VecEnv``."""

    def __init__(self, num_envs: int, config: ReachConfig = ReachConfig(), seed: int | None = None):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.cfg = config
        self.model = build_model(_add_scene)
        self.substeps = max(1, round(1.0 / (config.control_hz * self.model.opt.timestep)))
        self.datas = [mujoco.MjData(self.model) for _ in range(num_envs)]
        self.spec = EnvSpec(
            num_envs=num_envs, action_dim=config.action_dim, state_dim=STATE_DIM,
            cameras=config.cameras if config.render else (),
            image_size=(config.image_size, config.image_size),
            max_episode_steps=config.max_episode_steps, control_hz=config.control_hz,
        )
        self._site = self.model.site(EE_SITE).id
        self._mocap = {c: self.model.body(f"ball_{c}").mocapid[0] for c in COLOURS}
        self._lo, self._hi = self.model.jnt_range[:NUM_JOINTS].T.copy()  # joint limits from the model
        self._renderer: mujoco.Renderer | None = None
        self._seed_rng = np.random.default_rng(seed)
        self._episodes = [_Episode(rng=np.random.default_rng(s)) for s in env_seeds(seed, num_envs, self._seed_rng)]
        self._jac = np.zeros((3, self.model.nv))
        self._scratch: list[mujoco.MjData] = []  # sim states for ``rehearse``

    # -- protocol ---------------------------------------------------------------------------

    def reset(self, seed: int | Sequence[int] | None = None) -> Obs:
        seeds = env_seeds(seed, self.spec.num_envs, self._seed_rng)
        for i, s in enumerate(seeds):
            self._episodes[i] = _Episode(rng=np.random.default_rng(s))
            self._reset_one(i)
        return self._observe()

    def step(self, actions: np.ndarray) -> tuple[Obs, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        actions = check_actions(actions, self.spec)  # [B, T, A]
        B = self.spec.num_envs
        reward, terminated, truncated, info = step_outputs(
            self.spec, [ep.instruction for ep in self._episodes],
            episode_speed=np.full(B, np.nan, np.float32),  # mean ee displacement per step, m
        )
        final: dict[int, Obs] = {}  # envs whose episode ended: their last observation
        for i in range(B):
            try:
                r, term, trunc, n = self._run_chunk(self._episodes[i], self.datas[i], actions[i])
            except Exception as exc:  # isolate a failing sub-env: report, reset, go on
                log.warning("env %d failed and is reset: %s: %s", i, type(exc).__name__, exc)
                info["errors"][i] = f"{type(exc).__name__}: {exc}"
                info["final_state"][i] = self._state(i)
                truncated[i] = True
                self._reset_one(i)
                continue
            reward[i], terminated[i], truncated[i], info["steps"][i] = r, term, trunc, n
            if term or trunc:
                ep = self._episodes[i]
                info["success"][i] = term and self._speed_ok(ep)
                info["episode_return"][i] = ep.ret
                info["episode_length"][i] = ep.steps
                info["episode_speed"][i] = ep.path_length / max(ep.steps, 1)
                info["final_state"][i] = self._state(i)
                final[i] = self._observe([self.datas[i]], [ep])
                self._reset_one(i)
        obs = self._observe()
        info["final_obs"] = _with_rows(obs, final)
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None

    def rehearse(self, actions: np.ndarray, rows: Sequence[int], observe: bool = False) -> Rehearsal:
        """Counterfactual chunks: what chunk ``actions[m]`` [T, A] would earn if env ``rows[m]``
        ran it from its current state -> ``Rehearsal`` (reward, steps, terminated, truncated
        [M], and with ``observe`` the observation each rehearsal ends in, for a critic to
        bootstrap from). No env changes: each runs on a copy of the simulator state and episode
        bookkeeping (so a group of chunks from one state can be compared, GRPO over states in
        ``rl.train``). Deterministic: the same chunk gives what ``step`` would."""
        actions, rows = check_rehearsal(actions, rows, self.spec)
        while len(self._scratch) < len(rows):
            self._scratch.append(mujoco.MjData(self.model))
        M = len(rows)
        out = Rehearsal(np.zeros(M, np.float32), np.zeros(M, np.int64), np.zeros(M, bool), np.zeros(M, bool))
        episodes = []
        for m, i in enumerate(rows):
            d = self._scratch[m]
            mujoco.mj_copyData(d, self.model, self.datas[i])
            episodes.append(copy.deepcopy(self._episodes[i]))
            out.reward[m], out.terminated[m], out.truncated[m], out.steps[m] = self._run_chunk(episodes[m], d, actions[m])
        if observe:
            out = out._replace(obs=self._observe(self._scratch[:M], episodes))
        return out

    # -- expert -----------------------------------------------------------------------------

    def expert_chunk(self, horizon: int, noise: float = 0.0) -> np.ndarray:
        """Scripted expert: [B, T, A] actions moving straight to the current target at the
        instructed speed (open loop over the chunk), plus optional Gaussian action noise."""
        out = np.zeros((self.spec.num_envs, horizon, self.spec.action_dim))
        for i, ep in enumerate(self._episodes):
            d = self.datas[i]
            ee = d.site_xpos[self._site].copy()
            goals = [d.mocap_pos[self._mocap[c]].copy() for c in ep.targets[ep.next_target:]]
            step = SPEEDS[ep.speed_word] * self.cfg.max_ee_step
            for t in range(horizon):
                if not goals:
                    break
                delta = goals[0] - ee
                dist = np.linalg.norm(delta)
                if dist < 0.5 * self.cfg.reach_radius:
                    goals.pop(0)
                    continue
                move = delta * min(1.0, step / dist)
                ee = ee + move
                if self.cfg.action_mode == "ee_delta":
                    out[i, t] = move / self.cfg.max_ee_step
                else:
                    out[i, t] = self._ik(d, move) / self.cfg.max_joint_step
            if noise > 0:
                out[i] += ep.rng.normal(0.0, noise, size=out[i].shape)
        return np.clip(out, -1.0, 1.0)

    # -- internals --------------------------------------------------------------------------

    def _reset_one(self, i: int) -> None:
        ep, d = self._episodes[i], self.datas[i]
        mujoco.mj_resetData(self.model, d)
        d.qpos[:NUM_JOINTS] = np.asarray(HOME_QPOS) + ep.rng.normal(0.0, 0.05, NUM_JOINTS)
        d.ctrl[:NUM_JOINTS] = d.qpos[:NUM_JOINTS]
        positions: list[np.ndarray] = []
        if self.cfg.slot_jitter is not None:  # red left, green centre, blue right, jittered
            j = self.cfg.slot_jitter
            positions = [slot + ep.rng.uniform(-j, j, 3) for slot in _SLOTS]
        while len(positions) < len(COLOURS):  # balls at least 15 cm apart, in front of the arm
            p = np.array([ep.rng.uniform(-0.35, 0.35), ep.rng.uniform(0.3, 0.65), ep.rng.uniform(0.1, 0.45)])
            if all(np.linalg.norm(p - q) > 0.15 for q in positions):
                positions.append(p)
        for colour, p in zip(COLOURS, positions):
            d.mocap_pos[self._mocap[colour]] = p
        mujoco.mj_forward(self.model, d)
        ep.targets = list(ep.rng.choice(list(COLOURS), size=self.cfg.num_targets, replace=False))
        ep.speed_word = str(ep.rng.choice(list(SPEEDS)))
        verb = str(ep.rng.choice(VERBS))
        goal = " then the ".join(f"{c} ball" for c in ep.targets)
        word = ep.speed_word
        if word and self.cfg.speed_synonyms:  # drawn last: without synonyms the episode stream is unchanged
            word = str(ep.rng.choice(SPEED_SYNONYMS[word]))
        ep.instruction = f"{verb} the {goal}" + (f" {word}" if word else "")
        ep.steps, ep.next_target, ep.reached_at, ep.path_length, ep.ret = 0, 0, -1, 0.0, 0.0
        ep.prev_dist = self._dist_to_target(ep, d)

    def _dist_to_target(self, ep: _Episode, d: mujoco.MjData) -> float:
        goal = d.mocap_pos[self._mocap[ep.targets[ep.next_target]]]
        return float(np.linalg.norm(d.site_xpos[self._site] - goal))

    def _ik(self, d: mujoco.MjData, move: np.ndarray) -> np.ndarray:
        """Damped least-squares joint step for an end-effector displacement ``move`` (m)."""
        mujoco.mj_jacSite(self.model, d, self._jac, None, self._site)
        J = self._jac[:, :NUM_JOINTS]
        return J.T @ np.linalg.solve(J @ J.T + 1e-4 * np.eye(3), move)

    def _run_chunk(self, ep: _Episode, d: mujoco.MjData, chunk: np.ndarray) -> tuple[float, bool, bool, int]:
        """Execute one chunk [T, A] on (episode, sim state); stops at the end of the episode."""
        cfg = self.cfg
        total = 0.0
        for t, a in enumerate(np.clip(chunk, -1.0, 1.0)):
            if cfg.action_mode == "ee_delta":
                dq = self._ik(d, a * cfg.max_ee_step)
            else:
                dq = a * cfg.max_joint_step
            before = d.site_xpos[self._site].copy()
            target = np.clip(d.qpos[:NUM_JOINTS] + dq, self._lo, self._hi)
            d.ctrl[:NUM_JOINTS] = target                                           # position targets
            d.ctrl[NUM_JOINTS:] = (target - d.qpos[:NUM_JOINTS]) * cfg.control_hz  # velocity feed-forward
            mujoco.mj_step(self.model, d, nstep=self.substeps)
            if not np.isfinite(d.qpos).all():
                raise FloatingPointError("simulation diverged (non-finite joint positions)")
            ep.steps += 1
            moved = float(np.linalg.norm(d.site_xpos[self._site] - before))
            ep.path_length += moved
            dist = self._dist_to_target(ep, d)
            r = 0.0
            if cfg.reward == "shaped":
                r = cfg.progress_reward * (ep.prev_dist - dist)  # progress shaping
                if ep.speed_word == "slowly":  # the dense side of the slow cap, so shaping never pays for speeding
                    r -= cfg.speed_penalty * max(0.0, moved - cfg.slow_cap * cfg.max_ee_step)
            ep.prev_dist = dist
            done = False
            if dist < cfg.reach_radius:
                ep.next_target += 1
                if ep.next_target == len(ep.targets):
                    ep.reached_at = ep.steps
                    done = True
                    r += 1.0 if self._speed_ok(ep) else 0.0
                else:
                    ep.prev_dist = self._dist_to_target(ep, d)
            ep.ret += r
            total += r
            if done:
                return total, True, False, t + 1
            if ep.steps >= cfg.max_episode_steps:
                return total, False, True, t + 1
        return total, False, False, len(chunk)

    def _speed_ok(self, ep: _Episode) -> bool:
        if ep.reached_at < 0:
            return False
        if ep.speed_word == "slowly":
            return ep.path_length / ep.reached_at <= self.cfg.slow_cap * self.cfg.max_ee_step
        if ep.speed_word == "quickly":
            return ep.reached_at <= self.cfg.fast_deadline * len(ep.targets)
        return True

    def _state(self, i: int) -> np.ndarray:
        return self._state_of(self.datas[i])

    def _state_of(self, d: mujoco.MjData) -> np.ndarray:
        return np.concatenate([d.qpos[:NUM_JOINTS], d.site_xpos[self._site]]).astype(np.float32)

    def _observe(self, datas: Sequence[mujoco.MjData] | None = None, episodes: Sequence[_Episode] | None = None) -> Obs:
        """Observation of the envs (default) or of given (sim state, episode) pairs."""
        datas = self.datas if datas is None else datas
        episodes = self._episodes if episodes is None else episodes
        (H, W) = self.spec.image_size
        images: dict[str, np.ndarray] = {}
        if self.cfg.render:
            if self._renderer is None:
                self._renderer = mujoco.Renderer(self.model, H, W)
            for cam in self.cfg.cameras:
                frames = np.empty((len(datas), H, W, 3), np.uint8)
                for i, d in enumerate(datas):
                    self._renderer.update_scene(d, camera=cam)
                    frames[i] = self._renderer.render()
                images[cam] = frames
        return Obs(
            images=images,
            state=np.stack([self._state_of(d) for d in datas]),
            instruction=[ep.instruction for ep in episodes],
        )


def make_env(name: str, num_envs: int, seed: int | None = None, **overrides: Any) -> UR5eReach:
    """Built-in tasks by name: ``ur5e-reach`` and ``ur5e-reach2`` (via a waypoint)."""
    presets = {"ur5e-reach": ReachConfig(), "ur5e-reach2": ReachConfig(num_targets=2, max_episode_steps=100)}
    if name not in presets:
        raise ValueError(f"unknown env {name!r}; built-in envs: {', '.join(presets)}")
    return UR5eReach(num_envs, dataclasses.replace(presets[name], **overrides), seed=seed)
