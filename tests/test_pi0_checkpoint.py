"""Checkpoint loading (LeRobot and openpi layouts, legacy key layouts, dtype conversion, one
error for every bad key, absent stats) and the normalisers against their formulas."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers_ckpt import random_obs, random_policy, stats_for, write_lerobot, write_openpi
from vlafast.models import (
    CheckpointError, FeatureStats, Normalizer, Pi0Config, Pi0Observation, StatsError, load_pi0,
)
from vlafast.models.checkpoint import expected_tensors, load_into, plan_load, read_index, safetensors_files

VARIANTS = [False, True]
IDS = ["pi0", "pi05"]
REAL_STATE, REAL_ACTION = 3, 4  # robot dims below the padded model dims (5, 6)


def _expected_actions(source, obs, st, conv, pi05, noise):
    """What a loaded policy must output: the source model (no normaliser) on the hand-normalised
    state, then the hand-unnormalised first REAL_ACTION dims."""
    eps = 1e-6 if conv == "openpi" else 1e-8
    s, a = st["state"], st["actions"]
    T = torch.tensor
    state = None
    if not pi05:
        state = (obs.state - T(s["mean"])) / (T(s["std"]) + eps)
    raw = source.sample_actions(Pi0Observation(obs.images, obs.image_masks, obs.tokens, obs.token_masks, state),
                                noise=noise)[..., :REAL_ACTION]
    if pi05:  # quantile
        span = T(a["q99"]) - T(a["q01"]) + (eps if conv == "openpi" else 0.0)
        return (raw + 1) / 2 * span + T(a["q01"])
    return raw * (T(a["std"]) + (eps if conv == "openpi" else 0.0)) + T(a["mean"])


@pytest.mark.parametrize("layout", ["lerobot", "openpi"])
@pytest.mark.parametrize("pi05", VARIANTS, ids=IDS)
def test_load_roundtrip_samples_like_the_source(tmp_path, layout, pi05):
    cfg = Pi0Config.tiny(pi05=pi05)
    source = random_policy(cfg, seed=7)
    st = stats_for(REAL_ACTION, REAL_STATE)
    writer = write_lerobot if layout == "lerobot" else write_openpi
    folder = writer(tmp_path / "ckpt", source, st)
    policy = load_pi0(folder, config=cfg)
    for k, v in source.state_dict().items():
        assert torch.equal(policy.state_dict()[k], v), k
    assert policy.normalizer is not None and policy.normalizer.convention == layout
    assert policy.normalizer.action_mode == ("quantile" if pi05 else "mean_std")
    obs = random_obs(cfg, batch=2, state_dim=REAL_STATE, pad_last=1)
    noise = torch.randn(2, cfg.horizon, cfg.action_dim)
    out = policy.sample_actions(obs, noise=noise)
    assert out.shape == (2, cfg.horizon, REAL_ACTION)
    ref = _expected_actions(source, obs, st, layout, pi05, noise)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # measured max 0


@pytest.mark.parametrize("keys", ["transformers<4.52", "transformers5"])
def test_legacy_layouts_and_bf16_checkpoint(tmp_path, keys):
    """Other transformers key layouts, stats as buffers inside model.safetensors, a bf16
    file loaded (explicitly) as fp32, lm_head standing in for a missing embed_tokens."""
    cfg = Pi0Config.tiny()
    source = random_policy(cfg)
    folder = write_lerobot(tmp_path / "legacy", source, stats_for(REAL_ACTION, REAL_STATE), dtype=torch.bfloat16,
                           legacy_stats=True)
    sd = load_file(str(folder / "model.safetensors"))
    pg = "model.paligemma_with_expert.paligemma."
    moved = {}
    for k, v in sd.items():
        if k == pg + "model.language_model.embed_tokens.weight":
            continue  # only the tied lm_head remains
        if keys == "transformers5":
            k = k.replace(pg + "model.vision_tower.vision_model.", pg + "model.vision_tower.")
        else:
            k = k.replace(pg + "model.language_model.", pg + "language_model.model.")
            k = k.replace(pg + "lm_head.", pg + "language_model.lm_head.")
            k = k.replace(pg + "model.vision_tower.", pg + "vision_tower.")
        moved[k] = v
    save_file(moved, str(folder / "model.safetensors"))
    policy = load_pi0(folder, config=cfg, dtype=torch.float32)
    for k, v in source.state_dict().items():
        assert policy.state_dict()[k].dtype == torch.float32
        assert torch.equal(policy.state_dict()[k], v.to(torch.bfloat16).float()), k
    assert policy.normalizer.state.mean.shape == (REAL_STATE,)


def test_load_converts_dtype_and_leaves_nothing_on_meta(tmp_path):
    cfg = Pi0Config.tiny(pi05=True)
    folder = write_openpi(tmp_path / "c", random_policy(cfg), stats_for(REAL_ACTION, REAL_STATE))
    policy = load_pi0(folder, config=cfg, dtype=torch.bfloat16)
    tensors = list(policy.state_dict().values())
    assert all(t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors)
    assert len({t.data_ptr() for t in tensors}) == len(tensors)


def test_bad_checkpoint_lists_every_problem_in_one_error(tmp_path):
    cfg = Pi0Config.tiny()
    source = random_policy(cfg)
    bad_shape = "paligemma_with_expert.gemma_expert.model.layers.1.mlp.up_proj.weight"
    bad_dtype = "action_out_proj.bias"
    missing = "state_proj.weight"
    extra = {
        "model.not_a_module.weight": torch.zeros(3),
        "model." + bad_shape: torch.zeros(7, 7),
        "model." + bad_dtype: torch.zeros(cfg.action_dim, dtype=torch.int64),
    }
    folder = write_lerobot(tmp_path / "bad", source, stats_for(REAL_ACTION, REAL_STATE), drop=(missing,), extra=extra)
    with pytest.raises(CheckpointError) as info:
        load_pi0(folder, config=cfg)
    msg = str(info.value)
    assert f"1 missing keys:\n  {missing} [32, 5]" in msg
    assert "1 unexpected keys:\n  model.not_a_module.weight (as not_a_module.weight)" in msg
    assert f"model.{bad_shape}: checkpoint [7, 7], expected [56, 32]" in msg
    assert f"model.{bad_dtype}: checkpoint I64, expected a floating type" in msg


def test_absent_norm_stats_is_an_error(tmp_path):
    cfg = Pi0Config.tiny()
    source = random_policy(cfg)
    folder = write_lerobot(tmp_path / "lr", source, stats_for(REAL_ACTION, REAL_STATE), with_stats=False)
    with pytest.raises(StatsError, match="no normaliser statistics in .*normalizer_processor"):
        load_pi0(folder, config=cfg)
    folder = write_openpi(tmp_path / "op", source, stats_for(REAL_ACTION, REAL_STATE))
    (folder / "assets" / "tiny_robot" / "norm_stats.json").unlink()
    with pytest.raises(StatsError, match=r"expected assets/<id>/norm_stats.json"):
        load_pi0(folder, config=cfg)
    (folder / "assets" / "a").mkdir()
    (folder / "assets" / "b").mkdir()
    for d in "ab":
        (folder / "assets" / d / "norm_stats.json").write_text(json.dumps({"norm_stats": stats_for(4, 3)}))
    with pytest.raises(StatsError, match=r"several norm stats \['a', 'b'\].*asset_id="):
        load_pi0(folder, config=cfg)
    assert load_pi0(folder, config=cfg, asset_id="b").normalizer.action_dim == 4


def test_nested_asset_ids_unset_stats_and_explicit_stats(tmp_path):
    cfg = Pi0Config.tiny()
    source = random_policy(cfg)
    st = stats_for(REAL_ACTION, REAL_STATE)
    folder = write_openpi(tmp_path / "op", source, st, asset_id="physical-intelligence/libero")
    assert load_pi0(folder, config=cfg).normalizer.action_dim == REAL_ACTION
    # LeRobot base checkpoints keep inf in their (unset) stats buffers
    unset = {k: [float("inf")] * len(v) for k, v in st["state"].items()}
    folder = write_lerobot(tmp_path / "lr", source, {"state": unset, "actions": st["actions"]}, legacy_stats=True)
    with pytest.raises(StatsError, match=r"stats=Normalizer.*non-finite \['state.mean', 'state.std'\]"):
        load_pi0(folder, config=cfg)
    mine = Normalizer(FeatureStats(), FeatureStats.from_mapping(st["actions"]), "identity", "mean_std", "lerobot")
    policy = load_pi0(folder, config=cfg, stats=mine)
    assert policy.normalizer.state_mode == "identity"


def test_variant_mismatch_and_unknown_folder(tmp_path):
    cfg = Pi0Config.tiny()
    folder = write_lerobot(tmp_path / "c", random_policy(cfg), stats_for(REAL_ACTION, REAL_STATE))
    with pytest.raises(CheckpointError, match=r"holds a pi0 checkpoint \(lerobot layout\) but config.variant='pi05'"):
        load_pi0(folder, config=Pi0Config.tiny(pi05=True))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_pi0(tmp_path)


def test_generic_loader_with_shards_into_a_meta_module(tmp_path):
    """The loader is model-agnostic: a sharded checkpoint into a plain module built on meta."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    sd = ref.state_dict()
    save_file({k: sd[k].half() for k in ("0.weight", "0.bias")}, str(tmp_path / "a.safetensors"))
    save_file({k: sd[k].half() for k in ("2.weight", "2.bias")}, str(tmp_path / "b.safetensors"))
    weight_map = {"0.weight": "a.safetensors", "0.bias": "a.safetensors", "2.weight": "b.safetensors",
                  "2.bias": "b.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    files = safetensors_files(tmp_path)
    plan = plan_load(expected_tensors(model), read_index(files))
    load_into(model, files, plan, dtype=torch.float32)
    x = torch.randn(4, 5)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-2, atol=1e-2)  # fp16 storage; measured max 1.7e-4
    with pytest.raises(CheckpointError, match=r"2 missing keys:\n  2.bias \[3\]\n  2.weight \[3, 7\]"):
        plan_load(expected_tensors(model), read_index(files[:1]))


