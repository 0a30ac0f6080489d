"""Behaviour measurement and the `vlafast dictionary` / `vlafast steer` commands on a tiny policy
trained once per session on the built-in reach task (speed words in its instructions)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlafast.cli import main
from vlafast.interp import NeuronDictionary, SteeringPlan
from vlafast.interp import behaviour as bh
from vlafast.rl.recipe import Recipe, save_policy, train_tiny_policy
from vlafast.eval import evaluate

RECIPE = Recipe(num_envs=8, demos=16, sft_steps=60, sft_batch=16)  # mechanisms only: a weak policy will do


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pytest.importorskip("mujoco", reason="the built-in UR5e task simulates in MuJoCo")
    torch.manual_seed(0)
    policy, env = train_tiny_policy(RECIPE)
    path = tmp_path_factory.mktemp("policy") / "policy"
    save_policy(policy, RECIPE, path)
    yield policy, env, path
    env.close()


def test_bootstrap_ci_matches_normal_theory():
    x = np.random.default_rng(0).normal(3.0, 2.0, 4000)
    lo, hi = bh.bootstrap_ci(x, samples=4000)
    half = 1.96 * x.std() / np.sqrt(len(x))  # 0.062
    assert lo == pytest.approx(x.mean() - half, abs=0.01) and hi == pytest.approx(x.mean() + half, abs=0.01)
    # paired differences: y - x has a much smaller spread than y or x alone
    y = x + 1.0 + np.random.default_rng(1).normal(0.0, 0.1, 4000)
    dlo, dhi = bh.bootstrap_ci(y - x, samples=4000)
    assert dlo < 1.0 < dhi and dhi - dlo < 0.02  # 2 * 1.96 * 0.1 / sqrt(4000) = 0.0062


def test_with_speed_word():
    assert bh.with_speed_word("touch the red ball slowly", "quickly") == "touch the red ball quickly"
    assert bh.with_speed_word("go to the blue ball", "slowly") == "go to the blue ball slowly"
    assert bh.with_speed_word("reach the green ball rapid", "slowly") == "reach the green ball slowly"  # a synonym


@pytest.mark.slow
def test_steering_comparison_measures_speed(trained):
    policy, env, _ = trained
    plans = bh.default_plans(policy, env, alpha=4.0, k=3)
    assert set(plans) == {"fast", "slow", "dir:quickly", "dir:slowly"}
    # the last VLM MLP is skipped: it cannot reach the actions
    assert all(layer == "vlm.0" for name in ("fast", "slow") for layer in plans[name].neurons)
    for i in range(2):
        plans[f"random:fast#{i}"] = bh.random_like(plans["fast"], policy, seed=i)
    res = bh.steering_comparison(policy, env, plans, 16, 100)
    runs = res["runs"]
    print(bh.format_comparison(res))
    assert all(mlp.steer is None for _, mlp in policy.model.mlps())  # every plan removed
    # the unsteered run is plain evaluation on the same seeds (deterministic ODE sampling)
    ev = evaluate(policy, env, episodes=16, seed=100, progress=False)
    assert runs["baseline"]["speed"] == pytest.approx(np.mean([r["speed"] for r in ev["records"]]), rel=1e-6)
    for r in runs.values():
        lo, hi = r["speed_ci95"]
        assert lo <= r["speed"] <= hi
    # Whether a plan moves speed depends on the trained policy (README); what must hold is the
    # mechanism: "dir:quickly" shifts the "slowly" prompts' pooled vlm.0 activations exactly onto
    # the "quickly" mean (the direction is that difference, added at every prefix position).
    obs = env.reset(seed=0)
    prompts = {w: dict(obs, instruction=[bh.with_speed_word(t, w) for t in obs["instruction"]])
               for w in ("quickly", "slowly")}
    want = bh.prefix_activations(policy, prompts["quickly"], "vlm.0").mean(0)
    before = bh.prefix_activations(policy, prompts["slowly"], "vlm.0").mean(0)
    with plans["dir:quickly"].applied(policy):
        shifted = bh.prefix_activations(policy, prompts["slowly"], "vlm.0").mean(0)
    assert (want - before).abs().max() > 1e-3  # the speed word changes the activations
    torch.testing.assert_close(shifted, want, atol=1e-5, rtol=1e-5)  # measured max 7.2e-7 (|values| <= 4)
    assert runs["fast"]["neurons"] == len(plans["fast"]) > 0
    # the cluster against its random sets: per-episode differences to their mean, ranked
    c = runs["fast"]["vs_controls"]
    controls = [runs[f"random:fast#{i}"] for i in range(2)]
    assert c["controls"] == 2 and "vs_controls" not in runs["slow"]
    assert c["delta"] == pytest.approx(runs["fast"]["speed"] - np.mean([r["speed"] for r in controls]), abs=1e-12)
    assert c["ci95"][0] <= c["delta"] <= c["ci95"][1]
    assert c["above"] == sum(runs["fast"]["speed"] > r["speed"] for r in controls)
    assert c["below"] == sum(runs["fast"]["speed"] < r["speed"] for r in controls)
    assert c["p_faster"] == (1 + 2 - c["above"]) / 3 and c["p_slower"] == (1 + 2 - c["below"]) / 3  # no ties
    assert "fast against its 2 random sets" in bh.format_comparison(res)


@pytest.mark.slow
def test_dictionary_and_steer_cli(trained, tmp_path, capsys):
    policy, _, path = trained
    out = tmp_path / "d.safetensors"
    assert main(["dictionary", "build", "--policy", str(path), "-o", str(out), "-k", "3", "--bottom-k"]) == 0
    d = NeuronDictionary.load(out)
    assert d.k == 3 and d.layers == ("vlm.0", "vlm.1") and d.bottom_ids is not None
    assert d.matches(policy)
    capsys.readouterr()
    assert main(["dictionary", "search", str(out), "quickly", "fast", "--limit", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    want = d.search(["quickly", "fast"], limit=5)
    assert len(lines) == len(want) > 0 and all(f"{h.neuron:6d}" in line for h, line in zip(want, lines))
    assert main(["dictionary", "explain", str(out), "1", "7"]) == 0
    assert capsys.readouterr().out.strip() == str(d.explain(1, 7))
    js = tmp_path / "steer.json"
    assert main(["steer", "--policy", str(path), "--dictionary", str(out), "--cluster", "fast",
                 "--max-neurons", "4", "--controls", "1",
                 "--episodes", "8", "--direction", "0", "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "baseline" in text and "fast" in text
    result = json.loads(js.read_text())
    assert set(result["runs"]) == {"baseline", "fast", "random:fast#0"} and result["episodes"] == 8
    assert result["runs"]["fast"]["neurons"] == result["runs"]["random:fast#0"]["neurons"] == 4


@pytest.mark.slow
def test_cluster_file_cli_writes_and_steers_the_papers_form(trained, tmp_path, capsys):
    """`dictionary clusters` writes keyword clusters as flat ids with their top tokens; `steer
    --cluster-file` clamps exactly those neurons (and random controls of their size)."""
    from vlafast.interp import read_cluster_file

    policy, _, path = trained
    d = NeuronDictionary.build(policy, policy.tokenizer, k=3)
    dict_path = d.save(tmp_path / "d.safetensors")
    clusters = tmp_path / "clusters.yaml"
    assert main(["dictionary", "clusters", str(dict_path), "fast", "slow", "--max-neurons", "3", "-o", str(clusters)]) == 0
    assert "fast 3, slow 3 neurons (flat id = layer x" in capsys.readouterr().out
    read = read_cluster_file(clusters, policy)
    layers = [l for l in d.layers if l.startswith("vlm.")]
    assert read["fast"] == list(bh.cluster(d, "fast", layers=layers, max_neurons=3).neurons)
    js = tmp_path / "steer.json"
    assert main(["steer", "--policy", str(path), "--cluster-file", str(clusters), "--cluster", "fast", "--alpha", "10",
                 "--controls", "1", "--episodes", "8", "--direction", "0", "--json", str(js)]) == 0
    capsys.readouterr()
    runs = json.loads(js.read_text())["runs"]
    assert set(runs) == {"baseline", "fast", "random:fast#0"} and runs["fast"]["neurons"] == 3
    # one sentence, exit 2: a cluster the file lacks, a file together with --dictionary
    assert main(["steer", "--policy", str(path), "--cluster-file", str(clusters), "--cluster", "care"]) == 2
    assert f"{clusters} has no cluster 'care'; it has ['fast', 'slow']" in capsys.readouterr().err
    assert main(["steer", "--policy", str(path), "--cluster-file", str(clusters), "--dictionary", str(dict_path)]) == 2
    assert "--cluster-file names its neurons itself" in capsys.readouterr().err


def test_random_control_matches_plan_sizes():
    from test_interp_dictionary import tiny_pi0

    model = tiny_pi0()
    plan = SteeringPlan([(0, 1), (0, 5), (0, 9), ("expert.1", 3)], alpha=2.5, positions="all")
    a, b, c = (bh.random_like(plan, model, seed=s) for s in (0, 0, 1))
    assert {k: len(v) for k, v in a.neurons.items()} == {"vlm.0": 3, "expert.1": 1}
    assert a.neurons == b.neurons and a.neurons != c.neurons  # seeded
    assert (a.alpha, a.positions) == (2.5, "all")
    assert all(0 <= i < 80 for i in a.neurons["vlm.0"]) and all(0 <= i < 56 for i in a.neurons["expert.1"])


def test_errors(tmp_path, capsys):
    assert main(["dictionary", "build", "--policy", str(tmp_path), "-o", str(tmp_path / "d.safetensors")]) == 2
    assert "is not a policy folder: expected policy.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="towards must be one of"):
        bh.speed_direction(None, None, towards="sideways")
    plan = SteeringPlan([(0, 1)])
    with pytest.raises(ValueError, match="'baseline' is the unsteered run"):
        bh.steering_comparison(None, None, {"baseline": plan})
