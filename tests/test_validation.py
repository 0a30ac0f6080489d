"""Bad input at every boundary gets one sentence naming the argument, the value and what is
allowed, exit code 2 and no traceback (``--debug`` shows it); damaged files name the file and
list the first few problems with a count. Table-driven: each row is a command and the words
its error must contain."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from helpers_ckpt import random_policy, stats_for, write_lerobot
from vlafast.cli import main
from vlafast.models import Pi0Config, Pi0Policy
from vlafast.policies import build_word_tokenizer, words_of

WORDS = "pick up the black bowl task state action : , ; ."


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints and config files, good and damaged, that the table refers to by name."""
    root = tmp_path_factory.mktemp("bad")
    tok = build_word_tokenizer(words_of([WORDS]))
    cfg = Pi0Config.tiny(pi05=True, action_dim=8, state_dim=8, vocab_size=tok.get_vocab_size())
    good = write_lerobot(root / "good", random_policy(cfg), stats_for(7, 8), sizes=True)
    tok.save(str(good / "tokenizer.json"))
    paths = {"tmp": root, "good": good, "none": root / "nowhere"}

    def variant(name: str, edit) -> None:
        d = root / name
        d.mkdir()
        for f in good.iterdir():
            (d / f.name).write_bytes(f.read_bytes())
        edit(d)
        paths[name] = d

    variant("truncated", lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:300]))
    variant("badjson", lambda d: (d / "config.json").write_text('{"type": "pi05", '))
    variant("badtype", lambda d: (d / "config.json").write_text(
        (d / "config.json").read_text().replace('"type": "pi05"', '"type": "pi1"')))

    def reshaped(d):
        from safetensors.torch import load_file

        w = load_file(str(d / "model.safetensors"))
        for k in [k for k in w if "mlp" in k][:12]:  # 12 mis-shaped keys: the first few are listed, the rest counted
            w[k] = torch.zeros(3, 3)
        save_file(w, str(d / "model.safetensors"))

    variant("shapes", reshaped)

    def nan(d):
        from safetensors.torch import load_file

        w = load_file(str(d / "model.safetensors"))
        w["model.action_in_proj.weight"][0, 0] = math.nan
        save_file(w, str(d / "model.safetensors"))

    variant("nan", nan)
    for name, text in (("cfg_badjson", "{not json"), ("cfg_unknown", '{"num_envz": 3}'),
                       ("cfg_steps", '{"sft_steps": -5}'), ("cfg_type", '{"sft_lr": "fast"}'),
                       ("cfg_envs", '{"num_envs": 0}'), ("cfg_horizon", '{"exec_horizon": 99}'),
                       ("cfg_rl_key", '{"rl": {"colour": 1}}'), ("cfg_list", "[1, 2]"),
                       ("cfg_width", '{"width": 30}'), ("cfg_bool", '{"pi05": "yes"}')):
        (root / f"{name}.json").write_text(text)
        paths[name] = root / f"{name}.json"
    (root / "old.pt").write_bytes(b"not a pickle")
    paths["old"] = root / "old.pt"
    (root / "full").mkdir()
    (root / "full" / "x").write_text("a run")
    paths["full"] = root / "full"
    return paths


E = ["eval", "--policy", "{good}", "--env", "libero:libero_10"]
S = ["steer", "--policy", "{good}", "--env", "libero:libero_10"]
R = ["robot", "run", "--backend", "null", "--seconds", "0.1"]
T = ["train", "sft", "--out", "{tmp}/never", "--config"]

