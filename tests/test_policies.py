"""The policy layer: every format loads into the same kind of object, save / load round trips,
damaged and foreign files are refused with one sentence, and nothing is unpickled.

Slow tests: the CLI end to end on the tiny LeRobot-layout pi0.5 written here (eval on one
LIBERO task -> dictionary -> steer in that env -> PPO with Flow-SDE and Flow-Noise -> eval of
the result -> ``policies.load`` of the result equals the trained weights), OpenVLA through
eval and steer, and ``robot run --policy`` for a joint-space tiny pi0 on MuJoCo.
"""

from __future__ import annotations

import json
import pickle
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers_ckpt import random_policy, stats_for, write_lerobot
from vlafast import policies
from vlafast.cli import main
from vlafast.envs.base import EnvSpec
from vlafast.models import FeatureStats, Normalizer, Pi0Config, Pi0Policy
from vlafast.policies import FlowPolicy, PolicyError, build_word_tokenizer, flow_policy, words_of

LIBERO_A, LIBERO_S = 7, 8
WORDS = ("pick up the black bowl between plate and ramekin place it on fast quick rapid slow careful gentle up "
         "down raise lift high low task state action : , ; . in what should robot take to ? out")


def _spec(cameras=("image",), action_dim=LIBERO_A, state_dim=LIBERO_S, size=24) -> EnvSpec:
    return EnvSpec(num_envs=2, action_dim=action_dim, state_dim=state_dim, cameras=cameras,
                   image_size=(size, size), max_episode_steps=10, control_hz=20.0)


def _obs(spec: EnvSpec, seed: int = 0):
    rng = np.random.default_rng(seed)
    B, (H, W) = spec.num_envs, spec.image_size
    return {"images": {c: rng.integers(0, 256, (B, H, W, 3), dtype=np.uint8) for c in spec.cameras},
            "state": (0.5 * rng.normal(size=(B, spec.state_dim))).astype(np.float32),
            "instruction": ["pick up the black bowl"] * B}


def _tiny_flow_policy(pi05: bool = False, normalizer: Normalizer | None = None, noise_head: bool = True) -> FlowPolicy:
    torch.manual_seed(0)
    tok = build_word_tokenizer(words_of([WORDS]))
    cfg = Pi0Config.tiny(pi05=pi05, action_dim=8, state_dim=8, vocab_size=tok.get_vocab_size())
    pol = flow_policy(Pi0Policy(cfg, normalizer), tok, _spec(), exec_horizon=3, max_tokens=8)
    if noise_head:
        pol.attach_noise_head()
    return pol


@pytest.mark.parametrize("pi05", [False, True])
def test_save_load_round_trip_is_exact(tmp_path, pi05):
    norm = Normalizer(FeatureStats(mean=torch.randn(LIBERO_S), std=torch.rand(LIBERO_S) + 0.5),
                      FeatureStats(mean=torch.randn(LIBERO_A), std=torch.rand(LIBERO_A) + 0.5),
                      "mean_std", "mean_std", "openpi")
    pol = _tiny_flow_policy(pi05, norm)
    folder = policies.save(pol, tmp_path / "p")
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "policy.json", "tokenizer.json"]
    back = policies.load(folder, device="cpu")
    assert isinstance(back, FlowPolicy) and back.spec.heads == ("critic", "noise_head")
    assert back.spec == pol.spec
    _assert_same_state(pol, back)
    for feat in ("state", "actions"):
        for f in ("mean", "std"):
            assert torch.equal(getattr(getattr(norm, feat), f), getattr(getattr(back.model.normalizer, feat), f))
    # the same chunks from the same noise (the whole path: processor, sampler, unnormalisation)
    obs = _obs(_spec())
    a = pol.act_obs(obs, generator=torch.Generator().manual_seed(3))
    b = back.act_obs(obs, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 3, LIBERO_A) and np.array_equal(a, b)


def _assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k, v in sa.items():
        assert torch.equal(v, sb[k]), k


