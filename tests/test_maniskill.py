"""ManiSkillVecEnv against the real ManiSkill3 / SAPIEN (PickCube-v1, bundled assets).

Marked ``vulkan``: they need a Vulkan device for SAPIEN. On this CPU machine that is Mesa's
lavapipe 25.0.7 from Debian bookworm-backports (``make maniskill``); on the GPU machine NVIDIA's
driver. Where SAPIEN cannot start (or mani-skill is missing) they skip with SAPIEN's own error.
"""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from vlafast.envs import VecEnv, make_env
from vlafast.envs.maniskill import renderer_unavailable
from helpers_ckpt import grpo_over_states_smoke

TASK = "PickCube-v1"


@pytest.fixture(scope="module")
def sapien_ok():
    err = renderer_unavailable()
    if err:
        pytest.skip(err)


def _direct(obs_mode: str, seed: int, **kw):
    """The same task made directly with ManiSkill, in this process: the reference."""
    import gymnasium as gym

    env = gym.make(TASK, num_envs=1, obs_mode=obs_mode, sim_backend="physx_cpu", control_mode="pd_ee_delta_pose", **kw)
    obs, _ = env.reset(seed=seed)
    return env, obs


@pytest.fixture(scope="module")
def cpu_env(sapien_ok):
    from vlafast.envs.maniskill import ManiSkillVecEnv

    env = ManiSkillVecEnv(TASK, 2, "state", "physx_cpu", seed=5, max_episode_steps=8)
    yield env
    env.close()


@pytest.mark.vulkan
@pytest.mark.slow
def test_state_and_rewards_match_maniskill(cpu_env):
    assert isinstance(cpu_env, VecEnv)
    assert cpu_env.spec.action_dim == 7 and cpu_env.spec.cameras == () and cpu_env.spec.control_hz == 20.0
    obs = cpu_env.reset(seed=5)
    assert obs["instruction"] == ["pick up the red cube and move it to the green goal"] * 2
    rng = np.random.default_rng(0)
    chunk = rng.uniform(-1, 1, size=(2, 3, 7))
    got, reward, terminated, truncated, info = cpu_env.step(chunk)
    assert info["steps"].tolist() == [3, 3] and info["errors"] == [None, None]
    for i, seed in enumerate((5, 6)):
        ref, ref_obs = _direct("state", seed)
        np.testing.assert_array_equal(obs["state"][i], ref_obs[0].numpy())  # same sim, same seed: exact
        total = 0.0
        for a in chunk[i]:
            ref_obs, r, *_ = ref.step(a[None].astype(np.float32))
            total += float(r[0])
        ref.close()
        np.testing.assert_allclose(got["state"][i], ref_obs[0].numpy(), atol=1e-6)  # measured max 0
        np.testing.assert_allclose(reward[i], total, rtol=1e-6)  # float32 sum; measured 0


@pytest.mark.vulkan
@pytest.mark.slow
def test_budget_truncates_and_auto_resets(cpu_env):
    start = cpu_env.reset(seed=5)
    zeros = np.zeros((2, 5, 7))
    _, _, _, truncated, info = cpu_env.step(zeros)
    assert info["steps"].tolist() == [5, 5] and not truncated.any()
    obs, reward, terminated, truncated, info = cpu_env.step(zeros)  # budget 8: ends after 3
    assert info["steps"].tolist() == [3, 3]
    assert truncated.all() and not terminated.any() and not info["success"].any()
    assert info["episode_length"].tolist() == [8, 8]
    assert np.isfinite(info["episode_return"]).all() and (info["episode_return"] > 0).all()  # dense reward
    # the returned observation is a new episode: cube placed anew
    assert np.abs(obs["state"] - info["final_state"]).max() > 1e-3
    assert np.abs(obs["state"] - start["state"]).max() > 1e-3


@pytest.mark.vulkan
@pytest.mark.slow
def test_rehearse_restores_state_and_replays_step(cpu_env):
    # A rehearsed chunk earns what step() then pays and ends in the observation step() returns;
    # the state (sim, controller, elapsed steps) is restored after it: the time limit still
    # counts from before the rehearsals, and a second rehearsal of a chunk repeats the first.
    cpu_env.reset(seed=4)
    cpu_env.step(np.zeros((2, 2, 7)))
    chunk = np.random.default_rng(1).uniform(-1, 1, size=(2, 3, 7))
    rows = [1, 0, 1, 0]
    group = np.stack([chunk[1], chunk[0], chunk[1], np.zeros_like(chunk[0])])
    rh = cpu_env.rehearse(group, rows, observe=True)
    np.testing.assert_array_equal(rh.reward[0], rh.reward[2])  # same chunk from the restored state
    np.testing.assert_array_equal(rh.obs["state"][0], rh.obs["state"][2])
    assert rh.reward[3] != rh.reward[1]
    obs, reward, term, trunc, info = cpu_env.step(chunk)
    for m, i in ((0, 1), (1, 0)):
        assert rh.reward[m] == np.float32(reward[i]) and rh.steps[m] == info["steps"][i] == 3
        np.testing.assert_array_equal(rh.obs["state"][m], obs["state"][i])  # measured max 0
    # 2 + 3 of the 8-step budget are spent (rehearsals spent none): 3 more steps end it.
    assert cpu_env.rehearse(np.zeros((1, 5, 7)), [0]).truncated[0]
    _, _, _, trunc, info = cpu_env.step(np.zeros((2, 5, 7)))
    assert trunc.all() and info["steps"].tolist() == [3, 3]
    with pytest.raises(ValueError, match="one chunk per row"):
        cpu_env.rehearse(group, rows[:2])


