"""pi0 / pi0.5 numerics: the VLM prefix against stock transformers PaliGemma, the whole policy
against an independent naive implementation (full mask, no cache), cached vs uncached, padding,
bf16, the steering slot and the published parameter counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers_ckpt import random_obs, random_policy
from vlafast.models import Pi0Config, Pi0Observation, Pi0Policy, discretize_state, pi05_state_prompt, preprocess_images

VARIANTS = [False, True]
IDS = ["pi0", "pi05"]


# ----------------------------------------------------------------------------------------------
# naive reference: written from the state dict with explicit loops, a hand-built block mask,
# per-pair RoPE, manual softmax, no cache. Shares no code with vlafast.models.


def _rms(x, w, eps=1e-6):
    return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * (1.0 + w)


def _ln(x, w, b, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _rope(x, pos, theta=10_000.0):
    """x: [S, H, E] rotated per (i, i + E/2) pair by angle pos * theta^(-2i/E)."""
    E = x.shape[-1]
    out = x.clone()
    for i in range(E // 2):
        ang = pos.double() * theta ** (-2.0 * i / E)
        c, s = torch.cos(ang).float()[:, None], torch.sin(ang).float()[:, None]
        a, b = x[..., i], x[..., i + E // 2]
        out[..., i] = a * c - b * s
        out[..., i + E // 2] = b * c + a * s
    return out


def _naive_siglip(sd, cfg, img):
    """img: [3, H, W] -> [P, D_vlm]."""
    pre = "paligemma_with_expert.paligemma.model."
    v = cfg.vision
    ps = v.patch_size
    n = v.image_size // ps
    patches = [img[:, r * ps:(r + 1) * ps, c * ps:(c + 1) * ps].reshape(-1) for r in range(n) for c in range(n)]
    w = sd[pre + "vision_tower.vision_model.embeddings.patch_embedding.weight"].reshape(v.width, -1)
    x = torch.stack(patches) @ w.T + sd[pre + "vision_tower.vision_model.embeddings.patch_embedding.bias"]
    x = x + sd[pre + "vision_tower.vision_model.embeddings.position_embedding.weight"]
    hd = v.width // v.num_heads
    for l in range(v.depth):
        p = f"{pre}vision_tower.vision_model.encoder.layers.{l}."
        h = _ln(x, sd[p + "layer_norm1.weight"], sd[p + "layer_norm1.bias"])
        q, k, vv = (h @ sd[p + f"self_attn.{n_}_proj.weight"].T + sd[p + f"self_attn.{n_}_proj.bias"] for n_ in "qkv")
        heads = []
        for hh in range(v.num_heads):
            sl = slice(hh * hd, (hh + 1) * hd)
            a = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(hd), dim=-1)
            heads.append(a @ vv[:, sl])
        x = x + torch.cat(heads, -1) @ sd[p + "self_attn.out_proj.weight"].T + sd[p + "self_attn.out_proj.bias"]
        h = _ln(x, sd[p + "layer_norm2.weight"], sd[p + "layer_norm2.bias"])
        h = _gelu_tanh(h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"])
        x = x + h @ sd[p + "mlp.fc2.weight"].T + sd[p + "mlp.fc2.bias"]
    x = _ln(x, sd[pre + "vision_tower.vision_model.post_layernorm.weight"], sd[pre + "vision_tower.vision_model.post_layernorm.bias"])
    return x @ sd[pre + "multi_modal_projector.linear.weight"].T + sd[pre + "multi_modal_projector.linear.bias"]


def _sincos(t, dim):
    out = []
    for i in range(dim // 2):
        period = 4e-3 * (4.0 / 4e-3) ** (i / (dim // 2 - 1))
        out.append(2 * math.pi * t / period)
    a = torch.tensor(out, dtype=torch.float64)
    return torch.cat([a.sin(), a.cos()]).float()


def naive_velocity(sd, cfg: Pi0Config, obs: Pi0Observation, x_t, t, state, return_hidden=False):
    """Full-sequence forward for each batch row separately; returns v [B, T, A]."""
    pi05 = cfg.is_pi05
    vs, hs = [], []
    E = cfg.vlm.head_dim
    for b in range(x_t.shape[0]):
        # prefix tokens, validity, block ids
        toks, valid, block, stack = [], [], [], []
        for view in range(obs.images.shape[1]):
            img_tok = _naive_siglip(sd, cfg, obs.images[b, view])
            for row in img_tok:
                toks.append(row); valid.append(bool(obs.image_masks[b, view])); block.append(0); stack.append(0)
        emb = sd["paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"]
        for i, tok in enumerate(obs.tokens[b]):
            toks.append(emb[tok] * math.sqrt(cfg.vlm.width)); valid.append(bool(obs.token_masks[b, i])); block.append(0); stack.append(0)
        # suffix
        temb = _sincos(float(t[b]), cfg.expert.width)
        act = x_t[b] @ sd["action_in_proj.weight"].T + sd["action_in_proj.bias"]
        cond = None
        if pi05:
            c = F.silu(temb @ sd["time_mlp_in.weight"].T + sd["time_mlp_in.bias"])
            cond = F.silu(c @ sd["time_mlp_out.weight"].T + sd["time_mlp_out.bias"])
            act_block = 1
        else:
            toks.append(state[b] @ sd["state_proj.weight"].T + sd["state_proj.bias"]); valid.append(True); block.append(1); stack.append(1)
            h = torch.cat([act, temb[None].expand(act.shape[0], -1)], -1)
            h = F.silu(h @ sd["action_time_mlp_in.weight"].T + sd["action_time_mlp_in.bias"])
            act = h @ sd["action_time_mlp_out.weight"].T + sd["action_time_mlp_out.bias"]
            act_block = 2
        for row in act:
            toks.append(row); valid.append(True); block.append(act_block); stack.append(1)
        N = len(toks)
        pos = torch.tensor(np.cumsum(valid) - 1)
        allowed = torch.tensor([[valid[i] and valid[j] and block[j] <= block[i] for j in range(N)] for i in range(N)])
        pre_idx = [i for i in range(N) if stack[i] == 0]
        suf_idx = [i for i in range(N) if stack[i] == 1]
        xs = [torch.stack([toks[i] for i in pre_idx]), torch.stack([toks[i] for i in suf_idx])]
        roots = ["paligemma_with_expert.paligemma.model.language_model.", "paligemma_with_expert.gemma_expert.model."]

        def norm(x, key, s):
            if s == 1 and pi05:
                m = cond @ sd[key + ".dense.weight"].T + sd[key + ".dense.bias"]
                D = x.shape[-1]
                xn = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6)
                return xn * (1 + m[:D]) + m[D:2 * D], m[2 * D:]
            return _rms(x, sd[key + ".weight"]), None

        for l in range(cfg.vlm.depth):
            q_all = torch.zeros(N, cfg.vlm.num_heads, E)
            k_all = torch.zeros(N, cfg.vlm.num_kv_heads, E)
            v_all = torch.zeros(N, cfg.vlm.num_kv_heads, E)
            gates = []
            for s, idx in enumerate((pre_idx, suf_idx)):
                p = f"{roots[s]}layers.{l}."
                h, g = norm(xs[s], p + "input_layernorm", s)
                gates.append(g)
                q = (h @ sd[p + "self_attn.q_proj.weight"].T).reshape(len(idx), -1, E)
                k = (h @ sd[p + "self_attn.k_proj.weight"].T).reshape(len(idx), -1, E)
                v = (h @ sd[p + "self_attn.v_proj.weight"].T).reshape(len(idx), -1, E)
                q_all[idx], k_all[idx], v_all[idx] = _rope(q, pos[idx]), _rope(k, pos[idx]), v
            out = torch.zeros(N, cfg.vlm.num_heads * E)
            group = cfg.vlm.num_heads // cfg.vlm.num_kv_heads
            for i in range(N):
                keys = allowed[i].nonzero().flatten()
                if len(keys) == 0:
                    continue  # padded query: output unused
                for hh in range(cfg.vlm.num_heads):
                    sc = k_all[keys, hh // group] @ q_all[i, hh] / math.sqrt(E)
                    w = torch.exp(sc - sc.max())
                    out[i, hh * E:(hh + 1) * E] = (w / w.sum()) @ v_all[keys, hh // group]
            for s, idx in enumerate((pre_idx, suf_idx)):
                p = f"{roots[s]}layers.{l}."
                y = out[idx] @ sd[p + "self_attn.o_proj.weight"].T
                x = xs[s] + (y if gates[s] is None else y * gates[s])
                h, g = norm(x, p + "post_attention_layernorm", s)
                m = _gelu_tanh(h @ sd[p + "mlp.gate_proj.weight"].T) * (h @ sd[p + "mlp.up_proj.weight"].T)
                y = m @ sd[p + "mlp.down_proj.weight"].T
                xs[s] = x + (y if g is None else y * g)
        fin, _ = norm(xs[1], roots[1] + "norm", 1)
        fin = fin[-cfg.horizon:]
        hs.append(fin)
        vs.append(fin @ sd["action_out_proj.weight"].T + sd["action_out_proj.bias"])
    v = torch.stack(vs)
    return (v, torch.stack(hs)) if return_hidden else v


def naive_sample(sd, cfg, obs, noise, state, steps):
    """openpi's loop: time starts at 1.0, time += dt while time >= -dt/2."""
    dt = -1.0 / steps
    x, time = noise.clone(), 1.0
    while time >= -dt / 2:
        x = x + dt * naive_velocity(sd, cfg, obs, x, torch.full((x.shape[0],), time), state)
        time += dt
    return x


# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pi05", VARIANTS, ids=IDS)
def test_velocity_matches_naive_reference(pi05):
    cfg = Pi0Config.tiny(pi05=pi05)
    policy = random_policy(cfg)
    sd = {k: v.detach() for k, v in policy.state_dict().items()}
    obs = random_obs(cfg, batch=2, pad_last=2, drop_view=True)
    x = torch.randn(2, cfg.horizon, cfg.action_dim)
    t = torch.tensor([0.83, 0.31])
    state = policy.prepare_state(obs.state)
    with torch.no_grad():
        cache = policy.embed_prefix(obs.images, obs.image_masks, obs.tokens, obs.token_masks)
        v, h = policy.velocity(x, t, state, cache, return_hidden=True)
    ref_v, ref_h = naive_velocity(sd, cfg, obs, x, t, state, return_hidden=True)
    assert v.dtype == torch.float32 and h.shape == (2, cfg.horizon, cfg.expert.width)
    assert v.abs().mean() > 0.1  # not a degenerate comparison
    torch.testing.assert_close(v, ref_v, rtol=0, atol=2e-5)  # measured max 1.8e-6
    torch.testing.assert_close(h, ref_h, rtol=0, atol=2e-5)  # measured max 2.0e-6


@pytest.mark.parametrize("pi05", VARIANTS, ids=IDS)
def test_sample_actions_matches_naive_euler(pi05):
    cfg = Pi0Config.tiny(pi05=pi05, num_steps=3)
    policy = random_policy(cfg, seed=3)
    sd = {k: v.detach() for k, v in policy.state_dict().items()}
    obs = random_obs(cfg, batch=1, views=1, tokens=3, seed=4)
    noise = torch.randn(1, cfg.horizon, cfg.action_dim, generator=torch.Generator().manual_seed(5))
    out = policy.sample_actions(obs, noise=noise)
    ref = naive_sample(sd, cfg, obs, noise, policy.prepare_state(obs.state), 3)
    torch.testing.assert_close(out, ref, rtol=0, atol=5e-5)  # measured max 1.6e-6 (t grid 1-k/K vs summed dt)


