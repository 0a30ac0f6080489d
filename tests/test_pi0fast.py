"""pi0-FAST: the decoder's logits at every step against stock transformers PaliGemma on the same
tiny weights, greedy == the reference's step-by-step argmax, seeded sampling, EOS handling, the
prefix-LM mask, the steering slot, FAST decode failures, the static-buffer / CUDA-graph decoder
and checkpoint loading from tiny LeRobot and openpi folders written with the real key names."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vlafast.models import CheckpointError, GemmaConfig, SiglipConfig, StatsError
from vlafast.models.fast_tokenizer import FASTTokenizer, fast_to_paligemma
from vlafast.models.pi0fast import (
    ACTION_PREFIX, DecodeOutput, GraphedDecoder, Pi0FASTConfig, Pi0FASTObservation, Pi0FASTPolicy, pi0fast_prompt,
    sample_gumbel,
)
from vlafast.models.pi0fast_load import load_pi0fast

transformers = pytest.importorskip("transformers")

# awkward sizes: 1 kv head / 1 layer / batch 1, and the default tiny (2 kv heads, 3 layers)
CONFIGS = {
    "tiny": Pi0FASTConfig.tiny(),
    "mqa": Pi0FASTConfig.tiny(
        vision=SiglipConfig(image_size=21, patch_size=7, width=30, depth=1, mlp_dim=22, num_heads=5),
        vlm=GemmaConfig(width=40, depth=1, mlp_dim=54, num_heads=5, num_kv_heads=1, head_dim=10),
        vocab_size=457, max_decoding_steps=7),
}


def random_policy(cfg: Pi0FASTConfig, seed: int = 0) -> Pi0FASTPolicy:
    """Every parameter random (norm weights and biases too, so a (1 + w) / w mix-up or a dropped
    bias shows), scaled so activations stay O(1)."""
    torch.manual_seed(seed)
    policy = Pi0FASTPolicy(cfg).eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
            elif p.ndim == 1:
                p.normal_(0.0, 0.1)
            elif "embed_tokens" in name:
                p.normal_(0.0, 1.0 / cfg.vlm.width ** 0.5)
            elif "position_embedding" in name:
                p.normal_(0.0, 0.5)
            else:
                p.normal_(0.0, 1.0 / p[0].numel() ** 0.5)
    return policy


def inputs(cfg: Pi0FASTConfig, batch: int, views: int = 2, text: int = 6, *, seed: int = 1, pad_last: int = 2,
           drop_view: bool = True) -> tuple[torch.Tensor, ...]:
    """images, image_masks, tokens, token_masks (last row right-padded; row 0's last view absent)."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    images = torch.rand(batch, views, 3, s, s, generator=g) * 2 - 1
    image_masks = torch.ones(batch, views, dtype=torch.bool)
    if drop_view and views > 1:
        image_masks[0, -1] = False
    tokens = torch.randint(2, cfg.vocab_size, (batch, text), generator=g)
    token_masks = torch.ones(batch, text, dtype=torch.bool)
    if pad_last:
        token_masks[-1, text - pad_last:] = False
        tokens[-1, text - pad_last:] = cfg.pad_token_id
    return images, image_masks, tokens, token_masks


POSTFIX = torch.tensor([5, 11, 3])  # stands in for the ids of "Action: "


# ---------------------------------------------------------------------------------------------
# the reference: transformers' PaliGemma on the same weights


def hf_state_dict(policy: Pi0FASTPolicy, hf_keys: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Our weights under transformers' PaliGemma names (the installed version's naming when
    ``hf_keys`` is given), the tied lm_head included."""
    out = {}
    for k, t in policy.state_dict().items():
        k = k[len("pi0_paligemma."):]
        if hf_keys is not None and k not in hf_keys:  # transformers 5 drops the `vision_model.` level
            k = k.replace("vision_tower.vision_model.", "vision_tower.")
        out[k] = t
    out["lm_head.weight"] = out["model.language_model.embed_tokens.weight"]
    return out


def hf_paligemma(policy: Pi0FASTPolicy):
    cfg = policy.cfg
    v, g = cfg.vision, cfg.vlm
    hf_cfg = transformers.PaliGemmaConfig(
        vision_config=dict(hidden_size=v.width, intermediate_size=v.mlp_dim, num_hidden_layers=v.depth,
                           num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size,
                           layer_norm_eps=v.eps, hidden_act="gelu_pytorch_tanh", vision_use_head=False,
                           projection_dim=g.width),
        text_config=dict(hidden_size=g.width, intermediate_size=g.mlp_dim, num_hidden_layers=g.depth,
                         num_attention_heads=g.num_heads, num_key_value_heads=g.num_kv_heads, head_dim=g.head_dim,
                         vocab_size=cfg.vocab_size, rms_norm_eps=g.eps, hidden_activation="gelu_pytorch_tanh",
                         rope_theta=g.rope_theta),
        projection_dim=g.width, vocab_size=cfg.vocab_size, image_token_index=cfg.vocab_size - 1)
    hf = transformers.PaliGemmaForConditionalGeneration(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(hf_state_dict(policy, set(hf.state_dict())), strict=False)
    assert missing == [] and unexpected == [], (missing, unexpected)
    return hf


@torch.no_grad()
def hf_logits(hf, images, image_masks, tokens, token_masks, postfix: torch.Tensor | None) -> torch.Tensor:
    """transformers' logits [B, S, V] over images + prompt (bidirectional) + postfix (causal),
    built from its own modules: its vision tower and projector, its (scaled) embedding, a 4-D
    prefix-LM mask written here, positions cumsum(valid) - 1."""
    B, V = images.shape[:2]
    width = hf.config.text_config.hidden_size
    img = hf.model.multi_modal_projector(hf.model.vision_tower(pixel_values=images.flatten(0, 1)).last_hidden_state)
    img = img.reshape(B, -1, width)
    n = img.shape[1] // V
    ids, pad = tokens, token_masks
    Q = 0
    if postfix is not None:
        Q = postfix.shape[1]
        ids = torch.cat([tokens, postfix], 1)
        pad = torch.cat([pad, torch.ones(B, Q, dtype=torch.bool)], 1)
    lm = hf.model.language_model
    text = lm.embed_tokens(ids)
    if not hasattr(lm.embed_tokens, "embed_scale"):  # transformers 4.x scales inputs_embeds inside the stack
        img = img / math.sqrt(width)
    emb = torch.cat([img, text], 1)
    pad = torch.cat([image_masks[:, :, None].expand(B, V, n).reshape(B, -1), pad], 1)
    S = emb.shape[1]
    allowed = torch.zeros(B, S, S, dtype=torch.bool)
    P0 = S - Q
    allowed[:, :P0, :P0] = True  # the prefix sees itself
    allowed[:, P0:, :] = torch.ones(Q, S, dtype=torch.bool).tril(P0)  # postfix: causal, sees the whole prefix
    allowed &= pad[:, None, :] & pad[:, :, None]
    mask = torch.zeros(B, 1, S, S).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    out = lm(inputs_embeds=emb, attention_mask=mask, position_ids=torch.cumsum(pad.long(), 1) - 1)
    return hf.lm_head(out.last_hidden_state).float()


def last_valid(pad: torch.Tensor) -> torch.Tensor:
    return torch.where(pad, torch.arange(pad.shape[1]), -1).amax(1)


# ---------------------------------------------------------------------------------------------
# config and prompt


def test_config_json_round_trip_and_validation():
    for cfg in list(CONFIGS.values()) + [Pi0FASTConfig.pi0fast()]:
        assert Pi0FASTConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    big = Pi0FASTConfig.pi0fast()
    assert (big.vocab_size, big.vlm.width, big.vision.width, big.fast_top) == (257_152, 2048, 1152, 257_023)
    with pytest.raises(ValueError, match="eos_token_id"):
        Pi0FASTConfig.tiny(eos_token_id=521)
    with pytest.raises(ValueError, match="horizon"):
        Pi0FASTConfig.tiny(horizon=0)
    with pytest.raises(TypeError):
        Pi0FASTConfig.from_json({**Pi0FASTConfig.tiny().to_json(), "bogus": 1})


class WordTokenizer:
    """A stand-in for the PaliGemma tokenizer: whitespace words -> stable ids, BOS = 2."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, *, bos: bool) -> list[int]:
        ids = [self.vocab.setdefault(w, 3 + len(self.vocab)) for w in text.replace("\n", " \n ").split(" ") if w]
        return ([2] if bos else []) + ids


def test_prompt_text_state_bins_and_padding():
    assert pi0fast_prompt("  Pick_up the CUP\n", [0, 128, 255]) == "Task: pick up the cup, State: 0 128 255;\n"
    cfg = Pi0FASTConfig.tiny()
    policy = random_policy(cfg)
    tok = WordTokenizer()
    state = torch.tensor([[-1.0, 0.0, 0.999], [0.5, -0.5, 0.25]])
    tokens, masks, postfix = policy.prompt_tokens(["go left", "stop"], state, tok)
    assert postfix.tolist() == tok.encode(ACTION_PREFIX, bos=False)
    row0 = tok.encode(pi0fast_prompt("go left", [0, 128, 255, 128, 128]), bos=True)  # padded to state_dim 5
    assert tokens[0, :len(row0)].tolist() == row0 and masks[0].sum() == len(row0) == tokens.shape[1]
    row1 = tok.encode(pi0fast_prompt("stop", [192, 64, 160, 128, 128]), bos=True)
    assert tokens[1, :len(row1)].tolist() == row1 and masks[1].sum() == len(row1)
    assert (tokens[1, len(row1):] == cfg.pad_token_id).all() and not masks[1, len(row1):].any()
    lerobot = Pi0FASTPolicy(dataclasses.replace(cfg, pad_state=False))  # LeRobot: the real dims only
    assert lerobot.prompt_state(state).shape == (2, 3)
    assert lerobot.prompt_state(torch.zeros(1, 9)).shape == (1, cfg.state_dim)  # cut at state_dim
    with pytest.raises(ValueError, match="2 tasks for a state batch of 1"):
        policy.prompt_tokens(["a", "b"], state[:1], tok)


# ---------------------------------------------------------------------------------------------
# parity with transformers


@pytest.mark.parametrize("name,batch", [("tiny", 3), ("mqa", 1), ("mqa", 2)])
@pytest.mark.parametrize("with_postfix", [True, False], ids=["action-prefix", "no-postfix"])
def test_every_step_logits_match_transformers_and_greedy_is_its_argmax(name, batch, with_postfix):
    cfg = CONFIGS[name]
    policy = random_policy(cfg, seed=3)
    hf = hf_paligemma(policy)
    images, image_masks, tokens, token_masks = inputs(cfg, batch, seed=4)
    postfix = POSTFIX if with_postfix else None
    out = policy.generate(images, image_masks, tokens, token_masks, postfix)
    N = cfg.max_decoding_steps
    assert out.tokens.shape == out.log_probs.shape == out.valid.shape == (batch, N) and out.valid.all()

    # the reference sees the postfix and every decoded token but the last, teacher-forced
    fed = out.tokens[:, :-1] if postfix is None else torch.cat([POSTFIX.expand(batch, -1), out.tokens[:, :-1]], 1)
    ref = hf_logits(hf, images, image_masks, tokens, token_masks, fed)
    # logits predicting decoded token 0: at the prefix's last valid token (inside the padding
    # when there is no postfix), then at each fed decoded token
    Q = 0 if postfix is None else POSTFIX.numel()
    P = policy.prefix_len(images.shape[1], tokens.shape[1], Q)
    ref_steps = torch.cat([ref[torch.arange(batch), last_valid(torch.cat(
        [image_masks.repeat_interleave(cfg.vision.num_patches, 1), token_masks,
         torch.ones(batch, Q, dtype=torch.bool)], 1))][:, None], ref[:, P:]], 1)  # [B, N, V]
    assert torch.equal(out.tokens, ref_steps.argmax(-1))  # greedy == the reference's step-by-step argmax
    # our per-step logits: re-run the loop and record state.logits before each select
    state = policy.new_state(batch, P)
    with torch.no_grad():
        policy.prefill(images, image_masks, tokens, token_masks, postfix, state)
        ours = [state.logits.clone()]
        policy.select(state, sample=False)
        for _ in range(N - 1):
            ours.append(policy.decode_step(state).clone())
            policy.select(state, sample=False)
    ours = torch.stack(ours, 1)
    torch.testing.assert_close(ours, ref_steps, rtol=0, atol=1e-5)  # measured max 2.4e-6 (fp32, CPU)
    torch.testing.assert_close(out.log_probs, torch.log_softmax(ref_steps, -1).gather(2, out.tokens[..., None])[..., 0],
                               rtol=0, atol=1e-5)  # measured max 1.9e-6


def test_uncached_teacher_forced_logits_match_transformers():
    cfg = CONFIGS["tiny"]
    policy = random_policy(cfg, seed=5)
    hf = hf_paligemma(policy)
    images, image_masks, tokens, token_masks = inputs(cfg, 2, seed=6)
    post = torch.tensor([[5, 11, 3, 300, 301], [5, 11, 3, 7, 1]])
    with torch.no_grad():
        ours, pad = policy.forward_logits(images, image_masks, tokens, token_masks, post)
    ref = hf_logits(hf, images, image_masks, tokens, token_masks, post)
    valid = pad[:, :, None]
    torch.testing.assert_close(ours * valid, ref * valid, rtol=0, atol=1e-5)  # measured max 0 (same op order)


# ---------------------------------------------------------------------------------------------
# sampling, EOS, stopping


def test_sampling_is_reproducible_with_a_seeded_generator_and_log_probs_are_the_tempered_ones():
    cfg = CONFIGS["tiny"]
    policy = random_policy(cfg, seed=7)
    x = inputs(cfg, 3, seed=8)
    g = torch.Generator().manual_seed(11)
    a = policy.generate(*x, POSTFIX, temperature=0.7, generator=g)
    g.manual_seed(11)
    b = policy.generate(*x, POSTFIX, temperature=0.7, generator=g)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.log_probs, b.log_probs)
    g.manual_seed(12)
    assert not torch.equal(policy.generate(*x, POSTFIX, temperature=0.7, generator=g).tokens, a.tokens)
    with torch.no_grad():
        lg, _ = policy.forward_logits(*x, torch.cat([POSTFIX.expand(3, -1), a.tokens[:, :-1]], 1))
    P = policy.prefix_len(2, x[2].shape[1], POSTFIX.numel())
    ref = torch.log_softmax(lg[:, P - 1:] / 0.7, -1).gather(2, a.tokens[..., None])[..., 0]
    torch.testing.assert_close(a.log_probs, ref, rtol=0, atol=1e-5)  # measured max 1.4e-6 (cached vs uncached)
    with pytest.raises(ValueError, match="temperature"):
        policy.generate(*x, POSTFIX, temperature=-1.0)


