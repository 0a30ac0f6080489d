"""PPO / GRPO on token log-probs for autoregressive policies (OpenVLA) on the built-in reach task
with a tiny random OpenVLA: rollout and update log-probs agree, updates move the LLM and
nothing frozen, the clipped loss pushes the right way, samplers of the other kind of policy are
refused, and `vlafast train ppo --init <OpenVLA folder>` writes a result `policies.load` reads."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from test_openvla import random_openvla, tiny_stats
from test_openvla_load import REAL_CONFIG, checkpoint_tensors, write_checkpoint
from test_rl_train import tiny_policy
from vlafast import policies
from vlafast.cli import main
from vlafast.envs.reach_words import COLOURS, SPEEDS, VERBS
from vlafast.models.action_tokenizer import parse_dataset_statistics
from vlafast.models.openvla import OpenVLAConfig
from vlafast.policies import OpenVLAChunkPolicy, OpenVLAProcessor, PolicyError, PolicySpec, build_word_tokenizer, words_of
from vlafast.policies.openvla import OpenVLABatch
from vlafast.policies.tokens import TokenSampler, TokenTrace
from vlafast.rl import train as T
from vlafast.rl.buffer import Rollout
from vlafast.rl.losses import PPOConfig, ppo_loss
from vlafast.rl.sampler_spec import FlowSDE, Tokens, policy_sampler

# The prompt's words and the task's: the rest of Llama-2's 32000 ids (+ its pad) are filler.
WORDS = words_of([" ".join(VERBS), "the ball then", " ".join(COLOURS), " ".join(SPEEDS),
                  "in what action should robot take to ? out :"])
STATS = {"tiny_robot": tiny_stats()["tiny_robot"]}


def word_tokenizer():
    return build_word_tokenizer(WORDS + [f"t{i}" for i in range(32_001 - 2 - len(WORDS))])


def tiny_openvla(env, seed: int = 2) -> OpenVLAChunkPolicy:
    model = random_openvla(seed=seed, stats=parse_dataset_statistics(STATS))
    spec = PolicySpec(family="openvla", model=dataclasses.asdict(model.cfg), exec_horizon=1, action_space="ee_delta")
    return OpenVLAChunkPolicy(model, OpenVLAProcessor(model, word_tokenizer()), spec).bind(env.spec)


def openvla_folder(path, seed: int = 2):
    """A tiny OpenVLA in the Hugging Face layout (sharded safetensors, config.json,
    dataset_statistics.json with one dataset, tokenizer.json)."""
    source = random_openvla(seed=seed, stats=parse_dataset_statistics(STATS))
    ck = write_checkpoint(path, checkpoint_tensors(source), stats=STATS,
                          config={**REAL_CONFIG, "vlafast_config": OpenVLAConfig.tiny().to_json()})
    word_tokenizer().save(str(ck / "tokenizer.json"))
    return ck


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_and_update_log_probs_agree(env, temperature):
    pol = tiny_openvla(env)
    pol.attach_value_head()
    obs = env.reset(seed=0)
    batch = pol.observe(obs)
    assert len(set(batch.prompt_len.tolist())) > 1, obs["instruction"]  # prompts of different lengths batch
    config = TokenSampler(temperature)
    actions, trace, value = pol.act(batch, config, torch.Generator().manual_seed(0))
    first = pol.first_action_token
    assert trace.tokens.shape == (4, 7) and trace.valid.all()
    assert ((trace.tokens >= first) & (trace.tokens < first + 256)).all()  # action-bin tokens only
    assert np.array_equal(actions, pol.to_env(trace.tokens)) and actions.shape == (4, 1, env.spec.action_dim)
    # Teacher forcing vs the decode loop through the KV cache: equal to fp32 rounding (measured
    # max 1.9e-6 on chunk log-probs of about -25, 2.4e-7 on entropies, values bit-equal).
    logp, ent, v = pol.evaluate(batch, trace)
    torch.testing.assert_close(logp, trace.log_prob, rtol=0, atol=1e-4)
    torch.testing.assert_close(ent, trace.entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(v, value, rtol=0, atol=1e-5)
    torch.testing.assert_close(v, pol.value(batch), rtol=0, atol=1e-5)
    step_lp, _, _ = pol.evaluate_steps(batch, trace)
    torch.testing.assert_close(step_lp, trace.step_log_probs, rtol=0, atol=1e-5)
    # Minibatches mixing rows of two chunk steps (cat pads the shorter prompts) give the same.
    batch2 = pol.observe(env.reset(seed=1))
    _, trace2, _ = pol.act(batch2, config, torch.Generator().manual_seed(1))
    both, traces = OpenVLABatch.cat([batch, batch2]), TokenTrace.cat([trace, trace2])
    idx = torch.tensor([0, 3, 5, 6])
    logp, _, _ = pol.evaluate(both.index(idx), traces.select(idx))
    torch.testing.assert_close(logp, traces.log_prob[idx], rtol=0, atol=1e-4)


def test_updates_move_the_llm_and_nothing_frozen(env):
    pol = tiny_openvla(env)
    actor, critic = pol.rl_parameters()
    ids = {id(p) for p in actor + critic}
    frozen = [p for p in pol.parameters() if id(p) not in ids]
    assert frozen and all(id(p) in {id(q) for q in pol.model.language_model.parameters()} for p in actor)
    snap = lambda ps: [p.detach().clone() for p in ps]  # noqa: E731
    actor0, critic0, frozen0 = snap(actor), snap(critic), snap(frozen)
    ppo = T.RLConfig(iterations=2, chunks_per_rollout=2, sampler=Tokens(), critic_warmup=1,
                     ppo=PPOConfig(actor_lr=1e-3, critic_lr=1e-3, minibatch=4))
    hist = T.train_rl(pol, env, ppo, seed=0, progress=False)
    grpo = T.RLConfig(algo="grpo", iterations=2, group_size=2, sampler=Tokens(), ppo=PPOConfig(actor_lr=1e-3, minibatch=8))
    hist += T.train_rl(pol, env, grpo, seed=1, progress=False)
    for row in hist:
        for key in ("policy_loss", "approx_kl", "clipfrac", "entropy"):
            assert np.isfinite(row[key]), (key, row)
        assert "sigma_mean" not in row  # the flow sampler's health metric
    assert "value_loss" in hist[1] and "value_loss" not in hist[3]
    assert not all(torch.equal(a, b) for a, b in zip(actor0, actor))
    assert not all(torch.equal(a, b) for a, b in zip(critic0, critic))
    assert all(torch.equal(a, b) for a, b in zip(frozen0, frozen))  # vision towers and projector


def test_token_level_ratio_and_grpo_over_states(env):
    pol = tiny_openvla(env)
    cfg = T.RLConfig(iterations=2, chunks_per_rollout=2, sampler=Tokens(), critic_warmup=1,
                     ppo=PPOConfig(actor_lr=1e-3, minibatch=4, ratio="element"))
    hist = T.train_rl(pol, env, cfg, seed=0, progress=False)
    assert hist[-1]["approx_kl"] > 0 and np.isfinite(hist[-1]["policy_loss"])
    states = T.RLConfig(algo="grpo", grpo_groups="state", group_size=2, iterations=1, chunks_per_rollout=2,
                        sampler=Tokens(temperature=2.0), critic_warmup=1, ppo=PPOConfig(minibatch=8))
    hist = T.train_rl(pol, env, states, seed=0, progress=False)
    assert hist[0]["chunks_per_s"] > 0 and np.isfinite(hist[0]["value_loss"])


def test_per_token_update_log_probs_at_rollout(env):
    # prepare takes the per-token log-probs of the rollout; the first epoch's ratios are 1.
    pol = tiny_openvla(env)
    pol.attach_value_head()
    ro = Rollout()
    gen = torch.Generator().manual_seed(0)
    for seed in (0, 1):
        batch = pol.observe(env.reset(seed=seed))
        _, trace, value = pol.act(batch, TokenSampler(), gen)
        ro.add(batch, trace, value, torch.zeros(4), torch.zeros(4), torch.ones(4, dtype=torch.bool))
    s = T.prepare(ro, torch.randn(2, 4), torch.zeros(2, 4), PPOConfig(ratio="element"))
    assert s.per_element and s.old_log_prob.shape == (8, 7) and s.element_mask.shape == (8, 7)
    _, terms = T.ppo_clip_loss(pol, s, torch.arange(8), PPOConfig(ratio="element"))
    assert abs(float(terms["ratio_mean"]) - 1) < 1e-5 and float(terms["clipfrac"]) == 0


def test_clipped_loss_gradient_sign():
    # Two chunks, advantages +1 and -1: at ratio 1 the loss raises the first log-prob and lowers
    # the second; past the clip on the side the advantage pushes to, the gradient is 0; on the
    # other side it still pulls back.
    cfg = PPOConfig(clip=0.2)
    adv = torch.tensor([1.0, -1.0])

    def grad(log_ratio):
        logp = torch.tensor(log_ratio, requires_grad=True)
        loss, _ = ppo_loss(logp, torch.zeros(2), adv, cfg)
        loss.backward()
        return logp.grad

    g = grad([0.0, 0.0])
    assert g[0] < 0 < g[1]  # descent raises log pi of the good chunk, lowers the bad one's
    assert torch.equal(grad([np.log(1.5), np.log(0.5)]), torch.zeros(2))  # clipped: no push further
    g = grad([np.log(0.5), np.log(1.5)])
    assert g[0] < 0 < g[1]  # the ratio moved against the advantage: unclipped, pulled back
    # Per token: a masked (invalid) token gets no gradient.
    logp = torch.zeros(2, 3, requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss, _ = ppo_loss(logp, torch.zeros(2, 3), adv, cfg, element_mask=mask)
    loss.backward()
    assert logp.grad[0, 2] == 0 and (logp.grad[0, :2] < 0).all() and (logp.grad[1] > 0).all()


def test_a_sampler_of_the_other_kind_is_one_sentence(env):
    with pytest.raises(PolicyError, match="the tokens sampler draws action tokens, but this pi0 policy denoises"):
        policy_sampler(Tokens(), tiny_policy(env))
    with pytest.raises(PolicyError, match="the flow_sde sampler denoises, but this openvla policy decodes action"):
        T.train_rl(tiny_openvla(env), env, T.RLConfig(iterations=1, sampler=FlowSDE()), seed=0, progress=False)
    with pytest.raises(ValueError, match="anchors on a supervised loss on the demonstrations"):
        T.train_rl(tiny_openvla(env), env, T.RLConfig(iterations=1, sampler=Tokens(), bc_coef=1.0), seed=0,
                   progress=False)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        Tokens(temperature=0.0)


def test_save_openvla_round_trip(env, tmp_path):
    pol = tiny_openvla(env)
    with torch.no_grad():
        pol.model.language_model.lm_head.weight.mul_(1.5)  # not the source's weights
    folder = policies.save(pol, tmp_path / "out")  # dispatches to save_openvla
    back = policies.load(folder, device="cpu")
    assert isinstance(back, OpenVLAChunkPolicy) and back.model.cfg == pol.model.cfg
    want, got = pol.model.state_dict(), back.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    obs = env.reset(seed=0)
    assert np.array_equal(back.bind(env.spec).act_obs(obs), pol.act_obs(obs))


def test_cli_refuses_the_tokens_sampler_for_a_flow_policy(env, tmp_path, capsys):
    folder = policies.save(tiny_policy(env), tmp_path / "flow")
    args = ["train", "ppo", "--init", str(folder), "--env", "ur5e-reach", "--out", str(tmp_path / "run"),
            "--iterations", "1", "--no-progress"]
    assert main([*args, "--method", "tokens"]) == 2
    assert "the tokens sampler draws action tokens, but this pi0 policy denoises" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run folder is made
    assert main([*args, "--unnorm-key", "bridge_orig"]) == 2
    assert "--unnorm-key picks OpenVLA's dataset statistics" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_ppo_from_an_openvla_folder(tmp_path, capsys):
    pytest.importorskip("mujoco", reason="the built-in UR5e task simulates in MuJoCo")
    ck = openvla_folder(tmp_path / "ovla")
    config = tmp_path / "small.json"
    config.write_text(json.dumps({"num_envs": 2, "image_size": 16, "eval_episodes": 2, "env_kwargs": {"max_episode_steps": 6},
                                  "rl": {"chunks_per_rollout": 2, "critic_warmup": 1,
                                         "ppo": {"actor_lr": 1e-3, "epochs": 1, "micro_batch": 4}}}))
    out = tmp_path / "run"
    args = ["train", "ppo", "--init", str(ck), "--env", "ur5e-reach", "--out", str(out), "--config", str(config),
            "--no-progress"]
    assert main([*args, "--iterations", "2"]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "tokens" and len(summary["history"]) == 2
    assert json.loads((out / "recipe.json").read_text())["rl"]["sampler"] == {"temperature": 1.0, "kind": "tokens"}
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["policy"]
    result = policies.load(out / "policy", device="cpu")
    assert isinstance(result, OpenVLAChunkPolicy)
    got = result.model.state_dict()
    assert all(torch.equal(trained[f"model.{k}"], v) for k, v in got.items())  # the result is the trained weights
    start = policies.load(ck, device="cpu").model.state_dict()
    assert any(not torch.equal(start[k], v) for k, v in got.items() if k.startswith("language_model."))
    assert all(torch.equal(start[k], v) for k, v in got.items() if not k.startswith("language_model."))
    # a flow sampler for OpenVLA, and the tokens sampler for a flow policy: one sentence, exit 2
    assert main([*args, "--overwrite", "--iterations", "1", "--method", "flow_sde"]) == 2
    assert "this openvla policy decodes action tokens" in capsys.readouterr().err


# -- pi0-FAST through the same path --------------------------------------------------------------

@pytest.fixture(scope="module")
def fast_demos(env):
    """Scripted chunks and states of the built-in task: what a tiny pi0-FAST fits its codec on."""
    demos = T.collect_demos(env, episodes=4, horizon=4, exec_horizon=2, seed=0, progress=False)
    return np.concatenate(demos.actions), np.concatenate([o["state"] for o in demos.obs])


def tiny_fast(env, fast_demos):
    from vlafast.rl.recipe import Recipe, build_policy

    recipe = Recipe(family="pi0fast", num_envs=env.spec.num_envs, image_size=16, width=32, depth=1, horizon=4,
                    exec_horizon=2)
    pol = build_policy(recipe, env.spec)
    pol.fit_codec(*fast_demos)
    return pol


def test_fast_log_probs_agree_and_ppo_moves_its_gemma(env, fast_demos):
    pol = tiny_fast(env, fast_demos)
    batch = pol.observe(env.reset(seed=0))
    _, trace, value = pol.act(batch, TokenSampler(), torch.Generator().manual_seed(0))
    logp, ent, v = pol.evaluate(batch, trace)
    # measured max 7.6e-6 on chunk log-probs of about -75 (14 tokens), 9.5e-7 on entropies
    torch.testing.assert_close(logp, trace.log_prob, rtol=0, atol=1e-4)
    torch.testing.assert_close(ent, trace.entropy, rtol=0, atol=1e-5)
    torch.testing.assert_close(v, value, rtol=0, atol=1e-5)
    # per-token ratios (RLinf's token-level PPO): each step's log-prob, as the decode loop drew it
    step_lp, _, _ = pol.evaluate_steps(batch, trace)
    torch.testing.assert_close(step_lp, trace.step_log_probs, rtol=0, atol=1e-5)  # measured max 9.5e-7
    actor, critic = pol.rl_parameters()
    ids = {id(p) for p in actor + critic}
    frozen = [p for p in pol.parameters() if id(p) not in ids]
    actor0, frozen0 = [p.detach().clone() for p in actor], [p.detach().clone() for p in frozen]
    cfg = T.RLConfig(iterations=2, chunks_per_rollout=2, sampler=Tokens(), critic_warmup=1,
                     ppo=PPOConfig(actor_lr=1e-3, minibatch=4))
    hist = T.train_rl(pol, env, cfg, seed=0, progress=False)
    assert all(np.isfinite(h["policy_loss"]) and np.isfinite(h["value_loss"]) for h in hist)
    assert not all(torch.equal(a, b) for a, b in zip(actor0, actor))
    assert frozen and all(torch.equal(a, b) for a, b in zip(frozen0, frozen))  # the vision tower
    hist = T.train_rl(pol, env, dataclasses.replace(cfg, iterations=1, ppo=PPOConfig(actor_lr=1e-3, minibatch=4,
                                                                                      ratio="element")),
                      seed=0, progress=False)
    assert np.isfinite(hist[-1]["policy_loss"])


@pytest.mark.slow
def test_cli_ppo_from_a_fast_folder(env, fast_demos, tmp_path, capsys):
    folder = policies.save(tiny_fast(env, fast_demos), tmp_path / "fast")
    config = tmp_path / "small.json"
    config.write_text(json.dumps({"num_envs": 2, "image_size": 16, "eval_episodes": 2, "env_kwargs": {"max_episode_steps": 6},
                                  "rl": {"chunks_per_rollout": 2, "critic_warmup": 1,
                                         "ppo": {"actor_lr": 1e-3, "epochs": 1, "micro_batch": 4}}}))
    out = tmp_path / "run"
    assert main(["train", "ppo", "--init", str(folder), "--env", "ur5e-reach", "--out", str(out), "--config",
                 str(config), "--iterations", "2", "--no-progress"]) == 0, capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["method"] == "tokens"
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["policy"]
    result = policies.load(out / "policy", device="cpu")
    got = result.state_dict()
    assert set(got) == set(trained) and all(torch.equal(trained[k], v) for k, v in got.items())
    start = policies.load(folder, device="cpu").state_dict()
    assert any(not torch.equal(start[k], got[k]) for k in got if ".language_model." in k)  # the Gemma moved
    assert all(torch.equal(start[k], got[k]) for k in got if ".vision_tower." in k)
