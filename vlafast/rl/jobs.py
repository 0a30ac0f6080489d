"""The jobs behind `vlafast train` / `vlafast eval` and the demo: SFT, RL and evaluation runs
that write their results into a run folder (policy/, recipe.json, run.json, metrics.json,
checkpoint.pt, summary.json, episodes.json), never over another run unless asked to.

RL starts from a flow policy (a run trained here, a LeRobot / openpi pi0 / pi0.5 folder) or an
autoregressive one (an OpenVLA Hugging Face folder, pi0-FAST), trained on the log-probs of its
denoising steps or of its sampled action tokens. ``policy/`` holds the result in a form
``policies.load`` reads: a vlafast policy folder, or for OpenVLA a Hugging Face OpenVLA folder
(``policies.openvla.save_openvla``)."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from vlafast import policies
from vlafast.eval import evaluate, speed_by_word
from vlafast.policies import FlowPolicy
from vlafast._io import atomic_write_text, remove_stale_temps
from vlafast.rl import train as T
from vlafast.rl.dist import DistConfig, LearnerGroup, RayCollector
from vlafast.rl.recipe import (
    Recipe, build_env, build_policy, collect_recipe_demos, dump, ensure_noise_head, env_slice, load_policy, merge,
    save_policy,
)
from vlafast.rl.sampler_spec import Tokens

FLOW_FAMILIES = ("pi0", "pi05")


def summarise_eval(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: ev[k] for k in ("episodes", "success_rate", "success_ci95", "return")} | {"speed": speed_by_word(ev["records"])}


def write_results(out: Path, summary: dict[str, Any], ev: dict[str, Any]) -> None:
    """summary.json, and episodes.json: the final evaluation's per-episode records, which an
    evaluation of the same episodes by another policy pairs with (``eval.paired_difference``)."""
    atomic_write_text(out / "episodes.json", json.dumps(ev["records"]))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))


def run_sft(recipe: Recipe, out: str | Path, *, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Scripted demos -> SFT -> evaluation; writes out/policy/ and out/summary.json. An ``out``
    that holds a run is refused unless ``overwrite``."""
    out = Path(out)
    check_run_dir(out, resume=False, overwrite=overwrite)
    if isinstance(recipe.rl.sampler, Tokens):
        raise ValueError("train sft builds the tiny flow policy, which RL then samples with flow_sde or flow_noise: "
                         "drop the tokens sampler from the recipe")
    env = build_env(recipe)
    if not callable(getattr(env, "expert_chunk", None)):
        env.close()
        raise ValueError(f"env {recipe.env} has no scripted expert: train sft needs one (the built-in ur5e tasks); "
                         "RL from a published checkpoint needs no SFT: `vlafast train ppo --init CKPT --env ...`")
    start_run_dir(out, recipe, init=None, phase="sft")
    policy = build_policy(recipe, env.spec)
    t0 = time.perf_counter()
    demos = collect_recipe_demos(recipe, env, progress=progress)
    losses = T.sft(policy, demos, steps=recipe.sft_steps, batch_size=recipe.sft_batch, lr=recipe.sft_lr,
                   seed=recipe.seed, progress=progress)
    ev = evaluate(policy, env, episodes=recipe.eval_episodes, seed=recipe.seed + 100, num_steps=eval_steps(recipe),
                  progress=progress)
    summary = {"phase": "sft", "demo_episodes": demos.episodes, "demo_chunks": len(demos), "sft_loss": losses,
               "eval": summarise_eval(ev), "seconds": time.perf_counter() - t0}
    save_policy(policy, recipe, out / "policy")
    write_results(out, summary, ev)
    env.close()
    return summary


RUN_FILE = "run.json"


def check_run_dir(out: Path, *, resume: bool, overwrite: bool = False) -> None:
    """Refuse to overwrite a run, or to resume one that cannot be: before anything is written."""
    if resume and overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if resume:
        if not (out / "checkpoint.pt").is_file():
            raise ValueError(f"--resume: {out} has no checkpoint.pt (the run stopped before its first update ended): "
                             "start it again with --overwrite")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ValueError(f"--out {out} already holds a run: add --resume to continue it or --overwrite to replace it")


def resume_init(out: Path) -> str:
    """The policy a run in ``out`` started from (recorded in run.json when it began)."""
    try:
        init = json.loads((out / RUN_FILE).read_text())["init"]
        if not isinstance(init, str):
            raise ValueError(init)
        return init
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"--resume: {out / RUN_FILE} is missing or damaged, so the policy this run started from is "
                         "unknown: pass it again with --init") from None


def resume_unnorm_key(out: Path) -> str | None:
    """The OpenVLA statistics a run in ``out`` acts with (run.json; None when it names none)."""
    try:
        key = json.loads((out / RUN_FILE).read_text()).get("unnorm_key")
    except (OSError, ValueError, AttributeError):
        return None
    return key if isinstance(key, str) else None