def test_gumbel_max_draws_follow_the_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0, 0.5]]).expand(40_000, -1)
    g = torch.Generator().manual_seed(0)
    for T in (1.0, 0.5):
        draws = sample_gumbel(logits, torch.tensor([T]), g)
        freq = torch.bincount(draws, minlength=5).float() / draws.numel()
        p = torch.softmax(logits[0] / T, -1)
        assert (freq - p).abs().max() < 4 * math.sqrt(0.25 / draws.numel())  # 4 sigma


def test_rows_stop_at_their_eos_at_different_steps():
    cfg = CONFIGS["tiny"]
    policy = random_policy(cfg, seed=9)
    x = inputs(cfg, 3, seed=10)
    g = torch.Generator().manual_seed(3)
    free = policy.generate(*x, POSTFIX, temperature=1.0, generator=g)
    # choose as EOS a token row 0 drew at step 1, absent from row 0's step 0
    eos = int(free.tokens[0, 1])
    assert eos != int(free.tokens[0, 0])
    policy.cfg = dataclasses.replace(cfg, eos_token_id=eos)
    g.manual_seed(3)
    out = policy.generate(*x, POSTFIX, temperature=1.0, generator=g)
    N = cfg.max_decoding_steps
    stops = []
    for b in range(3):
        hits = (free.tokens[b] == eos).nonzero().flatten().tolist()
        stop = hits[0] if hits else N - 1
        stops.append(stop)
        keep = slice(0, stop + 1)
        assert torch.equal(out.tokens[b, keep], free.tokens[b, keep])  # the same draws up to the EOS
        assert torch.equal(out.log_probs[b, keep], free.log_probs[b, keep])
        assert out.valid[b, keep].all() and not out.valid[b, stop + 1:].any()
        assert (out.tokens[b, stop + 1:] == cfg.pad_token_id).all() and (out.log_probs[b, stop + 1:] == 0).all()
    assert stops[0] == 1 and len(set(stops)) > 1, stops
    # reading "all done?" back every k steps stops early with the same outputs
    for k in (1, 2, 5):
        g.manual_seed(3)
        early = policy.generate(*x, POSTFIX, temperature=1.0, generator=g, stop_check=k)
        assert torch.equal(early.tokens, out.tokens) and torch.equal(early.valid, out.valid)
        assert torch.equal(early.log_probs, out.log_probs)


