"""The scripted pick-and-place expert for LIBERO (vlafast.envs.libero_expert + the worker's
``poses`` command + LiberoVecEnv.expert_chunk), against the real LIBERO in .venv-libero
(`make libero`), as tests/test_libero.py."""

from __future__ import annotations

import numpy as np
import pytest

from vlafast.envs.libero import LiberoConfig, LiberoVecEnv
from vlafast.envs.libero_expert import PHASES, PickPlaceExpert

OBJECT_0 = "pick up the alphabet soup and place it in the basket"


def test_phase_machine_on_a_point_robot():
    # A kinematic stand-in: the hand moves 1 cm per unit action, the object follows a closed
    # hand that reached it. The expert goes through every phase and drops the object on the goal.
    ex = PickPlaceExpert()
    eef, obj, goal = np.array([0.0, 0.0, 0.25]), np.array([0.1, -0.2, 0.04]), np.array([0.0, 0.25, 0.0])
    seen, held = [], False
    for _ in range(300):
        a = ex.act({"eef_pos": eef, "object_pos": obj, "goal_pos": goal}, horizon=2)
        assert a.shape == (2, 7) and np.abs(a).max() <= 1.0 and (a[:, 3:6] == 0).all()
        seen.append(PHASES[ex.phase])
        for row in a:
            eef = eef + 0.01 * row[:3]
            held = row[6] > 0 and (held or np.linalg.norm(obj - eef) < 0.02)
            if held:
                obj = eef.copy()
        if seen[-1] == "retreat":
            break
    assert list(dict.fromkeys(seen)) == list(PHASES)
    assert np.linalg.norm((obj - goal)[:2]) < 0.02 and obj[2] < 0.16 and not held
    ex.reset()
    assert PHASES[ex.phase] == "above" and ex.timer == 0


@pytest.mark.slow
def test_expert_succeeds_on_libero_object_init_states():
    # Two envs on libero_object task 0 walk init states 0, 1 (first episodes) and 2, 3 (after
    # the same-step auto-reset, which must restart each env's phase machine).
    cfg = LiberoConfig(render_size=64, image_size=32, cameras=("image",))
    env = LiberoVecEnv("libero_object", [0], 2, cfg, seed=0)
    try:
        obs = env.reset(seed=0)
        assert obs["instruction"] == [OBJECT_0] * 2
        poses = env.poses()
        assert [p["object"] for p in poses] == ["alphabet_soup_1"] * 2 and poses[0]["goal"] == "basket_1"
        np.testing.assert_allclose(poses[0]["eef_pos"], obs["state"][0, :3], atol=1e-5)  # same site as the state
        assert poses[0]["steps"] == 0 and len(poses[0]["eef_quat"]) == 4 and len(poses[0]["gripper_qpos"]) == 2
        noisy, clean = env.expert_chunk(4, noise=0.1), env.expert_chunk(4)
        assert np.abs(noisy - clean)[..., :3].max() > 0.01 and np.array_equal(noisy[..., 3:], clean[..., 3:])
        env.reset(seed=0)  # the noise repeats with the env's seed (and differs between the envs); the reset
        # state repeats to 3.2e-6 (measured), the noise draws (std 0.1) exactly
        np.testing.assert_allclose(env.expert_chunk(4, noise=0.1), noisy, atol=1e-4, rtol=0)
        assert not np.allclose(noisy[0, :, :3] - clean[0, :, :3], noisy[1, :, :3] - clean[1, :, :3])
        env.reset(seed=0)
        results = []
        for _ in range(2 * env.spec.max_episode_steps // 4):
            _, _, terminated, truncated, info = env.step(env.expert_chunk(4))
            assert info["errors"] == [None, None]
            for i in np.flatnonzero(terminated | truncated):
                results.append((int(info["init_state_index"][i]), bool(info["success"][i]),
                                int(info["episode_length"][i])))
            if len(results) >= 4:
                break
        assert sorted(r[0] for r in results[:4]) == [0, 1, 2, 3]
        wins = sum(r[1] for r in results[:4])
        # measured: 4 / 4, 111 steps each (budget 280); init states 0-9 of this task: 10 / 10
        assert wins >= 3, results
    finally:
        env.close()
