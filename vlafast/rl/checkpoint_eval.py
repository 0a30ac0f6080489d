"""Evaluate a published-layout pi0 / pi0.5 checkpoint on a benchmark ``VecEnv`` (LIBERO,
ManiSkill): ``vlafast eval --env libero:libero_10 --checkpoint DIR --tokenizer FILE``.

The adapter (``ObsAdapter``) turns an env observation into a ``Pi0Observation`` as openpi /
LeRobot prepare one:

* cameras in the env's order (``spec.cameras``; LIBERO: ``image`` = base, ``wrist_image`` =
  left wrist), resized with padding to the model's image size (``preprocess_images``). The
  published models' third (right-wrist) view is absent on these envs; an absent view is masked
  out of attention and RoPE positions, so leaving it out gives the same actions.
* prompt: pi0 = BOS + ``instruction`` (stripped, ``_`` and newlines -> spaces) then ``"\\n"``
  encoded on its own (openpi's ``PaligemmaTokenizer.tokenize``; LeRobot appends the newline
  too); pi0.5 = ``pi05_state_prompt(instruction, discretize_state(normalised, padded state))``
  with BOS. BOS comes from the tokenizer: a sentencepiece model gets ``add_bos``; a
  ``tokenizer.json`` adds it through its post-processor if it has one (PaliGemma's does).
  Prompts are padded to the longest in the batch (padding is masked, so the length does not
  change the actions) and cut at ``max_tokens`` (openpi: 48 for pi0, 200 for pi0.5).
* state: the env's raw state (pi0 normalises and pads it inside the model).

Actions: ``sample_actions`` returns unnormalised actions [B, T, A_stats]; the first
``action_dim`` of the env are kept and the first ``exec_horizon`` of the T steps executed
(openpi's LIBERO example replans every 5). Episodes: each env runs a fixed quota of episodes
(the first ones it starts), so short (successful) episodes are not over-counted; success rates
per task come with 95% Wilson intervals. A few episodes are saved as GIFs (one frame per chunk:
observations come at chunk ends; cameras side by side).

Axes: B envs, V views, T horizon, A action dim, S state dim, L prompt tokens.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from vlafast._io import atomic_path, atomic_write_text
from vlafast.envs.base import EnvSpec, Obs
from vlafast.models.pi0 import Pi0Config, Pi0Observation, Pi0Policy, discretize_state, pi05_state_prompt, preprocess_images

log = logging.getLogger(__name__)

ENV_PREFIXES = ("libero:", "maniskill:")
Z95 = 1.959963984540054  # standard normal quantile at 0.975
MAX_TOKENS = {"pi0": 48, "pi05": 200}  # openpi's max_token_len defaults
EXEC_HORIZON = 5  # openpi's LIBERO example (replan_steps)


# -- statistics ---------------------------------------------------------------------------------

def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default); (0, 1) for n = 0."""
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # the ends are exactly 0 at k = 0 and 1 at k = n (analytically; rounding would give 1 - 1e-16)
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


# -- tokenizer ----------------------------------------------------------------------------------

class PromptTokenizer:
    """A user-supplied tokenizer: a HF ``tokenizers`` JSON file or a sentencepiece ``.model``."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found: pass --tokenizer with PaliGemma's "
                                    "tokenizer.json or paligemma_tokenizer.model (sentencepiece)")
        self.path = path
        if path.suffix == ".model":
            try:
                import sentencepiece
            except ImportError:
                raise ImportError(f"{path} is a sentencepiece model: `pip install sentencepiece`, or pass the "
                                  "tokenizer.json of the same tokenizer") from None
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            self._hf = None
            self.vocab_size = int(self._sp.get_piece_size())
        else:
            from tokenizers import Tokenizer

            try:
                self._hf = Tokenizer.from_file(str(path))
            except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
                raise ValueError(f"{path} is not a HF tokenizers JSON file ({exc}); pass tokenizer.json or a "
                                 "sentencepiece .model") from None
            self._sp = None
            self.vocab_size = int(self._hf.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, *, bos: bool) -> list[int]:
        """Token ids of ``text``; ``bos``: with the tokenizer's beginning-of-sequence handling."""
        if self._sp is not None:
            return list(self._sp.encode(text, add_bos=bos))
        return list(self._hf.encode(text, add_special_tokens=bos).ids)