# ---------------------------------------------------------------------------------------------
# the prefix-LM mask


def test_prefix_is_bidirectional_postfix_causal_and_padding_inert():
    cfg = CONFIGS["tiny"]
    policy = random_policy(cfg, seed=12)
    images, image_masks, tokens, token_masks = inputs(cfg, 2, seed=13)
    P = policy.prefix_len(2, tokens.shape[1], POSTFIX.numel())
    Q = POSTFIX.numel()

    def cache(tok, post):
        st = policy.new_state(2, P, 2)
        with torch.no_grad():
            policy.prefill(images, image_masks, tok, token_masks, post, st)
        return st

    base = cache(tokens, POSTFIX)
    # changing the last prompt token moves the K/V of the first image token at layer 1 (bidirectional)
    t2 = tokens.clone()
    t2[0, 3] = 7
    changed = cache(t2, POSTFIX)
    assert not torch.allclose(changed.cache.k[1, 0, :, 0], base.cache.k[1, 0, :, 0])
    # changing the last postfix token leaves every earlier slot's K/V alone (causal)
    p2 = POSTFIX.clone()
    p2[-1] = 17
    later = cache(tokens, p2)
    # (valid slots only: a padded token's row is all masked, so it attends everywhere, read by nobody)
    seen = base.valid[None, :, None, :P - 1, None]
    for name in ("k", "v"):
        a, b = getattr(later.cache, name)[:, :, :, :P - 1], getattr(base.cache, name)[:, :, :, :P - 1]
        torch.testing.assert_close(a * seen, b * seen, rtol=0, atol=0)
    assert not torch.equal(later.cache.k[:, :, :, P - 1], base.cache.k[:, :, :, P - 1])
    # the padded ids of the last row and the pixels of row 0's absent view change nothing valid
    t3 = tokens.clone()
    t3[-1, ~token_masks[-1]] = 123
    im3 = images.clone()
    im3[0, -1] = -images[0, -1]
    with torch.no_grad():
        a = policy.generate(images, image_masks, tokens, token_masks, POSTFIX)
        b = policy.generate(im3, image_masks, t3, token_masks, POSTFIX)
    assert torch.equal(a.tokens, b.tokens)
    torch.testing.assert_close(a.log_probs, b.log_probs, rtol=0, atol=1e-6)  # measured 0
    assert bool(base.valid[0, cfg.vision.num_patches:2 * cfg.vision.num_patches].any()) is False
    assert base.position.tolist() == [P - cfg.vision.num_patches, P - 2]  # first decoded token's RoPE position


