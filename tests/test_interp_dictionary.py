"""Neuron dictionary and keyword clusters on tiny pi0 and OpenVLA, against plain-torch oracles
written here (materialised logits + stable sort; brute-force keyword search)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from vlafast.interp import KEYWORDS, NeuronDictionary, cluster, load_tokens, normalize_token
from vlafast.models import OpenVLAConfig, OpenVLAPolicy, Pi0Config, Pi0Policy
from vlafast.models.llama import LlamaConfig
from vlafast.policies import build_word_tokenizer

SPEED_WORDS = ["quickly", "fast", "rapid", "slowly", "slow", "gently", "up", "down", "lift", "lower"]


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.dim() > 1 else 0.1))
    return model.eval()


def tiny_pi0(seed: int = 0) -> Pi0Policy:
    return _randomize(Pi0Policy(Pi0Config.tiny(vocab_size=101)), seed)  # 101 rows: prime


def tiny_openvla(seed: int = 0) -> OpenVLAPolicy:
    cfg = OpenVLAConfig.tiny()
    cfg = OpenVLAConfig(cfg.vision, cfg.fused_vision, LlamaConfig.tiny(vocab_size=384))  # tokenizer 320 + 64 pad
    return _randomize(OpenVLAPolicy(cfg), seed)


def word_tokens(n: int) -> list[str]:
    """n word-level tokens (2 specials + keywords + fillers) as ``build_word_tokenizer`` makes them."""
    words = SPEED_WORDS + [f"w{i}" for i in range(n - 2 - len(SPEED_WORDS))]
    tok = build_word_tokenizer(words)
    assert tok.get_vocab_size() == n
    return tok


def reference(model, E: torch.Tensor, k: int, largest: bool, gain: torch.Tensor | None):
    """ids [L, N, k], scores [L, N, k] by materialising every layer's logits."""
    ids, scores = [], []
    for name, mlp in model.mlps():
        W = mlp.down_proj.weight.detach().float()  # [D, N]
        if W.shape[0] != E.shape[1]:
            continue  # pi0's expert: another width
        if gain is not None:
            W = W * gain.float()[:, None]
        logits = W.T @ E.detach().float().T  # [N, V]
        order = torch.sort(logits, dim=1, descending=largest, stable=True).indices[:, :k]
        ids.append(order)
        scores.append(logits.gather(1, order))
    return torch.stack(ids), torch.stack(scores)


@pytest.mark.parametrize("k", [1, 7])
@pytest.mark.parametrize("final_norm", [False, True])
def test_pi0_dictionary_matches_materialised_topk(k, final_norm):
    model = tiny_pi0()
    tok = word_tokens(101)
    d = NeuronDictionary.build(model, tok, k=k, bottom_k=True, final_norm=final_norm, model_id="tiny")
    lm = model.language_model
    gain = (1.0 + lm.norm.weight) if final_norm else None  # Gemma RMSNorm scales by (1 + w)
    assert d.layers == ("vlm.0", "vlm.1")  # the expert (width 32 vs 48) has no dictionary
    for largest, ids, scores in ((True, d.top_ids, d.top_scores), (False, d.bottom_ids, d.bottom_scores)):
        want_ids, want_scores = reference(model, lm.embed_tokens.weight, k, largest, gain)
        assert torch.equal(ids, want_ids)
        torch.testing.assert_close(scores, want_scores, atol=1e-5, rtol=1e-5)  # measured max 8.3e-7 (fp32 order)


def test_openvla_dictionary_projects_only_the_tokenizer_rows():
    model = tiny_openvla()
    tok = word_tokens(331)  # 384 - 331 = 53 padding rows (< 64), like 32001 tokens -> 32064
    d = NeuronDictionary.build(model, tok, k=5, chunk_size=37)  # chunks of a prime size
    E = model.output_embedding[:331]
    want_ids, want_scores = reference(model, E, 5, True, None)
    assert torch.equal(d.top_ids, want_ids)
    torch.testing.assert_close(d.top_scores, want_scores, atol=1e-5, rtol=1e-5)  # measured max 1.2e-6
    assert int(d.top_ids.max()) < 331
    # final norm for Llama scales by w itself
    dn = NeuronDictionary.build(model, tok, k=5, final_norm=True, layers=[1])
    ids, _ = reference(model, E, 5, True, model.language_model.model.norm.weight)
    assert torch.equal(dn.top_ids[0], ids[1])


def test_save_load_roundtrip_and_atomic(tmp_path):
    model = tiny_pi0(1)
    tok = word_tokens(101)
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    d = NeuronDictionary.build(model, str(tok_path), k=4, bottom_k=True, model_id="tiny-pi0")
    out = d.save(tmp_path / "d.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.safetensors", "tokenizer.json"]  # no temp left
    e = NeuronDictionary.load(out)
    assert e.layers == d.layers and e.tokens == d.tokens and e.k == 4
    for a, b in ((e.top_ids, d.top_ids), (e.top_scores, d.top_scores), (e.bottom_ids, d.bottom_ids),
                 (e.bottom_scores, d.bottom_scores)):
        assert torch.equal(a, b)
    assert e.meta["model_id"] == "tiny-pi0" and e.meta["fingerprint"] == d.meta["fingerprint"]
    assert e.matches(model) and not e.matches(tiny_pi0(2))
    assert str(e.explain(1, 3)) == str(d.explain("vlm.1", 3))


def test_unicode_tokens_survive_save(tmp_path):
    tokens = ["[PAD]", "\u2581Quickly", "\u00e9l\u00e8ve", "", "\U0001F916"] + [f"t{i}" for i in range(96)]
    d = NeuronDictionary.build(tiny_pi0(), tokens, k=2)
    e = NeuronDictionary.load(d.save(tmp_path / "u.safetensors"))
    assert e.tokens == tuple(tokens)