def saved_recipe(out: Path) -> dict[str, Any]:
    """The recipe JSON a run in ``out`` was started with ({} when there is none)."""
    try:
        data = json.loads((out / "recipe.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_resume(out: Path, recipe: Recipe) -> None:
    """A resumed run must be the same algorithm and sampler as the one it continues."""
    data = saved_recipe(out)
    if not data:
        return  # no (readable) recipe.json: the checkpoint itself is checked when it loads
    saved = Recipe.from_json(data)
    was, now = (saved.rl.algo, saved.rl.sampler.kind), (recipe.rl.algo, recipe.rl.sampler.kind)
    if was != now:
        raise ValueError(f"--resume continues the run as it was trained ({was[0]} with {was[1]}); this asks for "
                         f"{now[0]} with {now[1]}: start a new run in another --out")


RUN_FILES = ("checkpoint.pt", "metrics.json", "summary.json", "episodes.json", "recipe.json", RUN_FILE)


def start_run_dir(out: Path, recipe: Recipe, *, init: str | Path | None, phase: str, resume: bool = False,
                  unnorm_key: str | None = None) -> None:
    """Create the run folder: clear temporary files a killed run left and (a new run over an old
    one) that run's files, so nothing of it can be resumed or read as this run's; then write
    recipe.json and run.json (with the OpenVLA ``unnorm_key`` the run acts with, if any)."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    if not resume:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "policy", ignore_errors=True)
    atomic_write_text(out / "recipe.json", dump(recipe))
    run = {"phase": phase, "init": None if init is None else str(Path(init).resolve())}
    if unnorm_key is not None:
        run["unnorm_key"] = unnorm_key
    atomic_write_text(out / RUN_FILE, json.dumps(run, indent=1))


def checkpoint_family(path: str | Path) -> str:
    """The model family of the policy folder at ``path`` without loading it: pi0 / pi05 (flow)
    or an autoregressive one (openvla, ...); a PolicyError when it is no policy folder."""
    path = Path(path)
    fmt = policies.detect_format(path)
    if fmt == "openvla":
        return "openvla"
    if fmt == "openpi":  # its keys say which: the format's own test (no config names the family)
        from vlafast.policies.io import is_pi0fast

        return "pi0fast" if is_pi0fast(path, fmt) else "pi0"
    folder = path if (path / "policy.json").is_file() or fmt != "vlafast" else path / "policy"
    try:
        meta = json.loads((folder / ("policy.json" if fmt == "vlafast" else "config.json")).read_text())
        return str(meta.get("family" if fmt == "vlafast" else "type"))
    except (OSError, ValueError, AttributeError):
        return "pi0"  # the flow loader names what is wrong with the file


def eval_steps(recipe: Recipe) -> int | None:
    """Denoising steps evaluation samples with (flow samplers' K; None for token policies)."""
    return getattr(recipe.rl.sampler, "num_steps", None)


def load_token_policy(path: str | Path, *, overrides: dict[str, Any] | None = None,
                      unnorm_key: str | None = None) -> tuple[Any, Recipe, Any]:
    """(policy, recipe, env) for RL of an autoregressive policy (OpenVLA, pi0-FAST) loaded from
    ``path`` on the CPU. A run trained here carries its recipe (env, RL settings); any other
    folder needs ``overrides["env"]`` and starts from plain RL settings. Either way the sampler
    is the tokens one unless ``overrides`` name another (which ``run_rl`` then refuses). The
    policy is bound to the env and has its value head."""
    overrides = dict(overrides or {})
    policy = policies.load(path, device="cpu", unnorm_key=unnorm_key)
    carried = policy.spec.recipe
    if carried is None and not overrides.get("env"):
        raise policies.PolicyError(f"{path} was not trained here, so it carries no env: give the env "
                                   "(--env ur5e-reach | libero:<suite> | maniskill:<task>)")
    start = Recipe.from_json(carried) if carried is not None else dataclasses.replace(Recipe(), rl=T.RLConfig())
    start = dataclasses.replace(start, rl=dataclasses.replace(start.rl, sampler=Tokens()))
    recipe = Recipe.from_json(merge(start.to_json(), overrides))
    env = build_env(recipe)
    try:
        if carried is not None:
            policy.bind(env.spec, exec_horizon=recipe.exec_horizon)
        else:
            policy.bind(env.spec)
        policy.attach_value_head()
    except BaseException:
        env.close()
        raise
    return policy, recipe, env


def load_rl_policy(path: str | Path, *, overrides: dict[str, Any] | None = None,
                   unnorm_key: str | None = None) -> tuple[Any, Recipe, Any]:
    """(policy, recipe, env) of the policy RL starts from: ``recipe.load_policy`` for flow
    policies, ``load_token_policy`` for autoregressive ones."""
    if checkpoint_family(path) in FLOW_FAMILIES:
        if unnorm_key is not None:
            raise ValueError("--unnorm-key picks OpenVLA's dataset statistics; this is a flow policy: drop it")
        return load_policy(path, overrides=overrides)
    return load_token_policy(path, overrides=overrides, unnorm_key=unnorm_key)


def save_result(policy, recipe: Recipe, folder: Path) -> Path:
    """The trained policy in a form ``policies.load`` reads: a vlafast policy folder carrying the
    recipe (flow), a Hugging Face OpenVLA folder (OpenVLA), ``policies.save``'s folder (others)."""
    if isinstance(policy, FlowPolicy):
        return save_policy(policy, recipe, folder)
    return policies.save(policy, folder)


def run_rl(init: str | Path | None, out: str | Path, *, recipe_overrides: dict[str, Any] | None = None,
           resume: bool = False, overwrite: bool = False, progress: bool = True,
           dist: DistConfig | None = None, unnorm_key: str | None = None) -> dict[str, Any]:
    """PPO / GRPO from a policy folder; writes checkpoints, metrics.json, policy/, summary.json.
    ``init`` None with ``resume``: the policy the run started from (its run.json). An ``out``
    that holds a run is refused unless ``resume`` or ``overwrite``. ``unnorm_key``: the
    dataset statistics an OpenVLA acts with (a resumed run keeps its own).
    With ``dist``, rollouts come from ``dist.workers`` Ray actors (``vlafast.rl.dist``), each
    building its slice of the recipe's env and a replica of the policy, and ``dist.learners`` > 1
    ranks share each update."""
    out = Path(out)
    check_run_dir(out, resume=resume, overwrite=overwrite)
    if resume:
        init = init or resume_init(out)
        unnorm_key = unnorm_key or resume_unnorm_key(out)
        recipe_overrides = merge(saved_recipe(out), recipe_overrides or {})  # the run as it was, then the new options
    policy, recipe, env = load_rl_policy(init, overrides=recipe_overrides, unnorm_key=unnorm_key)
    try:
        if resume:
            check_resume(out, recipe)
        if isinstance(policy, FlowPolicy):
            ensure_noise_head(policy, recipe)
        T.rl_sampler(policy, recipe.rl)  # a sampler for the other kind of policy is refused before the run starts
        if recipe.rl.bc_coef > 0:
            T.demo_loss(policy, recipe.rl.bc_coef)  # a policy without a supervised loss is refused now
    except BaseException:
        env.close()
        raise
    start_run_dir(out, recipe, init=init, phase=recipe.rl.algo, resume=resume,
                  unnorm_key=getattr(policy, "unnorm_key", None))
    t0 = time.perf_counter()
    demos = collect_recipe_demos(recipe, env, progress=progress) if recipe.rl.bc_coef > 0 else None
    collector = learners = None
    try:
        if dist is not None:
            # replicas for Ray workers / learners: the recipe's tiny model, or a copy of a loaded checkpoint
            rebuild = isinstance(policy, FlowPolicy) and policy.spec.recipe is not None
            make_policy = (functools.partial(build_policy, recipe) if rebuild
                           else functools.partial(replica_of, copy.deepcopy(policy).cpu()))
            collector = RayCollector(policy, functools.partial(env_slice, recipe), make_policy, recipe.rl, dist,
                                     seed=recipe.seed + 7, num_envs=recipe.num_envs)
            learners = LearnerGroup(make_policy, recipe.rl, dist) if dist.learners > 1 else None
        history = T.train_rl(policy, env, recipe.rl, seed=recipe.seed + 7, run_dir=out, resume=resume,
                             progress=progress, demos=demos, collector=collector, learners=learners)
    finally:
        for part in (learners, collector):
            if part is not None:
                part.close()
    ev = evaluate(policy, env, episodes=recipe.eval_episodes, seed=recipe.seed + 100, num_steps=eval_steps(recipe),
                  progress=progress)
    summary = {"phase": recipe.rl.algo, "method": recipe.rl.sampler.kind, "history": history, "eval": summarise_eval(ev),
               "seconds": time.perf_counter() - t0}
    save_result(policy, recipe, out / "policy")
    write_results(out, summary, ev)
    env.close()
    return summary


def replica_of(template, spec):
    """A copy of ``template`` bound to ``spec`` (a Ray worker's env slice)."""
    return copy.deepcopy(template).bind(spec)


def run_eval(checkpoint: str | Path, *, episodes: int | None = None, seed: int | None = None,
             progress: bool = True) -> dict[str, Any]:
    policy, recipe, env = load_policy(checkpoint)
    ev = evaluate(policy, env, episodes=episodes or recipe.eval_episodes,
                  seed=recipe.seed + 100 if seed is None else seed, num_steps=eval_steps(recipe), progress=progress)
    env.close()
    return summarise_eval(ev)


def format_eval(name: str, s: dict[str, Any]) -> str:
    sp = s["speed"]
    lo, hi = s["success_ci95"]
    return (f"{name:10s} success {100 * s['success_rate']:5.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]  "
            f"return {s['return']:6.3f}  speed slowly/none/quickly "
            f"{sp['slowly']:.4f} / {sp['(none)']:.4f} / {sp['quickly']:.4f} m/step  ({s['episodes']} episodes)")


__all__ = ["run_sft", "run_rl", "run_eval", "format_eval", "summarise_eval", "dataclasses"]