# ---------------------------------------------------------------------------------------------
# steering


def test_steer_slot_changes_logits_and_removal_is_bit_exact():
    cfg = CONFIGS["tiny"]
    policy = random_policy(cfg, seed=14)
    x = inputs(cfg, 2, seed=15)
    names = [n for n, _ in policy.mlps()]
    assert names == [f"vlm.{l}" for l in range(cfg.vlm.depth)]
    with torch.no_grad():
        base, _ = policy.forward_logits(*x, POSTFIX)
    base_dec = policy.generate(*x, POSTFIX)
    mlp = dict(policy.mlps())["vlm.1"]
    S, alpha = torch.tensor([3, 17, 41]), 10.0
    W = mlp.down_proj.weight
    seen = []

    def clamp(h, y):  # docs/architecture.md §2.4: y + W_S (alpha 1 - h_S)
        seen.append(h.shape[1])
        return y + (alpha - h[..., S]) @ W[:, S].T

    mlp.steer = clamp
    with torch.no_grad():
        steered, _ = policy.forward_logits(*x, POSTFIX)
        h = mlp.activations(torch.randn(1, 1, cfg.vlm.width))
        h2 = h.clone()
        h2[..., S] = alpha
        torch.testing.assert_close(clamp(h, mlp.down_proj(h)), mlp.down_proj(h2), rtol=1e-5, atol=1e-5)
    dec = policy.generate(*x, POSTFIX)
    assert (steered - base).abs().max() > 1e-2
    assert not torch.equal(dec.log_probs, base_dec.log_probs)
    assert 1 in seen and max(seen) > 1  # the slot runs on the prefill and on every decode step
    mlp.steer = None
    with torch.no_grad():
        again, _ = policy.forward_logits(*x, POSTFIX)
    assert torch.equal(again, base)
    after = policy.generate(*x, POSTFIX)
    assert torch.equal(after.tokens, base_dec.tokens) and torch.equal(after.log_probs, base_dec.log_probs)


