"""The VecEnv contract on the built-in UR5e tasks."""

import numpy as np
import pytest

pytest.importorskip("mujoco", reason="the built-in UR5e tasks simulate in MuJoCo")

from vlafast.envs import VecEnv, make_env  # noqa: E402
from vlafast.envs.reach import SPEEDS, ReachConfig, UR5eReach  # noqa: E402


@pytest.fixture(scope="module")
def env():
    e = make_env("ur5e-reach", 3, seed=0)
    yield e
    e.close()


def test_reset_contract(env):
    assert isinstance(env, VecEnv)
    obs = env.reset(seed=123)
    B, (H, W) = env.spec.num_envs, env.spec.image_size
    assert obs["images"]["base"].shape == (B, H, W, 3) and obs["images"]["base"].dtype == np.uint8
    assert obs["state"].shape == (B, env.spec.state_dim) and obs["state"].dtype == np.float32
    assert len(obs["instruction"]) == B and all("ball" in s for s in obs["instruction"])
    # Images show the scene, not a blank buffer.
    assert obs["images"]["base"].std() > 5


def test_seeding_is_deterministic():
    a, b = make_env("ur5e-reach", 2, seed=0, render=False), make_env("ur5e-reach", 2, seed=99, render=False)
    oa, ob = a.reset(seed=7), b.reset(seed=7)
    np.testing.assert_array_equal(oa["state"], ob["state"])
    assert oa["instruction"] == ob["instruction"]
    acts = np.random.default_rng(0).uniform(-1, 1, (2, 4, 3))
    ra, rb = a.step(acts), b.step(acts)
    np.testing.assert_array_equal(ra[0]["state"], rb[0]["state"])
    np.testing.assert_array_equal(ra[1], rb[1])
    # Per-env seeds: seed + i, so env 1 of seed 7 is env 0 of seed 8.
    oc = a.reset(seed=[8, 0])
    assert oc["instruction"][0] == ob["instruction"][1]


def test_step_executes_chunk_and_moves_toward_command():
    env = make_env("ur5e-reach", 1, seed=1, render=False)
    obs = env.reset(seed=1)
    ee0 = obs["state"][0, 6:]
    chunk = np.zeros((1, 3, 3))
    chunk[0, :, 2] = 1.0  # straight up at full speed for 3 steps
    obs, r, term, trunc, info = env.step(chunk)
    if not (term[0] or trunc[0]):
        assert info["steps"][0] == 3
        dz = obs["state"][0, 8] - ee0[2]
        # 3 steps x 4 cm commanded; the position servo tracks most of it.
        assert 0.08 < dz < 0.13, dz


def test_expert_solves_task_at_instructed_speed():
    env = make_env("ur5e-reach", 4, seed=3, render=False)
    env.reset(seed=3)
    speeds: dict[str, list[float]] = {w: [] for w in SPEEDS}
    successes = []
    for _ in range(60):
        words = [ep.speed_word for ep in env._episodes]
        _, _, term, trunc, info = env.step(env.expert_chunk(5))
        for i in np.where(term | trunc)[0]:
            successes.append(info["success"][i])
            speeds[words[i]].append(info["episode_speed"][i])
    assert len(successes) > 20 and np.mean(successes) > 0.95
    # The behaviour metric orders by speed word: slowly < (none) < quickly.
    means = [np.mean(speeds[w]) for w in ("slowly", "", "quickly")]
    assert means[0] < means[1] < means[2], means