# ---------------------------------------------------------------------------------------------
# normalisers against their formulas


def _stats(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q01 = -1 - torch.rand(d, generator=g)
    q99 = 1 + torch.rand(d, generator=g)
    q99[0] = q01[0]  # a degenerate (constant) dimension
    return FeatureStats(mean=torch.randn(d, generator=g), std=torch.rand(d, generator=g) + 0.1, q01=q01, q99=q99)


@pytest.mark.parametrize("conv", ["openpi", "lerobot"])
@pytest.mark.parametrize("mode", ["mean_std", "quantile"])
def test_normalizer_formulas(conv, mode):
    st = _stats(7)
    n = Normalizer(st, st, mode, mode, conv)
    x = torch.randn(3, 5, 7) * 2
    eps = 1e-6 if conv == "openpi" else 1e-8
    if mode == "mean_std":
        want = (x - st.mean) / (st.std + eps)
    else:
        span = st.q99 - st.q01
        span = span + eps if conv == "openpi" else torch.where(span == 0, torch.full_like(span, eps), span)
        want = (x - st.q01) / span * 2 - 1
    torch.testing.assert_close(n.normalize_actions(x), want, rtol=1e-6, atol=1e-6)  # measured max 0
    back = n.unnormalize_actions(n.normalize_actions(x))
    keep = slice(1, None) if mode == "quantile" else slice(None)  # dim 0 is degenerate for quantiles
    torch.testing.assert_close(back[..., keep], x[..., keep], rtol=0, atol=1e-5)  # measured max 9.5e-7
    # fewer dims than the stats: the stats' leading dims are used; more: a clear error
    torch.testing.assert_close(n.normalize_state(x[..., :4]), n.normalize_state(x)[..., :4])
    with pytest.raises(StatsError, match="has 9 dims but its stats only 7"):
        n.normalize_state(torch.zeros(2, 9))


def test_normalizer_loaders(tmp_path):
    st = {"state": {"mean": [1.0, 2.0], "std": [2.0, 4.0], "q01": [0.0, 0.0], "q99": [1.0, 2.0]},
          "actions": {"mean": [0.5], "std": [1.0], "q01": [-1.0], "q99": [3.0]}}
    p = tmp_path / "norm_stats.json"
    p.write_text(json.dumps({"norm_stats": st}))
    n = Normalizer.from_openpi(p, quantile=True)
    torch.testing.assert_close(n.normalize_state(torch.tensor([[0.5, 1.0]])),
                               torch.tensor([[0.5 / (1 + 1e-6) * 2 - 1, 1.0 / (2 + 1e-6) * 2 - 1]]))
    torch.testing.assert_close(n.unnormalize_actions(torch.tensor([[[0.0]]])), torch.tensor([[[(0 + 1) / 2 * (4.0 + 1e-6) - 1.0]]]),
                               rtol=0, atol=1e-6)
    p.write_text(json.dumps({"norm_stats": {"state": st["state"]}}))
    with pytest.raises(StatsError, match=r"lacks \['actions'\]"):
        Normalizer.from_openpi(p, quantile=False)
    tensors = {"observation.state.mean": torch.tensor([1.0]), "observation.state.std": torch.tensor([2.0]),
               "action.mean": torch.tensor([0.0, 1.0]), "action.std": torch.tensor([1.0, 3.0])}
    n = Normalizer.from_lerobot(tensors, state_mode="mean_std", action_mode="mean_std")
    assert n.action_dim == 2
    torch.testing.assert_close(n.unnormalize_actions(torch.tensor([[[1.0, 1.0]]])), torch.tensor([[[1.0, 4.0]]]))
    with pytest.raises(StatsError, match="no LeRobot stats for 'action'"):
        Normalizer.from_lerobot({"observation.state.mean": torch.zeros(1)}, state_mode="identity", action_mode="quantile")


def test_keys_and_shapes_match_the_reference_classes():
    """LeRobot / openpi build PaliGemmaWithExpertModel from stock transformers classes:
    ``paligemma`` = PaliGemmaForConditionalGeneration, ``gemma_expert`` = GemmaForCausalLM with
    ``embed_tokens = None``. Their state-dict keys (in this transformers' layout, mapped by the
    loader) and shapes must be exactly ours."""
    transformers = pytest.importorskip("transformers")
    from vlafast.models.pi0_load import _canonical

    cfg = Pi0Config.tiny()
    v, g, e = cfg.vision, cfg.vlm, cfg.expert
    pali = transformers.PaliGemmaForConditionalGeneration(transformers.PaliGemmaConfig(
        vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                           num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
                           vision_use_head=False, projection_dim=g.width),
        text_config=dict(hidden_size=g.width, intermediate_size=g.mlp_dim, num_hidden_layers=g.depth,
                         num_attention_heads=g.num_heads, num_key_value_heads=g.num_kv_heads, head_dim=g.head_dim,
                         vocab_size=cfg.vocab_size),
        projection_dim=g.width, vocab_size=cfg.vocab_size, image_token_index=cfg.vocab_size - 1))
    expert = transformers.GemmaForCausalLM(transformers.GemmaConfig(
        hidden_size=e.width, intermediate_size=e.mlp_dim, num_hidden_layers=e.depth, num_attention_heads=e.num_heads,
        num_key_value_heads=e.num_kv_heads, head_dim=e.head_dim, vocab_size=cfg.vocab_size))
    expert.model.embed_tokens = None
    ref = {f"paligemma_with_expert.paligemma.{k}": tuple(t.shape) for k, t in pali.state_dict().items()}
    ref.update({f"paligemma_with_expert.gemma_expert.{k}": tuple(t.shape) for k, t in expert.state_dict().items()})
    ref = {_canonical(k, pi05=False): s for k, s in ref.items()
           if not k.endswith("lm_head.weight")}  # tied / unused heads are skipped by the loader
    ours = {k: tuple(t.shape) for k, t in random_policy(cfg).state_dict().items() if k.startswith("paligemma_with_expert.")}
    assert ours == ref