# ---------------------------------------------------------------------------------------------
# FAST tokens -> actions


def smooth(n: int, T: int, A: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, T)[None, :, None]
    freq, phase, amp = rng.uniform(0.2, 1.5, (n, 1, A)), rng.uniform(0, 1, (n, 1, A)), rng.uniform(0.2, 1, (n, 1, A))
    return amp * np.sin(2 * np.pi * (freq * t + phase))


@pytest.fixture(scope="module")
def fast_codec() -> FASTTokenizer:
    cfg = CONFIGS["tiny"]
    return FASTTokenizer.fit(smooth(64, cfg.horizon, cfg.action_dim), vocab_size=cfg.fast_top + 1)


def test_decode_actions_cuts_at_bar_and_eos_and_counts_failures(fast_codec):
    cfg = CONFIGS["tiny"]
    policy = random_policy(cfg)
    fast = FASTTokenizer(fast_codec.tokenizer, fast_codec.config)
    chunks = smooth(4, cfg.horizon, cfg.action_dim, seed=5)
    streams = [fast_to_paligemma(np.asarray(s), paligemma_vocab_size=cfg.vocab_size).tolist()
               for s in fast.encode(chunks)]
    BAR, N = 9, 40
    rows = [streams[0] + [BAR, cfg.eos_token_id],  # the training layout
            streams[1] + [cfg.eos_token_id],  # EOS without the bar
            streams[2][:1] + [77] + streams[2][1:] + [BAR],  # a text token among the actions: fails
            []]  # nothing decoded: fails
    tokens = torch.full((4, N), cfg.pad_token_id)
    valid = torch.zeros(4, N, dtype=torch.bool)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor(r, dtype=torch.long)
        valid[b, :max(len(r), 1)] = True
    tokens[3, 0] = cfg.eos_token_id
    out = DecodeOutput(tokens, torch.zeros(4, N), valid)
    assert policy.action_tokens(out, [BAR])[:2] == [fast.encode(chunks[:1])[0], fast.encode(chunks[1:2])[0]]
    actions, ok = policy.decode_actions(out, fast, [BAR])
    assert ok.tolist() == [True, True, False, False] and fast.failures == 2
    assert actions.shape == (4, cfg.horizon, cfg.action_dim)
    bound = 0.5 * math.sqrt(cfg.horizon) / fast.config.scale  # FAST's round-trip bound per action
    assert (actions[:2] - torch.tensor(chunks[:2], dtype=torch.float32)).abs().max() <= bound + 1e-6
    assert (actions[2:] == 0).all()


