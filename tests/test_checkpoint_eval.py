"""`vlafast eval --policy ... --env ...`: a published-layout pi0 / pi0.5 checkpoint on a benchmark VecEnv.

Fast tests: the Wilson interval against a numeric inversion of the score test, the episode
quotas, the observation adapter on synthetic observations against an independent build of
the model inputs (images, prompt tokens incl. pi0.5's discretised state, state) built by the
policy layer's processor, the errors.
Slow test: the CLI end to end on real LIBERO (two libero_10 tasks in .venv-libero workers, a
tiny LeRobot-layout pi0 written by the test, 6-step episodes).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from helpers_ckpt import random_policy, stats_for, write_lerobot
from vlafast.envs.base import EnvSpec
from vlafast.envs.maniskill import renderer_unavailable
from vlafast.models import Pi0Config
from vlafast.models.pi0 import preprocess_images
from vlafast.models.pi0_load import load_pi0
from vlafast import eval as ev
from vlafast import policies
from vlafast.policies import FlowPolicy, PolicySpec, Pi0Processor, ProcessorConfig, PromptTokenizer, build_word_tokenizer
from vlafast.policies.processors import MAX_TOKENS, paligemma_prompt_ids

LIBERO_A, LIBERO_S = 7, 8  # LIBERO action / state dims


def _wilson_by_inversion(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson interval is {p : |k/n - p| <= z sqrt(p (1 - p) / n)}; find its ends by bisection."""
    phat = k / n

    def inside(p: float) -> bool:
        return abs(phat - p) <= z * math.sqrt(p * (1 - p) / n)

    def edge(a: float, b: float) -> float:  # a inside, b outside (or the reverse)
        for _ in range(200):
            m = 0.5 * (a + b)
            a, b = (m, b) if inside(m) == inside(a) else (a, m)
        return 0.5 * (a + b)

    lo = 0.0 if inside(0.0) else edge(phat, 0.0)
    hi = 1.0 if inside(1.0) else edge(phat, 1.0)
    return lo, hi


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 2), (1, 2), (0, 10), (3, 7), (5, 10), (10, 10), (37, 50), (1, 97)])
def test_wilson_interval_matches_the_score_test_inversion(k, n):
    lo, hi = ev.wilson_interval(k, n)
    rlo, rhi = _wilson_by_inversion(k, n)
    assert abs(lo - rlo) < 1e-9 and abs(hi - rhi) < 1e-9  # measured max 2e-16 (bisection to 2^-200)
    assert lo <= k / n <= hi


def test_wilson_interval_edges():
    assert ev.wilson_interval(0, 0) == (0.0, 1.0)
    # a published value: 0 successes of 10 -> [0, 0.2775] (Wilson 1927; e.g. Brown, Cai & DasGupta 2001)
    assert abs(ev.wilson_interval(0, 10)[1] - 0.2775) < 1e-4
    with pytest.raises(ValueError, match="successes <= n"):
        ev.wilson_interval(3, 2)


@pytest.mark.parametrize("tasks,episodes", [([0], 1), ([0, 1], 3), ([0, 1, 0, 1, 0], 7), ([2, 2, 2], 1), ([5, 3], 13)])
def test_env_quotas_give_every_task_its_episodes(tasks, episodes):
    quotas = ev.env_quotas(tasks, episodes)
    for t in set(tasks):
        mine = [q for q, u in zip(quotas, tasks) if u == t]
        assert sum(mine) == episodes and max(mine) - min(mine) <= 1


# -- adapter on synthetic observations -----------------------------------------------------------

WORDS = ["task", "state", "action", "pick", "up", "the", "bowl", "put", "it", "on", "plate",
         ":", ",", ";", "-"] + [str(i) for i in range(257)]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    build_word_tokenizer(WORDS).save(str(path))
    return path


def _checkpoint(folder, pi05: bool, action_dim=LIBERO_A, state_dim=LIBERO_S, vocab=400, seed=0):
    """A tiny LeRobot-layout checkpoint (padded dims 8, stats for the env's 7 / 8) and its config."""
    cfg = Pi0Config.tiny(pi05=pi05, action_dim=8, state_dim=8, vocab_size=vocab)
    return write_lerobot(folder, random_policy(cfg, seed=seed), stats_for(action_dim, state_dim)), cfg


def _load(ck):
    folder, cfg = ck
    return load_pi0(folder, config=cfg)


def _adapter(model, tok, spec, max_tokens=None, exec_horizon=5) -> FlowPolicy:
    """The published-checkpoint policy (PaliGemma prompts) around ``model``, bound to ``spec``."""
    pcfg = ProcessorConfig(prompt="paligemma", max_tokens=max_tokens or MAX_TOKENS[model.cfg.variant])
    pspec = PolicySpec(family=model.cfg.variant, model=model.cfg.to_json(), processor=pcfg, exec_horizon=exec_horizon)
    return FlowPolicy(model, Pi0Processor(model, tok, pcfg), pspec, critic=False).bind(spec)