@pytest.mark.parametrize("pi05", VARIANTS, ids=IDS)
@pytest.mark.parametrize("batch", [1, 3])
def test_cached_matches_uncached(pi05, batch):
    cfg = Pi0Config.tiny(pi05=pi05)
    policy = random_policy(cfg, seed=batch)
    obs = random_obs(cfg, batch=batch, views=3, tokens=7, pad_last=3, drop_view=True)
    x = torch.randn(batch, cfg.horizon, cfg.action_dim)
    t = torch.rand(batch)
    state = policy.prepare_state(obs.state)
    with torch.no_grad():
        cached = policy.velocity(x, t, state, policy.embed_prefix(obs.images, obs.image_masks, obs.tokens, obs.token_masks))
        joint = policy.joint_velocity(obs, x, t, state)
    torch.testing.assert_close(cached, joint, rtol=0, atol=1e-5)  # measured max 7.2e-7


@pytest.mark.parametrize("pi05", VARIANTS, ids=IDS)
def test_padding_does_not_leak(pi05):
    """A row with right-padded prompt tokens (garbage ids under the padding) acts like the
    same row without them; an absent view acts like no view at all."""
    cfg = Pi0Config.tiny(pi05=pi05)
    policy = random_policy(cfg)
    obs = random_obs(cfg, batch=1, views=2, tokens=6, pad_last=2, drop_view=True)
    trimmed = Pi0Observation(obs.images[:, :1], obs.image_masks[:, :1], obs.tokens[:, :4], obs.token_masks[:, :4], obs.state)
    noise = torch.randn(1, cfg.horizon, cfg.action_dim)
    a = policy.sample_actions(obs, noise=noise)
    b = policy.sample_actions(trimmed, noise=noise)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # measured max 6.0e-7