@pytest.mark.vulkan
@pytest.mark.slow
def test_killed_worker_is_restarted_and_reported(cpu_env):
    cpu_env.reset(seed=1)
    restarts = cpu_env.restarts
    os.kill(cpu_env.worker_pids[0], signal.SIGKILL)
    obs, reward, terminated, truncated, info = cpu_env.step(np.zeros((2, 2, 7)))
    assert "died" in info["errors"][0] and truncated[0] and reward[0] == 0
    assert info["errors"][1] is None and info["steps"][1] == 2
    assert cpu_env.restarts == restarts + 1 and np.isfinite(obs["state"]).all()
    _, _, _, _, info = cpu_env.step(np.zeros((2, 2, 7)))
    assert info["errors"] == [None, None] and info["steps"].tolist() == [2, 2]


@pytest.mark.vulkan
@pytest.mark.slow
def test_hung_worker_times_out_and_is_restarted(cpu_env):
    cpu_env.reset(seed=2)
    restarts = cpu_env.restarts
    os.kill(cpu_env.worker_pids[1], signal.SIGSTOP)  # a real hang: the process stops answering
    cpu_env._workers[1].timeout_s = 3.0              # white-box: this worker only, not the 300 s default
    _, reward, _, truncated, info = cpu_env.step(np.zeros((2, 2, 7)))
    assert "no answer within 3 s" in info["errors"][1] and truncated[1] and reward[1] == 0
    assert info["errors"][0] is None and cpu_env.restarts == restarts + 1
    _, _, _, _, info = cpu_env.step(np.zeros((2, 2, 7)))
    assert info["errors"] == [None, None] and info["steps"].tolist() == [2, 2]


@pytest.mark.vulkan
@pytest.mark.slow
def test_rgb_images_match_maniskill(sapien_ok):
    env = make_env("maniskill:PickCube-v1", 1, seed=3, obs_mode="rgb", sim_backend="physx_cpu", image_size=48)
    try:
        obs = env.reset(seed=3)
        assert env.spec.cameras == ("base_camera",) and env.spec.image_size == (48, 48)
        img = obs["images"]["base_camera"]
        assert img.shape == (1, 48, 48, 3) and img.dtype == np.uint8 and img.std() > 5
        ref, ref_obs = _direct("rgb", 3, sensor_configs=dict(width=48, height=48))
        ref.close()
        np.testing.assert_array_equal(img[0], ref_obs["sensor_data"]["base_camera"]["rgb"][0].numpy())  # measured 0
        qpos = ref_obs["agent"]["qpos"][0].numpy()
        np.testing.assert_array_equal(obs["state"][0, : qpos.size], qpos)  # state starts with agent qpos
    finally:
        env.close()


@pytest.mark.vulkan
@pytest.mark.gpu
def test_gpu_batched_sim_chunks_and_partial_resets(sapien_ok):
    from vlafast.envs.maniskill import ManiSkillVecEnv

    env = ManiSkillVecEnv(TASK, 16, "state", "auto", seed=0, max_episode_steps=6)
    try:
        assert env.sim_backend == "physx_cuda"
        obs = env.reset(seed=0)
        assert obs["state"].shape == (16, env.spec.state_dim) and np.isfinite(obs["state"]).all()
        zeros = np.zeros((16, 4, 7))
        _, _, _, truncated, info = env.step(zeros)
        assert info["steps"].tolist() == [4] * 16 and not truncated.any()
        obs, _, terminated, truncated, info = env.step(zeros)  # budget 6: ends after 2 of these 4
        assert info["steps"].tolist() == [2] * 16 and truncated.all() and not terminated.any()
        assert info["episode_length"].tolist() == [6] * 16
        assert np.abs(obs["state"] - info["final_state"]).max() > 1e-3
        _, _, _, truncated, info = env.step(zeros[:, :1])
        assert info["steps"].tolist() == [1] * 16 and not truncated.any()
    finally:
        env.close()


@pytest.mark.vulkan
def test_task_without_its_assets_is_refused_with_the_fix(sapien_ok):
    from vlafast.envs.maniskill import ManiSkillVecEnv, _missing_assets

    if not _missing_assets("PickSingleYCB-v1"):
        pytest.skip("YCB assets are present here")
    with pytest.raises(FileNotFoundError, match="download_asset PickSingleYCB-v1"):
        ManiSkillVecEnv("PickSingleYCB-v1", 1, "state", "physx_cpu")


def test_argument_validation():
    from vlafast.envs.maniskill import ManiSkillVecEnv

    with pytest.raises(ValueError, match="obs_mode"):
        ManiSkillVecEnv(TASK, 1, "pointcloud")
    with pytest.raises(ValueError, match="sim_backend"):
        ManiSkillVecEnv(TASK, 1, "state", "gpu")
    with pytest.raises(ValueError, match="image_size"):
        ManiSkillVecEnv(TASK, 1, "state", image_size=64)


@pytest.mark.vulkan
@pytest.mark.slow
def test_grpo_over_states_runs_on_maniskill(sapien_ok):
    # End to end on a real ManiSkill task: a tiny pi0 on 16 px RGB, horizon-correct GRPO over
    # states (rehearsals from worker snapshots, critic on their end observations), two updates.
    env = make_env("maniskill:PickCube-v1", 2, seed=3, obs_mode="rgb", sim_backend="physx_cpu", image_size=16,
                   max_episode_steps=6)
    try:
        grpo_over_states_smoke(env, image_size=16, patch_size=8, max_tokens=12)
    finally:
        env.close()
