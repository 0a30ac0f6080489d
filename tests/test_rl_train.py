"""RL plumbing on the built-in task with a tiny pi0: rollout/update log-prob agreement, SFT,
PPO/GRPO smoke runs, checkpoints and resume."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from vlafast.envs import make_env
from vlafast.envs.reach import COLOURS, SPEEDS, VERBS
from vlafast.flow.noise_head import NoiseHead
from vlafast.models.gemma import GemmaConfig
from vlafast.models.pi0 import Pi0Config, Pi0Policy
from vlafast.models.siglip import SiglipConfig
from vlafast.rl import train as T
from vlafast.rl.losses import PPOConfig, gae
from vlafast.rl.policy import VLAPolicy, build_word_tokenizer, words_of

WORDS = words_of([" ".join(VERBS), "the ball then", " ".join(COLOURS), " ".join(SPEEDS)])


def tiny_policy(env, pi05=False, noise_head=False, seed=0):
    torch.manual_seed(seed)
    tok = build_word_tokenizer(WORDS)
    g = GemmaConfig(width=32, depth=2, mlp_dim=48, num_heads=2, num_kv_heads=1, head_dim=16)
    cfg = Pi0Config.tiny(pi05=pi05, vision=SiglipConfig(image_size=16, patch_size=8, width=24, depth=1, mlp_dim=32, num_heads=2),
                         vlm=g, expert=g, vocab_size=tok.get_vocab_size(), action_dim=4, state_dim=9, horizon=6, num_steps=3)
    head = NoiseHead(cfg.expert.width, cfg.action_dim) if noise_head else None
    return VLAPolicy(Pi0Policy(cfg), tok, env.spec, exec_horizon=3, max_tokens=8, noise_head=head)


@pytest.fixture(scope="module")
def env():
    e = make_env("ur5e-reach", 4, seed=0, image_size=16, slot_jitter=0.04, max_episode_steps=12)
    yield e
    e.close()


@pytest.mark.parametrize("method", ["flow_sde", "flow_noise"])
def test_update_log_probs_equal_rollout(env, method):
    pol = tiny_policy(env, noise_head=method == "flow_noise")
    cfg = pol.sampler_config(method, 3)
    gen = torch.Generator().manual_seed(1)
    stats = {"success": [], "return": [], "env_steps": []}
    ro, _, last_value = T.collect(pol, env, env.reset(seed=3), 3, cfg, gen, stats)
    assert len(ro) == 3 and last_value.shape == (4,)
    pol.train()
    for batch, trace in zip(ro.batches, ro.traces):
        logp, ent, value = pol.evaluate(batch, trace)
        # Same batch, same code path as sampling: the PPO ratio is exactly 1 at the first epoch.
        assert torch.equal(logp, trace.log_prob)
        assert torch.equal(ent, trace.entropy)
    # Minibatches mixing chunks agree to fp32 rounding (GEMM blocking depends on batch size).
    batch, trace = ro.flat()
    idx = torch.tensor([0, 5, 7, 11])
    logp, _, _ = pol.evaluate(batch.index(idx), trace.select(idx))
    torch.testing.assert_close(logp, trace.log_prob[idx], rtol=1e-5, atol=1e-4)  # measured max 0 here


def test_sft_reduces_loss(env):
    pol = tiny_policy(env)
    demos = T.collect_demos(env, episodes=6, horizon=6, exec_horizon=3, seed=0, progress=False)
    assert len(demos) >= 6 and demos.actions[0].shape == (4, 6, 3)
    losses = T.sft(pol, demos, steps=60, batch_size=16, lr=3e-3, progress=False)
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10]), (losses[:10], losses[-10:])


def test_evaluate_counts_episodes(env):
    pol = tiny_policy(env)
    out = T.evaluate(pol, env, episodes=6, seed=5, num_steps=2, progress=False)
    assert out["episodes"] == 6 and len(out["records"]) == 6
    assert 0.0 <= out["success_rate"] <= 1.0
    assert all(np.isfinite(r["speed"]) for r in out["records"])
    again = T.evaluate(pol, env, episodes=6, seed=5, num_steps=2, progress=False)
    assert [r["return"] for r in again["records"]] == [r["return"] for r in out["records"]]  # fixed seeds


def test_ppo_checkpoint_and_resume(env, tmp_path):
    cfg = T.RLConfig(iterations=2, chunks_per_rollout=2, num_steps=2, ppo=PPOConfig(actor_lr=1e-3, minibatch=4))
    pol = tiny_policy(env)
    hist = T.train_rl(pol, env, cfg, seed=0, run_dir=tmp_path, progress=False)
    assert [h["iteration"] for h in hist] == [1, 2]
    for key in ("success_rate", "return", "approx_kl", "clipfrac", "explained_variance", "sigma_mean",
                "env_steps_per_s", "chunks_per_s", "policy_loss", "value_loss"):
        assert key in hist[-1], key
    assert json.loads((tmp_path / "metrics.json").read_text())[-1]["iteration"] == 2
    # Resume to 3 iterations: starts from the checkpoint, runs only the third.
    more = T.RLConfig(iterations=3, chunks_per_rollout=2, num_steps=2, ppo=PPOConfig(actor_lr=1e-3, minibatch=4))
    pol2 = tiny_policy(env, seed=1)
    hist2 = T.train_rl(pol2, env, more, seed=0, run_dir=tmp_path, resume=True, progress=False)
    assert [h["iteration"] for h in hist2] == [1, 2, 3]
    assert [h["policy_loss"] for h in hist2[:2]] == [h["policy_loss"] for h in hist]  # restored, not re-run
    with pytest.raises(FileNotFoundError, match="--resume needs a checkpoint"):
        T.train_rl(pol2, env, more, seed=0, run_dir=tmp_path / "none", resume=True, progress=False)


def test_grpo_iteration(env):
    pol = tiny_policy(env, noise_head=True)
    cfg = T.RLConfig(algo="grpo", method="flow_noise", iterations=1, group_size=2, num_steps=2,
                     ppo=PPOConfig(actor_lr=1e-3, minibatch=8))
    hist = T.train_rl(pol, env, cfg, seed=0, progress=False)
    assert hist[0]["episodes"] == 4 and "value_loss" not in hist[0] and "entropy" in hist[0]
    bad = T.RLConfig(algo="grpo", iterations=1, group_size=3)
    with pytest.raises(ValueError, match="multiple of group_size"):
        T.train_rl(pol, env, bad, seed=0, progress=False)


def test_pi05_critic_reads_prefix(env):
    pol = tiny_policy(env, pi05=True)
    assert pol.critic_input == "prefix"
    batch = pol.observe(env.reset(seed=0))
    v = pol.value(pol.context(batch), batch.state)
    assert v.shape == (4,) and torch.isfinite(v).all()


def test_gae_used_by_training_matches_loss_module():
    # The trainer's advantages are the losses module's GAE (one implementation).
    r, v, d = torch.ones(2, 1), torch.zeros(2, 1), torch.zeros(2, 1)
    adv, ret = gae(r, v, d, torch.zeros(1), 0.5, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[1.5], [1.0]]))


def test_bad_configs(env):
    with pytest.raises(ValueError, match="stochastic sampler"):
        T.RLConfig(method="ode")
    with pytest.raises(ValueError, match="algo must be"):
        T.RLConfig(algo="a2c")
    pol = tiny_policy(env)
    with pytest.raises(ValueError, match="flow_noise needs a policy built with noise_head"):
        pol.sampler_config("flow_noise", 3)
    with pytest.raises(ValueError, match="exec_horizon must be in"):
        VLAPolicy(pol.model, pol.tokenizer, env.spec, exec_horizon=99)


def _snapshot(params):
    return [p.detach().clone() for p in params]


def test_critic_warmup_and_frozen_vlm(env):
    # One warm-up update: the critic learns, the actor and the frozen VLM stay bit-identical.
    pol = tiny_policy(env)
    actor, critic = pol.rl_parameters()
    ids = {id(p) for p in actor + critic}
    frozen = [p for p in pol.parameters() if id(p) not in ids]
    before = _snapshot(actor), _snapshot(critic), _snapshot(frozen)
    cfg = T.RLConfig(iterations=1, chunks_per_rollout=2, num_steps=2, critic_warmup=1,
                     ppo=PPOConfig(actor_lr=1e-2, critic_lr=1e-2, minibatch=4))
    T.train_rl(pol, env, cfg, seed=0, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before[0], actor))
    assert not all(torch.equal(a, b) for a, b in zip(before[1], critic))
    assert all(torch.equal(a, b) for a, b in zip(before[2], frozen))
    assert all(p.requires_grad for p in pol.parameters())  # restored after training
    # A second iteration past the warm-up moves the actor.
    T.train_rl(pol, env, dataclasses.replace(cfg, iterations=2, critic_warmup=1), seed=0, progress=False)
    assert not all(torch.equal(a, b) for a, b in zip(before[0], actor))


def test_bc_anchor_pulls_towards_demos(env, tmp_path):
    # With a BC weight that dominates the PPO term, the RL phase lowers the demonstrations'
    # flow-matching loss; the anchor's sampling state is checkpointed for --resume.
    demos = T.collect_demos(env, episodes=4, horizon=6, exec_horizon=3, seed=0, progress=False)
    pol = tiny_policy(env)

    def demo_loss():
        g = torch.Generator().manual_seed(0)
        rng = np.random.default_rng(0)
        with torch.no_grad():
            return float(np.mean([pol.flow_matching_loss(*demos.sample(pol, 32, rng), generator=g).item() for _ in range(4)]))

    start = demo_loss()
    cfg = T.RLConfig(iterations=6, chunks_per_rollout=2, num_steps=2, bc_coef=50.0, bc_batch=16,
                     ppo=PPOConfig(actor_lr=3e-3, minibatch=8, max_grad_norm=100.0))
    hist = T.train_rl(pol, env, cfg, seed=0, run_dir=tmp_path, progress=False, demos=demos)
    assert "bc_loss" in hist[-1]
    assert demo_loss() < 0.8 * start, (start, demo_loss())
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert {"bc_rng", "bc_generator"} <= set(state)
    with pytest.raises(ValueError, match="needs the demonstrations"):
        T.train_rl(pol, env, cfg, seed=0, progress=False)
    with pytest.raises(ValueError, match="bc_coef and critic_warmup must be >= 0"):
        T.RLConfig(bc_coef=-1.0)


def test_grpo_over_states(env):
    # Groups of chunks from one simulator state: B * G samples per step, advantages normalised
    # within each group (the chunk reward's ranking), the envs advance with each group's first chunk.
    pol = tiny_policy(env)
    cfg = pol.sampler_config("flow_sde", 2)
    stats = {"success": [], "return": [], "env_steps": []}
    gen = torch.Generator().manual_seed(0)
    ro, _, adv = T.collect_state_groups(pol, env, env.reset(seed=4), 2, 3, cfg, gen, stats)
    assert len(ro) == 2 and ro.traces[0].log_prob.shape == (12,) and adv.shape == (2, 12)
    rewards = torch.stack(ro.rewards).view(2, 4, 3)
    a = adv.view(2, 4, 3)
    torch.testing.assert_close(a.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    assert (torch.argsort(a, -1) == torch.argsort(rewards, -1))[rewards.std(-1) > 0].all()
    hist = T.train_rl(pol, env, T.RLConfig(algo="grpo", grpo_groups="state", group_size=2, iterations=1,
                                           chunks_per_rollout=2, num_steps=2, ppo=PPOConfig(minibatch=8)),
                      seed=0, progress=False)
    assert hist[0]["chunks_per_s"] > 0 and "value_loss" not in hist[0]
    with pytest.raises(ValueError, match="grpo_groups must be"):
        T.RLConfig(grpo_groups="chunk")

    class NoRehearsal:
        spec = env.spec

    with pytest.raises(ValueError, match="needs an env with rehearse"):
        T.collect_state_groups(pol, NoRehearsal(), env.reset(seed=4), 1, 2, cfg, gen, stats)
