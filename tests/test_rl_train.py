"""RL plumbing on the built-in task with a tiny pi0: rollout/update log-prob agreement, SFT,
PPO/GRPO smoke runs, checkpoints and resume."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from vlafast.eval import evaluate
from vlafast.envs import make_env
from vlafast.envs.reach_words import COLOURS, SPEEDS, VERBS
from vlafast.flow.noise_head import NoiseHead
from vlafast.models.gemma import GemmaConfig
from vlafast.models.pi0 import Pi0Config, Pi0Policy
from vlafast.models.siglip import SiglipConfig
from vlafast.rl import train as T
from vlafast import flow
from vlafast.rl.losses import PPOConfig, gae, group_advantages
from vlafast.rl import sampler_spec
from vlafast.rl.sampler_spec import FlowNoise, FlowSDE, sampler_config
from vlafast.policies import FlowPolicy, build_word_tokenizer, flow_policy, words_of

WORDS = words_of([" ".join(VERBS), "the ball then", " ".join(COLOURS), " ".join(SPEEDS)])


def tiny_policy(env, pi05=False, noise_head=False, seed=0):
    torch.manual_seed(seed)
    tok = build_word_tokenizer(WORDS)
    g = GemmaConfig(width=32, depth=2, mlp_dim=48, num_heads=2, num_kv_heads=1, head_dim=16)
    cfg = Pi0Config.tiny(pi05=pi05, vision=SiglipConfig(image_size=16, patch_size=8, width=24, depth=1, mlp_dim=32, num_heads=2),
                         vlm=g, expert=g, vocab_size=tok.get_vocab_size(), action_dim=4, state_dim=9, horizon=6, num_steps=3)
    head = NoiseHead(cfg.expert.width, cfg.action_dim) if noise_head else None
    return flow_policy(Pi0Policy(cfg), tok, env.spec, exec_horizon=3, max_tokens=8, noise_head=head)


@pytest.mark.parametrize("spec", [FlowSDE(num_steps=3), FlowNoise(num_steps=3)], ids=["flow_sde", "flow_noise"])
def test_update_log_probs_equal_rollout(env, spec):
    pol = tiny_policy(env, noise_head=spec.kind == "flow_noise")
    cfg = sampler_config(spec, pol.noise_head)
    gen = torch.Generator().manual_seed(1)
    stats = T.new_stats()
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
    out = evaluate(pol, env, episodes=6, seed=5, num_steps=2, progress=False)
    assert out["episodes"] == 6 and len(out["records"]) == 6
    assert 0.0 <= out["success_rate"] <= 1.0
    assert all(np.isfinite(r["speed"]) for r in out["records"])
    again = evaluate(pol, env, episodes=6, seed=5, num_steps=2, progress=False)
    assert [r["return"] for r in again["records"]] == [r["return"] for r in out["records"]]  # fixed seeds


def test_ppo_checkpoint_and_resume(env, tmp_path):
    cfg = T.RLConfig(iterations=2, chunks_per_rollout=2, sampler=FlowSDE(num_steps=2),
                     ppo=PPOConfig(actor_lr=1e-3, minibatch=4))
    pol = tiny_policy(env)
    hist = T.train_rl(pol, env, cfg, seed=0, run_dir=tmp_path, progress=False)
    assert [h["iteration"] for h in hist] == [1, 2]
    for key in ("success_rate", "return", "approx_kl", "clipfrac", "explained_variance", "sigma_mean",
                "env_steps_per_s", "chunks_per_s", "policy_loss", "value_loss"):
        assert key in hist[-1], key
    assert json.loads((tmp_path / "metrics.json").read_text())[-1]["iteration"] == 2
    # Resume to 3 iterations: starts from the checkpoint, runs only the third.
    more = T.RLConfig(iterations=3, chunks_per_rollout=2, sampler=FlowSDE(num_steps=2),
                      ppo=PPOConfig(actor_lr=1e-3, minibatch=4))
    pol2 = tiny_policy(env, seed=1)
    hist2 = T.train_rl(pol2, env, more, seed=0, run_dir=tmp_path, resume=True, progress=False)
    assert [h["iteration"] for h in hist2] == [1, 2, 3]
    assert [h["policy_loss"] for h in hist2[:2]] == [h["policy_loss"] for h in hist]  # restored, not re-run
    with pytest.raises(FileNotFoundError, match="--resume needs a checkpoint"):
        T.train_rl(pol2, env, more, seed=0, run_dir=tmp_path / "none", resume=True, progress=False)


def test_grpo_iteration(env):
    pol = tiny_policy(env, noise_head=True)
    cfg = T.RLConfig(algo="grpo", sampler=FlowNoise(num_steps=2), iterations=1, group_size=2,
                     ppo=PPOConfig(actor_lr=1e-3, minibatch=8))
    hist = T.train_rl(pol, env, cfg, seed=0, progress=False)
    assert hist[0]["episodes"] == 4 and "value_loss" not in hist[0] and "entropy" in hist[0]
    bad = T.RLConfig(algo="grpo", iterations=1, group_size=3)
    with pytest.raises(ValueError, match="multiple of group_size"):
        T.train_rl(pol, env, bad, seed=0, progress=False)


def test_env_step_budget_ends_the_run_nearest_to_it(env):
    # The rule: stop once another update like the last would end farther from the budget.
    h = [{"env_steps": 100.0}, {"env_steps": 100.0}]
    assert not T.budget_spent(h, 251) and T.budget_spent(h, 250) and not T.budget_spent(h, None)
    pol = tiny_policy(env, noise_head=True)
    cfg = T.RLConfig(algo="grpo", sampler=FlowNoise(num_steps=2), iterations=5, group_size=2,
                     ppo=PPOConfig(actor_lr=1e-3, minibatch=8))
    first = T.train_rl(pol, env, dataclasses.replace(cfg, iterations=1), seed=0, progress=False)[0]["env_steps"]
    hist = T.train_rl(pol, env, dataclasses.replace(cfg, env_step_budget=int(1.6 * first)), seed=0, progress=False)
    spent = [h["env_steps"] for h in hist]
    assert 2 <= len(hist) < 5 and T.budget_spent(hist, int(1.6 * first)) and not T.budget_spent(hist[:-1], int(1.6 * first))
    assert abs(sum(spent) - 1.6 * first) < max(spent), spent  # within one update of the budget
    with pytest.raises(ValueError, match="env_step_budget must be an integer >= 1"):
        T.RLConfig(env_step_budget=0)


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
        T.RLConfig(sampler="ode")
    with pytest.raises(ValueError, match="stochastic sampler"):
        T.RLConfig(sampler=flow.ode(3))  # a flow sampler config, not a spec
    with pytest.raises(ValueError, match="algo must be"):
        T.RLConfig(algo="a2c")
    pol = tiny_policy(env)
    with pytest.raises(ValueError, match="flow_noise needs a policy with a noise head"):
        T.rl_sampler(pol, T.RLConfig(sampler=FlowNoise(num_steps=3)))
    with pytest.raises(ValueError, match="exec_horizon must be in"):
        flow_policy(pol.model, pol.tokenizer, env.spec, exec_horizon=99)


def _snapshot(params):
    return [p.detach().clone() for p in params]


def test_critic_warmup_and_frozen_vlm(env):
    # One warm-up update: the critic learns, the actor and the frozen VLM stay bit-identical.
    pol = tiny_policy(env)
    actor, critic = pol.rl_parameters()
    ids = {id(p) for p in actor + critic}
    frozen = [p for p in pol.parameters() if id(p) not in ids]
    before = _snapshot(actor), _snapshot(critic), _snapshot(frozen)
    cfg = T.RLConfig(iterations=1, chunks_per_rollout=2, sampler=FlowSDE(num_steps=2), critic_warmup=1,
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
    cfg = T.RLConfig(iterations=6, chunks_per_rollout=2, sampler=FlowSDE(num_steps=2), bc_coef=50.0, bc_batch=16,
                     ppo=PPOConfig(actor_lr=3e-3, minibatch=8, max_grad_norm=100.0))
    hist = T.train_rl(pol, env, cfg, seed=0, run_dir=tmp_path, progress=False, demos=demos)
    assert "bc_loss" in hist[-1]
    assert demo_loss() < 0.8 * start, (start, demo_loss())
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert {"bc_rng", "bc_generator"} <= set(state)
    assert state["config"]["sampler"] == {"kind": "flow_sde", "num_steps": 2, "a": 0.5, "hybrid": True}
    assert sampler_spec.from_json(state["config"]["sampler"]) == cfg.sampler
    with pytest.raises(ValueError, match="needs the demonstrations"):
        T.train_rl(pol, env, cfg, seed=0, progress=False)
    with pytest.raises(ValueError, match="bc_coef and critic_warmup must be >= 0"):
        T.RLConfig(bc_coef=-1.0)


def test_grpo_over_states(env):
    # Groups of chunks from one simulator state: B * G samples per step, advantages normalised
    # within each group (the chunk reward's ranking), the envs advance with each group's first chunk.
    pol = tiny_policy(env)
    cfg = sampler_config(FlowSDE(num_steps=2))
    stats = T.new_stats()
    gen = torch.Generator().manual_seed(0)
    ro, _, adv, ret = T.collect_state_groups(pol, env, env.reset(seed=4), 2, 3, cfg, gen, stats, bootstrap=False)
    assert len(ro) == 2 and ro.traces[0].log_prob.shape == (12,) and adv.shape == (2, 12) and ret is None
    rewards = torch.stack(ro.rewards).view(2, 4, 3)
    a = adv.view(2, 4, 3)
    torch.testing.assert_close(a.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    assert (torch.argsort(a, -1) == torch.argsort(rewards, -1))[rewards.std(-1) > 0].all()
    hist = T.train_rl(pol, env, T.RLConfig(algo="grpo", grpo_groups="state", group_size=2, iterations=1,
                                           chunks_per_rollout=2, sampler=FlowSDE(num_steps=2),
                                           rehearsal_bootstrap=False,
                                           ppo=PPOConfig(minibatch=8)),
                      seed=0, progress=False)
    assert hist[0]["chunks_per_s"] > 0 and "value_loss" not in hist[0]
    assert hist[0]["env_steps"] > 0
    with pytest.raises(ValueError, match="grpo_groups must be"):
        T.RLConfig(grpo_groups="chunk")

    class NoRehearsal:
        spec = env.spec

    with pytest.raises(ValueError, match="needs an env with rehearse"):
        T.collect_state_groups(pol, NoRehearsal(), env.reset(seed=4), 1, 2, cfg, gen, stats)


def _constant_critic(pol, value):
    """Make V(s) == value for every observation (the critic's last layer: zero weights, bias)."""
    with torch.no_grad():
        pol.critic[-1].weight.zero_()
        pol.critic[-1].bias.fill_(value)


def test_truncation_bootstraps_from_final_observation():
    pytest.importorskip("mujoco", reason="the built-in UR5e task simulates in MuJoCo")
    # timeouts="bootstrap": a chunk that hits the time limit earns gamma * V(final obs) on top of
    # its reward; a chunk that ends by success or goes on earns its reward only. "terminal" (the
    # default): no chunk earns anything from the critic. Same rollout, critics V = 0 and 5.
    env = make_env("ur5e-reach", 3, seed=0, image_size=16, slot_jitter=0.04, max_episode_steps=5)
    pol = tiny_policy(env)
    cfg = sampler_config(FlowSDE(num_steps=2))
    rewards, dones = {}, None
    for timeouts in ("bootstrap", "terminal"):
        for v in (0.0, 5.0):
            _constant_critic(pol, v)
            ro, _, _ = T.collect(pol, env, env.reset(seed=1), 4, cfg, torch.Generator().manual_seed(2), T.new_stats(),
                                 0.9, timeouts=timeouts)
            rewards[timeouts, v] = torch.stack(ro.rewards)
            dones = torch.stack(ro.dones)
    diff = rewards["bootstrap", 5.0] - rewards["bootstrap", 0.0]
    assert dones.any()  # 3-step chunks against a 5-step limit: truncations happen
    torch.testing.assert_close(diff[dones.bool() & (diff != 0)], torch.full_like(diff[dones.bool() & (diff != 0)], 4.5))
    assert (diff[~dones.bool()] == 0).all() and (diff == 4.5).any()
    assert torch.equal(rewards["terminal", 5.0], rewards["terminal", 0.0])
    assert torch.equal(rewards["terminal", 0.0], rewards["bootstrap", 0.0])
    assert T.RLConfig().timeouts == "terminal"
    with pytest.raises(ValueError, match="timeouts must be"):
        T.RLConfig(timeouts="truncate")
    env.close()


def test_state_groups_bootstrap_from_rehearsed_end_state(env):
    # Horizon-correct GRPO over states: a chunk's score is r + gamma * V(its rehearsed end
    # state) (unless it reached the goal), normalised within its group; the critic's targets
    # are the executed path's GAE returns, shared by the G samples of a state.
    pol = tiny_policy(env)
    with torch.no_grad():  # a critic that reads the proprio state only, so V differs between end states
        pol.critic[0].weight.zero_()
        pol.critic[0].weight[:, -env.spec.state_dim:] = torch.randn(64, env.spec.state_dim)
    cfg = sampler_config(FlowSDE(num_steps=2))
    obs = env.reset(seed=6)
    G, rows = 3, torch.arange(4).repeat_interleave(3)
    batch = pol.observe(obs).index(rows)
    actions, _, _ = pol.act(batch, cfg, torch.Generator().manual_seed(9))
    rh = env.rehearse(actions, rows.tolist(), observe=True)
    end = pol.observe(rh.obs)
    with torch.no_grad():
        v_end = pol.value(pol.context(end), end.state)
    score = torch.from_numpy(rh.reward) + 0.9 * torch.from_numpy(~rh.terminated).float() * v_end
    expected, _ = group_advantages(score, G)
    ro, _, adv, ret = T.collect_state_groups(pol, env, obs, 2, G, cfg, torch.Generator().manual_seed(9), T.new_stats(),
                                             gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv[0], expected)  # measured max error 0
    myopic, _ = group_advantages(torch.from_numpy(rh.reward), G)
    assert not torch.allclose(adv[0], myopic, atol=1e-3)
    assert ret.shape == (2, 12) and (ret.view(2, 4, 3) == ret.view(2, 4, 3)[..., :1]).all()


def test_update_regime_accumulation_early_stop_health(env):
    # The whole-rollout optimiser step accumulated over micro-batches equals one big batch
    # (to fp32 rounding); a tiny target_kl stops once the policy has moved; grad_cosine is logged.
    def run(micro, target_kl, ratio="chunk"):
        pol = tiny_policy(env)
        cfg = T.RLConfig(iterations=2, chunks_per_rollout=2, sampler=FlowSDE(num_steps=2), critic_warmup=1,
                         ppo=PPOConfig(actor_lr=1e-3, minibatch=None, micro_batch=micro, epochs=3, target_kl=target_kl,
                                       ratio=ratio))
        hist = T.train_rl(pol, env, cfg, seed=0, progress=False)
        return pol, hist

    a, ha = run(3, None)
    b, hb = run(64, None)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)  # measured max ~1e-7
    assert ha[-1]["epochs"] == 3 and -1 <= ha[-1]["grad_cosine"] <= 1 and "grad_cosine" not in ha[0]  # warm-up
    _, hc = run(64, 1e-9)
    # One optimiser step per epoch: epoch 1 measures the KL before its step (0), epoch 2 sees
    # the moved policy and stops the update. The warm-up's actor never moves: KL stays 0.
    assert hc[-1]["epochs"] == 2 and hc[0]["epochs"] == 3
    _, he = run(64, None, ratio="element")
    assert he[-1]["approx_kl"] > 0 and he[-1]["policy_loss"] != ha[-1]["policy_loss"]


