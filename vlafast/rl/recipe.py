"""Recipes: everything needed to rebuild an environment and a tiny flow VLA for it, saved
with the policy so `vlafast eval` / `vlafast train ppo --init` can load a run.

The default recipe is what `vlafast demo` runs on a 2-core CPU: the built-in UR5e reach task
(balls in colour slots, 32 px camera) and a ~0.3 M-parameter pi0 of the real structure.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from vlafast.envs import make_env
from vlafast.envs.libero import LIBERO_WORDS
from vlafast.envs.reach_words import COLOURS, SPEEDS, VERBS
from vlafast.models.gemma import GemmaConfig
from vlafast.models.pi0 import Pi0Config, Pi0Policy
from vlafast.models.siglip import SiglipConfig
from vlafast.rl.losses import PPOConfig
from vlafast import policies
from vlafast._validate import number, of_type
from vlafast.policies import FASTPolicy, FlowPolicy, build_word_tokenizer, flow_policy, words_of
from vlafast.rl import sampler_spec
from vlafast.rl.sampler_spec import FlowNoise, FlowSDE
from vlafast.rl.train import Demos, RLConfig, collect_demos

# Words the tiny tokenizer knows: the task's own plus the paper's steering keywords, so the
# neuron dictionary of a policy trained here has "fast"/"slow"/"up"... tokens to find.
EXTRA_WORDS = ("up down raise lift high low fast quick rapid slow careful gentle steady smooth "
               "left right forward back stop")
FAMILIES = ("pi0", "pi0fast")
FAST_VOCAB = 512  # ids the tiny pi0-FAST reserves for FAST tokens: its BPE, fitted on the demos, uses at most these
# the tiny pi0-FAST's FAST scale: coarser than FAST's 10 (rounding error <= 0.1 RMS on the [-1, 1] actions),
# fewer distinct symbols, a BPE vocabulary the tiny model learns in a few hundred steps
FAST_SCALE = 5.0
EOS = "[eos]"


@dataclasses.dataclass(frozen=True)
class Recipe:
    env: str = "ur5e-reach"
    # Further make_env options, e.g. {"obs_mode": "rgb", "sim_backend": "physx_cpu"} for ManiSkill or
    # {"task_ids": [0, 1], "max_episode_steps": 300} for LIBERO (JSON lists become tuples).
    env_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_envs: int = 16
    image_size: int = 32
    slot_jitter: float | None = 0.04
    # 7 cm leaves room above few-shot SFT: at 5 cm even 400 demonstrations imitate to only
    # ~55% (the tiny policy's precision), at 7 cm 400 reach ~82% against ~60% for 24.
    reach_radius: float | None = 0.07
    # "pi0": the tiny flow pi0 (pi05 picks pi0.5); "pi0fast": a tiny pi0-FAST (build_fast_policy)
    family: str = "pi0"
    pi05: bool = False
    width: int = 64                 # VLM and expert width (the tiny pi0)
    depth: int = 2
    patch_size: int = 8
    horizon: int = 8                # model chunk length T
    exec_horizon: int = 5           # actions executed per chunk
    demos: int = 24                 # scripted episodes for SFT (few-shot on purpose)
    sft_steps: int = 200
    sft_batch: int = 32
    sft_lr: float = 2e-3
    eval_episodes: int = 128
    seed: int = 0
    # Flow-SDE (one stochastic step per chunk, pi_RL's cheapest update) with GRPO over states:
    # 8 chunks sampled from each env's current state are rehearsed from a copy of it and
    # compared on their reward, then the env goes on with the first. Episode-level advantages
    # (PPO with GAE, episode GRPO) did not beat the noise at this budget (README, "The demo").
    # The demo keeps the myopic score (the chunk's own reward, no critic) that its README figures
    # were measured with, and `python -m tools.rl_compare` runs the same settings.
    rl: RLConfig = RLConfig(algo="grpo", grpo_groups="state", group_size=8, sampler=FlowSDE(), iterations=200,
                            chunks_per_rollout=4, bc_coef=1.0, rehearsal_bootstrap=False, critic_warmup=0,
                            ppo=PPOConfig(actor_lr=1e-4, critic_lr=1e-3, minibatch=128, epochs=2))

    def __post_init__(self) -> None:
        of_type("recipe env", self.env, str, "an env name such as ur5e-reach or libero:libero_spatial")
        of_type("recipe env_kwargs", self.env_kwargs, dict, "an object of make_env options")
        of_type("recipe pi05", self.pi05, bool, "true or false")
        if self.family not in FAMILIES:
            raise ValueError(f"recipe family must be one of {FAMILIES}, got {self.family!r}")
        if self.family == "pi0fast" and self.pi05:
            raise ValueError("recipe pi05 applies to the flow family: drop it with family 'pi0fast'")
        for name, low in (("num_envs", 1), ("image_size", 8), ("width", 8), ("depth", 1), ("patch_size", 1),
                          ("horizon", 1), ("demos", 1), ("sft_steps", 1), ("sft_batch", 1), ("eval_episodes", 1),
                          ("seed", 0)):
            number(f"recipe {name}", getattr(self, name), low=low, integer=True)
        number("recipe exec_horizon", self.exec_horizon, low=1, high=self.horizon, integer=True)
        if self.width % 8:
            raise ValueError(f"recipe width must be a multiple of 8 (4 heads of an even width), got {self.width}")
        number("recipe sft_lr", self.sft_lr, low=0, low_open=True)
        number("recipe slot_jitter", self.slot_jitter, low=0, optional=True)
        number("recipe reach_radius", self.reach_radius, low=0, low_open=True, optional=True)
        if not isinstance(self.rl, RLConfig):
            raise ValueError(f"recipe rl must be an RL config, got {type(self.rl).__name__}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Recipe":
        """A recipe from (partial) JSON: unknown keys raise, nested rl / rl.ppo / rl.sampler are
        merged. RL configs of older recipes (flat ``method`` / ``num_steps`` / ``sde_a`` /
        ``sde_hybrid``) become the sampler spec."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown recipe keys {sorted(unknown)}; known: {sorted(known)}")
        data = dict(data)
        base = cls()
        if "rl" in data:
            if not isinstance(data["rl"], dict) or not isinstance(data["rl"].get("ppo", {}), dict):
                raise ValueError(f"recipe rl (and rl.ppo) must be objects of RL settings, got {data['rl']!r}")
            rl = dict(data["rl"])
            try:
                ppo = PPOConfig(**{**dataclasses.asdict(base.rl.ppo), **rl.pop("ppo", {})})
                if "betas" in rl or "betas" in data.get("rl", {}).get("ppo", {}):
                    ppo = dataclasses.replace(ppo, betas=tuple(ppo.betas))
                sampler = sampler_spec.from_rl_json(rl, base.rl.sampler)
                rest = {k: v for k, v in dataclasses.asdict(base.rl).items() if k not in ("ppo", "sampler")}
                data["rl"] = RLConfig(**{**rest, **rl}, ppo=ppo, sampler=sampler)
            except TypeError as exc:  # an unknown key: name it, as for the recipe's own keys
                key = re.search(r"argument '(\w+)'", str(exc))
                raise ValueError(f"recipe rl has an unknown key {key.group(1)!r}" if key else f"recipe rl: {exc}") from None
        return dataclasses.replace(base, **data)