def prompt_ids(tok: PromptTokenizer, instruction: str, state_bins: Tensor | None) -> list[int]:
    """pi0 (``state_bins`` None): BOS + cleaned instruction, then "\\n" on its own; pi0.5: the
    ``pi05_state_prompt`` with BOS. state_bins: [S]."""
    if state_bins is not None:
        return tok.encode(pi05_state_prompt(instruction, state_bins), bos=True)
    cleaned = instruction.strip().replace("_", " ").replace("\n", " ")
    return tok.encode(cleaned, bos=True) + tok.encode("\n", bos=False)


# -- observation adapter ------------------------------------------------------------------------

class ObsAdapter:
    """Env observation -> ``Pi0Observation`` for one loaded policy (module docstring)."""

    def __init__(self, policy: Pi0Policy, tokenizer: PromptTokenizer, spec: EnvSpec, *, max_tokens: int | None = None):
        cfg = policy.cfg
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens but the model's embedding "
                             f"only {cfg.vocab_size}: pass the tokenizer the checkpoint was trained with "
                             "(PaliGemma's for the published pi0 / pi0.5)")
        if not spec.cameras:
            raise ValueError("pi0 needs camera images; this env has none (ManiSkill: obs_mode='rgb')")
        if not cfg.is_pi05 and spec.state_dim > cfg.state_dim:
            raise ValueError(f"env state has {spec.state_dim} dims but the model takes at most {cfg.state_dim}")
        norm = policy.normalizer
        if norm is not None and norm.state_mode != "identity" and norm.state.dim != spec.state_dim:
            raise ValueError(f"the checkpoint's state statistics have {norm.state.dim} dims but the env's state "
                             f"{spec.state_dim}: this checkpoint was trained for another robot / benchmark")
        out_dim = norm.action_dim if norm is not None and norm.action_dim else cfg.action_dim
        if out_dim < spec.action_dim:
            raise ValueError(f"the checkpoint outputs {out_dim} action dims, the env needs {spec.action_dim}")
        self.policy, self.tok, self.spec = policy, tokenizer, spec
        self.max_tokens = max_tokens or MAX_TOKENS[cfg.variant]

    def __call__(self, obs: Obs) -> Pi0Observation:
        cfg, device = self.policy.cfg, self.policy.device
        missing = [c for c in self.spec.cameras if c not in obs["images"]]
        if missing:
            raise ValueError(f"observation lacks cameras {missing} (has {sorted(obs['images'])})")
        frames = torch.from_numpy(np.stack([obs["images"][c] for c in self.spec.cameras], axis=1))  # [B, V, H, W, 3]
        images = preprocess_images(frames, cfg.vision.image_size).to(device=device, dtype=self.policy.dtype)
        B, V = images.shape[:2]
        state = torch.as_tensor(np.asarray(obs["state"], np.float32), device=device)  # [B, S]
        bins = None
        if cfg.is_pi05:
            norm = self.policy.normalizer
            s = norm.normalize_state(state) if norm is not None else state
            bins = discretize_state(torch.nn.functional.pad(s.float(), (0, cfg.state_dim - s.shape[1])))  # [B, S_pad]
        rows = [prompt_ids(self.tok, text, None if bins is None else bins[b]) for b, text in enumerate(obs["instruction"])]
        too_long = [len(r) for r in rows if len(r) > self.max_tokens]
        if too_long:
            log.warning("prompt of %d tokens cut to max_tokens=%d", max(too_long), self.max_tokens)
        L = max(1, min(self.max_tokens, max(len(r) for r in rows)))
        tokens = torch.zeros(B, L, dtype=torch.long)
        masks = torch.zeros(B, L, dtype=torch.bool)
        for b, r in enumerate(rows):
            r = r[:L]
            tokens[b, :len(r)] = torch.tensor(r, dtype=torch.long)
            masks[b, :len(r)] = True
        if int(tokens.max()) >= cfg.vocab_size:
            raise ValueError(f"token id {int(tokens.max())} >= the model's vocabulary {cfg.vocab_size}")
        return Pi0Observation(images, torch.ones(B, V, dtype=torch.bool, device=device), tokens.to(device),
                              masks.to(device), None if cfg.is_pi05 else state)

    def actions(self, obs: Obs, *, exec_horizon: int, num_steps: int | None,
                generator: torch.Generator | None = None) -> np.ndarray:
        """One chunk for the env: [B, exec_horizon, A_env] float64 (unnormalised, truncated)."""
        chunk = self.policy.sample_actions(self(obs), generator=generator, num_steps=num_steps)  # [B, T, A_out]
        return chunk[:, :exec_horizon, : self.spec.action_dim].double().cpu().numpy()


