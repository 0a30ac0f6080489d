"""Cluster files in the steering paper's form (flat ids, layer x d_ff + neuron): the paper's own
files read with the published layouts, write -> read round trips, bad files, and the paper's
intervention on a tiny pi0-FAST: a file's cluster clamped to a constant through a SteeringPlan
decodes exactly what an oracle written here (a pre-hook overwriting ``down_proj``'s inputs at the
flat ids, the paper's hook) decodes."""

from __future__ import annotations

import json

import pytest
import torch

from vlafast.interp import NeuronDictionary, SteeringPlan
from vlafast.interp.cluster_files import (
    ClusterFileError, flat_layout, from_flat, read_cluster_file, to_flat, write_cluster_file,
)
from vlafast.models.pi0fast import Pi0FASTConfig
from test_pi0fast import POSTFIX, inputs, random_policy

# the paper's pi0-FAST clusters (openpi/experiments/configs/interventions/dictionaries.yaml)
PAPER_PI0FAST = "high_cluster:\n  - 256459\n  - 260217\n  - 40857\n\nlow_cluster:\n  - 5674\n  - 253282\n  - 257247\n  - 268401\n"
# the form of the paper's OpenVLA clusters: id -> the neuron's top tokens
PAPER_OPENVLA = "blank: {}\n\nup_3:\n  237682: ['up', 'Up', '[action: -0.227]']\n  302720: ['raised', 'raise']\n  274043: ['up', 'UP']\n"


def test_paper_files_read_with_the_published_layouts(tmp_path):
    f = tmp_path / "pi0fast.yaml"
    f.write_text(PAPER_PI0FAST)
    clusters = read_cluster_file(f, layout=(18, 16384))
    assert list(clusters) == ["high_cluster", "low_cluster"]
    # 256459 = 15 * 16384 + 10699: Gemma-2B layer 15; 40857 = 2 * 16384 + 8089
    assert clusters["high_cluster"] == [("vlm.15", 10699), ("vlm.15", 14457), ("vlm.2", 8089)]
    assert len(clusters["low_cluster"]) == 4 and clusters["low_cluster"][0] == ("vlm.0", 5674)
    g = tmp_path / "openvla.yaml"
    g.write_text(PAPER_OPENVLA)
    up = read_cluster_file(g, layout=(32, 11008), names=["up_3"])  # Llama-2-7B: 32 x 11008
    assert up == {"up_3": [("vlm.21", 6514), ("vlm.27", 5504), ("vlm.24", 9851)]}
    with pytest.raises(ClusterFileError, match="cluster 'blank'.* is empty"):
        read_cluster_file(g, layout=(32, 11008))
    # the same ids do not fit a smaller model: refused, not wrapped into other layers
    with pytest.raises(ClusterFileError, match=r"id 256459 is outside \[0, 240\) \(3 layers x 80 neurons"):
        read_cluster_file(f, layout=(3, 80))


def test_flat_ids_round_trip():
    for layer, neuron, d_ff in (("vlm.0", 0, 7), ("vlm.17", 16383, 16384), ("vlm.3", 5, 6)):
        flat = to_flat(layer, neuron, d_ff)
        assert from_flat(flat, d_ff) == (layer, neuron)
    with pytest.raises(ValueError, match="only language-model layers"):
        to_flat("expert.0", 1, 8)
    with pytest.raises(ValueError, match=r"neuron must be in \[0, 8\)"):
        to_flat("vlm.0", 8, 8)


@pytest.fixture(scope="module")
def tiny():
    return random_policy(Pi0FASTConfig.tiny(), seed=3)