def test_loaded_published_checkpoint_is_the_same_kind_of_object(tmp_path):
    cfg = Pi0Config.tiny(pi05=True, action_dim=8, state_dim=8, vocab_size=97)
    ck = write_lerobot(tmp_path / "ck", random_policy(cfg), stats_for(LIBERO_A, LIBERO_S), sizes=True)
    build_word_tokenizer(words_of([WORDS])).save(str(ck / "tokenizer.json"))
    assert policies.detect_format(ck) == "lerobot"
    pol = policies.load(ck, device="cpu")
    assert isinstance(pol, FlowPolicy) and pol.spec.family == "pi05" and pol.spec.processor.prompt == "paligemma"
    assert pol.spec.exec_horizon == 5 and pol.critic is None and pol.spec.env is None
    with pytest.raises(PolicyError, match="not bound to an environment yet"):
        pol.act_obs(_obs(_spec()))
    pol.bind(_spec())
    chunk = pol.act_obs(_obs(_spec()), generator=torch.Generator().manual_seed(0))
    assert chunk.shape == (2, 5, LIBERO_A) and np.isfinite(chunk).all()
    # RL heads attach to it and save with it
    pol.attach_value_head()
    pol.attach_noise_head()
    back = policies.load(policies.save(pol, tmp_path / "tuned"), device="cpu")
    assert back.spec.heads == ("critic", "noise_head") and back.spec.source == pol.spec.source
    _assert_same_state(pol, back)


def test_formats_and_damaged_files_are_refused_with_one_sentence(tmp_path):
    pol = _tiny_flow_policy()
    folder = policies.save(pol, tmp_path / "p")
    cases = []
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "is not a policy folder: expected policy.json"))
    cases.append((tmp_path / "none", "no checkpoint at"))
    (tmp_path / "policy.pt").write_bytes(b"x")
    cases.append((tmp_path / "policy.pt", "vlafast convert"))
    bad_json = tmp_path / "badjson"
    bad_json.mkdir()
    (bad_json / "policy.json").write_text("{not json")
    cases.append((bad_json, "is not valid JSON"))
    for name, edit in (("truncated", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:200])),
                       ("family", lambda d: _edit_spec(d, family="pi1")),
                       ("unknown", lambda d: _edit_spec(d, colour="red")),
                       ("keys", lambda d: _drop_weights(d, "critic."))):
        d = tmp_path / name
        d.mkdir()
        for f in folder.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        edit(d)
        cases.append((d, {"truncated": "damaged or truncated", "family": "family must be one of",
                          "unknown": r"unknown keys \['colour'\]", "keys": "does not match"}[name]))
    for path, message in cases:
        with pytest.raises(PolicyError, match=message) as info:
            policies.load(path, device="cpu")
        text = str(info.value)
        assert len(text.splitlines()) == 1 and len(text) < 600, text  # one sentence, names the file
    nan = tmp_path / "nan"
    policies.save(pol, nan)
    weights = load_file(str(nan / "model.safetensors"))
    weights["critic.0.weight"][0, 0] = float("nan")
    from safetensors.torch import save_file

    save_file(weights, str(nan / "model.safetensors"))
    with pytest.raises(PolicyError, match=r"NaN / inf in critic.0.weight"):
        policies.load(nan, device="cpu")


def _edit_spec(folder, **changes):
    spec = json.loads((folder / "policy.json").read_text())
    spec.update(changes)
    (folder / "policy.json").write_text(json.dumps(spec))


def _drop_weights(folder, prefix):
    from safetensors.torch import save_file

    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith(prefix)}, str(folder / "model.safetensors"))