def test_predict_actions_end_to_end_never_raises_and_unnormalises(fast_codec):
    from vlafast.models import FeatureStats, Normalizer

    cfg = CONFIGS["tiny"]
    A_real = 2
    norm = Normalizer(FeatureStats(mean=torch.tensor([0.5, -1.0, 2.0]), std=torch.tensor([2.0, 0.5, 1.0])),
                      FeatureStats(mean=torch.tensor([1.0, -2.0]), std=torch.tensor([3.0, 0.5])),
                      "mean_std", "mean_std", "lerobot")
    policy = random_policy(cfg, seed=16)
    policy.normalizer = norm
    fast = FASTTokenizer(fast_codec.tokenizer, fast_codec.config)
    images, image_masks, _, _ = inputs(cfg, 3, seed=17)
    obs = Pi0FASTObservation(images, image_masks, torch.randn(3, 3), ["pick up the cup", "open_drawer", "stop"])
    actions, ok = policy.predict_actions(obs, WordTokenizer(), fast)
    assert actions.shape == (3, cfg.horizon, A_real) and ok.dtype == torch.bool
    assert fast.failures == int((~ok).sum())
    # failed rows are zeros in the normalised space: the action mean after unnormalising
    mean = torch.tensor([1.0, -2.0])
    assert torch.allclose(actions[~ok], mean.expand_as(actions[~ok]))
    g = torch.Generator().manual_seed(0)
    sampled, ok2 = policy.predict_actions(obs, WordTokenizer(), fast, temperature=1.0, generator=g, stop_check=4)
    assert sampled.shape == actions.shape and fast.failures == int((~ok).sum() + (~ok2).sum())


# ---------------------------------------------------------------------------------------------
# the static-buffer decoder (CUDA graph off CUDA: the same step, eagerly)