# -- episode loop -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EvalConfig:
    episodes: int = 10                  # per task
    exec_horizon: int = EXEC_HORIZON    # actions executed per chunk (<= the model's horizon)
    num_steps: int | None = None        # denoise steps (None: the checkpoint's)
    videos: int = 2                     # episodes saved as GIFs
    max_tokens: int | None = None       # prompt cap (None: openpi's 48 / 200)
    seed: int = 0

    def __post_init__(self):
        if self.episodes < 1:
            raise ValueError(f"episodes must be >= 1 (per task), got {self.episodes}")
        if self.exec_horizon < 1:
            raise ValueError(f"exec_horizon must be >= 1, got {self.exec_horizon}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.videos < 0:
            raise ValueError(f"videos must be >= 0, got {self.videos}")


def env_quotas(task_of_env: Sequence[Any], episodes: int) -> list[int]:
    """Episodes each env runs so that every task gets ``episodes``: split across the envs of
    that task in order (env r of P gets episodes // P, plus one for r < episodes % P)."""
    quotas, seen = [], {}
    peers = {t: sum(1 for u in task_of_env if u == t) for t in task_of_env}
    for t in task_of_env:
        r = seen.get(t, 0)
        seen[t] = r + 1
        quotas.append(episodes // peers[t] + (1 if r < episodes % peers[t] else 0))
    return quotas


def _frame(obs: Obs, cameras: Sequence[str], i: int) -> np.ndarray:
    return np.concatenate([obs["images"][c][i] for c in cameras], axis=1)  # [H, V*W, 3]


def run_episodes(adapter: ObsAdapter, env, cfg: EvalConfig, *, progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Run every env's quota of episodes. Returns (episodes, videos): one record per finished
    episode (env, task, instruction, success, length, return, error) and up to ``cfg.videos``
    {"env", "task", "success", "frames": [H, W', 3] list} of the first episodes of envs 0, 1, ...."""
    spec = env.spec
    if cfg.exec_horizon > adapter.policy.cfg.horizon:
        raise ValueError(f"exec_horizon {cfg.exec_horizon} exceeds the model's horizon {adapter.policy.cfg.horizon}")
    B = spec.num_envs
    task_ids = [int(t) for t in getattr(env, "task_ids", [0] * B)]
    quotas = env_quotas(task_ids, cfg.episodes)
    done = [0] * B
    gen = torch.Generator(device=adapter.policy.device).manual_seed(cfg.seed)
    obs = env.reset(seed=cfg.seed)
    filming = {i: [_frame(obs, spec.cameras, i)] for i in range(min(cfg.videos, B)) if quotas[i] > 0}
    videos: list[dict] = []
    records: list[dict] = []
    total = sum(quotas)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="episodes", unit="ep")
    try:
        while sum(done) < total:
            chunk = adapter.actions(obs, exec_horizon=cfg.exec_horizon, num_steps=cfg.num_steps, generator=gen)
            instructions = list(obs["instruction"])
            obs, _, terminated, truncated, info = env.step(chunk)
            errors = info.get("errors") or [None] * B
            for i in range(B):
                ended = bool(terminated[i] or truncated[i])
                if i in filming and not ended:
                    filming[i].append(_frame(obs, spec.cameras, i))
                if not ended or done[i] >= quotas[i]:
                    continue
                done[i] += 1
                rec = {"env": i, "task_id": task_ids[i],
                       "instruction": info["instruction"][i] if "instruction" in info else instructions[i],
                       "success": bool(info["success"][i]), "length": int(info["episode_length"][i]),
                       "return": float(info["episode_return"][i]), "error": errors[i]}
                records.append(rec)
                if bar is not None:
                    bar.update(1)
                if i in filming:
                    videos.append({"env": i, "task_id": task_ids[i], "success": rec["success"], "frames": filming.pop(i)})
    finally:
        if bar is not None:
            bar.close()
    return records, videos


# -- summary ------------------------------------------------------------------------------------

def summarise(records: Sequence[dict]) -> dict[str, Any]:
    """Per-task and overall success with 95% Wilson intervals."""
    tasks: dict[int, dict] = {}
    for r in records:
        t = tasks.setdefault(r["task_id"], {"task_id": r["task_id"], "instruction": r["instruction"],
                                            "episodes": 0, "successes": 0, "errors": 0, "lengths": []})
        t["episodes"] += 1
        t["successes"] += int(r["success"])
        t["errors"] += int(r["error"] is not None)
        t["lengths"].append(r["length"])
    rows = []
    for t in sorted(tasks.values(), key=lambda t: t["task_id"]):
        lo, hi = wilson_interval(t["successes"], t["episodes"])
        rows.append({"task_id": t["task_id"], "instruction": t["instruction"], "episodes": t["episodes"],
                     "successes": t["successes"], "success_rate": t["successes"] / t["episodes"],
                     "ci95": [lo, hi], "mean_length": float(np.mean(t["lengths"])), "errors": t["errors"]})
    n, s = sum(r["episodes"] for r in rows), sum(r["successes"] for r in rows)
    lo, hi = wilson_interval(s, n)
    return {"tasks": rows, "overall": {"episodes": n, "successes": s, "success_rate": s / n if n else 0.0,
                                       "ci95": [lo, hi]}}


def format_summary(summary: dict[str, Any], title: str = "") -> str:
    """A markdown table: one row per task and an overall row."""
    lines = [f"## {title}", ""] if title else []
    lines += ["| task | instruction | episodes | success | 95% CI (Wilson) | mean length |",
              "|---:|---|---:|---:|---|---:|"]

    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    for r in summary["tasks"]:
        lines.append(f"| {r['task_id']} | {r['instruction']} | {r['episodes']} | {pct(r['success_rate'])} "
                     f"({r['successes']}) | {pct(r['ci95'][0])} - {pct(r['ci95'][1])} | {r['mean_length']:.0f} |")
    o = summary["overall"]
    lines.append(f"| all | | {o['episodes']} | {pct(o['success_rate'])} ({o['successes']}) | "
                 f"{pct(o['ci95'][0])} - {pct(o['ci95'][1])} | |")
    return "\n".join(lines) + "\n"


def write_gif(path: str | os.PathLike, frames: Sequence[np.ndarray], frame_s: float) -> Path:
    """frames: uint8 [H, W, 3] each -> an endlessly looping GIF, written atomically."""
    from PIL import Image

    images = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    with atomic_path(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=max(20, int(round(1000 * frame_s))), loop=0)
    return Path(path)


# -- the command --------------------------------------------------------------------------------

def check_env_name(name: str) -> None:
    if not name.startswith(ENV_PREFIXES) or not name.split(":", 1)[1]:
        raise ValueError(f"--env must be libero:<suite> (e.g. libero:libero_10) or maniskill:<task> "
                         f"(e.g. maniskill:PickCube-v1), got {name!r}; built-in tasks are evaluated "
                         "from their policy.pt without --env")


def evaluate_checkpoint(checkpoint: str | os.PathLike, env_name: str, tokenizer: str | os.PathLike, *,
                        cfg: EvalConfig = EvalConfig(), out: str | os.PathLike | None = None,
                        tasks: Sequence[int] | None = None, num_envs: int | None = None,
                        env_overrides: dict[str, Any] | None = None, device: str | None = None,
                        config: Pi0Config | None = None, progress: bool = True) -> dict[str, Any]:
    """Load ``checkpoint`` (LeRobot / openpi layout), build ``env_name``, run ``cfg.episodes``
    per task, write ``summary.json``, ``summary.md`` and GIFs into ``out``; returns the summary.
    ``env_overrides``: extra ``make_env`` arguments (LIBERO: LiberoConfig fields such as
    ``max_episode_steps``; ManiSkill: ManiSkillVecEnv arguments); ``config``: the model sizes
    when they are not the published ones (``load_pi0``)."""
    from vlafast.envs import make_env
    from vlafast.models.pi0_load import load_pi0

    check_env_name(env_name)
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found: pass a LeRobot or openpi pi0 / pi0.5 folder "
                                "(config.json + model.safetensors, or model.safetensors + assets/)")
    if num_envs is not None and num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    tok = PromptTokenizer(tokenizer)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    policy = load_pi0(checkpoint, config=config, dtype=dtype, device=device)
    if cfg.exec_horizon > policy.cfg.horizon:
        raise ValueError(f"exec_horizon {cfg.exec_horizon} exceeds the checkpoint's horizon {policy.cfg.horizon}")
    if tok.vocab_size > policy.cfg.vocab_size:  # before the (slow) env start; ObsAdapter checks again
        raise ValueError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's embedding only "
                         f"{policy.cfg.vocab_size}: pass the tokenizer the checkpoint was trained with")
    overrides = dict(env_overrides or {})
    kind = env_name.split(":", 1)[0]
    if kind == "libero":
        from vlafast.envs.libero import NUM_TASKS

        suite = env_name.split(":", 1)[1]
        if tasks is None and suite not in NUM_TASKS:
            raise ValueError(f"unknown LIBERO suite {suite!r}: known {', '.join(NUM_TASKS)} (or pass --tasks)")
        task_list = list(tasks) if tasks is not None else list(range(NUM_TASKS[suite]))
        overrides["task_ids"] = task_list
        n = num_envs or len(task_list)
    else:
        if tasks is not None:
            raise ValueError("--tasks applies to LIBERO suites; a ManiSkill env name is one task")
        overrides.setdefault("obs_mode", "rgb")
        n = num_envs or 1
    out = Path(out) if out is not None else Path("runs") / f"eval-{env_name.replace(':', '-')}-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    env = make_env(env_name, n, seed=cfg.seed, **overrides)
    try:
        adapter = ObsAdapter(policy, tok, env.spec, max_tokens=cfg.max_tokens)
        records, videos = run_episodes(adapter, env, cfg, progress=progress)
        control_hz = env.spec.control_hz
    finally:
        env.close()
    summary = summarise(records)
    summary["config"] = {"checkpoint": str(checkpoint), "env": env_name, "tokenizer": str(tok.path),
                         "variant": policy.cfg.variant, "num_envs": n, "device": device, "dtype": str(dtype),
                         **dataclasses.asdict(cfg), "env_overrides": overrides}
    summary["episodes"] = records
    summary["videos"] = []
    for v in videos:
        name = f"task{v['task_id']:02d}_env{v['env']:02d}_{'success' if v['success'] else 'failure'}.gif"
        write_gif(out / "videos" / name, v["frames"], cfg.exec_horizon / control_hz)
        summary["videos"].append(f"videos/{name}")
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
    atomic_write_text(out / "summary.md", format_summary(summary, f"{env_name}: {checkpoint}"))
    summary["out"] = str(out)
    return summary


def add_arguments(p) -> None:
    """The ``vlafast eval --env ...`` options (beside --checkpoint / --episodes / --seed)."""
    g = p.add_argument_group("benchmark envs (--env): a published-layout pi0 / pi0.5 checkpoint")
    g.add_argument("--env", default=None, help="libero:<suite> (e.g. libero:libero_10) | maniskill:<task> "
                                                "(e.g. maniskill:PickCube-v1)")
    g.add_argument("--tokenizer", default=None, help="PaliGemma's tokenizer.json or paligemma_tokenizer.model")
    g.add_argument("--tasks", default=None, help="LIBERO task ids, comma separated (default: the whole suite)")
    g.add_argument("--num-envs", type=int, default=None, help="parallel envs (default: LIBERO one per task, ManiSkill 1)")
    g.add_argument("--videos", type=int, default=None, help="episodes saved as GIFs (default 2)")
    g.add_argument("--out", default=None, help="run folder (default runs/eval-<env>-<time>)")
    g.add_argument("--steps", type=int, default=None, help="denoise steps (default: the checkpoint's)")
    g.add_argument("--exec-horizon", type=int, default=None,
                   help=f"actions executed per chunk before replanning (default {EXEC_HORIZON}, as openpi's LIBERO example)")
    g.add_argument("--max-episode-steps", type=int, default=None, help="step budget per episode (default: the env's)")


ENV_OPTIONS = ("tokenizer", "tasks", "num_envs", "videos", "out", "steps", "exec_horizon", "max_episode_steps")


def reject_env_options(args) -> None:
    """``vlafast eval`` without --env (a built-in task's policy.pt): the --env options do not apply."""
    given = [f"--{k.replace('_', '-')}" for k in ENV_OPTIONS if getattr(args, k, None) is not None]
    if given:
        raise SystemExit(f"{', '.join(given)} apply to benchmark envs: add --env libero:<suite> | maniskill:<task>")


def main(args) -> int:
    """``vlafast eval --env ...``: print the summary table, write the run folder."""
    if not args.tokenizer:
        raise SystemExit("vlafast eval --env needs --tokenizer (PaliGemma's tokenizer.json or "
                         "paligemma_tokenizer.model for the published checkpoints)")
    try:
        tasks = None if args.tasks is None else [int(t) for t in args.tasks.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--tasks must be comma-separated integers, got {args.tasks!r}") from None
    cfg = EvalConfig(episodes=args.episodes or EvalConfig.episodes,
                     exec_horizon=EXEC_HORIZON if args.exec_horizon is None else args.exec_horizon,
                     num_steps=args.steps, videos=EvalConfig.videos if args.videos is None else args.videos,
                     seed=0 if args.seed is None else args.seed)
    overrides = {} if args.max_episode_steps is None else {"max_episode_steps": args.max_episode_steps}
    summary = evaluate_checkpoint(args.checkpoint, args.env, args.tokenizer, cfg=cfg, out=args.out, tasks=tasks,
                                  num_envs=args.num_envs, env_overrides=overrides, progress=not args.no_progress)
    print(format_summary(summary), end="")
    print(f"wrote {Path(summary['out']) / 'summary.md'}, summary.json and {len(summary['videos'])} GIF(s)")
    return 0


__all__ = ["EvalConfig", "ObsAdapter", "PromptTokenizer", "evaluate_checkpoint", "format_summary", "prompt_ids",
           "run_episodes", "summarise", "wilson_interval", "env_quotas", "write_gif", "check_env_name"]