def test_prefix_does_not_depend_on_the_suffix_and_steps_do_not_grow_the_cache():
    cfg = Pi0Config.tiny()
    policy = random_policy(cfg)
    obs = random_obs(cfg, batch=2)
    cache = policy.embed_prefix(obs.images, obs.image_masks, obs.tokens, obs.token_masks)
    lengths = [k.shape[2] for k in cache.keys]
    state = policy.prepare_state(obs.state)
    with torch.no_grad():
        v1 = policy.velocity(torch.randn(2, 7, 6), torch.rand(2), state, cache)
        policy.velocity(torch.randn(2, 7, 6), torch.rand(2), state, cache)
    assert [k.shape[2] for k in cache.keys] == lengths
    assert torch.isfinite(v1).all()


@pytest.mark.parametrize("pi05", VARIANTS, ids=IDS)
def test_bf16_close_to_fp32(pi05):
    cfg = Pi0Config.tiny(pi05=pi05)
    policy = random_policy(cfg)
    obs = random_obs(cfg, batch=2, pad_last=1)
    noise = torch.randn(2, cfg.horizon, cfg.action_dim)
    ref = policy.sample_actions(obs, noise=noise)
    low = policy.to(torch.bfloat16).sample_actions(obs, noise=noise)
    assert low.dtype == torch.float32
    err = (low - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err  # measured max 2.9e-2 (pi0), 1.2e-2 (pi05) vs |ref| max 3.0 / 4.2


def test_prefix_matches_transformers_paligemma():
    transformers = pytest.importorskip("transformers")
    cfg = Pi0Config.tiny()
    policy = random_policy(cfg)
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
    hf_keys = set(hf.state_dict())
    ours = {}
    for k, t in policy.state_dict().items():
        if k.startswith("paligemma_with_expert.paligemma."):
            k = k[len("paligemma_with_expert.paligemma."):]
            if k not in hf_keys:  # transformers 5 drops the `vision_model.` level
                k = k.replace("vision_tower.vision_model.", "vision_tower.")
            ours[k] = t
    missing, unexpected = hf.load_state_dict(ours, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}, (missing, unexpected)

    obs = random_obs(cfg, batch=2, views=2, tokens=6, pad_last=2)
    B, V = obs.images.shape[:2]
    with torch.no_grad():
        # SigLIP + projector (transformers 4.x get_image_features also divided by sqrt(width); pi0 does not)
        pix = obs.images.reshape(B * V, 3, v.image_size, v.image_size)
        hf_img = hf.model.multi_modal_projector(hf.model.vision_tower(pixel_values=pix).last_hidden_state)
        our_img = policy.projector(policy.vision_tower(pix))
        torch.testing.assert_close(our_img, hf_img, rtol=0, atol=1e-5)  # measured max 0 (same op order)

        cache = policy.embed_prefix(obs.images, obs.image_masks, obs.tokens, obs.token_masks, keep_hidden_states=True)
        emb = cache.hidden_states[0]
        pad = cache.pad_mask
        mask = torch.zeros(B, 1, pad.shape[1], pad.shape[1]).masked_fill(~(pad[:, None, :] & pad[:, :, None])[:, None], -1e30)
        lm = hf.model.language_model
        if hasattr(lm.embed_tokens, "embed_scale"):
            # transformers >= 5 scales inside the embedding (= pi0's language-token scaling) and
            # leaves inputs_embeds alone: check the language tokens of the prefix against it.
            n_img = V * v.num_patches
            torch.testing.assert_close(emb[:, n_img:], lm.embed_tokens(obs.tokens), rtol=0, atol=1e-6)  # measured 0
            stack_in = emb
        else:  # transformers 4.x multiplies inputs_embeds by sqrt(width); undo it
            stack_in = emb / math.sqrt(g.width)
        out = lm(inputs_embeds=stack_in, attention_mask=mask, position_ids=torch.cumsum(pad.long(), 1) - 1,
                 output_hidden_states=True, use_cache=True)
    hf_cache = out.get("cache") or out.past_key_values  # renamed in transformers 5
    for l in range(g.depth):  # K (after RoPE) and V per layer: what the expert reads
        layer = hf_cache.layers[l] if hasattr(hf_cache, "layers") else None
        hf_k = layer.keys if layer is not None else hf_cache.key_cache[l]
        hf_v = layer.values if layer is not None else hf_cache.value_cache[l]
        torch.testing.assert_close(cache.keys[l], hf_k, rtol=1e-5, atol=1e-5)  # measured max 0
        torch.testing.assert_close(cache.values[l], hf_v, rtol=1e-5, atol=1e-5)  # measured max 0
    valid = pad[:, :, None]
    for l in range(g.depth):  # hidden_states[l] = residual stream entering layer l
        torch.testing.assert_close(cache.hidden_states[l] * valid, out.hidden_states[l] * valid,
                                   rtol=1e-5, atol=1e-5)  # measured max 0
    torch.testing.assert_close(cache.hidden * valid, out.last_hidden_state * valid, rtol=1e-5, atol=1e-5)  # measured 0


def test_steer_slot_corrects_down_proj_output_and_removal_is_exact():
    cfg = Pi0Config.tiny()
    policy = random_policy(cfg)
    obs = random_obs(cfg, batch=2)
    noise = torch.randn(2, cfg.horizon, cfg.action_dim)
    base = policy.sample_actions(obs, noise=noise)
    names = [n for n, _ in policy.mlps()]
    assert names == ["vlm.0", "vlm.1", "expert.0", "expert.1"]
    # vlm.0: the LAST VLM layer's MLP feeds only the prefix output, never the cached K/V, so
    # steering it cannot move the actions.
    mlp = dict(policy.mlps())["vlm.0"]
    S, alpha = torch.tensor([3, 17, 40]), 4.0
    W = mlp.down_proj.weight

    def clamp(h, y):  # docs/architecture.md §2: y + W_S (alpha 1 - h_S)
        return y + (alpha - h[..., S]) @ W[:, S].T

    seen = {}

    def check(h, y):
        seen["h"], seen["y"] = h, y
        return clamp(h, y)

    mlp.steer = check
    steered = policy.sample_actions(obs, noise=noise)
    torch.testing.assert_close(seen["y"], F.linear(seen["h"], W), rtol=0, atol=1e-6)  # measured 0: y = W h
    h = seen["h"].clone()
    h[..., S] = alpha
    torch.testing.assert_close(clamp(seen["h"], seen["y"]), F.linear(h, W), rtol=1e-5, atol=1e-5)  # measured 1.4e-6
    assert (steered - base).abs().max() > 1e-3
    mlp.steer = None
    assert torch.equal(policy.sample_actions(obs, noise=noise), base)


def test_published_parameter_counts_on_meta():
    with torch.device("meta"):
        pi0 = Pi0Policy(Pi0Config.pi0())
        pi05 = Pi0Policy(Pi0Config.pi05())
    n0 = sum(p.numel() for p in pi0.parameters())
    n5 = sum(p.numel() for p in pi05.parameters())
    assert 3.2e9 < n0 < 3.4e9, n0  # published ~3.3B; measured 3,238,048,528
    # pi0.5: adaRMS dense (1024 -> 3072) on 37 expert norms replaces state_proj / action_time_mlp
    w = 1024
    assert n5 - n0 == 37 * (3 * w * w + 3 * w - w) + 2 * (w * w + w) - (32 * w + w) - (2 * w * w + w) - (w * w + w)
    lm = pi0.language_model
    assert tuple(lm.embed_tokens.weight.shape) == (257_152, 2048) and len(lm.layers) == 18
    assert tuple(lm.layers[0].mlp.down_proj.weight.shape) == (2048, 16_384)
    assert tuple(pi0.expert.layers[0].self_attn.k_proj.weight.shape) == (256, 1024)
    assert pi0.vision_tower.cfg.num_patches == 256


def test_input_errors_name_the_fix():
    cfg = Pi0Config.tiny()
    policy = random_policy(cfg)
    obs = random_obs(cfg, batch=2)
    cache = policy.embed_prefix(obs.images, obs.image_masks, obs.tokens, obs.token_masks)
    with pytest.raises(ValueError, match=r"x_t must be \[B, T, A\] = \[2, 7, 6\]"):
        policy.velocity(torch.zeros(2, 7, 5), torch.zeros(2), policy.prepare_state(obs.state), cache)
    with pytest.raises(ValueError, match="normalised, padded state"):
        policy.velocity(torch.zeros(2, 7, 6), torch.zeros(2), None, cache)
    with pytest.raises(ValueError, match=r"images must be \[B, V, 3, 24, 24\]"):
        policy.embed_prefix(obs.images[:, :, :, :20], obs.image_masks, obs.tokens, obs.token_masks)
    with pytest.raises(ValueError, match="noise must be"):
        policy.sample_actions(obs, noise=torch.zeros(2, 3, 6))


def test_discretize_state_matches_numpy_digitize():
    x = torch.tensor([[-1.2, -1.0, -0.99, -0.5, 0.0, 0.003, 0.5, 0.9999, 1.0 - 1e-7, 1.5]])
    ref = np.digitize(x.numpy(), bins=np.linspace(-1, 1, 257)[:-1]) - 1
    assert discretize_state(x).tolist() == ref.tolist()
    assert pi05_state_prompt("pick_up the cup\n", torch.tensor([3, 250])) == "Task: pick up the cup, State: 3 250;\nAction: "


def test_preprocess_images_scales_resizes_and_pads_black():
    g = torch.Generator().manual_seed(0)
    square = torch.randint(0, 256, (2, 3, 16, 16, 3), dtype=torch.uint8, generator=g)
    out = preprocess_images(square, size=16)
    assert out.shape == (2, 3, 3, 16, 16)
    torch.testing.assert_close(out, square.permute(0, 1, 4, 2, 3).float() / 255 * 2 - 1, rtol=0, atol=1e-6)  # measured 0
    wide = torch.full((1, 1, 10, 20, 3), 255, dtype=torch.uint8)  # 2:1 -> 16 x 8, padded 4 rows top and bottom
    out = preprocess_images(wide, size=16)
    assert torch.all(out[..., :4, :] == -1) and torch.all(out[..., 12:, :] == -1)
    torch.testing.assert_close(out[..., 4:12, :], torch.ones(1, 1, 3, 8, 16))  # measured 0
    with pytest.raises(ValueError, match=r"uint8 \[B, V, H, W, 3\]"):
        preprocess_images(square.float())


@pytest.mark.parametrize("pi05", VARIANTS, ids=IDS)
def test_flow_matching_loss_matches_naive_and_backpropagates(pi05):
    cfg = Pi0Config.tiny(pi05=pi05)
    policy = random_policy(cfg, seed=11)
    sd = {k: v.detach() for k, v in policy.state_dict().items()}
    obs = random_obs(cfg, batch=2, views=1, tokens=4, pad_last=1)
    actions = torch.randn(2, cfg.horizon, 4)  # 4 real dims of 6
    noise = torch.randn(2, cfg.horizon, cfg.action_dim)
    time = torch.tensor([0.9, 0.2])
    loss = policy.flow_matching_loss(obs, actions, noise=noise, time=time)
    padded = F.pad(actions, (0, 2))
    x_t = time[:, None, None] * noise + (1 - time[:, None, None]) * padded
    ref = (naive_velocity(sd, cfg, obs, x_t, time, policy.prepare_state(obs.state)) - (noise - padded)) ** 2
    assert loss.shape == (2, cfg.horizon, 4)
    torch.testing.assert_close(loss, ref[..., :4], rtol=1e-4, atol=2e-5)  # measured max 6.9e-6 (loss values up to ~10)
    loss.mean().backward()
    grad = policy.expert.layers[0].mlp.down_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("pi05", VARIANTS, ids=IDS)
def test_velocity_fn_drives_the_flow_sampler(pi05):
    """policy.velocity_fn / encode plug into vlafast.flow: its ODE sampler reproduces
    sample_actions, and Flow-Noise gets the expert hidden states."""
    from vlafast import flow

    cfg = Pi0Config.tiny(pi05=pi05)
    policy = random_policy(cfg)
    obs = random_obs(cfg, batch=2, pad_last=1)
    noise = torch.randn(2, cfg.horizon, cfg.action_dim)
    ctx = policy.encode(obs)
    with torch.no_grad():
        actions, _ = flow.sample(flow.ode(num_steps=cfg.num_steps), policy.velocity_fn(), ctx, noise)
        v, h = policy.velocity_fn(return_hidden=True)(noise, torch.ones(2), ctx)
    torch.testing.assert_close(actions, policy.sample_actions(obs, noise=noise), rtol=0, atol=1e-5)  # measured max 0
    assert v.shape == noise.shape and h.shape == (2, cfg.horizon, cfg.expert.width)


@pytest.mark.parametrize("pi05", VARIANTS, ids=IDS)
def test_sample_actions_is_the_flow_ode_sampler(pi05):
    """sample_actions is flow.sample(flow.ode(K), velocity_fn(), encode(obs), noise), with RTC its
    guidance option on the normalised, padded targets: bit for bit, noise from the generator
    drawn as torch.randn([B, T, A])."""
    from vlafast import flow

    cfg = Pi0Config.tiny(pi05=pi05, num_steps=3)
    policy = random_policy(cfg, seed=6)
    obs = random_obs(cfg, batch=2, views=1, tokens=3, seed=7)
    shape = (2, cfg.horizon, cfg.action_dim)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    ctx = policy.encode(obs)
    want, _ = flow.sample(flow.ode(3), policy.velocity_fn(), ctx, noise)
    assert torch.equal(policy.sample_actions(obs, noise=noise), want)
    assert torch.equal(policy.sample_actions(obs, generator=torch.Generator().manual_seed(8)), want)
    want5, _ = flow.sample(flow.ode(5), policy.velocity_fn(), ctx, noise)
    assert torch.equal(policy.sample_actions(obs, noise=noise, num_steps=5), want5)
    prefix = torch.randn(2, cfg.horizon, 4, generator=torch.Generator().manual_seed(9))
    w = flow.prefix_weights(cfg.horizon, d=2, s=2)
    target, weights = policy._rtc_targets(prefix, w, 2)  # noqa: SLF001
    guided, _ = flow.sample(flow.ode(3), policy.velocity_fn(), ctx, noise,
                            guidance=flow.RTCGuidance(target, weights, 2.0))
    assert torch.equal(policy.sample_actions(obs, noise=noise, prefix=prefix, prefix_weights=w, max_guidance=2.0), guided)
    assert not torch.equal(guided, want)


# ----------------------------------------------------------------------------------------------
# real-time chunking (RTC) in sample_actions


def _rows(obs: Pi0Observation, b: int) -> Pi0Observation:
    fields = ("images", "image_masks", "tokens", "token_masks", "state")
    return Pi0Observation(*(None if getattr(obs, f) is None else getattr(obs, f)[b:b + 1] for f in fields))


def direct_rtc_sample(sd, cfg, obs, noise, state, steps, target, weights, beta):
    """RTC written out: for each row, the full Jacobian J of the denoised estimate x - t v(x)
    (naive velocity, autograd.functional.jacobian) and the step x <- x - v / K + c_tau / K *
    J^T (W * (Y - x0_hat)), c_tau = min(beta, (1 - tau) / (tau r^2)), tau = 1 - t."""
    x = noise.clone()
    for k in range(steps):
        t = 1.0 - k / steps
        tau = 1.0 - t
        rows = []
        for b in range(x.shape[0]):
            ob, sb = _rows(obs, b), None if state is None else state[b:b + 1]

            def denoised(xb):
                return xb - t * naive_velocity(sd, cfg, ob, xb[None], torch.full((1,), t), sb)[0]

            xb = x[b]
            J = torch.autograd.functional.jacobian(denoised, xb, vectorize=True)  # [T, A, T, A]: d x0_hat / d x
            x0 = denoised(xb)
            v = (xb - x0) / t
            g = torch.einsum("ijkl,ij->kl", J, weights[b] * (target[b] - x0))
            r2 = (1 - tau) ** 2 / (tau**2 + (1 - tau) ** 2)
            c = beta if tau == 0 else min(beta, (1 - tau) / (tau * r2))
            rows.append(xb - v / steps + c / steps * g)
        x = torch.stack(rows)
    return x


@pytest.mark.parametrize("pi05", VARIANTS, ids=IDS)
def test_rtc_sample_matches_a_direct_jacobian_implementation(pi05):
    from vlafast.flow import prefix_weights

    cfg = Pi0Config.tiny(pi05=pi05, num_steps=3)
    policy = random_policy(cfg, seed=3)
    sd = {k: v.detach() for k, v in policy.state_dict().items()}
    obs = random_obs(cfg, batch=2, views=1, tokens=3, seed=4)
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(2, cfg.horizon, cfg.action_dim, generator=g)
    prefix = torch.randn(2, cfg.horizon, 4, generator=g)  # the env's 4 action dims of the model's 6
    w = prefix_weights(cfg.horizon, d=2, s=2)
    out = policy.sample_actions(obs, noise=noise, prefix=prefix, prefix_weights=w, max_guidance=5.0)
    W = (w[:, None] * (torch.arange(cfg.action_dim) < 4)).float().expand(2, -1, -1)
    Y = F.pad(prefix, (0, 2))
    ref = direct_rtc_sample(sd, cfg, obs, noise, policy.prepare_state(obs.state), 3, Y, W, 5.0)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)  # measured max 9.5e-6 (pi0), 1.3e-6 (pi0.5)
    plain = policy.sample_actions(obs, noise=noise)
    live = w > 0
    err = lambda a: float((a[:, live, :4] - prefix[:, live]).abs().mean())  # noqa: E731
    assert err(out) < 0.5 * err(plain), (err(out), err(plain))  # guidance pulls the frozen part
    zero = policy.sample_actions(obs, noise=noise, prefix=prefix, prefix_weights=torch.zeros(cfg.horizon))
    torch.testing.assert_close(zero, plain, rtol=0, atol=1e-5)  # W = 0: plain Euler up to v / K vs dt * v (measured 1.4e-6)