def test_write_then_read_with_and_without_tokens(tmp_path, tiny):
    tokens = [f"tok{i}" for i in range(tiny.cfg.vocab_size)]
    d = NeuronDictionary.build(tiny, tokens, k=4, progress=False)
    layers, d_ff = flat_layout(tiny)
    assert (layers, d_ff) == (tiny.cfg.vlm.depth, tiny.cfg.vlm.mlp_dim)
    clusters = {"high": [("vlm.2", 79), ("vlm.0", 3)], "low": [("vlm.1", 0)]}
    for name, dictionary in (("plain.yaml", None), ("tokens.yml", d), ("tokens.json", d)):
        path = write_cluster_file(tmp_path / name, clusters, d_ff=d_ff, dictionary=dictionary)
        assert read_cluster_file(path, tiny) == clusters
    text = (tmp_path / "plain.yaml").read_text()
    assert "high:" in text and str(2 * d_ff + 79) in text
    data = json.loads((tmp_path / "tokens.json").read_text())
    assert data["high"][str(2 * d_ff + 79)] == [t for t, _ in d.explain("vlm.2", 79).top]
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "must map cluster names to neuron ids"),
    ("a: 5", "cluster 'a' must be a list of ids or a mapping"),
    ("a: [1, x]", "neuron ids are integers, got 'x'"),
    ("a: [1, true]", "neuron ids are integers, got True"),
    ("a: [1, 1]", "id 1 appears twice"),
    ("a: [-1]", r"id -1 is outside \[0, 240\)"),
    ("a: [1, 2, 300, 400]", r"id 300 is outside \[0, 240\) .* and 1 more"),
    ("a: [1\n b", "is not valid YAML"),
    ("!!python/object/apply:os.system ['true']", "is not valid YAML"),  # safe_load builds no objects
    ("", "got nothing"),
])
def test_bad_files_name_the_file_and_the_problem(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ClusterFileError, match=message) as exc:
        read_cluster_file(f, layout=(3, 80))
    assert str(f) in str(exc.value) and "\n" not in str(exc.value)


def test_missing_cluster_and_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("a: [1]\n")
    with pytest.raises(ClusterFileError, match=r"has no cluster 'b'; it has \['a'\]"):
        read_cluster_file(f, layout=(3, 80), names=["b"])
    with pytest.raises(ClusterFileError, match="cannot read cluster file"):
        read_cluster_file(tmp_path / "none.yaml", layout=(3, 80))


def _hook_clamp(model, flat_ids: list[int], coef: float):
    """The paper's intervention, written here as the oracle: a pre-hook on every layer's
    down_proj overwriting the inputs at the flat ids' neurons with ``coef``."""
    d_ff = model.cfg.vlm.mlp_dim
    handles = []
    for l, layer in enumerate(model.language_model.layers):
        idx = [i - l * d_ff for i in flat_ids if i // d_ff == l]
        if not idx:
            continue

        def pre(mod, args, idx=idx):
            h = args[0].clone()
            h[..., idx] = coef
            return (h,)
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(pre))
    return handles


def test_paper_intervention_on_pi0fast_equals_the_hook_oracle(tmp_path, tiny):
    """A 3-neuron cluster over two layers at coefficient 10 (the paper's high cluster's size and
    coefficient): the steered greedy decode (prefix and every decoded token) equals the hook
    oracle's, token for token, with log-probs to float rounding; unsteered is restored bit for bit."""
    d_ff = tiny.cfg.vlm.mlp_dim
    ids = [2 * d_ff + 7, 0 * d_ff + 41, 2 * d_ff + 60]
    f = tmp_path / "clusters.yaml"
    f.write_text(f"high_cluster: {ids}\nlow_cluster: [{d_ff + 1}]\n")
    plan = SteeringPlan(read_cluster_file(f, tiny, names=["high_cluster"])["high_cluster"], alpha=10.0)
    x = inputs(tiny.cfg, 3)
    base = tiny.generate(*x, POSTFIX, max_steps=6)
    with plan.applied(tiny):
        steered = tiny.generate(*x, POSTFIX, max_steps=6)
    handles = _hook_clamp(tiny, ids, 10.0)
    try:
        want = tiny.generate(*x, POSTFIX, max_steps=6)
    finally:
        for h in handles:
            h.remove()
    assert not torch.equal(steered.tokens, base.tokens)  # the clamp changes what is decoded
    assert torch.equal(steered.tokens, want.tokens) and torch.equal(steered.valid, want.valid)
    torch.testing.assert_close(steered.log_probs, want.log_probs, atol=1e-5, rtol=0)  # measured max 7.2e-7
    again = tiny.generate(*x, POSTFIX, max_steps=6)
    assert torch.equal(again.tokens, base.tokens) and torch.equal(again.log_probs, base.log_probs)