def build_env(recipe: Recipe, num_envs: int | None = None, seed: int | None = None):
    return env_slice(recipe, 0, num_envs or recipe.num_envs, seed=seed)


def env_slice(recipe: Recipe, first_env: int, num_envs: int, seed: int | None = None):
    """Envs [first_env, first_env + num_envs) of the recipe's vector env (a Ray rollout
    worker's share, ``vlafast.rl.dist``). Envs that differ by index beyond their seed (LIBERO:
    task and init-state order) are built as they are in the whole; the seeds a slice resets
    with come from the collector (``rl.train.reset_seeds``)."""
    overrides: dict[str, Any] = {"image_size": recipe.image_size}
    overrides.update({k: tuple(v) if isinstance(v, list) else v for k, v in recipe.env_kwargs.items()})
    if recipe.env.startswith("libero:") and (first_env or num_envs != recipe.num_envs):
        overrides.update(first_env=first_env, total_envs=recipe.num_envs)
    if recipe.env.startswith("ur5e-"):
        overrides["slot_jitter"] = recipe.slot_jitter
        if recipe.reach_radius is not None:
            overrides["reach_radius"] = recipe.reach_radius
    return make_env(recipe.env, num_envs, seed=recipe.seed if seed is None else seed, **overrides)


def task_words(env: str = "ur5e-reach") -> list[str]:
    """The built-in task's words and the steering keywords, then (for a LIBERO env) the words of
    LIBERO's instructions, so a tiny policy trained on several LIBERO tasks reads which object
    its instruction names (unknown words are one [UNK] token)."""
    words = words_of([" ".join(VERBS), "the ball then", " ".join(COLOURS), " ".join(SPEEDS), EXTRA_WORDS])
    if env.startswith("libero:"):
        words += [w for w in LIBERO_WORDS.split() if w not in words]
    return words