def test_speed_synonyms_change_only_the_words():
    # The same seeds with and without synonyms: the same scenes, targets, speeds and expert
    # behaviour; only the instruction's last word changes, to a synonym of the same speed.
    from vlafast.envs.reach_words import SPEED_SYNONYMS, speed_of
    from vlafast.eval import speed_word

    plain = make_env("ur5e-reach", 8, seed=0, render=False)
    syn = make_env("ur5e-reach", 8, seed=0, render=False, speed_synonyms=True)
    used = set()
    for seed in range(6):
        a, b = plain.reset(seed=10 * seed), syn.reset(seed=10 * seed)
        np.testing.assert_array_equal(a["state"], b["state"])
        assert [ep.speed_word for ep in plain._episodes] == [ep.speed_word for ep in syn._episodes]
        for s, t, ep in zip(a["instruction"], b["instruction"], syn._episodes):
            assert s.split()[:-1] == t.split()[:-1] or s == t
            assert speed_word(t) == speed_word(s) == (ep.speed_word or "(none)")
            if ep.speed_word:
                assert t.split()[-1] in SPEED_SYNONYMS[ep.speed_word]
                used.add(t.split()[-1])
        ra, rb = plain.step(plain.expert_chunk(5)), syn.step(syn.expert_chunk(5))
        np.testing.assert_array_equal(ra[0]["state"], rb[0]["state"])
        np.testing.assert_array_equal(ra[1], rb[1])
    assert len(used) >= 5, used  # 48 speed-worded episodes draw most of the 7 words
    assert speed_of("rapid") == "quickly" and speed_of("steady") == "slowly" and speed_of("ball") == ""
    with pytest.raises(ValueError, match="speed_synonyms must be true or false"):
        ReachConfig(speed_synonyms="yes")


def test_waypoint_variant_needs_both_targets():
    env = make_env("ur5e-reach2", 2, seed=5, render=False)
    obs = env.reset(seed=5)
    assert all(" then the " in s for s in obs["instruction"])
    done_success = []
    for _ in range(40):
        _, _, term, trunc, info = env.step(env.expert_chunk(5))
        done_success += list(info["success"][term | trunc])
    assert len(done_success) >= 2 and np.mean(done_success) > 0.9
    # Random actions rarely solve it.
    env.reset(seed=5)
    rnd = []
    for _ in range(40):
        _, _, term, trunc, info = env.step(np.random.default_rng(0).uniform(-1, 1, (2, 5, 3)))
        rnd += list(info["success"][term | trunc])
    assert np.mean(rnd) < 0.5


def test_auto_reset_and_episode_info():
    env = make_env("ur5e-reach", 2, seed=2, render=False, max_episode_steps=6)
    env.reset(seed=2)
    obs, r, term, trunc, info = env.step(np.zeros((2, 8, 3)))
    # 6-step budget inside an 8-step chunk: truncated after 6, reset immediately.
    assert trunc.all() and not term.any()
    assert (info["steps"] == 6).all() and (info["episode_length"] == 6).all()
    assert np.isfinite(info["episode_return"]).all()
    assert info["final_state"].shape == (2, env.spec.state_dim)
    assert not np.allclose(info["final_state"], obs["state"])  # obs is the new episode's first
    # final_obs: the ended episodes' last observations (what a critic bootstraps a truncation from)
    np.testing.assert_array_equal(info["final_obs"]["state"], info["final_state"])
    assert info["final_obs"]["instruction"] == info["instruction"]
    obs, *_, info = env.step(np.zeros((2, 2, 3)))  # nothing ends: final_obs is the returned obs
    np.testing.assert_array_equal(info["final_obs"]["state"], obs["state"])


def test_progress_reward_scales_shaping():
    returns = []
    for w in (2.0, 0.5):
        env = make_env("ur5e-reach", 2, seed=8, render=False, progress_reward=w)
        env.reset(seed=8)
        _, r, term, _, _ = env.step(env.expert_chunk(2))
        assert not term.any()  # two steps never reach the ball: the reward is shaping only
        returns.append(r)
    np.testing.assert_allclose(returns[1], returns[0] * 0.25, rtol=1e-5)
    with pytest.raises(ValueError, match="progress_reward and speed_penalty must be >= 0"):
        ReachConfig(progress_reward=-1.0)


def test_speed_penalty_charges_only_speeding_when_asked_slowly():
    rewards, words = [], None
    for penalty in (4.0, 0.0):
        env = make_env("ur5e-reach", 6, seed=3, render=False, speed_penalty=penalty)
        env.reset(seed=3)
        words = [ep.speed_word for ep in env._episodes]
        fast = np.clip(3.0 * env.expert_chunk(2), -1, 1)  # well above every instructed speed
        rewards.append(env.step(fast)[1])  # same motion in both envs; only the charge differs
    slow = np.array([w == "slowly" for w in words])
    assert slow.any() and (~slow).any(), words
    cost = rewards[1] - rewards[0]
    assert (cost[slow] > 0).all(), cost     # speeding while asked "slowly" is charged ...
    assert (cost[~slow] == 0).all(), cost   # ... and nothing else is