CASES = [
    # eval: counts, seeds, indices, names
    (["eval", "--policy", "{good}", "--episodes", "-5"], "--episodes must be >= 1, got -5"),
    (["eval", "--policy", "{good}", "--episodes", "0"], "--episodes must be >= 1, got 0"),
    ([*E, "--seed", "-1"], "--seed must be >= 0, got -1"),
    ([*E, "--num-envs", "0"], "--num-envs must be >= 1, got 0"),
    ([*E, "--steps", "0"], "--steps must be >= 1, got 0"),
    ([*E, "--exec-horizon", "0"], "--exec-horizon must be >= 1, got 0"),
    ([*E, "--max-episode-steps", "-3"], "--max-episode-steps must be >= 1, got -3"),
    ([*E, "--videos", "-1"], "--videos must be >= 0, got -1"),
    ([*E, "--tasks", "0,one"], "--tasks must be comma-separated integers, got '0,one'"),
    ([*E, "--tasks", "-2"], "--tasks must be task ids >= 0, got '-2'"),
    (["eval", "--policy", "{good}", "--env", "gym:CartPole-v1"], "--env must be libero:<suite>"),
    (["eval", "--policy", "{good}", "--env", "libero:libero_11"], "unknown LIBERO suite 'libero_11'"),
    (["eval", "--policy", "{good}", "--tokenizer", "t.json"], "--tokenizer apply to benchmark envs"),
    # checkpoints: missing, pickled, damaged, foreign
    ([*E[:2], "{none}", *E[3:]], "no checkpoint at"),
    ([*E[:2], "{old}", *E[3:]], "convert it once with `vlafast convert"),
    ([*E[:2], "{truncated}", *E[3:]], "is not a readable safetensors file"),
    ([*E[:2], "{badjson}", *E[3:]], "config.json is not valid JSON (line 1"),
    ([*E[:2], "{badtype}", *E[3:]], "type 'pi1' is not a supported policy"),
    ([*E[:2], "{shapes}", *E[3:]], "12 mis-shaped keys"),
    ([*E[:2], "{nan}", *E[3:]], "model.action_in_proj.weight hold NaN / inf"),
    ([*E[:2], "{tmp}", *E[3:]], "is not a policy folder"),
    # steer: counts, alphas
    ([*S, "--episodes", "0"], "--episodes must be >= 1, got 0"),
    ([*S, "--controls", "-1"], "--controls must be >= 0, got -1"),
    ([*S, "-k", "0"], "--k must be >= 1, got 0"),
    ([*S, "--alpha", "nan"], "--alpha must be a finite number, got nan"),
    ([*S, "--alpha", "inf"], "--alpha must be a finite number, got inf"),
    ([*S, "--max-neurons", "0"], "--max-neurons must be >= 1, got 0"),
    (["steer", "--env", "libero:libero_10"], "--env needs --policy"),
    # dictionary
    (["dictionary", "build", "--policy", "{good}", "-o", "{tmp}/d.safetensors", "-k", "0"], "-k must be >= 1 (tokens kept per neuron), got 0"),
    (["dictionary", "build", "--policy", "{none}", "-o", "{tmp}/d.safetensors"], "no checkpoint at"),
    (["dictionary", "search", "{tmp}/d.safetensors", "fast", "--limit", "0"], "--limit and --min-hits must be >= 1"),
    (["dictionary", "explain", "{tmp}/d.safetensors", "vlm.0", "-3"], "neuron must be an index >= 0, got -3"),
    (["dictionary", "search", "{old}", "fast"], "is not a readable safetensors file"),
    # train: config files and options
    ([*T, "{cfg_badjson}"], "is not valid JSON (line 1, column 2"),
    ([*T, "{cfg_unknown}"], "unknown recipe keys ['num_envz']"),
    ([*T, "{cfg_steps}"], "recipe sft_steps must be an integer >= 1, got -5"),
    ([*T, "{cfg_type}"], "recipe sft_lr must be a finite number > 0, got 'fast'"),
    ([*T, "{cfg_envs}"], "recipe num_envs must be an integer >= 1, got 0"),
    ([*T, "{cfg_horizon}"], "recipe exec_horizon must be an integer >= 1 and <= 8, got 99"),
    ([*T, "{cfg_rl_key}"], "recipe rl has an unknown key 'colour'"),
    ([*T, "{cfg_list}"], "must hold a JSON object of recipe keys, got list"),
    ([*T, "{cfg_width}"], "recipe width must be a multiple of 8"),
    ([*T, "{cfg_bool}"], "recipe pi05 must be true or false, got 'yes'"),
    ([*T, "{tmp}/missing.json"], "does not exist"),
    (["train", "sft", "--out", "{full}"], "already holds a run: add --resume to continue it or --overwrite"),
    (["train", "sft", "--out", "{tmp}/x", "--init", "{good}"], "builds a fresh policy: drop --init"),
    (["train", "ppo", "--out", "{tmp}/x"], "needs --init <policy folder>"),
    (["train", "ppo", "--init", "{good}", "--out", "{tmp}/x", "--iterations", "0"], "--iterations must be >= 1, got 0"),
    (["train", "ppo", "--init", "{good}", "--out", "{tmp}/x", "--workers", "-1"], "--workers must be >= 0, got -1"),
    (["train", "ppo", "--init", "{good}", "--out", "{tmp}/x", "--learners", "2"], "give --workers N too"),
    (["train", "ppo", "--out", "{full}", "--resume", "--overwrite"], "give one of them"),
    (["train", "ppo", "--out", "{full}", "--resume"], "has no checkpoint.pt"),
    (["train", "ppo", "--init", "{good}", "--out", "{tmp}/x"], "carries no env"),
    # robot run: rates, durations, amplitudes
    ([*R, "--amplitude", "100"], "--amplitude must be in [0, 1] rad"),
    ([*R, "--amplitude", "nan"], "--amplitude must be a finite number, got nan"),
    ([*R[:-1], "-1"], "--seconds must be > 0, got -1.0"),
    ([*R, "--hz", "nan"], "--hz must be a finite number, got nan"),
    ([*R, "--hz", "0"], "--hz must be in [1, 1000]"),
    ([*R, "--freq", "0"], "--freq must be in (0, 5] Hz"),
    ([*R, "--ensemble", "1.5"], "--ensemble must be in [0, 1)"),
    ([*R, "--rtc", "--ensemble", "0.5"], "choose one of --rtc and --ensemble"),
    ([*R, "--chunk-exec", "0"], "--chunk-exec must be >= 1"),
    ([*R, "--latency-ms", "-5"], "--latency-ms must be >= 0"),
    ([*R, "--policy", "{none}"], "no checkpoint at"),
    # convert, bench, global options
    (["convert", "{none}", "{tmp}/conv"], "is not a plain vlafast policy.pt"),
    (["convert", "{old}", "{full}"], "exists and is not empty"),
    (["bench", "servo-timing", "--hz", "0", "--out", "{tmp}/b.csv"], "hz must be in"),
    (["--threads", "0", "eval", "--policy", "{good}"], "--threads must be an integer >= 1, got 0"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a[:3]) + f" #{i}" for i, (a, _) in enumerate(CASES)])