def prompt_tokens(env: str) -> int:
    """Instruction tokens the tiny flow policy reads: 8 for the built-in task's short commands,
    24 for LIBERO's (up to 19 words: the object and its place come last)."""
    return 24 if env.startswith("libero:") else 8


def build_policy(recipe: Recipe, spec) -> FlowPolicy | FASTPolicy:
    """The tiny pi0 (or pi0.5, or pi0-FAST) of the recipe, randomly initialised from its seed."""
    if recipe.family == "pi0fast":
        return build_fast_policy(recipe, spec)
    tok = build_word_tokenizer(task_words(recipe.env))
    heads = 4
    g = GemmaConfig(width=recipe.width, depth=recipe.depth, mlp_dim=2 * recipe.width, num_heads=heads,
                    num_kv_heads=1, head_dim=recipe.width // heads)
    vision = SiglipConfig(image_size=recipe.image_size, patch_size=recipe.patch_size, width=recipe.width,
                          depth=recipe.depth, mlp_dim=2 * recipe.width, num_heads=heads)
    cfg = Pi0Config.tiny(pi05=recipe.pi05, vision=vision, vlm=g, expert=g, vocab_size=tok.get_vocab_size(),
                         action_dim=max(4, spec.action_dim), state_dim=max(spec.state_dim, 8),
                         horizon=recipe.horizon, num_steps=recipe.rl.sampler.num_steps)
    torch.manual_seed(recipe.seed)
    noise_head = None
    if isinstance(recipe.rl.sampler, FlowNoise):
        from vlafast.flow.noise_head import NoiseHead

        noise_head = NoiseHead(cfg.expert.width, cfg.action_dim)
    return flow_policy(Pi0Policy(cfg), tok, spec, exec_horizon=recipe.exec_horizon,
                       max_tokens=prompt_tokens(recipe.env), noise_head=noise_head)


def build_fast_policy(recipe: Recipe, spec) -> FASTPolicy:
    """The tiny pi0-FAST of the recipe, randomly initialised from its seed; its FAST codec and
    normaliser are fitted on the SFT demonstrations (``FASTPolicy.fit_codec``, which
    ``rl.train.sft`` calls).

    The prompt is the real one, ``"Task: <instruction>, State: <bins>;\\n"`` then ``"Action: "``,
    read by a word-level tokenizer whose vocabulary is, in id order: [PAD] (0, the pad id),
    [UNK], [eos] (the end-of-sequence id), the task's words and the steering keywords, the
    prompt's own words and marks (task, state, action, ``:``, ``,``, ``;``, ``|``), the 256 state
    bins "0" ... "255" (the state normalised with the demos' q01 / q99, cut to its real dims),
    then ``FAST_VOCAB`` ids for FAST tokens at the top of the vocabulary, FAST id k at
    ``vocab - 1 - k`` as the real model places them (no skipped ids: the tiny vocabulary has no
    special tokens up there), named ``<fastk>`` so the neuron dictionary can show them. The
    Gemma stack has the depth of the flow pi0's VLM and expert together (2 * depth); the
    vision tower and widths are the flow recipe's; decoding stops at T * A + 2 tokens (a BPE
    never gives more tokens than symbols, then "|" and EOS)."""
    from vlafast.models.pi0fast import Pi0FASTConfig, Pi0FASTPolicy
    from vlafast.policies.fast import FASTProcessor
    from vlafast.policies.processors import ProcessorConfig
    from vlafast.policies.spec import EnvBinding, PolicySpec

    prompt = ["task", "state", "action", ":", ",", ";", "|"] + [str(i) for i in range(256)]
    known = task_words(recipe.env)
    words = [EOS] + known + [w for w in prompt if w not in known]
    fast_names = [f"<fast{k}>" for k in range(FAST_VOCAB - 1, -1, -1)]
    tok = build_word_tokenizer(words + fast_names)
    heads = 4
    g = GemmaConfig(width=recipe.width, depth=2 * recipe.depth, mlp_dim=2 * recipe.width, num_heads=heads,
                    num_kv_heads=1, head_dim=recipe.width // heads)
    vision = SiglipConfig(image_size=recipe.image_size, patch_size=recipe.patch_size, width=recipe.width,
                          depth=recipe.depth, mlp_dim=2 * recipe.width, num_heads=heads)
    cfg = Pi0FASTConfig(vision=vision, vlm=g, vocab_size=tok.get_vocab_size(), action_dim=spec.action_dim,
                        state_dim=spec.state_dim, pad_state=False, horizon=recipe.horizon,
                        max_decoding_steps=recipe.horizon * spec.action_dim + 2, fast_skip_tokens=0,
                        eos_token_id=tok.token_to_id(EOS), pad_token_id=0)
    torch.manual_seed(recipe.seed)
    model = Pi0FASTPolicy(cfg)
    with torch.no_grad():  # the tied LM head: unit-scale token inputs (x sqrt(width)) and O(1) logits, as Gemma's init
        model.language_model.embed_tokens.weight.normal_(0.0, cfg.vlm.width ** -0.5)
    processor_cfg = ProcessorConfig(prompt="paligemma", max_tokens=32)
    pspec = PolicySpec(family="pi0fast", model=cfg.to_json(), processor=processor_cfg, exec_horizon=recipe.exec_horizon,
                       env=EnvBinding.of(spec))
    return FASTPolicy(model, FASTProcessor(model, tok, processor_cfg), pspec, None, fast_vocab=FAST_VOCAB,
                      fast_scale=FAST_SCALE)


def ensure_noise_head(policy: FlowPolicy, recipe: Recipe) -> None:
    """Give ``policy`` a fresh Flow-Noise head (drawn from torch's global RNG) when the recipe
    trains with Flow-Noise and the policy (e.g. an SFT checkpoint) has none."""
    if isinstance(recipe.rl.sampler, FlowNoise):
        policy.attach_noise_head()


def collect_recipe_demos(recipe: Recipe, env, progress: bool = True) -> Demos:
    """The recipe's scripted demonstrations (deterministic in its seed): what SFT learns from
    and what the RL phase's BC anchor (``rl.bc_coef``) replays."""
    if not callable(getattr(env, "expert_chunk", None)):
        raise ValueError(f"env {recipe.env} has no scripted expert to demonstrate with: SFT and the RL phase's BC "
                         "anchor need one (set rl.bc_coef to 0 for RL on this env)")
    return collect_demos(env, recipe.demos, recipe.horizon, recipe.exec_horizon, seed=recipe.seed + 1, progress=progress)


def save_policy(policy: FlowPolicy | FASTPolicy, recipe: Recipe, folder: str | Path) -> Path:
    """The policy with its recipe in its spec, as ``vlafast.policies.save`` writes it (a folder
    of JSON + safetensors, each file written atomically)."""
    return policies.save(policy.with_recipe(recipe.to_json()), folder)


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Recipe JSON ``base`` updated by ``overrides``, nested dicts (rl, rl.ppo, env_kwargs) key by key."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_policy(path: str | Path, *, overrides: dict[str, Any] | None = None,
                device: str = "cpu") -> tuple[FlowPolicy | FASTPolicy, Recipe, Any]:
    """(policy, recipe, env) of a policy folder, the recipe updated with ``overrides`` (partial
    recipe JSON). A run trained here carries its recipe; its policy is rebuilt from it (the same
    random draws as when it was trained) and given the saved weights. Any other flow policy (a
    LeRobot / openpi pi0 or pi0.5) needs ``overrides["env"]`` and is bound to that env. A
    pi0-FAST is used as loaded (its FAST codec and normaliser were fitted on its own demos)."""
    policy = policies.load(path, device=device)
    if not isinstance(policy, (FlowPolicy, FASTPolicy)):
        raise policies.PolicyError(f"{path} holds a {policy.spec.family} policy; this job needs a pi0 / pi0.5 or a "
                                   "pi0-FAST")
    overrides = dict(overrides or {})
    carried = policy.spec.recipe
    if carried is None and not overrides.get("env"):
        raise policies.PolicyError(f"{path} was not trained here, so it carries no env: give the env "
                                   "(--env libero:<suite> | maniskill:<task> | ur5e-reach)")
    base = Recipe.from_json(carried) if carried is not None else None
    # a checkpoint from elsewhere starts from plain RL settings, not the demo's tuning (which
    # anchors on the built-in task's scripted demonstrations)
    start = base if base is not None else dataclasses.replace(Recipe(), rl=RLConfig())
    recipe = Recipe.from_json(merge(start.to_json(), overrides))
    env = build_env(recipe)
    try:
        rebuilt = build_policy(base, env.spec) if base is not None and isinstance(policy, FlowPolicy) else None
        if rebuilt is not None and rebuilt.model.cfg == policy.model.cfg:  # the recipe's own model, not a checkpoint's
            if policy.noise_head is not None:
                rebuilt.attach_noise_head()
            try:
                rebuilt.load_state_dict(policy.state_dict())
            except RuntimeError as exc:
                raise policies.PolicyError(f"{path} does not fit the model its recipe builds: "
                                           f"{str(exc).splitlines()[1].strip()}") from None
            rebuilt.model.normalizer = policy.model.normalizer
            policy = rebuilt.with_recipe(carried)
        policy.bind(env.spec, exec_horizon=recipe.exec_horizon)
    except BaseException:
        env.close()
        raise
    return policy, recipe, env


def convert_legacy(path: str | Path, folder: str | Path) -> Path:
    """A ``policy.pt`` written by vlafast before policy folders -> a policy folder. It is read
    with ``torch.load(weights_only=True)``: tensors, numbers, strings and containers only, so
    a crafted file cannot run code; what it holds is then checked against the recipe's model."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError / RuntimeError variants
        raise policies.PolicyError(f"{path} is not a plain vlafast policy.pt (refused by the weights-only loader: "
                                   f"{str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or not {"recipe", "policy"} <= set(state):
        raise policies.PolicyError(f"{path} is not a vlafast policy.pt: it needs 'recipe' and 'policy' entries")
    recipe = Recipe.from_json(state["recipe"])
    env = build_env(recipe)
    try:
        policy = build_policy(recipe, env.spec)
        if any(k.startswith("noise_head.") for k in state["policy"]):
            policy.attach_noise_head()
        policy.load_state_dict(state["policy"])
    finally:
        env.close()
    return save_policy(policy, recipe, folder)


def train_tiny_policy(recipe=None, *, progress: bool = False):
    """(policy, env): the recipe's tiny pi0 (``vlafast.rl.recipe``, default ``Recipe()``: the
    built-in reach task, a word tokenizer that also knows the paper's steering keywords)
    behaviour-cloned on the scripted expert for ``recipe.sft_steps`` steps."""
    from vlafast.rl import train

    recipe = recipe or Recipe()
    env = build_env(recipe)
    policy = build_policy(recipe, env.spec)
    demos = train.collect_demos(env, recipe.demos, recipe.horizon, recipe.exec_horizon, seed=recipe.seed + 1,
                                progress=progress)
    train.sft(policy, demos, steps=recipe.sft_steps, batch_size=recipe.sft_batch, lr=recipe.sft_lr,
              seed=recipe.seed, progress=progress)
    return policy.eval(), env


def dump(recipe: Recipe) -> str:
    return json.dumps(recipe.to_json(), indent=1)