def test_rtc_prefix_is_in_the_unnormalised_output_space():
    """With a normaliser the prefix comes in robot units (what the robot executes) and the
    output follows it there; per-row weights; shape errors name the fix."""
    from vlafast.models.normalize import FeatureStats, Normalizer

    cfg = Pi0Config.tiny(num_steps=4)
    policy = random_policy(cfg, seed=1)
    policy.normalizer = Normalizer(FeatureStats(mean=torch.zeros(5), std=torch.ones(5)),
                                   FeatureStats(mean=torch.tensor([0.5, -2.0, 10.0]), std=torch.tensor([0.1, 3.0, 2.0])),
                                   "mean_std", "mean_std", "openpi")
    obs = random_obs(cfg, batch=2, views=1, tokens=3, seed=2)
    noise = torch.randn(2, cfg.horizon, cfg.action_dim, generator=torch.Generator().manual_seed(3))
    plain = policy.sample_actions(obs, noise=noise)
    assert plain.shape == (2, cfg.horizon, 3)
    prefix = plain + torch.tensor([0.2, 6.0, 4.0])  # two stds off the plain chunk, in robot units
    w = torch.stack([torch.ones(cfg.horizon), torch.zeros(cfg.horizon)])  # row 0 guided everywhere, row 1 not
    out = policy.sample_actions(obs, noise=noise, prefix=prefix, prefix_weights=w)
    scale = torch.tensor([0.1, 3.0, 2.0])
    assert float(((out[0] - prefix[0]) / scale).abs().mean()) < 0.3 * 2.0  # pulled from 2 stds to < 0.6
    torch.testing.assert_close(out[1], plain[1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"prefix must be \[B=2, T=7, A_out=3\]"):
        policy.sample_actions(obs, noise=noise, prefix=prefix[..., :2], prefix_weights=w)
    with pytest.raises(ValueError, match=r"prefix_weights must be \[T=7\] or \[B=2, T=7\]"):
        policy.sample_actions(obs, noise=noise, prefix=prefix, prefix_weights=w[:, :3])
    with pytest.raises(ValueError, match="needs both prefix"):
        policy.sample_actions(obs, noise=noise, prefix=prefix)
