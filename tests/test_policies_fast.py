"""pi0-FAST through the policy layer: LeRobot and openpi folders (the real key names, written by
test_pi0fast's builders) load as ``FASTPolicy``; save / load is exact; bad folders get one
sentence; act and evaluate agree (PPO's first ratio is 1); the SFT loss trains; a tiny pi0-FAST
recipe goes through `vlafast train sft`, `vlafast eval` and `vlafast dictionary build`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_pi0fast import random_policy, stats_for, write_lerobot, write_openpi
from vlafast import policies
from vlafast.cli import main
from vlafast.envs.base import EnvSpec
from vlafast.models.fast_tokenizer import FASTTokenizer
from vlafast.models.pi0fast import Pi0FASTConfig
from vlafast.policies import FASTPolicy, PolicyError, build_word_tokenizer
from vlafast.policies.tokens import TokenSampler

CFG = Pi0FASTConfig.tiny()  # vocab 521, A 3, S 5, T 4, 9 decode steps
WORDS = (["[eos]", "task", "state", "action", ":", ",", ";", "|", "pick", "up", "the", "red", "block", "and", "place",
          "it", "carefully", "on", "blue", "plate"] + [str(i) for i in range(256)])
SPEC = EnvSpec(num_envs=3, action_dim=3, state_dim=5, cameras=("base", "wrist"), image_size=(24, 24),
               max_episode_steps=10, control_hz=10.0)


def codec() -> FASTTokenizer:
    g = np.random.default_rng(0)
    t = np.linspace(0, 1, CFG.horizon)[None, :, None]
    chunks = np.sin(2 * t * g.uniform(0.5, 2, (64, 1, CFG.action_dim)) + g.uniform(0, 3, (64, 1, CFG.action_dim)))
    return FASTTokenizer.fit(chunks, vocab_size=390)  # the tiny model maps at most 393 FAST ids


def with_tokenizers(folder, fast: bool = True):
    build_word_tokenizer(WORDS).save(str(folder / "tokenizer.json"))
    if fast:
        codec().save(folder / "fast_tokenizer")
    return folder


def obs(B: int = 3, seed: int = 0) -> dict:
    g = np.random.default_rng(seed)
    texts = ["pick up the red block", "place it on the blue plate carefully", "pick up the red block and place it"]
    return {"images": {c: g.integers(0, 255, (B, 24, 24, 3), dtype=np.uint8) for c in SPEC.cameras},
            "state": g.normal(size=(B, 5)).astype(np.float32), "instruction": texts[:B]}


@pytest.fixture(scope="module")
def lerobot_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lerobot")
    write_lerobot(folder, random_policy(CFG), stats_for(3, 5))
    return with_tokenizers(folder)


def test_lerobot_and_openpi_folders_load_as_fast_policies(lerobot_folder, tmp_path):
    openpi = with_tokenizers(write_openpi(tmp_path / "openpi", random_policy(CFG), stats_for(3, 5)))
    (openpi / "config.json").write_text(json.dumps({"vlafast_config": CFG.to_json()}))  # tiny sizes; no "type"
    assert policies.detect_format(lerobot_folder) == "lerobot" and policies.detect_format(openpi) == "openpi"
    for folder, layout in ((lerobot_folder, "lerobot"), (openpi, "openpi")):
        p = policies.load(folder, device="cpu")
        assert isinstance(p, FASTPolicy) and p.spec.family == "pi0fast" and p.spec.source.startswith(layout)
        assert isinstance(p, policies.Policy) and isinstance(p, policies.Steerable)
        chunk = p.bind(SPEC).act_obs(obs())
        assert chunk.shape == (3, p.exec_horizon, 3) and np.isfinite(chunk).all()
        # a random model's tokens do not decode: counted, never raised
        assert p.decode_failures == 3 and p.decoded_chunks == 3
        assert p.action_layers() == [f"vlm.{l}" for l in range(CFG.vlm.depth)]


def test_save_load_round_trip_is_exact(lerobot_folder, tmp_path):
    p = policies.load(lerobot_folder, device="cpu").bind(SPEC)
    p.attach_value_head()
    folder = policies.save(p, tmp_path / "saved")
    assert (folder / "fast_tokenizer" / "processor_config.json").is_file()
    q = policies.load(folder, device="cpu")
    assert q.spec == p.spec and q.spec.heads == ("critic",)
    sp, sq = p.state_dict(), q.state_dict()
    assert sp.keys() == sq.keys() and all(torch.equal(sp[k], sq[k]) for k in sp)
    assert q.fast.config == p.fast.config and q.fast.tokenizer.to_str() == p.fast.tokenizer.to_str()
    o = obs()
    np.testing.assert_array_equal(p.act_obs(o), q.act_obs(o))
    b = p.observe(o)
    torch.testing.assert_close(p.value(b), q.value(b), rtol=0, atol=0)


def test_bad_folders_get_one_sentence(lerobot_folder, tmp_path):
    bare = tmp_path / "bare"
    write_lerobot(bare, random_policy(CFG), stats_for(3, 5))
    with_tokenizers(bare, fast=False)
    with pytest.raises(PolicyError, match=r"no fast_tokenizer/ FAST processor folder.*--fast-tokenizer"):
        policies.load(bare, device="cpu")
    # the codec passed explicitly
    assert isinstance(policies.load(bare, device="cpu", fast_tokenizer=lerobot_folder / "fast_tokenizer"), FASTPolicy)
    with pytest.raises(PolicyError, match="is not a FAST processor folder"):
        policies.load(bare, device="cpu", fast_tokenizer=tmp_path)
    saved = policies.save(policies.load(lerobot_folder, device="cpu").bind(SPEC), tmp_path / "saved")
    (saved / "fast_tokenizer" / "processor_config.json").unlink()
    with pytest.raises(PolicyError, match="processor_config.json not found"):
        policies.load(saved, device="cpu")
    (bare / "config.json").write_text(json.dumps({"type": "pi0fast_v2"}))
    with pytest.raises(PolicyError, match="'pi0fast_v2' is not a supported policy"):
        policies.load(bare, device="cpu")
    small = tmp_path / "small"
    write_lerobot(small, random_policy(CFG), stats_for(3, 5))
    build_word_tokenizer(WORDS + [f"w{i}" for i in range(300)]).save(str(small / "tokenizer.json"))
    codec().save(small / "fast_tokenizer")
    with pytest.raises(ValueError, match="has 578 tokens but the model's embedding only 521"):
        policies.load(small, device="cpu")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_evaluate_recomputes_act_log_probs(lerobot_folder, temperature):
    p = policies.load(lerobot_folder, device="cpu").bind(SPEC)
    p.attach_value_head()
    batch = p.observe(obs())
    assert len(set(batch.token_masks.sum(1).tolist())) == 3  # prompts of three lengths (right-padded)
    g = torch.Generator().manual_seed(3)
    sampler = TokenSampler(temperature)
    actions, trace, value = p.act(batch, sampler, g)
    assert actions.shape == (3, p.exec_horizon, 3) and trace.tokens.shape == (3, CFG.max_decoding_steps)
    log_prob, entropy, value2 = p.evaluate(batch, trace)
    # KV-cached decode vs one uncached pass, fp32: measured |diff| <= 7.7e-6 over 10 draws (sums of 9 steps)
    assert (log_prob - trace.log_prob).abs().max() < 5e-5
    assert (entropy - trace.entropy).abs().max() < 5e-5
    assert (value - value2).abs().max() < 1e-5
    assert torch.exp(log_prob - trace.log_prob).sub(1).abs().max() < 1e-4  # PPO's first ratio
    # rows and steps: a trace row scored alone gives its own log-prob
    one = p.evaluate(batch.index(torch.tensor([2])), trace.select(torch.tensor([2])))[0]
    assert (one - trace.log_prob[2]).abs().max() < 5e-5
    # the scores depend on the tokens: another draw scores differently
    other = p.act(batch, sampler, torch.Generator().manual_seed(4))[1]
    assert not torch.equal(other.tokens, trace.tokens)
    log_prob.sum().backward()  # differentiable for PPO
    assert p.model.language_model.embed_tokens.weight.grad is not None


def test_sft_loss_decreases_on_a_fixed_batch(lerobot_folder):
    torch.manual_seed(0)
    p = policies.load(lerobot_folder, device="cpu").bind(SPEC)
    o = obs()
    batch = p.observe(o)
    g = np.random.default_rng(1)
    actions = torch.as_tensor(g.uniform(-1, 1, (3, CFG.horizon, 3)), dtype=torch.float32)
    targets, mask = p.action_targets(actions)
    assert (targets[mask] == CFG.eos_token_id).sum() == 3  # each sequence ends "|" EOS
    opt = torch.optim.Adam(p.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = p.sft_loss(batch, actions)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses  # loss drops below 0.3x its start in 25 steps (asserted; the margin is wide)
    with pytest.raises(ValueError, match=r"actions must be \[B, T=4"):
        p.sft_loss(batch, actions[:, :3])


def test_tiny_pi0fast_recipe_through_train_eval_dictionary(tmp_path, capsys):
    pytest.importorskip("mujoco", reason="the built-in task simulates a UR5e")
    config = tmp_path / "fast.json"
    config.write_text(json.dumps({"family": "pi0fast", "num_envs": 4, "demos": 4, "sft_steps": 3, "sft_batch": 8,
                                  "eval_episodes": 4, "image_size": 16, "width": 16, "depth": 1}))
    run = tmp_path / "run"
    assert main(["train", "sft", "--out", str(run), "--config", str(config), "--no-progress"]) == 0
    saved = json.loads((run / "policy" / "policy.json").read_text())
    assert saved["family"] == "pi0fast" and saved["recipe"]["family"] == "pi0fast"
    assert (run / "policy" / "fast_tokenizer" / "tokenizer.json").is_file()
    assert main(["eval", "--policy", str(run), "--episodes", "4", "--no-progress"]) == 0
    assert "success" in capsys.readouterr().out
    d = tmp_path / "dict.safetensors"
    assert main(["dictionary", "build", "--policy", str(run), "-o", str(d), "-k", "32"]) == 0
    assert "2 layers" in capsys.readouterr().out  # every Gemma layer of the 2 * depth stack
    assert main(["dictionary", "search", str(d), "quickly"]) == 0
    # the paper's path: clusters written as flat ids, clamped at 10, with a random control; every
    # run reports the fraction of chunks that did not decode (a broken stream holds the arm)
    clusters, out = tmp_path / "clusters.yaml", tmp_path / "steer.json"
    assert main(["dictionary", "clusters", str(d), "fast", "slow", "-o", str(clusters)]) == 0
    capsys.readouterr()
    assert main(["steer", "--policy", str(run), "--cluster-file", str(clusters), "--alpha", "10", "--controls", "1",
                 "--episodes", "4", "--json", str(out)]) == 0
    assert "undecoded" in capsys.readouterr().out
    runs = json.loads(out.read_text())["runs"]
    assert "baseline" in runs and len(runs) >= 3, list(runs)
    assert all(0.0 <= r["undecoded"] <= 1.0 for r in runs.values())


@pytest.mark.slow
def test_robot_run_drives_a_joint_space_pi0fast_folder(tmp_path, capsys):
    """`vlafast robot run --policy <pi0-FAST folder>`: a tiny joint-space pi0-FAST (the recipe's
    builder, its FAST codec fitted on chunks around the UR5e's home pose) decodes whole greedy
    chunks from the MuJoCo backend's rendered camera, joint state and prompt, and the servo
    accepts them; --rtc (a flow sampler's guidance) is refused in one sentence."""
    import dataclasses
    import re

    pytest.importorskip("mujoco", reason="the MuJoCo backend simulates the UR5e")
    from vlafast.rl.recipe import Recipe, build_fast_policy
    from vlafast.robot.servo import UR5E_HOME

    spec = EnvSpec(num_envs=1, action_dim=6, state_dim=6, cameras=("robot",), image_size=(16, 16),
                   max_episode_steps=100, control_hz=20.0)
    recipe = Recipe(family="pi0fast", width=16, depth=1, image_size=16, horizon=8, exec_horizon=4)
    pol = build_fast_policy(recipe, spec)
    pol._spec = dataclasses.replace(pol.spec, action_space="joint_position")
    g = np.random.default_rng(0)
    t = np.linspace(0, 1, recipe.horizon)[None, :, None]
    chunks = np.asarray(UR5E_HOME)[None, None] + 0.05 * np.sin(2 * t * g.uniform(0.5, 2, (64, 1, 6)) + g.uniform(0, 3, (64, 1, 6)))
    pol.fit_codec(chunks, chunks[:, 0])
    folder = policies.save(pol, tmp_path / "fast-joint")
    assert policies.load(folder).spec.action_space == "joint_position"
    code = main(["robot", "run", "--backend", "mujoco", "--policy", str(folder), "--prompt", "lift", "--seconds", "1.5",
                 "--no-realtime", "--report", str(tmp_path / "report")])
    out = capsys.readouterr().out
    # as the pi0 folder's test: what the code controls, not this machine's speed (a watchdog stop
    # under load, exit 1, is the servo's job; a policy error is not)
    assert code in (0, 1) and "policy error" not in out, out
    accepted = [int(m) for m in re.findall(r"chunks (\d+)/\d+", out)]
    assert accepted and max(accepted) >= 1, out
    assert (tmp_path / "report" / "cycles.csv").exists()
    assert main(["robot", "run", "--backend", "mujoco", "--policy", str(folder), "--rtc", "--seconds", "0.5",
                 "--no-realtime"]) == 2
    assert "--rtc guides a flow sampler; pi0-FAST decodes tokens" in capsys.readouterr().err
