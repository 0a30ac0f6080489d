"""pi_RL's regime and honest statistics: the sparse 0/1 reward, time-outs, the Flow-Noise entropy
scale, paired intervals, independent episode streams per seed, and the comparison tool."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vlafast.eval import (
    STREAM_STRIDE, paired_difference, paired_difference_interval, seed_streams, wilson_interval,
)
from vlafast.rl import train as T


def _reach(n=4, **kw):
    pytest.importorskip("mujoco", reason="the built-in UR5e task simulates in MuJoCo")
    from vlafast.envs import make_env

    return make_env("ur5e-reach", n, seed=0, image_size=16, slot_jitter=0.04, max_episode_steps=30, **kw)


# -- the sparse reward -----------------------------------------------------------------------------

def test_sparse_reward_pays_success_only():
    # The same seeds and expert actions: success is identical, the sparse reward is 1 on the
    # step that succeeds (speed word kept) and 0 everywhere else, the shaped one is dense.
    shaped, sparse = _reach(reward="shaped"), _reach(reward="sparse")
    shaped.reset(seed=11), sparse.reset(seed=11)
    n_success = 0
    dense = False
    for _ in range(12):
        chunk = shaped.expert_chunk(5, noise=0.3)
        np.testing.assert_array_equal(sparse.expert_chunk(5, noise=0.3), chunk)  # keeps the episode RNGs in step
        _, r_shaped, term_a, trunc_a, info_a = shaped.step(chunk)
        _, r_sparse, term_b, trunc_b, info_b = sparse.step(chunk)
        np.testing.assert_array_equal(term_a, term_b)
        np.testing.assert_array_equal(trunc_a, trunc_b)
        np.testing.assert_array_equal(info_a["success"], info_b["success"])
        np.testing.assert_array_equal(r_sparse, info_b["success"].astype(np.float32))
        n_success += int(info_b["success"].sum())
        dense |= bool((r_shaped[~term_a] != 0).any())
    assert n_success > 0 and dense
    with pytest.raises(ValueError, match="reward must be 'shaped'"):
        _reach(reward="binary")
    shaped.close(), sparse.close()


# -- the Flow-Noise entropy bonus is RLinf's per-element mean ----------------------------------------

def test_flow_noise_entropy_is_the_per_element_mean():
    # RLinf: entropy = mean over the K+1 Gaussian terms (initial noise N(0, I) and K
    # transitions) and the executed elements of 0.5 log(2 pi e sigma^2). The update's entropy
    # term must be that number, not the per-chunk sum.
    from vlafast.flow.noise_head import NoiseHead
    from vlafast.models.gemma import GemmaConfig
    from vlafast.models.pi0 import Pi0Config, Pi0Policy
    from vlafast.models.siglip import SiglipConfig
    from vlafast.policies import build_word_tokenizer, flow_policy
    from vlafast.rl.losses import PPOConfig
    from vlafast.rl.recipe import task_words
    from vlafast.rl.sampler_spec import FlowNoise, sampler_config

    env = _reach()
    torch.manual_seed(0)
    tok = build_word_tokenizer(task_words())
    g = GemmaConfig(width=32, depth=1, mlp_dim=48, num_heads=2, num_kv_heads=1, head_dim=16)
    cfg = Pi0Config.tiny(vision=SiglipConfig(image_size=16, patch_size=8, width=24, depth=1, mlp_dim=32, num_heads=2),
                         vlm=g, expert=g, vocab_size=tok.get_vocab_size(), action_dim=4, state_dim=9, horizon=6,
                         num_steps=3)
    pol = flow_policy(Pi0Policy(cfg), tok, env.spec, exec_horizon=3, max_tokens=8,
                      noise_head=NoiseHead(cfg.expert.width, cfg.action_dim))
    cfg = sampler_config(FlowNoise(num_steps=3), pol.noise_head)
    ro, _, _ = T.collect(pol, env, env.reset(seed=2), 2, cfg, torch.Generator().manual_seed(3), T.new_stats())
    _, trace = ro.flat()
    m = trace.action_mask.float()                                     # [T, A]: executed actions x env dims
    h = 0.5 * torch.log(2 * math.pi * math.e * trace.sigmas.float() ** 2)  # [M, K, T, A]
    h0 = 0.5 * math.log(2 * math.pi * math.e)
    per_sample = (h0 * m.sum() + (h * m).sum((1, 2, 3))) / ((trace.sigmas.shape[1] + 1) * m.sum())
    samples = T.prepare(ro, torch.zeros(2, 4), torch.zeros(2, 4), PPOConfig())
    with torch.no_grad():
        _, terms = T.ppo_clip_loss(pol, samples, samples.idx, PPOConfig())
    torch.testing.assert_close(terms["entropy"], per_sample.mean(), rtol=1e-5, atol=1e-5)  # measured 0 to 1e-7
    assert m.sum() < m.numel()  # the mask matters: only the executed part counts
    env.close()


# -- paired statistics -------------------------------------------------------------------------------

def test_paired_interval_covers_at_its_level():
    # Simulated pairs with a known difference and correlation: the 95% interval covers the true
    # difference in 93-97% of 2000 draws (n = 200 episodes, success 0.55 vs 0.62).
    rng = np.random.default_rng(0)
    n, covered, draws = 200, 0, 2000
    p_both, p_first, p_second = 0.45, 0.17, 0.10  # first 0.62, second 0.55, difference 0.07
    for _ in range(draws):
        c = rng.multinomial(n, [p_both, p_first, p_second, 1 - p_both - p_first - p_second])
        _, lo, hi = paired_difference_interval(*map(int, c))
        covered += lo <= 0.07 <= hi
    assert 0.93 <= covered / draws <= 0.97, covered / draws


def test_paired_interval_is_narrower_than_separate_wilson_and_matches_wald_at_large_n():
    # 1024 paired episodes, 60% vs 66%, most episodes agreeing: the paired interval (width 0.049)
    # is much narrower than an unpaired one from the two Wilson intervals (0.083), and close to
    # the Wald interval of the mean paired difference at this n.
    both, only_first, only_second, neither = 560, 116, 54, 294
    n = both + only_first + only_second + neither
    d, lo, hi = paired_difference_interval(both, only_first, only_second, neither)
    assert d == pytest.approx((only_first - only_second) / n)
    w1, w2 = wilson_interval(both + only_first, n), wilson_interval(both + only_second, n)
    assert hi - lo < 0.65 * math.hypot(w1[1] - w1[0], w2[1] - w2[0])
    x = np.r_[np.ones(only_first), -np.ones(only_second), np.zeros(both + neither)]
    half = 1.959964 * x.std() / math.sqrt(n)
    assert lo == pytest.approx(d - half, abs=0.003) and hi == pytest.approx(d + half, abs=0.003)
    # no discordant pairs: the difference is 0 and its interval contains 0; symmetry
    d0, lo0, hi0 = paired_difference_interval(500, 0, 0, 524)
    assert d0 == 0 and lo0 < 0 < hi0 and hi0 < 0.01
    d1, lo1, hi1 = paired_difference_interval(560, 54, 116, 294)
    assert (d1, lo1, hi1) == pytest.approx((-d, -hi, -lo))
    with pytest.raises(ValueError, match=">= 0"):
        paired_difference_interval(1, -1, 0, 0)


def test_paired_difference_pairs_records_by_episode():
    def rec(env, index, success, instruction="touch the red ball"):
        return {"env": env, "index": index, "success": success, "instruction": instruction}

    a = [rec(0, 0, True), rec(0, 1, False), rec(1, 0, True), rec(1, 1, True)]
    b = [rec(1, 1, False), rec(1, 0, True), rec(0, 1, False), rec(0, 0, False)]  # another completion order
    out = paired_difference(a, b)
    assert (out["both"], out["only_first"], out["only_second"], out["neither"]) == (1, 2, 0, 1)
    assert out["difference"] == 0.5 and out["episodes"] == 4
    with pytest.raises(ValueError, match="same episodes"):
        paired_difference(a, b[:3])
    with pytest.raises(ValueError, match="different instructions"):
        paired_difference(a, b[:3] + [rec(0, 0, False, "reach the blue ball")])


# -- independent streams -------------------------------------------------------------------------------

def test_seed_streams_are_disjoint_between_seeds_and_roles():
    blocks = []
    for seed in range(6):
        s = seed_streams(seed)
        blocks += [s.demos, s.train, s.eval]
    assert len(set(b // STREAM_STRIDE for b in blocks)) == len(blocks)  # one block each
    # a run's training resets stay inside its block (10_000 seeds per update, 256 envs)
    s = seed_streams(1)
    assert max(T.reset_seeds(s.train, 9_998, 0, 256)) < s.train + STREAM_STRIDE
    with pytest.raises(ValueError, match="integer >= 0"):
        seed_streams(-1)


def test_evaluation_streams_share_no_episode_between_seeds():
    # The old scheme (evaluation at seed + 100 with env i at + i) gave seeds 0 and 1 15 of 16
    # env streams in common; the streams here share none. Episodes are compared by their
    # instruction and initial state (ball positions enter the rendered image; state is the arm).
    env = _reach(16)
    first = {}
    for seed in (0, 1):
        obs = env.reset(seed=seed_streams(seed).eval)
        first[seed] = {(ins, tuple(np.round(st, 5))) for ins, st in zip(obs["instruction"], obs["state"])}
    assert not first[0] & first[1]
    old = {}
    for seed in (0, 1):
        obs = env.reset(seed=seed + 100)
        old[seed] = {(ins, tuple(np.round(st, 5))) for ins, st in zip(obs["instruction"], obs["state"])}
    assert len(old[0] & old[1]) == 15
    env.close()


# -- the comparison tool -------------------------------------------------------------------------------

def test_compare_methods_run_in_pi_rl_regime():
    from vlafast.rl import compare as C
    from vlafast.rl.recipe import Recipe

    base = C.base_recipe("reach", 2)
    assert base.seed == 2 and base == Recipe(seed=2)
    assert C.base_recipe("headroom", 0).reach_radius == 0.05
    sparse = C.base_recipe("headroom", 0, {"env_kwargs": {"reward": "sparse"}})
    assert sparse.env_kwargs == {"reward": "sparse"} and sparse.reach_radius == 0.05
    for m in ("ppo_flow_sde", "ppo_flow_noise"):
        r = C.method_recipe(base, m)
        assert r.rl.algo == "ppo" and r.rl.bc_coef == 0 and r.rl.timeouts == "terminal"
        assert r.num_envs * r.rl.chunks_per_rollout >= 2048 and r.rl.ppo.minibatch is None  # chunks per optimiser step
        assert r.rl.ppo.actor_lr == C.ACTOR_LR[r.rl.sampler.kind]
        assert C.steps_per_update(r, 30.0) == 64 * 32 * 5
    grpo, states = C.method_recipe(base, "grpo"), C.method_recipe(base, "grpo_states")
    assert grpo.rl.grpo_groups == "episode" and C.steps_per_update(grpo, 30.0) == 256 * 30
    assert states.rl == Recipe().rl and C.steps_per_update(states, 30.0) == 16 * 4 * 5 * 9
    assert C.method_recipe(base, "sft") is base
    quick = C.method_recipe(base, "grpo_states", {"num_envs": 4, "rl": {"chunks_per_rollout": 2}})
    assert quick.num_envs == 4 and quick.rl == dataclasses.replace(Recipe().rl, chunks_per_rollout=2)
    with pytest.raises(ValueError, match="method must be one of"):
        C.method_recipe(base, "ppo")
    with pytest.raises(ValueError, match="testbed must be one of"):
        C.base_recipe("reech", 0)


def test_best_method_is_the_highest_mean_paired_gain_over_complete_seeds():
    from vlafast.rl import compare as C

    def row(method, seed, gain, testbed="headroom"):
        return {"method": method, "testbed": testbed, "seed": str(seed), "gain": "" if method == "sft" else str(gain)}

    rows = [row("sft", s, None) for s in (0, 1)] + [row("ppo_flow_sde", 0, 0.05), row("ppo_flow_sde", 1, 0.01),
                                                    row("grpo", 0, 0.04), row("grpo", 1, 0.03),
                                                    row("grpo_states", 0, 0.5),  # one seed only: not compared
                                                    row("ppo_flow_noise", 0, 0.9, "reach")]
    assert C.best_method(rows, "headroom") == "grpo"  # mean 0.035 against 0.03
    assert C.best_method(rows, "reach") == "ppo_flow_noise"
    with pytest.raises(ValueError, match="no RL method run on every seed"):
        C.best_method(rows[:2], "headroom")


def test_the_demo_runs_the_committed_comparisons_best_method():
    """Issue 28, item 6: the demo's RL phase is the method with the best mean paired gain in the
    committed table at the demo's testbed and budget, and that table holds the demo's rows."""
    import csv

    from vlafast.rl import compare as C

    path = Path(__file__).resolve().parents[1] / C.DEMO.table
    rows = list(csv.DictReader(path.open()))
    assert C.best_method(rows, C.DEMO.testbed) == C.DEMO.method
    for r in rows:
        assert r["testbed"] == C.DEMO.testbed and int(r["episodes"]) == C.DEMO.episodes
        # what each run spent: no method got less than its budget; episode GRPO's updates cost what
        # its episodes last, sized by SFT's mean length, and its episodes grew longer (158k-175k)
        assert r["method"] == "sft" or int(r["env_steps"]) >= 0.95 * C.DEMO.env_steps
    assert {(r["method"], int(r["seed"])) for r in rows} >= {("sft", C.DEMO.seed), (C.DEMO.method, C.DEMO.seed)}


def test_compare_table_csv_and_curves(tmp_path):
    from tools import rl_compare as C
    from vlafast.rl import compare

    rows = [{"method": "sft", "testbed": "reach", "seed": 0, "env_steps": 0, "updates": 0, "episodes": 8,
             "success": 0.5, "ci_low": 0.4, "ci_high": 0.6, "seconds": 1.0},
            {"method": "ppo_flow_sde", "testbed": "reach", "seed": 0, "env_steps": 100, "updates": 2, "episodes": 8,
             "success": 0.75, "ci_low": 0.5, "ci_high": 0.9, "gain": 0.25, "gain_low": 0.05, "gain_high": 0.4,
             "approx_kl": 0.006, "clipfrac": 0.07, "seconds": 2.0}]
    C.write_csv(rows[::-1], tmp_path / "r.csv")
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0] == ",".join(C.COLUMNS)
    assert lines[1].startswith("sft,reach,0,0,0,8,0.5,") and lines[2].startswith("ppo_flow_sde,reach,0,100,2,8,0.75,")
    table = C.summary(rows)
    assert "| ppo_flow_sde | 100 | 75.0% [50.0, 90.0], +25.0 [+5.0, +40.0] | 75.0% | +25.0 |" in table
    assert "| sft | 0 | 50.0% [40.0, 60.0] | 50.0% | - |" in table
    (tmp_path / "reach").mkdir()
    history = [{"env_steps": 50.0, "success_rate": 0.5}, {"env_steps": 50.0, "success_rate": 0.7}]
    (tmp_path / "reach" / "ppo_flow_sde_seed0.history.json").write_text(json.dumps(history))
    png = C.plot_curves(tmp_path, "reach", rows, tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # pooled curve: episode-weighted success per env-step window, empty windows left out
    x, y = compare.pooled_curve(np.array([10.0, 20.0, 30.0, 90.0]), np.array([1.0, 0.0, 0.5, 0.25]),
                          np.array([1.0, 3.0, 2.0, 4.0]), bins=3)
    np.testing.assert_allclose(x, [15.0, 75.0])
    np.testing.assert_allclose(y, [(1 + 0 + 1) / 6, 0.25])
    warmup_then_actor = [{"approx_kl": 1.0, "clipfrac": 0.0}, {"approx_kl": 0.01, "clipfrac": 0.1}]
    assert C.actor_means(warmup_then_actor, 1) == {"approx_kl": 0.01, "clipfrac": 0.1}


def test_compare_runs_end_to_end(tmp_path, monkeypatch):
    # A tiny comparison: SFT, then PPO Flow-Noise paired against it on the same evaluation
    # episodes, the episodes and history written beside the CSV's row.
    from tools import rl_compare as C
    from vlafast.rl import compare
    from vlafast.rl.sampler_spec import FlowNoise

    monkeypatch.setitem(compare.METHODS, "ppo_flow_noise", dict(num_envs=4, rl=dict(
        compare.ppo_settings(FlowNoise()), chunks_per_rollout=2, critic_warmup=1)))
    monkeypatch.setattr(compare, "EVAL_ENVS", 4)
    recipe = {"num_envs": 4, "image_size": 16, "demos": 4, "sft_steps": 5, "width": 16, "depth": 1, "horizon": 4,
              "exec_horizon": 3, "env_kwargs": {"max_episode_steps": 9}}
    assert C.main(["--testbeds", "reach", "--seeds", "3", "--methods", "sft", "ppo_flow_noise", "--env-steps", "48",
                   "--episodes", "8", "--jobs", "1", "--recipe", json.dumps(recipe), "--work", str(tmp_path / "w"),
                   "--out", str(tmp_path / "r.csv")]) == 0
    rows = (tmp_path / "r.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["sft", "ppo_flow_noise"]
    ppo = dict(zip(C.COLUMNS, rows[2].split(",")))
    assert int(ppo["updates"]) == 2 and int(ppo["episodes"]) == 8 and ppo["gain_low"] != ""
    sft = json.loads((tmp_path / "w" / "reach" / "sft_seed3.episodes.json").read_text())
    rl = json.loads((tmp_path / "w" / "reach" / "ppo_flow_noise_seed3.episodes.json").read_text())
    assert sorted((r["env"], r["index"], r["instruction"]) for r in sft) == \
        sorted((r["env"], r["index"], r["instruction"]) for r in rl)
    assert (tmp_path / "r.png").exists()  # one testbed: the CSV's name
    assert (tmp_path / "w" / "reach" / "ppo_flow_noise_seed3" / "policy.json").exists()  # the trained policy, beside
    # --lr-sweep from the same SFT policy: one critic-only update, then the actor's step size
    assert C.main(["--testbeds", "reach", "--seeds", "3", "--methods", "ppo_flow_noise", "--lr-sweep", "1e-4",
                   "--sweep-updates", "1", "--jobs", "1", "--work", str(tmp_path / "w"),
                   "--out", str(tmp_path / "sweep.csv")]) == 0
    sweep = dict(zip(C.SWEEP_COLUMNS, (tmp_path / "sweep.csv").read_text().splitlines()[1].split(",")))
    assert sweep["actor_lr"] == "0.0001" and sweep["chunks_per_step"] == "8" and 0 < float(sweep["approx_kl"]) < 1
