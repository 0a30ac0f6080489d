"""One LIBERO environment in its own process: the worker side of ``vlafast.envs.libero``.

Runs under any interpreter that has LIBERO (the ``.venv-libero`` made by ``make libero``, which
keeps mujoco 2.3.7 / numpy 1.26 / robosuite 1.4 apart from the main venv), so it imports only
the standard library, numpy, PIL and LIBERO, never vlafast or torch:

    /path/to/.venv-libero/bin/python libero_worker.py <image-file>

Protocol: length-prefixed pickles (8-byte little-endian length, protocol 4) of plain Python
values (dict / list / str / int / float / bytes) over the process's stdin / stdout; LIBERO's own
prints are sent to stderr. Observation images go through ``<image-file>``, a file in shared
memory (/dev/shm) that both sides map: camera c occupies bytes [c*H*W*3, (c+1)*H*W*3).

Requests (``(command, args)``) and replies (a dict; ``{"error": "..."}`` if the command raised):
  init   {suite, task_id, cameras, render_size, image_size, num_steps_wait, max_steps}
         -> {instruction, num_init_states}
  reset  {init_index, seed} -> {state}                       (images written)
  step   {actions: float64 bytes [T, 7], next_init_index, next_seed}
         -> {reward, success, truncated, steps, episode_return, episode_length, final_state, state}
         The chunk stops early at success or at the step budget; the env is then reset at once
         (same-step auto-reset) to ``next_init_index`` and the new episode's first obs returned.
  rehearse {chunks: [float64 bytes [T, 7]], observe}
         -> {rehearsals: [{reward, success, terminated, truncated, steps[, state, images]}]}
         Each chunk from a snapshot of the current state (MuJoCo integration state + the Python
         fields of the env, robot, controller, gripper and observables), which is then restored;
         no auto-reset; images {camera: bytes [image_size, image_size, 3]}.
  poses  {} -> {eef_pos [3], eef_quat [4] (x, y, z, w), gripper_qpos [2], object, object_pos [3],
         goal, goal_pos [3], steps (control steps of the running episode)}: what a scripted expert
         needs (``vlafast.envs.libero_expert``), read from the current MuJoCo state, no step taken. ``object`` / ``goal`` are the task's
         ``obj_of_interest`` (first / second: e.g. alphabet_soup_1 / basket_1 in libero_object,
         akita_black_bowl_1 / plate_1 in libero_spatial), positions are their root bodies' world
         positions (``sim.data.body_xpos``).
  close  {} -> {} and exit

Observation conventions (openpi's LIBERO example, also OpenVLA's): images rendered at
``render_size`` (256 in LIBERO's data), rotated 180 degrees (robosuite renders them upside down
and mirrored), resized to ``image_size`` with PIL bilinear (openpi's resize_with_pad; square in,
square out, so no padding); state = eef position (3) + eef orientation as axis-angle (3) +
gripper finger positions (2). The first ``num_steps_wait`` (>= 1) steps of each episode execute
the no-op action [0]*6 + [-1] while objects settle and do not count against the step budget.
"""

from __future__ import annotations

import math
import mmap
import os
import pickle
import struct
import sys

CAMERA_KEYS = {"image": "agentview_image", "wrist_image": "robot0_eye_in_hand_image"}
NOOP_ACTION = [0.0] * 6 + [-1.0]


def read_msg(fd: int):
    header = _read_exact(fd, 8)
    (n,) = struct.unpack("<Q", header)
    return pickle.loads(_read_exact(fd, n))


def write_msg(fd: int, obj) -> None:
    data = pickle.dumps(obj, protocol=4)
    buf = memoryview(struct.pack("<Q", len(data)) + data)
    while buf:
        n = os.write(fd, buf)
        buf = buf[n:]


def _read_exact(fd: int, n: int) -> bytes:
    chunks, left = [], n
    while left:
        b = os.read(fd, left)
        if not b:
            raise EOFError("pipe closed")
        chunks.append(b)
        left -= len(b)
    return b"".join(chunks)