class _Payload:
    """Unpickling this runs code (writes a file): what a crafted policy.pt would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_a_malicious_policy_pt_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "policy.pt"
    with open(bad, "wb") as fh:
        pickle.dump({"recipe": {}, "policy": _Payload(marker)}, fh)
    with pytest.raises(PolicyError, match="vlafast convert"):
        policies.load(bad)
    assert main(["convert", str(bad), str(tmp_path / "out")]) == 2
    assert not marker.exists()  # the weights-only loader refused the file; nothing ran


def test_convert_turns_an_old_policy_pt_into_a_folder(tmp_path):
    pytest.importorskip("mujoco", reason="the built-in UR5e task simulates in MuJoCo")
    from vlafast.rl.recipe import Recipe, build_env, build_policy

    recipe = Recipe(num_envs=2, image_size=16, width=32)
    env = build_env(recipe)
    pol = build_policy(recipe, env.spec)
    env.close()
    torch.save({"recipe": recipe.to_json(), "policy": pol.state_dict(), "extra": {"summary": {"x": [1.0]}}},
               tmp_path / "policy.pt")
    assert main(["convert", str(tmp_path / "policy.pt"), str(tmp_path / "new")]) == 0
    back = policies.load(tmp_path / "new", device="cpu")
    assert back.spec.recipe["width"] == 32
    _assert_same_state(pol, back)


def test_jobs_a_model_cannot_do_get_one_sentence(tmp_path, capsys):
    cfg = Pi0Config.tiny(action_dim=8, state_dim=8, vocab_size=97)
    ck = write_lerobot(tmp_path / "ck", random_policy(cfg), stats_for(LIBERO_A, LIBERO_S), sizes=True)
    build_word_tokenizer(words_of([WORDS])).save(str(ck / "tokenizer.json"))
    pol = policies.load(ck, device="cpu")
    with pytest.raises(PolicyError, match="the env has 9 action dims but this pi0 outputs 7"):
        pol.bind(_spec(action_dim=9))
    assert pol.spec.env is None  # a refused binding leaves the policy as it was
    # PPO from a checkpoint that carries no env
    assert main(["train", "ppo", "--init", str(ck), "--out", str(tmp_path / "r"), "--iterations", "1"]) == 2
    assert "carries no env" in capsys.readouterr().err
    # a task-space policy on the joint-space robot loop
    _edit_spec_to(policies.save(pol, tmp_path / "ee"), action_space="ee_delta")
    assert main(["robot", "run", "--backend", "null", "--policy", str(tmp_path / "ee"), "--seconds", "0.2"]) == 2
    assert "outputs ee_delta actions; the UR5e loop streams joint positions" in capsys.readouterr().err
    # a folder that does not say what its actions are needs the user's word that they are joint positions
    assert main(["robot", "run", "--backend", "mujoco", "--policy", str(ck), "--seconds", "0.2"]) == 2
    assert "add --joint-positions" in capsys.readouterr().err


def _edit_spec_to(folder, **changes):
    _edit_spec(folder, **changes)
    return folder


# -- end to end on LIBERO ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pi05_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pi05")
    tok = build_word_tokenizer(words_of([WORDS]))
    cfg = Pi0Config.tiny(pi05=True, action_dim=8, state_dim=8, vocab_size=tok.get_vocab_size(), horizon=6,
                         num_steps=2)
    ck = write_lerobot(folder / "ck", random_policy(cfg, seed=4), stats_for(LIBERO_A, LIBERO_S), sizes=True)
    tok.save(str(ck / "tokenizer.json"))
    return ck


LIBERO = ["--env", "libero:libero_spatial", "--tasks", "0", "--max-episode-steps", "6"]


@pytest.mark.slow
def test_lerobot_pi05_through_eval_dictionary_steer_ppo_eval(pi05_checkpoint, tmp_path, capsys):
    ck = pi05_checkpoint
    # 1. eval on one LIBERO task
    assert main(["eval", "--policy", str(ck), *LIBERO, "--episodes", "1", "--videos", "0", "--no-progress",
                 "--out", str(tmp_path / "eval0")]) == 0
    summary = json.loads((tmp_path / "eval0" / "summary.json").read_text())
    assert summary["overall"]["episodes"] == 1 and summary["config"]["family"] == "pi05"
    # 2. dictionary, 3. steer with a cluster in that env
    d = tmp_path / "d.safetensors"
    assert main(["dictionary", "build", "--policy", str(ck), "-o", str(d), "-k", "10"]) == 0
    js = tmp_path / "steer.json"
    assert main(["steer", "--policy", str(ck), *LIBERO, "--dictionary", str(d), "--cluster", "fast",
                 "--episodes", "1", "--json", str(js)]) == 0
    result = json.loads(js.read_text())
    assert set(result["runs"]) == {"baseline", "fast"} and result["metric"] == "action_norm"
    assert result["runs"]["fast"]["neurons"] > 0
    # 4. PPO for 2 updates from that folder, Flow-SDE and Flow-Noise
    config = tmp_path / "rl.json"
    config.write_text(json.dumps({"num_envs": 2, "eval_episodes": 1, "exec_horizon": 3,
                                  "env_kwargs": {"task_ids": [0], "max_episode_steps": 6},
                                  "rl": {"chunks_per_rollout": 2, "num_steps": 2, "critic_warmup": 1,
                                         "ppo": {"minibatch": 4, "actor_lr": 1e-3}}}))
    for method in ("flow_sde", "flow_noise"):
        out = tmp_path / method
        assert main(["train", "ppo", "--init", str(ck), "--env", "libero:libero_spatial", "--config", str(config),
                     "--method", method, "--iterations", "2", "--out", str(out), "--no-progress"]) == 0
        history = json.loads((out / "metrics.json").read_text())
        assert [h["iteration"] for h in history] == [1, 2]
        assert all(np.isfinite(h["policy_loss"]) for h in history)
        # 5. eval of the result (its folder carries the env), 6. load equals the trained weights
        assert main(["eval", "--policy", str(out), "--episodes", "1", "--no-progress"]) == 0
        trained = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["policy"]
        back = policies.load(out, device="cpu")
        assert back.spec.heads == (("critic", "noise_head") if method == "flow_noise" else ("critic",))
        saved = back.state_dict()
        assert set(saved) == set(trained)
        for k, v in trained.items():
            assert torch.equal(saved[k], v), k
        moved = [k for k, v in trained.items() if k.startswith("model.action_out_proj")]
        original = policies.load(ck, device="cpu").state_dict()
        assert any(not torch.equal(trained[k], original[k]) for k in moved)  # the actor moved


@pytest.mark.slow
def test_openvla_through_eval_and_steer(tmp_path, capsys):
    from test_openvla import random_openvla, tiny_stats
    from test_openvla_load import REAL_CONFIG, checkpoint_tensors, write_checkpoint

    from vlafast.models.action_tokenizer import parse_dataset_statistics
    from vlafast.models.openvla import OpenVLAConfig

    source = random_openvla(seed=2, stats=parse_dataset_statistics(tiny_stats()))
    ck = write_checkpoint(tmp_path / "ovla", checkpoint_tensors(source),
                          config={**REAL_CONFIG, "vlafast_config": OpenVLAConfig.tiny().to_json()})
    filler = [f"t{i}" for i in range(32_001 - 2 - len(words_of([WORDS])))]  # Llama-2 (32000) + its pad token
    build_word_tokenizer(words_of([WORDS]) + filler).save(str(ck / "tokenizer.json"))
    assert policies.detect_format(ck) == "openvla"
    assert main(["eval", "--policy", str(ck), *LIBERO, "--episodes", "1", "--videos", "0", "--no-progress",
                 "--unnorm-key", "tiny_robot", "--out", str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["overall"]["episodes"] == 1 and summary["config"]["family"] == "openvla"
    js = tmp_path / "steer.json"
    assert main(["steer", "--policy", str(ck), *LIBERO, "--unnorm-key", "tiny_robot", "--cluster", "fast", "-k", "50",
                 "--episodes", "1", "--json", str(js)]) == 0
    result = json.loads(js.read_text())
    assert "baseline" in result["runs"] and result["metric"] == "action_norm"


@pytest.mark.slow
def test_robot_run_drives_a_joint_space_policy_folder(tmp_path, capsys):
    pytest.importorskip("mujoco", reason="the MuJoCo backend simulates the UR5e")
    from vlafast.robot.servo import UR5E_HOME

    home = torch.tensor(UR5E_HOME, dtype=torch.float32)
    norm = Normalizer(FeatureStats(mean=home, std=torch.full((6,), 0.3)),
                      FeatureStats(mean=home, std=torch.full((6,), 0.01)), "mean_std", "mean_std", "openpi")
    torch.manual_seed(0)
    tok = build_word_tokenizer(words_of([WORDS]))
    cfg = Pi0Config.tiny(action_dim=8, state_dim=8, vocab_size=tok.get_vocab_size(), horizon=50, num_steps=2)
    spec = EnvSpec(num_envs=1, action_dim=6, state_dim=6, cameras=("robot",), image_size=(24, 24),
                   max_episode_steps=100, control_hz=20.0)
    pol = flow_policy(Pi0Policy(cfg, norm), tok, spec, exec_horizon=5, critic=False, action_space="joint_position")
    folder = policies.save(pol, tmp_path / "joint")
    code = main(["robot", "run", "--backend", "mujoco", "--policy", str(folder), "--prompt", "lift", "--seconds", "1.5",
                 "--no-realtime", "--num-steps", "2", "--report", str(tmp_path / "report")])
    out = capsys.readouterr().out
    # What the code controls, not how fast this machine is: the policy's chunks (rendered camera,
    # joint state, prompt) reached the servo and were accepted; a watchdog stop on a loaded
    # machine (exit 1) is the servo doing its job, a policy error is not.
    assert code in (0, 1) and "policy error" not in out, out
    accepted = [int(m) for m in re.findall(r"chunks (\d+)/\d+", out)]
    assert accepted and max(accepted) >= 1, out
    assert (tmp_path / "report" / "cycles.csv").exists()