def test_bad_input_is_one_sentence_and_exit_2(files, argv, message, capsys):
    argv = [a.format(**files) for a in argv]
    assert main(argv) == 2, argv
    out = capsys.readouterr()
    err = out.err.strip().splitlines()
    assert err and err[0].startswith("vlafast") and message in out.err, (message, out.err)
    # one sentence; a damaged checkpoint lists its first few problems per kind and counts the rest
    assert "Traceback" not in out.err and len(err) <= (12 if "mis-shaped" in message else 1), out.err


def test_enough_cases():
    assert len(CASES) >= 40


def test_debug_shows_the_traceback(files):
    with pytest.raises(ValueError, match="--episodes must be >= 1"):
        main(["--debug", "eval", "--policy", str(files["good"]), "--episodes", "0"])


@pytest.mark.parametrize("kwargs,message", [
    ({"num_steps": 0}, "num_steps K must be an int >= 1"),
    ({"num_steps": -3}, "num_steps K must be an int >= 1"),
    ({"noise": torch.zeros(1, 2, 2)}, "noise must be"),
])
def test_python_entry_points_refuse_bad_values(kwargs, message):
    from helpers_ckpt import random_obs

    cfg = Pi0Config.tiny()
    model = Pi0Policy(cfg)
    with pytest.raises(ValueError, match=message):
        model.sample_actions(random_obs(cfg, 1), **kwargs)


def test_eval_config_and_policy_spec_refuse_bad_values():
    from vlafast.eval import EvalConfig
    from vlafast.policies import PolicySpec

    for kw, message in (({"episodes": 0}, "episodes must be an integer >= 1, got 0"),
                        ({"episodes": 2.5}, "episodes must be an integer >= 1, got 2.5"),
                        ({"videos": -1}, "videos must be an integer >= 0, got -1"),
                        ({"num_steps": 0}, "num_steps must be an integer >= 1, got 0")):
        with pytest.raises(ValueError, match=message):
            EvalConfig(**kw)
    with pytest.raises(ValueError, match="exec_horizon must be an int >= 1, got 0"):
        PolicySpec(family="pi0", model={}, exec_horizon=0)
    with pytest.raises(ValueError, match=r"format_version must be 1, got None"):
        PolicySpec.from_json({"family": "pi0", "model": {}})


@pytest.mark.parametrize("argv", [["--help"], ["-h"], ["eval", "-h"], ["train", "-h"], ["steer", "-h"],
                                  ["dictionary", "build", "-h"], ["robot", "run", "-h"], ["robot", "fake-ur", "-h"],
                                  ["convert", "-h"], ["demo", "-h"], ["bench", "-h"]])
def test_help_prints_and_exits_0(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    assert "usage: vlafast" in capsys.readouterr().out