def test_element_log_probs_equal_at_rollout(env):
    # The per-element log-probs recomputed in the update equal the rollout's (ratio 1 at epoch 1).
    for spec in (FlowSDE(num_steps=3), FlowNoise(num_steps=3)):
        pol = tiny_policy(env, noise_head=spec.kind == "flow_noise")
        cfg = sampler_config(spec, pol.noise_head)
        batch = pol.observe(env.reset(seed=3))
        _, trace, _ = pol.act(batch, cfg, torch.Generator().manual_seed(0))
        ev = flow.evaluate(pol.velocity_fn, pol.context(batch), trace, elements=True)
        old = flow.element_log_probs(trace)
        torch.testing.assert_close(ev.element_log_prob, old, rtol=0, atol=1e-6)  # measured max 0
        mask = trace.action_mask.reshape(-1)
        torch.testing.assert_close((old * mask).sum(1), trace.log_prob, rtol=1e-5, atol=1e-4)


def test_critic_runs_need_warmup_and_old_checkpoints_resume(env, tmp_path, caplog):
    with pytest.raises(ValueError, match="critic_warmup >= 1"):
        T.RLConfig(critic_warmup=0)
    with pytest.raises(ValueError, match="critic_warmup >= 1"):
        T.RLConfig(algo="grpo", grpo_groups="state", critic_warmup=0)
    T.RLConfig(algo="grpo", grpo_groups="state", rehearsal_bootstrap=False, critic_warmup=0)  # no critic: fine
    cfg = T.RLConfig(iterations=1, chunks_per_rollout=2, sampler=FlowSDE(num_steps=2), critic_warmup=1,
                     ppo=PPOConfig(micro_batch=4))
    pol = tiny_policy(env)
    T.train_rl(pol, env, cfg, seed=0, run_dir=tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    del state["bc_rng"], state["bc_generator"]  # as written before the BC anchor existed
    torch.save(state, tmp_path / "checkpoint.pt")
    with caplog.at_level("WARNING"):
        hist = T.train_rl(pol, env, dataclasses.replace(cfg, iterations=2), seed=0, run_dir=tmp_path, resume=True,
                          progress=False)
    assert [h["iteration"] for h in hist] == [1, 2]
    assert "no 'bc_rng'" in caplog.text and "older vlafast" in caplog.text


def test_ensure_noise_head_adds_one_only_when_flow_noise_needs_it():
    pytest.importorskip("mujoco", reason="the built-in UR5e task simulates in MuJoCo")
    from vlafast.rl.recipe import Recipe, build_env, build_policy, ensure_noise_head

    recipe = dataclasses.replace(Recipe(), num_envs=1)
    env = build_env(recipe)
    pol = build_policy(recipe, env.spec)  # the demo recipe trains Flow-SDE: no head
    env.close()
    ensure_noise_head(pol, recipe)
    assert pol.noise_head is None
    noise = dataclasses.replace(recipe, rl=dataclasses.replace(recipe.rl, sampler=FlowNoise()))
    ensure_noise_head(pol, noise)
    head = pol.noise_head
    assert head is not None and head.width == pol.model.cfg.expert.width
    ensure_noise_head(pol, noise)
    assert pol.noise_head is head  # an existing head is kept


def test_sampler_spec_json_and_sampler_configs():
    sde, noise = FlowSDE(num_steps=3, a=0.3, hybrid=False), FlowNoise(num_steps=5)
    assert sde.to_json() == {"num_steps": 3, "a": 0.3, "hybrid": False, "kind": "flow_sde"}
    assert noise.to_json() == {"num_steps": 5, "kind": "flow_noise"}
    for spec in (sde, noise):
        assert sampler_spec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    # Partial JSON merges into a base spec; a new kind keeps the fields it shares with the base.
    assert sampler_spec.from_json({"a": 0.2}, base=sde) == FlowSDE(num_steps=3, a=0.2, hybrid=False)
    assert sampler_spec.from_json({"kind": "flow_noise"}, base=sde) == FlowNoise(num_steps=3)
    assert sampler_spec.from_json({"kind": "flow_sde"}, base=noise) == FlowSDE(num_steps=5)
    with pytest.raises(ValueError, match="stochastic sampler: kind must be one of"):
        sampler_spec.from_json({"kind": "ode"})
    with pytest.raises(ValueError, match=r"unknown flow_noise sampler fields \['a'\]"):
        sampler_spec.from_json({"kind": "flow_noise", "a": 0.5})
    with pytest.raises(ValueError, match="num_steps"):
        FlowNoise(num_steps=0)
    with pytest.raises(ValueError, match="noise level"):
        FlowSDE(a=0.0)
    with pytest.raises(ValueError, match="FlowSDE.hybrid must be true or false"):
        sampler_spec.from_json({"hybrid": "yes"})
    # The spec is the one place that builds the flow sampler.
    assert sampler_config(sde) == flow.flow_sde(a=0.3, hybrid=False, num_steps=3)
    head = NoiseHead(32, 4)
    assert sampler_config(noise, head) == flow.flow_noise(head, num_steps=5)
    with pytest.raises(TypeError, match="not a sampler spec"):
        sampler_config(flow.ode(3))


def test_recipes_load_old_and_new_rl_json():
    from vlafast.rl.recipe import Recipe

    base = Recipe()
    assert Recipe.from_json(json.loads(json.dumps(base.to_json()))) == base
    noise = dataclasses.replace(base, rl=dataclasses.replace(base.rl, sampler=FlowNoise(num_steps=3)))
    assert Recipe.from_json(json.loads(json.dumps(noise.to_json()))) == noise
    # A recipe saved before the spec: flat method / num_steps / sde_a / sde_hybrid under "rl".
    old = base.to_json()
    old["rl"] = {k: v for k, v in old["rl"].items() if k != "sampler"}
    old["rl"].update(method="flow_sde", num_steps=3, sde_a=0.3, sde_hybrid=False)
    assert Recipe.from_json(old).rl.sampler == FlowSDE(num_steps=3, a=0.3, hybrid=False)
    old["rl"].update(method="flow_noise")  # its sde_* keys were ignored by Flow-Noise, and still are
    assert Recipe.from_json(old).rl.sampler == FlowNoise(num_steps=3)
    # Partial configs (`vlafast train --config`, the CLI's --method) merge into the default spec.
    assert Recipe.from_json({"rl": {"num_steps": 6}}).rl.sampler == FlowSDE(num_steps=6)
    assert Recipe.from_json({"rl": {"method": "flow_noise"}}).rl.sampler == FlowNoise(num_steps=4)
    assert Recipe.from_json({"rl": {"sampler": {"a": 0.3}}}).rl.sampler == FlowSDE(a=0.3)
    assert Recipe.from_json({"rl": {"sampler": {"kind": "flow_sde", "a": 0.3}, "method": "flow_noise"}}
                            ).rl.sampler == FlowNoise()
    with pytest.raises(ValueError, match="kind must be one of"):
        Recipe.from_json({"rl": {"method": "ode"}})


def test_a_new_algorithm_is_a_table_entry(env, monkeypatch):
    # An algorithm is (rollout, minibatch loss) in ALGORITHMS: here REINFORCE on GRPO's episode
    # groups, -mean(A * log pi), with no clipping and no critic.
    calls = []

    def reinforce_loss(policy, s, micro, cfg):
        calls.append(len(micro))
        ev = flow.evaluate(policy.velocity_fn, policy.context(s.batch.index(micro)), s.trace.select(micro))
        policy_loss = -(s.advantages[micro] * ev.log_prob).mean()
        approx_kl = (s.old_log_prob[micro] - ev.log_prob).mean().detach()
        return policy_loss, {"policy_loss": policy_loss.detach(), "approx_kl": approx_kl}

    monkeypatch.setitem(T.ALGORITHMS, "reinforce", T.Algorithm(rollout=T.group_rollout, loss=reinforce_loss,
                                                                     critic=lambda cfg: False))
    cfg = T.RLConfig(algo="reinforce", sampler=FlowSDE(num_steps=2), iterations=1, group_size=2, critic_warmup=0,
                     ppo=PPOConfig(minibatch=8, epochs=1, target_kl=None))
    pol = tiny_policy(env)
    hist = T.train_rl(pol, env, cfg, seed=0, progress=False)
    assert calls and set(hist[0]) >= {"policy_loss", "approx_kl"} and "clipfrac" not in hist[0]
    with pytest.raises(ValueError, match="algo must be one of"):
        T.RLConfig(algo="a2c")