def test_explain_lists_tokens_and_scores():
    model = tiny_pi0(3)
    tok = word_tokens(101)
    d = NeuronDictionary.build(model, tok, k=3, bottom_k=True)
    tokens = load_tokens(tok)
    ex = d.explain(0, 17)
    W = model.language_model.layers[0].mlp.down_proj.weight.detach()
    logits = model.language_model.embed_tokens.weight.detach() @ W[:, 17]
    best = torch.sort(logits, descending=True, stable=True)
    assert [t for t, _ in ex.top] == [tokens[i] for i in best.indices[:3].tolist()]
    assert [s for _, s in ex.top] == pytest.approx(best.values[:3].tolist(), abs=1e-5)  # measured 2e-7
    assert [t for t, _ in ex.bottom] == [tokens[i] for i in best.indices.flip(0)[:3].tolist()]


def brute_force_search(d: NeuronDictionary, words: list[str], min_hits: int = 1):
    want = {w.lower() for w in words}
    rows = []
    for li, layer in enumerate(d.layers):
        for n in range(d.top_ids.shape[1]):
            hits, score = 0, 0.0
            for r, tid in enumerate(d.top_ids[li, n].tolist()):
                if normalize_token(d.tokens[tid]) in want:
                    hits += 1
                    score += (d.k - r) / d.k
            if hits >= min_hits:
                rows.append((-hits, -score, li, n, layer))
    rows.sort()
    return [(layer, n, -h) for h, _, _, n, layer in rows]


def test_search_and_clusters_match_brute_force():
    d = NeuronDictionary.build(tiny_pi0(4), word_tokens(101), k=6)
    for words, min_hits in ((["quickly", "fast", "rapid"], 1), (["up", "lift", "w3", "w4", "w5"], 2)):
        got = [(h.layer, h.neuron, h.hits) for h in d.search(words, limit=None, min_hits=min_hits)]
        want = brute_force_search(d, words, min_hits)
        assert got == want and got  # non-empty: the test can tell ranking errors apart
    fast = cluster(d, "fast")
    assert fast.neurons == tuple((l, n) for l, n, _ in brute_force_search(d, list(KEYWORDS["fast"])))
    assert cluster(d, "fast") == fast  # deterministic
    assert cluster(d, "fast", max_neurons=3).neurons == fast.neurons[:3]
    only1 = cluster(d, "fast", layers=[1])
    assert only1.neurons and all(layer == "vlm.1" for layer, _ in only1.neurons)


def test_normalize_token():
    assert normalize_token("\u2581Quickly") == "quickly"
    assert normalize_token("\u0120up") == "up"
    assert normalize_token("##fast,") == "fast"
    assert normalize_token("<s>") == "s"


def test_bad_input_errors(tmp_path):
    model = tiny_pi0()
    with pytest.raises(ValueError, match="tokenizer has 90 tokens but the model's vocabulary matrix has 101"):
        NeuronDictionary.build(model, word_tokens(90))
    with pytest.raises(ValueError, match="tokenizer has 102 tokens"):
        NeuronDictionary.build(model, [f"t{i}" for i in range(102)])
    with pytest.raises(ValueError, match="action expert"):
        NeuronDictionary.build(model, word_tokens(101), layers=["expert.0"])
    with pytest.raises(ValueError, match="unknown layer 'vlm.7'"):
        NeuronDictionary.build(model, word_tokens(101), layers=[7])
    with pytest.raises(ValueError, match="at least one VLM layer"):
        NeuronDictionary.build(model, word_tokens(101), layers=[])
    with pytest.raises(ValueError, match="k must be in 1..64"):
        NeuronDictionary.build(model, word_tokens(101), k=65)
    d = NeuronDictionary.build(model, word_tokens(101), k=2, layers=[1])
    with pytest.raises(ValueError, match="not in this dictionary"):
        d.explain(0, 1)
    with pytest.raises(ValueError, match=r"neuron must be an int in \[0, 80\)"):
        d.explain(1, 80)
    with pytest.raises(ValueError, match="unknown keyword set"):
        cluster(d, "sideways")
    with pytest.raises(ValueError, match="min_hits"):
        cluster(d, "fast", min_hits=0)
    with pytest.raises(FileNotFoundError):
        NeuronDictionary.load(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a vlafast neuron dictionary"):
        NeuronDictionary.load(tmp_path / "other.safetensors")


def test_metadata_is_json_with_model_facts(tmp_path):
    from safetensors import safe_open

    d = NeuronDictionary.build(tiny_pi0(), word_tokens(101), k=2, model_id="m")
    path = d.save(tmp_path / "d.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["vlafast"])
    assert meta["layers"] == ["vlm.0", "vlm.1"] and meta["k"] == 2 and meta["model_id"] == "m"
    assert meta["vocab_rows"] == 101 and meta["width"] == 48 and len(meta["fingerprint"]) == 32
    assert not math.isnan(float(d.top_scores.max()))


def test_expert_excluded_even_at_the_vlm_width():
    from vlafast.models import GemmaConfig

    vlm = Pi0Config.tiny().vlm
    model = _randomize(Pi0Policy(Pi0Config.tiny(vocab_size=101, expert=vlm)), 0)
    assert dict(model.mlps())["expert.0"].down_proj.weight.shape == (48, 80)  # same shape as the VLM's
    d = NeuronDictionary.build(model, word_tokens(101), k=2)
    assert d.layers == ("vlm.0", "vlm.1")
    with pytest.raises(ValueError, match="is in the action expert"):
        NeuronDictionary.build(model, word_tokens(101), layers=["expert.1"])
    assert isinstance(vlm, GemmaConfig)