@pytest.mark.parametrize("name,batch", [("tiny", 2), ("mqa", 1)])
def test_decoder_static_buffers_match_generate_on_cpu(name, batch):
    cfg = CONFIGS[name]
    policy = random_policy(cfg, seed=18)
    x = inputs(cfg, batch, seed=19)
    P = policy.prefix_len(2, x[2].shape[1], POSTFIX.numel())
    dec = GraphedDecoder(policy, batch, P)
    assert dec.graph is None
    want = policy.generate(*x, POSTFIX)
    for _ in range(2):
        got = policy.generate(*x, POSTFIX, decoder=dec)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.log_probs, want.log_probs)
    other = inputs(cfg, batch, seed=20)  # stale cache entries must not leak
    assert torch.equal(policy.generate(*other, POSTFIX, decoder=dec).tokens, policy.generate(*other, POSTFIX).tokens)
    g = torch.Generator().manual_seed(5)
    sdec = GraphedDecoder(policy, batch, P, sample=True, generator=g)
    g.manual_seed(5)
    got = policy.generate(*x, POSTFIX, temperature=0.8, generator=g, decoder=sdec)
    g.manual_seed(5)
    want = policy.generate(*x, POSTFIX, temperature=0.8, generator=g)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.log_probs, want.log_probs)
    with pytest.raises(ValueError, match="build another with new_state"):
        policy.generate(*inputs(cfg, batch, text=7, seed=19), POSTFIX, decoder=dec)
    with pytest.raises(ValueError, match="sample=True"):
        policy.generate(*x, POSTFIX, temperature=0.5, generator=g, decoder=dec)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_decoder_matches_eager_on_gpu(dtype):
    cfg = CONFIGS["tiny"]
    policy = random_policy(cfg, seed=21).to("cuda", dtype)
    x = [t.cuda() for t in inputs(cfg, 3, seed=22)]
    post = POSTFIX.cuda()
    P = policy.prefix_len(2, x[2].shape[1], POSTFIX.numel())
    eager = policy.generate(*x, post)
    dec = GraphedDecoder(policy, 3, P)
    assert dec.graph is not None
    for _ in range(2):  # replays reuse the static state
        got = policy.generate(*x, post, decoder=dec)
        assert torch.equal(got.tokens, eager.tokens) and torch.equal(got.log_probs, eager.log_probs)
    g = torch.Generator(device="cuda")
    sdec = GraphedDecoder(policy, 3, P, sample=True, generator=g)
    assert sdec.graph is not None
    g.manual_seed(7)
    got = policy.generate(*x, post, temperature=0.9, generator=g, decoder=sdec)
    g.manual_seed(7)
    want = policy.generate(*x, post, temperature=0.9, generator=g)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.log_probs, want.log_probs)
    g.manual_seed(8)
    assert not torch.equal(policy.generate(*x, post, temperature=0.9, generator=g, decoder=sdec).tokens, got.tokens)
    if dtype == torch.float32:  # fp32 on the GPU (cuDNN's default TF32 convolutions off) against the CPU,
        # teacher-forced on the GPU's tokens so a near-tie flipping an argmax cannot make this flaky
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            exact = policy.generate(*x, post)
        cpu = random_policy(cfg, seed=21)
        toks = exact.tokens.cpu()
        with torch.no_grad():
            lg, _ = cpu.forward_logits(*[t.cpu() for t in x], torch.cat([POSTFIX.expand(3, -1), toks[:, :-1]], 1))
        ref = torch.log_softmax(lg[:, P - 1:], -1).gather(2, toks[..., None])[..., 0]
        torch.testing.assert_close(exact.log_probs.cpu(), ref, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# checkpoints


def stats_for(action_dim: int, state_dim: int) -> dict:
    g = torch.Generator().manual_seed(2)

    def feat(d):
        mean = torch.randn(d, generator=g)
        return {"mean": mean.tolist(), "std": (0.5 + torch.rand(d, generator=g)).tolist(),
                "q01": (mean - 1 - torch.rand(d, generator=g)).tolist(),
                "q99": (mean + 1 + torch.rand(d, generator=g)).tolist()}

    return {"state": feat(state_dim), "actions": feat(action_dim)}


_OLD_NAMES = (  # transformers < 4.52, as LeRobot's published pi0fast checkpoints carry them
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def paligemma_keys(policy: Pi0FASTPolicy, naming: str) -> dict[str, torch.Tensor]:
    """transformers PaliGemma keys: 'new' (4.52 - 4.x), 'old' (< 4.52) or 'v5' (no vision_model.)."""
    sd = {k: v.clone().contiguous() for k, v in hf_state_dict(policy).items()}
    if naming == "v5":
        return {k.replace("vision_tower.vision_model.", "vision_tower."): v for k, v in sd.items()}
    if naming == "old":
        out = {}
        for k, v in sd.items():
            for new, old in _OLD_NAMES:
                if k.startswith(new):
                    k = old + k[len(new):]
                    break
            out[k] = v
        return out
    return sd


def write_lerobot(folder: Path, policy: Pi0FASTPolicy, stats: dict, *, naming: str = "old",
                  legacy_stats: bool = False, drop: tuple[str, ...] = (), extra: dict | None = None,
                  sizes: bool = True, tie: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = policy.cfg
    sd = {"model.pi0_paligemma." + k: v for k, v in paligemma_keys(policy, naming).items()}
    if not tie:  # safetensors writers keep one of two tied tensors
        del sd[next(k for k in sd if k.endswith("lm_head.weight"))]
    for k in drop:
        del sd[k]
    sd.update(extra or {})
    feats = {"observation.state": stats["state"], "action": stats["actions"]}
    stat_tensors = {f"{f}.{n}": torch.tensor(v) for f, d in feats.items() for n, v in d.items()}
    if legacy_stats:
        for k, v in stat_tensors.items():
            f, _, n = k.rpartition(".")
            owner = "normalize_inputs" if f.startswith("observation") else "unnormalize_outputs"
            sd[f"{owner}.buffer_{f.replace('.', '_')}.{n}"] = v
    else:
        save_file({k: v for k, v in stat_tensors.items() if k.startswith("observation")},
                  str(folder / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
        save_file({k: v for k, v in stat_tensors.items() if k.startswith("action")},
                  str(folder / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    save_file(sd, str(folder / "model.safetensors"))
    meta = {"type": "pi0fast", "chunk_size": cfg.horizon, "n_action_steps": cfg.horizon,
            "max_action_dim": cfg.action_dim, "max_state_dim": cfg.state_dim, "fast_skip_tokens": cfg.fast_skip_tokens,
            "max_decoding_steps": cfg.max_decoding_steps,
            "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"}}
    if sizes:
        meta["vlafast_config"] = cfg.to_json()
    (folder / "config.json").write_text(json.dumps(meta))
    return folder


def write_openpi(folder: Path, policy: Pi0FASTPolicy, stats: dict, *, naming: str = "v5") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(paligemma_keys(policy, naming), str(folder / "model.safetensors"))
    (folder / "assets" / "tiny_robot").mkdir(parents=True)
    (folder / "assets" / "tiny_robot" / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))
    return folder


def same_weights(a: Pi0FASTPolicy, b: Pi0FASTPolicy) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("naming", ["old", "new", "v5"])
@pytest.mark.parametrize("legacy_stats", [False, True])
def test_load_lerobot_layouts(tmp_path, naming, legacy_stats):
    cfg = CONFIGS["mqa"]
    policy = random_policy(cfg, seed=23)
    stats = stats_for(4, 3)
    folder = write_lerobot(tmp_path / "ck", policy, stats, naming=naming, legacy_stats=legacy_stats,
                           tie=naming != "new")
    loaded = load_pi0fast(folder)
    assert loaded.cfg == cfg
    same_weights(loaded, policy)
    n = loaded.normalizer
    assert (n.state_mode, n.action_mode, n.convention, n.action_dim) == ("mean_std", "mean_std", "lerobot", 4)
    torch.testing.assert_close(n.actions.mean, torch.tensor(stats["actions"]["mean"]))
    x = inputs(cfg, 2, seed=24)
    assert torch.equal(loaded.generate(*x, POSTFIX).tokens, policy.generate(*x, POSTFIX).tokens)
    half = load_pi0fast(folder, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_lerobot_config_json_sets_published_sizes_and_lerobot_prompt(tmp_path):
    policy = random_policy(CONFIGS["tiny"])
    folder = write_lerobot(tmp_path / "ck", policy, stats_for(3, 3), sizes=False)
    with pytest.raises(CheckpointError) as err:  # published sizes from config.json: the tiny weights misfit
        load_pi0fast(folder)
    msg = str(err.value)
    assert "mis-shaped keys" in msg and "lerobot checkpoint" in msg
    loaded = load_pi0fast(folder, config=CONFIGS["tiny"])
    same_weights(loaded, policy)
    from vlafast.models.pi0fast_load import _lerobot_config

    meta = json.loads((folder / "config.json").read_text())
    big = _lerobot_config(meta)
    assert (big.horizon, big.action_dim, big.state_dim, big.pad_state, big.max_decoding_steps, big.vocab_size) == (
        4, 3, 5, False, 9, 257_152)


@pytest.mark.parametrize("naming", ["new", "v5", "old"])
def test_load_openpi_pytorch_layout(tmp_path, naming):
    cfg = CONFIGS["tiny"]
    policy = random_policy(cfg, seed=25)
    stats = stats_for(3, 5)
    folder = write_openpi(tmp_path / "ck", policy, stats, naming=naming)
    loaded = load_pi0fast(folder, config=cfg)
    same_weights(loaded, policy)
    n = loaded.normalizer
    assert (n.state_mode, n.action_mode, n.convention) == ("quantile", "quantile", "openpi")
    (folder / "config.json").write_text(json.dumps({"vlafast_config": cfg.to_json()}))
    same_weights(load_pi0fast(folder), policy)
    (folder / "assets" / "other").mkdir()
    (folder / "assets" / "other" / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))
    with pytest.raises(StatsError, match="pass asset_id"):
        load_pi0fast(folder)
    assert load_pi0fast(folder, asset_id="other").normalizer.state_mode == "quantile"


def test_load_errors_list_every_problem_at_once(tmp_path):
    cfg = CONFIGS["mqa"]
    policy = random_policy(cfg)
    layer0 = "model.pi0_paligemma.language_model.model.layers.0."
    bad = {layer0 + "mlp.up_proj.weight": torch.zeros(3, 3), "model.pi0_paligemma.extra.weight": torch.zeros(2),
           "model.action_out_proj.weight": torch.zeros(2, 2)}
    folder = write_lerobot(tmp_path / "ck", policy, stats_for(2, 2), drop=(layer0 + "mlp.up_proj.weight",
                                                                           layer0 + "mlp.gate_proj.weight"), extra=bad)
    with pytest.raises(CheckpointError) as err:
        load_pi0fast(folder)
    msg = str(err.value)
    for want in ("1 missing keys", "gate_proj", "2 unexpected keys", "extra.weight", "action_out_proj",
                 "1 mis-shaped keys", "up_proj.weight: checkpoint [3, 3]"):
        assert want in msg, (want, msg)
    (folder / "config.json").write_text(json.dumps({"type": "pi0"}))
    with pytest.raises(CheckpointError, match="not pi0fast"):
        load_pi0fast(folder)
    nostats = write_lerobot(tmp_path / "ns", policy, stats_for(2, 2))
    for f in nostats.glob("*normalizer_processor*"):
        f.unlink()
    with pytest.raises(StatsError, match="no normaliser statistics"):
        load_pi0fast(nostats)
    inf = stats_for(2, 2)
    inf["actions"]["std"][0] = float("inf")
    with pytest.raises(StatsError, match="non-finite"):
        load_pi0fast(write_lerobot(tmp_path / "inf", policy, inf))


def test_bench_module_runs_tiny_on_cpu():
    """The benchmark's CPU path (tiny config): both chunk rows decode the same tokens, the
    static-buffer decoder is the one the graph would replay, rows follow the schema."""
    import argparse

    from vlafast.bench import BENCHMARKS
    from vlafast.bench import pi0fast as bench

    assert "pi0fast" in BENCHMARKS
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    rows = bench.run(parser.parse_args(["--prompt-tokens", "7", "--steps", "5"]))
    ops = [(r.op, r.backend) for r in rows]
    if torch.cuda.is_available():
        assert ("chunk_decode", "graph-decode") in ops and ("decode_step", "graph-decode") in ops
    else:
        assert ops == [("chunk_decode", "eager"), ("chunk_decode", "static-eager"), ("decode_step", "eager")]
    assert all(r.median_ms > 0 for r in rows)
    assert rows[0].extra["tokens_match"] and rows[1].baseline == "eager" and rows[1].ratio > 0


def test_bench_random_weights_keep_siglip_gains_and_vision_alive():
    """The GPU benchmark's published-size model gets random weights on the meta device
    (``bench.core.random_weights_``); here the same rule on the tiny model: SigLIP's LayerNorm
    gains 1 (they scale by w), every other 1-D tensor 0 (Gemma's RMSNorm scales by 1 + w), and
    two different images give different vision tokens (with all gains 0 they were constant)."""
    from vlafast.bench.core import random_weights_
    from vlafast.bench.pi0fast import SIGLIP_GAINS

    torch.manual_seed(0)
    policy = Pi0FASTPolicy(Pi0FASTConfig.tiny()).eval()
    random_weights_(policy, SIGLIP_GAINS, torch.Generator().manual_seed(0))
    gains = {n: p for n, p in policy.named_parameters() if p.ndim == 1 and any(g in n for g in SIGLIP_GAINS)}
    assert gains and all(bool((p == 1).all()) for p in gains.values())
    assert all(bool((p == 0).all()) for n, p in policy.named_parameters() if p.ndim == 1 and n not in gains)
    size = policy.cfg.vision.image_size
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        tokens = policy.vision_tower(images)
    assert (tokens[0] - tokens[1]).abs().max() > 1e-3  # the images reach the tokens
