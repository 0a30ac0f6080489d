"""Tiny pi0 / pi0.5 checkpoints for tests, written in the LeRobot and openpi layouts with the
published key names and shape rules (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from vlafast.models import Pi0Config, Pi0Observation, Pi0Policy


def random_policy(cfg: Pi0Config, seed: int = 0) -> Pi0Policy:
    """A policy with every parameter random (norm weights and biases too, so a mix-up of
    (1 + w) vs w or a dropped bias shows), scaled so activations stay O(1)."""
    torch.manual_seed(seed)
    policy = Pi0Policy(cfg).eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
            elif p.ndim == 1:
                p.normal_(0.0, 0.1)
            elif "embed_tokens" in name or "position_embedding" in name:
                p.normal_(0.0, 0.5 if "position" in name else 1.0 / cfg.vlm.width ** 0.5)
            elif ".dense." in name:
                p.normal_(0.0, 0.3 / p.shape[1] ** 0.5)
            else:
                fan_in = p[0].numel()
                p.normal_(0.0, 1.0 / fan_in ** 0.5)
    return policy


def random_obs(cfg: Pi0Config, batch: int, views: int = 2, tokens: int = 5, *, seed: int = 1,
               state_dim: int | None = None, pad_last: int = 0, drop_view: bool = False) -> Pi0Observation:
    """Random inputs; ``pad_last`` pads that many prompt tokens of the last row, ``drop_view``
    marks the last view of row 0 absent."""
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    images = torch.rand(batch, views, 3, s, s, generator=g) * 2 - 1
    image_masks = torch.ones(batch, views, dtype=torch.bool)
    if drop_view:
        image_masks[0, -1] = False
    toks = torch.randint(0, cfg.vocab_size, (batch, tokens), generator=g)
    token_masks = torch.ones(batch, tokens, dtype=torch.bool)
    if pad_last:
        token_masks[-1, tokens - pad_last:] = False
    state = None if cfg.is_pi05 else torch.randn(batch, state_dim or cfg.state_dim, generator=g)
    return Pi0Observation(images, image_masks, toks, token_masks, state)


def stats_for(action_dim: int, state_dim: int, seed: int = 2) -> dict[str, dict[str, list[float]]]:
    g = torch.Generator().manual_seed(seed)

    def feat(d: int) -> dict[str, list[float]]:
        mean = torch.randn(d, generator=g)
        q01 = mean - 1.0 - torch.rand(d, generator=g)
        return {"mean": mean.tolist(), "std": (0.5 + torch.rand(d, generator=g)).tolist(),
                "q01": q01.tolist(), "q99": (mean + 1.0 + torch.rand(d, generator=g)).tolist()}

    return {"state": feat(state_dim), "actions": feat(action_dim)}


def _tensors(policy: Pi0Policy, prefix: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    sd = {prefix + k: v.detach().to(dtype).contiguous() for k, v in policy.state_dict().items()}
    # The published files carry the tied LM head beside the input embedding.
    emb = prefix + "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
    sd[prefix + "paligemma_with_expert.paligemma.lm_head.weight"] = sd[emb].clone()
    return sd


def write_lerobot(folder: Path, policy: Pi0Policy, stats: dict, *, dtype: torch.dtype = torch.float32,
                  drop: tuple[str, ...] = (), extra: dict[str, torch.Tensor] | None = None,
                  legacy_stats: bool = False, with_stats: bool = True, sizes: bool = False) -> Path:
    """LeRobot layout: config.json, model.safetensors (``model.`` prefix), processor stats.
    ``sizes``: also record the exact (tiny) sizes in config.json's ``vlafast_config`` so the
    folder loads without ``config=`` (``vlafast.policies.load``, the CLI)."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = policy.cfg
    sd = _tensors(policy, "model.", dtype)
    for k in drop:
        del sd["model." + k]
    sd.update(extra or {})
    mode = "QUANTILES" if cfg.is_pi05 else "MEAN_STD"
    feats = {"observation.state": stats["state"], "action": stats["actions"]}
    stat_tensors = {f"{f}.{n}": torch.tensor(v) for f, d in feats.items() for n, v in d.items()}
    if with_stats and legacy_stats:
        for k, v in stat_tensors.items():
            f, _, n = k.rpartition(".")
            owner = "normalize_inputs" if f.startswith("observation") else "unnormalize_outputs"
            sd[f"{owner}.buffer_{f.replace('.', '_')}.{n}"] = v
    save_file(sd, str(folder / "model.safetensors"))
    if with_stats and not legacy_stats:
        pre = {k: v for k, v in stat_tensors.items() if k.startswith("observation")}
        post = {k: v for k, v in stat_tensors.items() if k.startswith("action")}
        save_file(pre, str(folder / "policy_preprocessor_step_3_normalizer_processor.safetensors"))
        save_file(post, str(folder / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    meta = {
        "type": cfg.variant, "chunk_size": cfg.horizon, "n_action_steps": cfg.horizon,
        "max_action_dim": cfg.action_dim, "max_state_dim": cfg.state_dim, "num_inference_steps": cfg.num_steps,
        "paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m",
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode},
    }
    if sizes:
        meta["vlafast_config"] = cfg.to_json()
    (folder / "config.json").write_text(json.dumps(meta))
    return folder


def write_openpi(folder: Path, policy: Pi0Policy, stats: dict, *, asset_id: str = "tiny_robot",
                 dtype: torch.dtype = torch.float32) -> Path:
    """openpi PyTorch layout: model.safetensors (no prefix) + assets/<id>/norm_stats.json."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(policy, "", dtype), str(folder / "model.safetensors"))
    assets = folder / "assets" / asset_id
    assets.mkdir(parents=True, exist_ok=True)
    (assets / "norm_stats.json").write_text(json.dumps({"norm_stats": stats}))
    return folder


def grpo_over_states_smoke(env, image_size: int, patch_size: int, max_tokens: int) -> None:
    """Two updates of horizon-correct GRPO over states (rehearsals from the env's snapshots, the
    critic on their end observations) with a tiny pi0 on ``env``: the run ends, its losses are
    finite and the actor moved. Shared by the LIBERO and ManiSkill end-to-end tests."""
    import numpy as np

    from vlafast.models.gemma import GemmaConfig
    from vlafast.models.siglip import SiglipConfig
    from vlafast.rl import train as T
    from vlafast.rl.losses import PPOConfig
    from vlafast.rl.sampler_spec import FlowSDE
    from vlafast.policies import FlowPolicy, build_word_tokenizer, flow_policy, words_of

    torch.manual_seed(0)
    instructions = getattr(env, "instructions", None) or [env.instruction]
    tok = build_word_tokenizer(words_of(instructions))
    g = GemmaConfig(width=32, depth=1, mlp_dim=48, num_heads=2, num_kv_heads=1, head_dim=16)
    vision = SiglipConfig(image_size=image_size, patch_size=patch_size, width=24, depth=1, mlp_dim=32, num_heads=2)
    cfg = Pi0Config.tiny(vision=vision, vlm=g, expert=g, vocab_size=tok.get_vocab_size(), action_dim=8,
                         state_dim=env.spec.state_dim, horizon=4, num_steps=2)
    pol = flow_policy(Pi0Policy(cfg), tok, env.spec, exec_horizon=2, max_tokens=max_tokens)
    before = [p.detach().clone() for p in pol.rl_parameters()[0]]
    rl = T.RLConfig(algo="grpo", grpo_groups="state", group_size=2, iterations=2, chunks_per_rollout=2, sampler=FlowSDE(num_steps=2),
                    critic_warmup=1, ppo=PPOConfig(actor_lr=1e-3, micro_batch=8))
    hist = T.train_rl(pol, env, rl, seed=0, progress=False)
    assert [h["iteration"] for h in hist] == [1, 2] and hist[-1]["env_steps"] > 0
    assert np.isfinite(hist[-1]["value_loss"]) and np.isfinite(hist[-1]["policy_loss"])
    assert not all(torch.equal(a, b) for a, b in zip(before, pol.rl_parameters()[0]))  # the actor learned