def _inputs(policy: FlowPolicy, obs):
    return policy.model_inputs(obs)


def _spec(cameras=("image", "wrist_image"), state_dim=LIBERO_S, action_dim=LIBERO_A, size=32) -> EnvSpec:
    return EnvSpec(num_envs=3, action_dim=action_dim, state_dim=state_dim, cameras=cameras,
                   image_size=(size, size), max_episode_steps=10, control_hz=20.0)


def _obs(spec: EnvSpec, seed=0):
    rng = np.random.default_rng(seed)
    B, (H, W) = spec.num_envs, spec.image_size
    # dict order deliberately not the spec's order, plus an extra camera the spec does not use
    cams = list(reversed(spec.cameras)) + ["extra"]
    images = {c: rng.integers(0, 256, (B, H, W, 3), dtype=np.uint8) for c in cams}
    return {"images": images, "state": rng.normal(size=(B, spec.state_dim)).astype(np.float32),
            "instruction": ["pick up the bowl", "put_it on the plate\n", "Pick up the bowl, put it on the plate"]}


def test_pi0_adapter_builds_the_model_inputs(tmp_path, tokenizer_path):
    policy = _load(_checkpoint(tmp_path / "ck", pi05=False))
    tok = PromptTokenizer(tokenizer_path)
    spec = _spec(cameras=("wrist_image", "image"))
    obs = _obs(spec)
    adapter = _adapter(policy, tok, spec, exec_horizon=3)
    x = _inputs(adapter, obs)

    frames = np.stack([obs["images"]["wrist_image"], obs["images"]["image"]], axis=1)
    torch.testing.assert_close(x.images, preprocess_images(torch.from_numpy(frames), policy.cfg.vision.image_size),
                               rtol=0, atol=0)
    assert x.image_masks.all() and x.image_masks.shape == (3, 2)
    torch.testing.assert_close(x.state, torch.from_numpy(obs["state"]), rtol=0, atol=0)
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]"] + list(dict.fromkeys(WORDS)))}
    expected = [[vocab[w] for w in ["pick", "up", "the", "bowl"]],
                [vocab[w] for w in ["put", "it", "on", "the", "plate"]],  # "_" and "\n" become spaces
                [vocab[w] for w in ["pick", "up", "the", "bowl", ",", "put", "it", "on", "the", "plate"]]]
    assert x.tokens.shape == (3, 10)
    for b, ids in enumerate(expected):
        assert x.tokens[b, :len(ids)].tolist() == ids
        assert x.token_masks[b].tolist() == [True] * len(ids) + [False] * (10 - len(ids))

    # actions: the first exec_horizon steps and the env's action dims of the policy's own sample
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    chunk = adapter.act_obs(obs, num_steps=2, generator=g1)
    ref = policy.sample_actions(x, generator=g2, num_steps=2)
    assert chunk.shape == (3, 3, LIBERO_A) and chunk.dtype == np.float64
    np.testing.assert_allclose(chunk, ref[:, :3, :LIBERO_A].double().numpy(), rtol=0, atol=0)

    # a prompt longer than max_tokens is cut (masked padding does not change the actions)
    short = _inputs(_adapter(policy, tok, spec, max_tokens=4), obs)
    assert short.tokens.shape == (3, 4) and short.tokens[2].tolist() == expected[2][:4]