def test_joint_delta_mode():
    env = make_env("ur5e-reach", 2, seed=4, render=False, action_mode="joint_delta")
    assert env.spec.action_dim == 6
    env.reset(seed=4)
    succ = []
    for _ in range(40):
        _, _, term, trunc, info = env.step(env.expert_chunk(5))
        succ += list(info["success"][term | trunc])
    assert len(succ) > 5 and np.mean(succ) > 0.9


def test_crashed_sub_env_is_isolated(monkeypatch):
    env = make_env("ur5e-reach", 3, seed=6, render=False)
    env.reset(seed=6)
    real = UR5eReach._run_chunk

    def flaky(self, ep, d, chunk):
        if d is self.datas[1]:
            raise RuntimeError("injected fault")
        return real(self, ep, d, chunk)

    monkeypatch.setattr(UR5eReach, "_run_chunk", flaky)
    obs, r, term, trunc, info = env.step(np.zeros((3, 2, 3)))
    assert info["errors"][1] == "RuntimeError: injected fault"
    assert info["errors"][0] is None and info["errors"][2] is None
    assert trunc[1] and r[1] == 0
    assert (info["steps"][[0, 2]] == 2).all()
    assert np.isfinite(obs["state"]).all()


@pytest.mark.parametrize(
    "actions,match",
    [
        (np.zeros((2, 3, 3)), r"actions must be \[B=3, T, A=3\], got \[2, 3, 3\]"),
        (np.zeros((3, 3)), r"actions must be \[B=3"),
        (np.zeros((3, 0, 3)), r"T >= 1"),
        (np.full((3, 2, 3), np.nan), r"NaN/inf for environments \[0, 1, 2\]"),
    ],
)
def test_bad_actions_raise(env, actions, match):
    with pytest.raises(ValueError, match=match):
        env.step(actions)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="num_targets must be 1 or 2"):
        ReachConfig(num_targets=3)
    with pytest.raises(ValueError, match="cameras must be"):
        ReachConfig(cameras=("top",))
    with pytest.raises(ValueError, match="unknown env 'ur5e-fly'"):
        make_env("ur5e-fly", 1)
    with pytest.raises(ValueError, match="one seed per environment"):
        make_env("ur5e-reach", 2, render=False).reset(seed=[1, 2, 3])


def test_rehearse_is_counterfactual_and_exact():
    # A rehearsed chunk earns exactly what step() then pays for it, ends in the observation
    # step() then returns, and changes nothing.
    env = make_env("ur5e-reach", 3, seed=2, image_size=16)
    env.reset(seed=2)
    env.step(env.expert_chunk(3))
    chunk = np.clip(env.expert_chunk(4) + np.random.default_rng(0).normal(0, 0.3, (3, 4, 3)), -1, 1)
    qpos = [d.qpos.copy() for d in env.datas]
    rows = [2, 0, 0, 1]
    group = np.stack([chunk[2], chunk[0], np.zeros_like(chunk[0]), chunk[1]])
    out = env.rehearse(group, rows, observe=True)
    r, n = out.reward, out.steps
    assert all(np.array_equal(q, d.qpos) for q, d in zip(qpos, env.datas))  # untouched
    obs, r_step, term, trunc, info = env.step(chunk)
    assert r[0] == np.float32(r_step[2]) and r[1] == np.float32(r_step[0]) and r[3] == np.float32(r_step[1])
    for m, i in ((0, 2), (1, 0), (3, 1)):  # final_obs: the step's end observation, before any reset
        assert out.terminated[m] == term[i] and out.truncated[m] == trunc[i]
        assert np.array_equal(out.obs["images"]["base"][m], info["final_obs"]["images"]["base"][i])
        assert np.array_equal(out.obs["state"][m], info["final_obs"]["state"][i])
    assert not np.array_equal(out.obs["state"][2], out.obs["state"][1])  # standing still ends elsewhere
    assert env.rehearse(group, rows).obs is None
    assert list(n[[0, 1, 3]]) == list(info["steps"][[2, 0, 1]]) and n[2] == 4
    assert r[2] != r[1]  # standing still is worth something else than moving
    with pytest.raises(ValueError, match="one chunk per row"):
        env.rehearse(group, rows[:2])
    with pytest.raises(ValueError, match="rows must index"):
        env.rehearse(group, [0, 1, 2, 3])
