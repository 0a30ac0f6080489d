"""ManiSkill3 behind the ``VecEnv`` protocol: GPU-parallel sim when CUDA is present, one
process per environment on the CPU otherwise.

- ``sim_backend="physx_cuda"`` (``"auto"`` with CUDA): one batched ManiSkill env holds all B
  sub-scenes (the pi_RL setups run 320). A chunk is stepped T times for the whole batch; an env
  whose episode ends inside the chunk has its remaining outputs ignored and is reset (a
  partial reset of just those envs) before the observation is returned.
- ``sim_backend="physx_cpu"`` (``"auto"`` without CUDA): PhysX CPU allows one env per scene, so
  each env is a ``num_envs=1`` ManiSkill env in its own process (spawned), which runs the whole
  chunk locally and auto-resets itself; one message per chunk. A failed env is reset, a dead
  process restarted, and both reported in ``info["errors"]``.

SAPIEN needs a Vulkan device even for state observations (scene materials are created at
load). NVIDIA's driver provides one; on a CPU-only machine Mesa's lavapipe >= 24.3 does
(``VK_KHR_external_semaphore_fd``; Debian 12's own Mesa 22.3 lacks it): ``make maniskill``
unpacks Debian bookworm-backports' mesa-vulkan-drivers (25.0.7) into ``.venv/vulkan-cpu/``
(``tools/lavapipe.py``, from a source checkout) and this module points ``VK_ICD_FILENAMES`` at it
when no other driver is configured and there is no CUDA device (``find_vulkan_icd``).

Observations: ``obs_mode="state"``: state = ManiSkill's flat state vector, no images;
``obs_mode="rgb"``: images {camera: uint8 [B, H, W, 3]} per ManiSkill sensor (PickCube:
``base_camera``), state = the flattened ``agent`` and ``extra`` entries. Actions are the
env's control mode (default ``pd_ee_delta_pose``: 7 dims in [-1, 1]).

Axes: B envs, T actions per chunk, A action dim, S state dim.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pathlib
import sys
from typing import Any, Sequence

import numpy as np

from vlafast.envs.base import (
    EnvSpec, Obs, Rehearsal, check_actions, check_rehearsal, env_seeds, gather_rehearsals, rehearsal_replies, rows_by_env,
    step_outputs,
)

log = logging.getLogger(__name__)

OBS_MODES = ("state", "rgb")
SIM_BACKENDS = ("auto", "physx_cuda", "physx_cpu")
# Language for tasks that have none (ManiSkill's tabletop tasks are not language-conditioned).
INSTRUCTIONS = {
    "PickCube-v1": "pick up the red cube and move it to the green goal",
    "PushCube-v1": "push the blue cube to the goal region",
    "StackCube-v1": "stack the red cube on top of the green cube",
}
CONTROL_HZ_DEFAULT = 20.0


def find_vulkan_icd() -> str | None:
    """The Vulkan driver manifest SAPIEN should use when none is configured: the lavapipe that
    ``make maniskill`` (``tools/lavapipe.py``) put into this venv
    (``<sys.prefix>/vulkan-cpu/lvp_icd.json``). None if ``VK_ICD_FILENAMES`` /
    ``VK_DRIVER_FILES`` is set or there is no such file (SAPIEN then looks for a system driver,
    e.g. NVIDIA's)."""
    if os.environ.get("VK_ICD_FILENAMES") or os.environ.get("VK_DRIVER_FILES"):
        return None
    icd = pathlib.Path(sys.prefix) / "vulkan-cpu" / "lvp_icd.json"
    return str(icd) if icd.exists() else None


def _use_vulkan_icd() -> None:
    icd = find_vulkan_icd()
    if icd is None:
        return
    import torch

    if not torch.cuda.is_available():  # a CUDA machine has NVIDIA's Vulkan driver: prefer it
        os.environ["VK_ICD_FILENAMES"] = icd


def renderer_unavailable() -> str | None:
    """Why ManiSkill cannot render here (not installed, or SAPIEN finds no Vulkan device), as a
    message to act on; None when it can."""
    try:
        _use_vulkan_icd()
        import mani_skill.envs  # noqa: F401
        import sapien.render

        sapien.render.get_device_summary()
    except ImportError as exc:
        return f"mani-skill is not installed ({exc}); `make maniskill`"
    except RuntimeError as exc:
        return f"SAPIEN has no Vulkan device here: {exc}"
    return None


def flatten_obs(obs: Any, obs_mode: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A batched ManiSkill observation -> (images {camera: uint8 [B, H, W, 3]}, state float32 [B, S])."""
    if obs_mode == "state":
        return {}, _np(obs).astype(np.float32).reshape(_np(obs).shape[0], -1)
    images = {cam: _np(data["rgb"]).astype(np.uint8) for cam, data in obs["sensor_data"].items()}
    leaves: list[np.ndarray] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for v in node.values():
                walk(v)
        else:
            a = _np(node)
            leaves.append(a.reshape(a.shape[0], -1).astype(np.float32))

    walk({k: obs[k] for k in ("agent", "extra") if k in obs})
    return images, np.concatenate(leaves, axis=1)


def _missing_assets(task: str) -> list[str]:
    from mani_skill.utils import assets
    from mani_skill.utils.registration import REGISTERED_ENVS

    missing = []
    for asset_id in REGISTERED_ENVS[task].asset_download_ids or []:
        ids = assets.expand_data_group_into_individual_data_source_ids(asset_id) if asset_id in assets.DATA_GROUPS else [asset_id]
        missing += [i for i in ids if not assets.is_data_source_downloaded(i)]
    return missing


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _make(task: str, num_envs: int, sim_backend: str, obs_mode: str, control_mode: str, max_episode_steps: int,
          image_size: int | None):
    import gymnasium as gym
    import mani_skill.envs  # noqa: F401  (registers the tasks)

    kwargs: dict[str, Any] = dict(num_envs=num_envs, obs_mode=obs_mode, sim_backend=sim_backend,
                                  control_mode=control_mode, max_episode_steps=max_episode_steps)
    if obs_mode == "state":
        kwargs["render_backend"] = "none"  # no cameras: do not allocate render targets
    if image_size is not None:
        kwargs["sensor_configs"] = dict(width=image_size, height=image_size)
    return gym.make(task, **kwargs)


# -- CPU path: one process per env ---------------------------------------------------------

def _cpu_worker(conn, make_args: tuple, obs_mode: str) -> None:
    """Runs one ``num_envs=1`` ManiSkill env; requests (command, args) -> reply dict."""
    try:
        env = _make(*make_args)
        base = env.unwrapped
        conn.send({"action_dim": int(base.single_action_space.shape[0]), "control_hz": float(base.control_freq)})
    except Exception as exc:
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
        return
    ret, steps = 0.0, 0

    def observe(obs):
        images, state = flatten_obs(obs, obs_mode)
        return {"images": {k: v[0] for k, v in images.items()}, "state": state[0]}

    def run_chunk(actions):
        """Step ``actions`` [T, A] until the episode ends -> (last obs, reply without obs)."""
        reward, n, term, trunc, success, obs = 0.0, 0, False, False, False, None
        for a in actions:
            obs, r, te, tr, info = env.step(a[None].astype(np.float32))
            reward, n = reward + float(_np(r).reshape(-1)[0]), n + 1
            term, trunc = bool(_np(te).reshape(-1)[0]), bool(_np(tr).reshape(-1)[0])
            if "success" in info:
                success = bool(_np(info["success"]).reshape(-1)[0])
            if term or trunc:
                break
        return obs, {"reward": reward, "steps": n, "terminated": term, "truncated": trunc and not term, "success": success}

    def snapshot():
        """Everything a chunk changes: sim state (actors, articulations), controller state
        (ManiSkill's get_state_dict holds it, set_state_dict does not restore it), the time
        limit's elapsed steps, and the episode's running return / length."""
        state = base.get_state_dict()
        clone = lambda x: {k: clone(v) for k, v in x.items()} if isinstance(x, dict) else x.clone()  # noqa: E731
        return clone(state), base._elapsed_steps.clone(), ret, steps

    def restore(snap):
        nonlocal ret, steps
        state, elapsed, ret, steps = snap
        base.set_state_dict(state)
        if "controller" in state:
            base.agent.set_controller_state(state["controller"])
        base._elapsed_steps[:] = elapsed

    while True:
        try:
            command, args = conn.recv()
        except EOFError:
            break
        if command == "close":
            break
        try:
            if command == "reset":
                obs, _ = env.reset(seed=args["seed"])
                ret, steps = 0.0, 0
                reply = observe(obs)
            elif command == "step":
                obs, reply = run_chunk(args["actions"])
                ret, steps = ret + reply["reward"], steps + reply["steps"]
                if reply["terminated"] or reply["truncated"]:
                    final = observe(obs)["state"]
                    reply.update(episode_return=ret, episode_length=steps, final_state=final)
                    obs, _ = env.reset(seed=args["next_seed"])
                    ret, steps = 0.0, 0
                reply.update(observe(obs))
            elif command == "rehearse":  # each chunk from a snapshot of the current state, then restored
                snap = snapshot()
                replies = []
                for chunk in args["chunks"]:
                    restore(snap)
                    obs, reply = run_chunk(chunk)
                    if args["observe"]:
                        reply.update(observe(obs))
                    replies.append(reply)
                restore(snap)
                reply = {"rehearsals": replies}
            else:
                raise ValueError(f"unknown command {command!r}")
        except Exception as exc:  # reported to the parent, which resets or restarts this env
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        conn.send(reply)
    env.close()


class _CpuEnv:
    """One spawned process holding one env."""

    def __init__(self, ctx, make_args: tuple, obs_mode: str, timeout_s: float):
        self.timeout_s = timeout_s
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_cpu_worker, args=(child, make_args, obs_mode), daemon=True)
        self.proc.start()
        child.close()

    def send(self, command: str, **args: Any) -> None:
        try:
            self.conn.send((command, args))
        except (BrokenPipeError, OSError) as exc:
            raise RuntimeError(f"ManiSkill worker pid {self.proc.pid} is gone ({exc})") from exc

    def recv(self) -> dict:
        if not self.conn.poll(self.timeout_s):  # hung: kill it so the restart does not wait again
            self.proc.kill()
            self.proc.join()
            raise RuntimeError(f"ManiSkill worker pid {self.proc.pid} gave no answer within {self.timeout_s:g} s (killed)")
        try:
            return self.conn.recv()
        except (EOFError, ConnectionResetError) as exc:
            self.proc.join(1)
            raise RuntimeError(f"ManiSkill worker pid {self.proc.pid} died (exit code {self.proc.exitcode})") from exc

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(("close", {}))
                self.proc.join(10)
            except (BrokenPipeError, OSError):
                pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class ManiSkillVecEnv:
    """B ManiSkill3 envs of one task; implements ``vlafast.envs.VecEnv`` (module docstring)."""

    def __init__(self, task: str, num_envs: int, obs_mode: str = "state", sim_backend: str = "auto", *,
                 seed: int | None = None, control_mode: str = "pd_ee_delta_pose", image_size: int | None = None,
                 max_episode_steps: int | None = None, instruction: str | None = None, timeout_s: float = 300.0):
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if obs_mode not in OBS_MODES:
            raise ValueError(f"obs_mode must be one of {OBS_MODES}, got {obs_mode!r}")
        if sim_backend not in SIM_BACKENDS:
            raise ValueError(f"sim_backend must be one of {SIM_BACKENDS}, got {sim_backend!r}")
        if image_size is not None and obs_mode != "rgb":
            raise ValueError("image_size applies to obs_mode='rgb' only")
        _use_vulkan_icd()
        import gymnasium as gym
        import mani_skill.envs  # noqa: F401
        import torch

        if sim_backend == "auto":
            sim_backend = "physx_cuda" if torch.cuda.is_available() else "physx_cpu"
        if sim_backend == "physx_cuda" and not torch.cuda.is_available():
            raise ValueError("sim_backend='physx_cuda' needs a CUDA device; use 'physx_cpu' or 'auto'")
        if task not in gym.registry:
            raise ValueError(f"unknown ManiSkill task {task!r} (e.g. PickCube-v1, PushCube-v1, StackCube-v1)")
        missing = _missing_assets(task)
        if missing:  # ManiSkill would prompt on stdin (and exit) to download them
            raise FileNotFoundError(
                f"{task} needs ManiSkill assets that are not downloaded: {', '.join(missing)}; run "
                f"`python -m mani_skill.utils.download_asset {task}` where the network allows it"
            )
        max_steps = max_episode_steps or gym.spec(task).max_episode_steps
        if not max_steps:
            raise ValueError(f"{task} has no registered episode length: pass max_episode_steps=N")
        self.task, self.obs_mode, self.sim_backend = task, obs_mode, sim_backend
        self.instruction = instruction or INSTRUCTIONS.get(task, task.rsplit("-v", 1)[0])
        self._make_args = (task, 1 if sim_backend == "physx_cpu" else num_envs, sim_backend, obs_mode, control_mode,
                           max_steps, image_size)
        self._seed_rng = np.random.default_rng(seed)
        self._seeds = env_seeds(seed, num_envs, self._seed_rng)
        self._episode = [0] * num_envs
        self._return = np.zeros(num_envs, np.float64)   # GPU path: running episode return
        self._length = np.zeros(num_envs, np.int64)     # GPU path: running episode length
        self.restarts = 0
        self._needs_reset = True
        if sim_backend == "physx_cuda":
            self._gpu = _make(*self._make_args)
            base = self._gpu.unwrapped
            action_dim = int(base.single_action_space.shape[0])
            control_hz = float(base.control_freq)
            obs, _ = self._gpu.reset(seed=self._seeds)
            self._workers: list[_CpuEnv] = []
            images, state = flatten_obs(obs, obs_mode)
        else:
            self._gpu = None
            self._ctx = mp.get_context("spawn")
            self.timeout_s = timeout_s
            self._workers = []
            try:
                self._workers = [_CpuEnv(self._ctx, self._make_args, obs_mode, timeout_s) for _ in range(num_envs)]
                hello = [self._cpu_recv(i) for i in range(num_envs)]  # processes start in parallel
                if "error" in hello[0]:
                    raise RuntimeError(f"ManiSkill {task} failed to start on physx_cpu: {hello[0]['error']}")
                action_dim, control_hz = hello[0]["action_dim"], hello[0]["control_hz"]
                self._workers[0].send("reset", seed=self._seeds[0])  # learn the observation layout
                first = self._cpu_recv(0)
                if "error" in first:
                    raise RuntimeError(f"ManiSkill {task} failed to reset: {first['error']}")
            except BaseException:
                self.close()
                raise
            images = {c: v[None] for c, v in first["images"].items()}
            state = first["state"][None]
        H, W = next(iter(images.values())).shape[1:3] if images else (0, 0)
        self.spec = EnvSpec(num_envs=num_envs, action_dim=action_dim, state_dim=state.shape[1],
                            cameras=tuple(images), image_size=(H, W), max_episode_steps=max_steps,
                            control_hz=control_hz)
        self._images = {c: np.zeros((num_envs, H, W, 3), np.uint8) for c in images}
        self._state = np.zeros((num_envs, state.shape[1]), np.float32)

    # -- protocol ---------------------------------------------------------------------------

    def reset(self, seed: int | Sequence[int] | None = None) -> Obs:
        self._seeds = env_seeds(seed, self.spec.num_envs, self._seed_rng)
        self._episode = [1] * self.spec.num_envs
        if self._gpu is not None:
            obs, _ = self._gpu.reset(seed=self._seeds)
            self._return[:], self._length[:] = 0.0, 0
            self._store(*flatten_obs(obs, self.obs_mode))
        else:
            for i, w in enumerate(self._workers):
                w.send("reset", seed=self._seeds[i])
            for i in range(self.spec.num_envs):
                reply = self._cpu_recv(i)
                if "error" in reply:
                    raise RuntimeError(f"ManiSkill env {i} failed to reset: {reply['error']}")
                self._store_one(i, reply)
        self._needs_reset = False
        return self._observe()

    def step(self, actions: np.ndarray) -> tuple[Obs, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        if self._needs_reset:
            raise RuntimeError("call reset() before the first step()")
        actions = check_actions(actions, self.spec)  # [B, T, A]
        B = self.spec.num_envs
        reward, terminated, truncated, info = step_outputs(self.spec, [self.instruction] * B)
        out = dict(reward=reward, terminated=terminated, truncated=truncated)
        if self._gpu is not None:
            self._step_gpu(actions, out, info)
        else:
            self._step_cpu(actions, out, info)
        return self._observe(), out["reward"], out["terminated"], out["truncated"], info

    def rehearse(self, actions: np.ndarray, rows: Sequence[int], observe: bool = False) -> Rehearsal:
        """Counterfactual chunks (GRPO over states, ``rl.train.collect_state_groups``): chunk m
        [T, A] run from env ``rows[m]``'s current state, which is then restored (sim state,
        controller state, elapsed steps, episode bookkeeping) -> ``Rehearsal``. Each env's
        chunks run in its own worker, the workers in parallel. CPU sim only."""
        if self._gpu is not None:
            raise NotImplementedError("rehearse runs on the CPU sim (sim_backend='physx_cpu'); the GPU sim batches "
                                      "every env in one scene, where a per-env snapshot would stall the others")
        if self._needs_reset:
            raise RuntimeError("call reset() before rehearse()")
        actions, rows = check_rehearsal(actions, rows, self.spec)
        mine = rows_by_env(rows)
        for i, ms in mine.items():
            self._workers[i].send("rehearse", chunks=[actions[m].astype(np.float32) for m in ms], observe=observe)
        replies = rehearsal_replies({i: self._cpu_recv(i) for i in mine}, "ManiSkill")
        return gather_rehearsals(self.spec, mine, replies, [self.instruction] * self.spec.num_envs, observe)

    def close(self) -> None:
        if self._gpu is not None:
            self._gpu.close()
            self._gpu = None
        for w in self._workers:
            w.close()
        self._workers = []

    def __enter__(self) -> "ManiSkillVecEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def worker_pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    # -- GPU path ---------------------------------------------------------------------------

    def _step_gpu(self, actions: np.ndarray, out: dict, info: dict) -> None:
        import torch

        env, B = self._gpu, self.spec.num_envs
        base = env.unwrapped
        chunk = torch.as_tensor(actions, dtype=torch.float32, device=base.device)  # [B, T, A]
        done = np.zeros(B, bool)
        ret, length = self._return, self._length
        try:
            for t in range(chunk.shape[1]):
                obs, r, te, tr, step_info = env.step(chunk[:, t])
                r, te, tr = _np(r).astype(np.float64), _np(te).astype(bool), _np(tr).astype(bool)
                _, state = flatten_obs(obs, self.obs_mode)
                live = ~done
                bad = live & ~np.isfinite(state).all(axis=1)  # a diverged sub-scene is isolated
                for i in np.flatnonzero(bad):
                    info["errors"][i] = "simulation diverged (non-finite state)"
                out["reward"][live] += r[live].astype(np.float32)
                info["steps"][live] += 1
                ret[live] += r[live]
                length[live] += 1
                ended = live & (te | tr | bad)
                if ended.any():
                    success = _np(step_info["success"]).astype(bool) if "success" in step_info else te
                    out["terminated"][ended] = (te & ~bad)[ended]
                    out["truncated"][ended] = ((tr & ~te) | bad)[ended]
                    info["success"][ended] = (success & ~bad)[ended]
                    info["episode_return"][ended] = ret[ended]
                    info["episode_length"][ended] = length[ended]
                    info["final_state"][ended] = state[ended]
                    out["reward"][bad] = 0.0
                done |= ended
                if done.all():
                    break
        except Exception as exc:  # the batched sim failed as a whole: report it for every env, reset all
            log.warning("ManiSkill GPU step failed; resetting every env: %s: %s", type(exc).__name__, exc)
            err = f"{type(exc).__name__}: {exc}"
            info["errors"] = [err] * B
            out["truncated"][:] = True
            out["reward"][:] = 0.0
            done[:] = True
        if done.any():
            idx = np.flatnonzero(done)
            ret[idx], length[idx] = 0.0, 0
            for i in idx:
                self._episode[i] += 1
            obs, _ = env.reset(options={"env_idx": torch.as_tensor(idx, device=base.device)})
        self._store(*flatten_obs(obs, self.obs_mode))

    # -- CPU path ---------------------------------------------------------------------------

    def _step_cpu(self, actions: np.ndarray, out: dict, info: dict) -> None:
        B = self.spec.num_envs
        sent = []
        for i, w in enumerate(self._workers):
            try:
                w.send("step", actions=actions[i].astype(np.float32), next_seed=self._episode_seed(i, self._episode[i]))
                sent.append(i)
            except RuntimeError as exc:
                info["errors"][i] = str(exc)
        for i in sent:
            reply = self._cpu_recv(i)
            if "error" in reply:
                info["errors"][i] = reply["error"]
                continue
            out["reward"][i], info["steps"][i] = reply["reward"], reply["steps"]
            if reply["terminated"] or reply["truncated"]:
                out["terminated"][i], out["truncated"][i] = reply["terminated"], reply["truncated"]
                info["success"][i] = reply["success"]
                info["episode_return"][i] = reply["episode_return"]
                info["episode_length"][i] = reply["episode_length"]
                info["final_state"][i] = reply["final_state"]
                self._episode[i] += 1
            self._store_one(i, reply)
        for i in range(B):
            if info["errors"][i] is None:
                continue
            log.warning("ManiSkill env %d failed and is reset: %s", i, info["errors"][i])
            out["truncated"][i], out["reward"][i] = True, 0.0
            info["final_state"][i] = self._state[i]
            self._recover(i)

    def _cpu_recv(self, i: int) -> dict:
        try:
            return self._workers[i].recv()
        except RuntimeError as exc:
            return {"error": str(exc)}

    def _recover(self, i: int) -> None:
        """Reset env i; restart its process if the reset fails too."""
        seed = self._episode_seed(i, self._episode[i])
        reply = {"error": "not attempted"}
        for attempt in range(2):
            if attempt == 1 or not self._workers[i].proc.is_alive():
                self._workers[i].close()
                self._workers[i] = _CpuEnv(self._ctx, self._make_args, self.obs_mode, self.timeout_s)
                self.restarts += 1
                hello = self._cpu_recv(i)
                if "error" in hello:
                    reply = hello
                    continue
            try:
                self._workers[i].send("reset", seed=seed)
            except RuntimeError:
                continue
            reply = self._cpu_recv(i)
            if "error" not in reply:
                self._store_one(i, reply)
                self._episode[i] += 1
                return
        raise RuntimeError(f"ManiSkill env {i} could not be reset after a failure: {reply['error']}")

    def _episode_seed(self, i: int, episode: int) -> int:
        if episode == 0:
            return self._seeds[i]
        return int(np.random.SeedSequence([self._seeds[i], episode]).generate_state(1)[0]) % (2**31 - 1)

    # -- observations -----------------------------------------------------------------------

    def _store(self, images: dict[str, np.ndarray], state: np.ndarray) -> None:
        for c in self._images:
            self._images[c][:] = images[c]
        self._state[:] = state

    def _store_one(self, i: int, reply: dict) -> None:
        for c in self._images:
            self._images[c][i] = reply["images"][c]
        self._state[i] = reply["state"]

    def _observe(self) -> Obs:
        return Obs(images={c: v.copy() for c, v in self._images.items()}, state=self._state.copy(),
                   instruction=[self.instruction] * self.spec.num_envs)