def test_pi0_prompt_has_the_tokenizers_bos_and_a_separate_newline(tmp_path):
    """openpi: encode(text, add_bos=True) + encode("\\n"); a tokenizer.json adds BOS through its
    post-processor (PaliGemma's does), and the newline must not get a second BOS."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    vocab = {"[PAD]": 0, "[UNK]": 1, "<bos>": 2, "\n": 3, "pick": 4, "up": 5, "the": 6, "bowl": 7}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(" "), behavior="removed")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tok.save(str(tmp_path / "tok.json"))
    pt = PromptTokenizer(tmp_path / "tok.json")
    assert paligemma_prompt_ids(pt, " pick_up the\nbowl ", None) == [2, 4, 5, 6, 7, 3]
    policy = _load(_checkpoint(tmp_path / "ck", pi05=False))
    spec = _spec()
    obs = _obs(spec)
    obs["instruction"] = ["pick up", "the bowl", "pick up the bowl"]
    x = _inputs(_adapter(policy, pt, spec), obs)
    assert x.tokens.tolist() == [[2, 4, 5, 3, 0, 0], [2, 6, 7, 3, 0, 0], [2, 4, 5, 6, 7, 3]]
    assert x.token_masks.sum(1).tolist() == [4, 4, 6]


def test_pi05_adapter_puts_the_discretised_state_in_the_prompt(tmp_path, tokenizer_path):
    stats = stats_for(LIBERO_A, LIBERO_S)
    policy = _load(_checkpoint(tmp_path / "ck", pi05=True))
    spec = _spec()
    obs = _obs(spec, seed=3)
    obs["state"] = obs["state"] * 0.6  # mostly inside [q01, q99]
    x = _inputs(_adapter(policy, PromptTokenizer(tokenizer_path), spec), obs)
    assert x.state is None
    # independent reference: LeRobot quantile normalisation, zero padding to 8, np.digitize bins
    q01, q99 = np.array(stats["state"]["q01"]), np.array(stats["state"]["q99"])
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]"] + list(dict.fromkeys(WORDS)))}
    for b in range(3):
        norm = (obs["state"][b].astype(np.float64) - q01) / (q99 - q01) * 2 - 1
        bins = np.digitize(np.pad(norm, (0, 8 - LIBERO_S)), np.linspace(-1, 1, 257)[:-1]) - 1
        text = obs["instruction"][b].strip().replace("_", " ").replace("\n", " ").lower()
        words = ["task", ":"] + text.replace(",", " , ").split() + [",", "state", ":"]
        for v in bins:
            words += ["-", str(-v)] if v < 0 else [str(v)]
        words += [";", "action", ":"]
        ids = [vocab[w] for w in words]
        n = int(x.token_masks[b].sum())
        assert x.tokens[b, :n].tolist() == ids


# -- errors ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ur5e-reach", "libero", "libero:", "gym:CartPole-v1", "maniskill"])
def test_unknown_env_name_is_refused_before_anything_loads(name, tmp_path, tokenizer_path):
    with pytest.raises(ValueError, match="libero:<suite>"):
        ev.evaluate_on_env(None, name)


def test_unknown_libero_suite_is_refused_before_the_env_starts(tmp_path, tokenizer_path):
    with pytest.raises(ValueError, match="unknown LIBERO suite 'libero_11'"):
        ev.benchmark_env("libero:libero_11", seed=0)


def test_missing_checkpoint_and_tokenizer(tmp_path, tokenizer_path):
    with pytest.raises(policies.PolicyError, match="no checkpoint at .*nowhere"):
        policies.load(tmp_path / "nowhere", tokenizer_path)
    ck, _ = _checkpoint(tmp_path / "ck", pi05=False)
    with pytest.raises(FileNotFoundError, match="tokenizer file .* not found"):
        policies.load(ck, tmp_path / "tokenizer.json")
    with pytest.raises(policies.PolicyError, match="has no tokenizer.json: pass tokenizer="):
        policies.load(ck)


def test_tokenizer_larger_than_the_model_vocabulary(tmp_path):
    big = tmp_path / "big.json"
    build_word_tokenizer([f"w{i}" for i in range(120)]).save(str(big))  # 122 ids
    cfg = Pi0Config.tiny(action_dim=8, state_dim=8, vocab_size=97)
    ck = write_lerobot(tmp_path / "ck", random_policy(cfg), stats_for(LIBERO_A, LIBERO_S), sizes=True)
    with pytest.raises(ValueError, match="122 tokens but the model's embedding only 97"):
        policies.load(ck, big)  # refused when loading, before any env starts
    with pytest.raises(ValueError, match="122 tokens but the model's embedding only 97"):
        _adapter(load_pi0(ck, config=cfg), PromptTokenizer(big), _spec())


def test_env_mismatch_errors(tmp_path, tokenizer_path):
    policy = _load(_checkpoint(tmp_path / "ck", pi05=False))
    tok = PromptTokenizer(tokenizer_path)
    with pytest.raises(ValueError, match="the env has 9 action dims but this pi0 outputs 7"):
        _adapter(policy, tok, _spec(action_dim=9))
    with pytest.raises(ValueError, match="state statistics have 8 dims but the env's state 6"):
        _adapter(policy, tok, _spec(state_dim=6))
    with pytest.raises(ValueError, match="no camera images|has none"):
        _adapter(policy, tok, _spec(cameras=()))


def test_cli_dispatches_env_evaluations(tmp_path, tokenizer_path, capsys):
    from vlafast.cli import main

    def error(argv):
        assert main(argv) == 2
        return capsys.readouterr().err

    ck, _ = _checkpoint(tmp_path / "ck", pi05=False)
    assert "has no tokenizer.json: pass tokenizer= (--tokenizer)" in error(
        ["eval", "--policy", str(ck), "--env", "libero:libero_10"])
    assert "--tasks must be comma-separated integers" in error(
        ["eval", "--policy", str(ck), "--env", "libero:libero_10", "--tokenizer", str(tokenizer_path), "--tasks", "0,one"])
    assert "--tokenizer, --videos apply to benchmark envs" in error(
        ["eval", "--policy", str(tmp_path), "--tokenizer", "t.json", "--videos", "3"])
    assert "libero:<suite>" in error(  # reached the benchmark path, not the built-in task's
        ["eval", "--policy", str(ck), "--env", "gym:CartPole-v1", "--tokenizer", str(tokenizer_path)])


# -- for real: LIBERO ------------------------------------------------------------------------------

@pytest.mark.slow
def test_tiny_lerobot_pi0_on_real_libero(tmp_path, tokenizer_path, capsys):
    ck, cfg = _checkpoint(tmp_path / "ck", pi05=False)
    out = tmp_path / "run"
    budget, horizon = 6, 3  # steps per episode, actions per chunk: 2 chunks an episode
    run = ev.EvalConfig(episodes=2, num_steps=2, videos=2, seed=3)
    policy = _adapter(load_pi0(ck, config=cfg), PromptTokenizer(tokenizer_path), _spec(), exec_horizon=horizon)
    summary = ev.evaluate_on_env(
        policy, "libero:libero_10", cfg=run, out=out, tasks=[0, 1], num_envs=2,
        env_overrides={"max_episode_steps": budget, "render_size": 96, "image_size": 64}, progress=False)
    assert json.loads((out / "summary.json").read_text())["tasks"] == summary["tasks"]
    table = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2 + 1  # header, 2 tasks, overall

    tasks = summary["tasks"]
    assert [t["task_id"] for t in tasks] == [0, 1] and all(t["episodes"] == 2 for t in tasks)
    assert tasks[0]["instruction"] != tasks[1]["instruction"] and all(t["instruction"] for t in tasks)
    eps = summary["episodes"]
    assert len(eps) == 4 and sorted(e["env"] for e in eps) == [0, 0, 1, 1]
    assert all(e["error"] is None for e in eps)
    for e in eps:  # a random tiny policy: a success within 6 steps would end the episode early
        assert e["length"] == budget or (e["success"] and e["length"] < budget)
    for t in tasks:
        k = sum(e["success"] for e in eps if e["task_id"] == t["task_id"])
        assert t["successes"] == k
        assert t["ci95"] == pytest.approx(list(_wilson_by_inversion(k, 2)), abs=1e-9)  # measured 2e-16
    o = summary["overall"]
    assert o["episodes"] == 4 and o["ci95"] == pytest.approx(list(_wilson_by_inversion(o["successes"], 4)), abs=1e-9)

    # GIFs: one frame per chunk of the first episodes of envs 0 and 1, both cameras side by side
    assert len(summary["videos"]) == 2
    for rel in summary["videos"]:
        with Image.open(out / rel) as gif:
            assert gif.n_frames == budget // horizon and gif.size == (2 * 64, 64)


# -- for real: ManiSkill (SAPIEN needs a Vulkan device: lavapipe here via `make maniskill`) ------------


@pytest.mark.vulkan
@pytest.mark.slow
def test_tiny_lerobot_pi0_on_real_maniskill(tmp_path, tokenizer_path):
    err = renderer_unavailable()
    if err:
        pytest.skip(err)
    state_dim = 29  # PickCube-v1 rgb: agent qpos 9 + qvel 9, tcp pose 7, goal 3, is_grasped 1
    cfg = Pi0Config.tiny(action_dim=8, state_dim=32, vocab_size=400)
    ck = write_lerobot(tmp_path / "ck", random_policy(cfg), stats_for(LIBERO_A, state_dim))
    budget, horizon = 6, 3
    policy = _adapter(load_pi0(ck, config=cfg), PromptTokenizer(tokenizer_path),
                      _spec(cameras=("base_camera",), state_dim=state_dim), exec_horizon=horizon)
    summary = ev.evaluate_on_env(
        policy, "maniskill:PickCube-v1", cfg=ev.EvalConfig(episodes=2, num_steps=2, videos=1, seed=1),
        out=tmp_path / "run", num_envs=2, progress=False,
        env_overrides={"sim_backend": "physx_cpu", "image_size": 48, "max_episode_steps": budget})
    (task,) = summary["tasks"]
    assert task["episodes"] == 2 and task["instruction"] == "pick up the red cube and move it to the green goal"
    assert sorted(e["env"] for e in summary["episodes"]) == [0, 1]
    for e in summary["episodes"]:
        assert e["error"] is None and (e["length"] == budget or (e["success"] and e["length"] < budget))
    assert task["ci95"] == pytest.approx(list(_wilson_by_inversion(task["successes"], 2)), abs=1e-9)
    (rel,) = summary["videos"]
    with Image.open(tmp_path / "run" / rel) as gif:
        assert gif.n_frames == budget // horizon and gif.size == (48, 48)