def quat_to_axis_angle(quat) -> list[float]:
    """robosuite quaternion (x, y, z, w) -> axis * angle, angle in [0, pi] for w >= 0."""
    x, y, z, w = (float(q) for q in quat)
    w = max(-1.0, min(1.0, w))
    den = math.sqrt(max(0.0, 1.0 - w * w))
    if den < 1e-12:
        return [0.0, 0.0, 0.0]
    angle = 2.0 * math.acos(w)
    return [x * angle / den, y * angle / den, z * angle / den]


class Worker:
    def __init__(self, image_path: str):
        self.image_path = image_path
        self.env = None

    # -- commands ---------------------------------------------------------------------------

    def init(self, suite: str, task_id: int, cameras: list[str], render_size: int, image_size: int,
             num_steps_wait: int, max_steps: int) -> dict:
        os.environ.setdefault("MUJOCO_GL", "egl")
        os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
        import numpy as np
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv

        self.np = np
        suites = benchmark.get_benchmark_dict()
        if suite not in suites:
            raise ValueError(f"unknown LIBERO suite {suite!r}; known: {', '.join(sorted(suites))}")
        task_suite = suites[suite]()
        if not 0 <= task_id < task_suite.n_tasks:
            raise ValueError(f"task_id must be in [0, {task_suite.n_tasks}) for {suite}, got {task_id}")
        task = task_suite.get_task(task_id)
        self.init_states = task_suite.get_task_init_states(task_id)
        bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
        # hard_reset=False: LIBERO's default (True) rebuilds the MuJoCo model from XML at every
        # reset (6-9 s here, vs ~0.4 s); the init state then overwrites the whole sim state anyway.
        self.env = OffScreenRenderEnv(
            bddl_file_name=bddl, camera_heights=render_size, camera_widths=render_size, hard_reset=False,
        )
        self.cameras = list(cameras)
        self.render_size, self.image_size = render_size, image_size
        self.num_steps_wait, self.max_steps = num_steps_wait, max_steps
        self._set_cameras(False)
        size = len(self.cameras) * image_size * image_size * 3
        with open(self.image_path, "r+b") as f:
            self.images = mmap.mmap(f.fileno(), size)
        self.steps, self.ret = 0, 0.0
        return {"instruction": task.language, "num_init_states": int(len(self.init_states))}

    def reset(self, init_index: int, seed: int) -> dict:
        env = self.env
        env.seed(seed)
        env.reset()
        env.set_init_state(self.init_states[init_index % len(self.init_states)])
        for k in range(self.num_steps_wait):
            obs, _, _ = self._step(NOOP_ACTION, render=k == self.num_steps_wait - 1)
        self.steps, self.ret = 0, 0.0
        return {"state": self._observe(obs)}

    def step(self, actions: bytes, next_init_index: int, next_seed: int) -> dict:
        obs, out = self._run_chunk(self._chunk(actions), render_last=True)
        if out["success"] or out["truncated"]:
            out.update(episode_return=self.ret, episode_length=self.steps, final_state=self._proprio(obs))
            out.update(self.reset(next_init_index, next_seed))
        else:
            out["state"] = self._observe(obs)
        return out

    def rehearse(self, chunks: list, observe: bool) -> dict:
        """Each chunk run from a snapshot of the current state, which is then restored; with
        ``observe``, the state and camera frames each ends in (frames as bytes in the reply: the
        shared image file keeps the current observation)."""
        snap = self._snapshot()
        replies = []
        try:
            for actions in chunks:
                self._restore(snap)
                obs, out = self._run_chunk(self._chunk(actions), render_last=observe)
                out["terminated"], out["truncated"] = out["success"], out["truncated"] and not out["success"]
                if observe:
                    if any(CAMERA_KEYS[c] not in obs for c in self.cameras):  # ended before its last action
                        obs = self._render_now()
                    out["state"], out["images"] = self._proprio(obs), self._frames(obs)
                replies.append(out)
        finally:
            self._restore(snap)
        return {"rehearsals": replies}

    def poses(self) -> dict:
        """End effector (the grip site, as ``robot0_eef_pos``), finger joints, and the task's
        object and goal (``obj_of_interest[0]`` / ``[1]``, root-body positions)."""
        env = self.env.env
        data = env.sim.data
        interest = list(env.obj_of_interest)
        if len(interest) < 2:
            raise ValueError(f"poses needs an object and a goal in obj_of_interest, got {interest}")
        robot = env.robots[0]
        eef = data.site_xpos[robot.eef_site_id]
        w, x, y, z = data.get_body_xquat(robot.robot_model.eef_name)  # MuJoCo's (w, x, y, z)
        quat = (x, y, z, w)  # robosuite's robot0_eef_quat convention
        fingers = data.qpos[robot._ref_gripper_joint_pos_indexes]

        def pos(name):
            return [float(v) for v in data.body_xpos[env.obj_body_id[name]]]

        return {"eef_pos": [float(v) for v in eef], "eef_quat": [float(v) for v in quat],
                "gripper_qpos": [float(v) for v in fingers], "object": interest[0], "object_pos": pos(interest[0]),
                "goal": interest[1], "goal_pos": pos(interest[1]), "steps": self.steps}

    # -- internals --------------------------------------------------------------------------

    def _chunk(self, actions: bytes):
        return self.np.frombuffer(actions, dtype=self.np.float64).reshape(-1, 7)

    def _run_chunk(self, chunk, render_last: bool):
        """Step ``chunk`` [T, 7] until it ends, succeeds or hits the step budget -> (last obs,
        {reward, success, truncated, steps}). Cameras render after the last action only."""
        reward, success, truncated, n, obs = 0.0, False, False, 0, None
        for t, a in enumerate(chunk):
            # images are needed only after the chunk's last action, if the episode goes on
            render = render_last and t == len(chunk) - 1 and self.steps + 1 < self.max_steps
            obs, r, done = self._step(a.tolist(), render=render)
            n += 1
            self.steps += 1
            reward += float(r)
            self.ret += float(r)
            if done:  # LIBERO's done is its success check (all goal predicates hold)
                success = True
                break
            if self.steps >= self.max_steps:
                truncated = True
                break
        return obs, {"reward": reward, "success": success, "truncated": truncated, "steps": n}

    def _state_holders(self) -> list:
        """The Python objects whose fields a step changes besides MuJoCo's state: the env
        (timestep, cur_time, done), each robot (its recent-value buffers), its arm controller
        (goal pose, reference orientation) and gripper (current action), every observable
        (sampling timers, last values)."""
        env = self.env.env
        holders = [env]
        for robot in env.robots:
            grippers = robot.gripper.values() if isinstance(robot.gripper, dict) else [robot.gripper]
            holders += [robot, robot.controller, *grippers]
        return holders + list(env._observables.values())

    def _snapshot(self):
        """Everything the next chunk depends on. MuJoCo's integration state (time, qpos, qvel,
        act, warm start, controls, applied forces, mocap) alone does not replay a chunk exactly
        (0.009 off in the eef pose after 5 steps, measured): the Python-side fields of
        ``_state_holders`` are copied too. Replay is then bitwise (tests)."""
        import copy

        import mujoco

        np = self.np
        sim = self.env.env.sim
        spec = mujoco.mjtState.mjSTATE_INTEGRATION
        physics = np.empty(mujoco.mj_stateSize(sim.model._model, spec))
        mujoco.mj_getState(sim.model._model, sim.data._data, physics, spec)
        plain = (bool, int, float, str, type(None), np.ndarray, np.generic)
        fields = [(obj, {k: copy.deepcopy(v) for k, v in vars(obj).items()
                         if isinstance(v, plain) or type(v).__name__.endswith("Buffer")})
                  for obj in self._state_holders()]
        return physics, fields, self.steps, self.ret

    def _restore(self, snap) -> None:
        import copy

        import mujoco

        physics, fields, self.steps, self.ret = snap
        sim = self.env.env.sim
        mujoco.mj_setState(sim.model._model, sim.data._data, physics, mujoco.mjtState.mjSTATE_INTEGRATION)
        mujoco.mj_forward(sim.model._model, sim.data._data)
        for obj, values in fields:
            for k, v in values.items():
                setattr(obj, k, copy.deepcopy(v))

    def _render_now(self):
        """The observation of the current state with the cameras on (no step taken)."""
        self._set_cameras(True)
        try:
            return self.env.env._get_observations(force_update=True)
        finally:
            self._set_cameras(False)

    def _step(self, action: list[float], render: bool):
        """One control step. Cameras are rendered only when ``render``: rendering is ~95% of a
        LIBERO step on a CPU, and only a chunk's last observation is returned. A camera enabled
        just for this step samples at the same substep as with cameras always on, so the
        observation is identical to LIBERO's own loop (checked against it in the tests)."""
        if render:
            self._set_cameras(True)
        try:
            obs, r, done, _ = self.env.step(action)
        finally:
            if render:
                self._set_cameras(False)
        return obs, r, done

    def _set_cameras(self, enabled: bool) -> None:
        observables = self.env.env._observables
        clock = observables["robot0_eef_pos"]  # always enabled, same sampling rate as the cameras
        for name in self.cameras:
            self.env.env.modify_observable(CAMERA_KEYS[name], "enabled", enabled)
            if enabled:
                # robosuite samples an observable at the physics substep its own timer picks, and
                # set_enabled resets that timer. With cameras always on, their timers would run in
                # lockstep with the proprio observables' (same rate, same resets and forced updates),
                # so take over that clock: the frame is then sampled at the same substep as the
                # state, exactly as in LIBERO's own loop. (Private fields of robosuite 1.4.0, pinned.)
                cam = observables[CAMERA_KEYS[name]]
                cam._time_since_last_sample = clock._time_since_last_sample
                cam._sampled = clock._sampled
                cam._current_delay = clock._current_delay

    @staticmethod
    def _proprio(obs) -> list[float]:
        return (
            [float(v) for v in obs["robot0_eef_pos"]]
            + quat_to_axis_angle(obs["robot0_eef_quat"])
            + [float(v) for v in obs["robot0_gripper_qpos"]]
        )

    def _frames(self, obs) -> dict[str, bytes]:
        """Each camera's frame as the policy sees it, [image_size, image_size, 3] uint8 bytes."""
        np, frames = self.np, {}
        for name in self.cameras:
            img = np.ascontiguousarray(obs[CAMERA_KEYS[name]][::-1, ::-1])  # rotate 180 degrees
            if self.image_size != self.render_size:
                from PIL import Image

                img = np.asarray(Image.fromarray(img).resize((self.image_size, self.image_size), Image.BILINEAR))
            frames[name] = img.tobytes()
        return frames

    def _observe(self, obs) -> list[float]:
        frame, frames = self.image_size * self.image_size * 3, self._frames(obs)
        for c, name in enumerate(self.cameras):
            self.images[c * frame:(c + 1) * frame] = frames[name]
        return self._proprio(obs)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: libero_worker.py <image-file>", file=sys.stderr)
        return 2
    # Run as a script, this file's folder (vlafast/envs, which holds libero.py) heads sys.path
    # and would shadow the real ``libero`` package.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    # Own the original stdin/stdout for the protocol; LIBERO / robosuite print to stdout, so
    # fd 1 becomes stderr for everything else in this process.
    fd_in, fd_out = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    worker = Worker(argv[1])
    while True:
        try:
            command, args = read_msg(fd_in)
        except EOFError:
            return 0
        if command == "close":
            write_msg(fd_out, {})
            return 0
        try:
            reply = getattr(worker, command)(**args) if command in ("init", "reset", "step", "rehearse", "poses") else None
            if reply is None:
                raise ValueError(f"unknown command {command!r}")
        except Exception as exc:  # reported to the parent, which resets or restarts this env
            import traceback

            traceback.print_exc()
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        write_msg(fd_out, reply)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