@pytest.mark.parametrize("pi05", VARIANTS, ids=IDS)
def test_published_size_key_set_plans_cleanly(tmp_path, pi05):
    """A full-size LeRobot key set (as headers only: nothing allocated) matches the model that
    ``config.json`` describes, including the expert's unused 257152 x 1024 LM head."""
    from vlafast.models import Pi0Policy
    from vlafast.models.checkpoint import TensorInfo
    from vlafast.models.pi0_load import _lerobot_config, _rename_fn

    meta = {"type": "pi05" if pi05 else "pi0", "chunk_size": 50, "max_action_dim": 32, "max_state_dim": 32,
            "num_inference_steps": 10, "paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m",
            "image_resolution": [224, 224]}
    cfg = _lerobot_config(meta, pi05)
    assert cfg == (Pi0Config.pi05() if pi05 else Pi0Config.pi0())
    with torch.device("meta"):
        model = Pi0Policy(cfg)
    f = tmp_path / "model.safetensors"
    index = {f"model.{k}": TensorInfo(f"model.{k}", s, "BF16", f) for k, (s, _) in expected_tensors(model).items()}
    for k, shape in (("paligemma_with_expert.paligemma.lm_head.weight", (257_152, 2048)),
                     ("paligemma_with_expert.gemma_expert.lm_head.weight", (257_152, 1024))):
        index[f"model.{k}"] = TensorInfo(f"model.{k}", shape, "BF16", f)
    plan = plan_load(expected_tensors(model), index, _rename_fn(index, pi05))
    assert len(plan) == len(expected_tensors(model))
