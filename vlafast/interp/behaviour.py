"""Steered vs unsteered behaviour of any steerable policy on a ``VecEnv`` (docs/architecture.md §2).

The paper's behaviour metric is the mean end-effector displacement per control step (LIBERO-
Long: baseline 0.38, "fast" cluster 0.56, "slow" cluster 0.25). The built-in UR5e task reports
it per episode (``info["episode_speed"]``, metres per step); on other envs the mean norm of the
first three action dims stands in (``vlafast.eval.run_episodes``'s ``action_norm``); ``steering_comparison`` runs the same
fixed seed set once per plan (deterministic ODE sampling: every run sees the same episodes, so
the only difference is the plan) and reports mean speed with a bootstrap 95 % interval, the
difference to the unsteered run with a paired (episode by episode) bootstrap interval, and
the means per instructed speed word.

Also here: the speed-word direction baseline (``speed_direction``: mean difference of VLM activations between "... quickly" and
"... slowly" prompts on the same scenes) and ``cluster_plans`` (keyword clusters from a
neuron dictionary turned into plans, restricted to the VLM layers that can move the actions).

Axes: B envs, P prefix tokens, D VLM width.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from vlafast.envs.reach_words import speed_of
from vlafast.interp.cluster_files import read_cluster_file
from vlafast.interp.clusters import cluster
from vlafast.interp.dictionary import NeuronDictionary
from vlafast.interp.steering import DirectionPlan, SteeringPlan

SPEED_WORDS = ("slowly", "quickly")


# ---------------------------------------------------------------------------------------------
# plans


def action_layers(policy) -> list[str]:
    """VLM layers whose MLPs can change pi0's actions: all but the last (whose MLP only feeds the
    prefix output, never the K/V the expert reads; see ``Pi0Policy.mlps``)."""
    if callable(getattr(policy, "action_layers", None)):
        return policy.action_layers()
    model = policy.model if hasattr(policy, "model") else policy
    depth = model.cfg.vlm.depth
    return [f"vlm.{l}" for l in range(depth - 1)]


def cluster_plans(policy, dictionary: NeuronDictionary, names: list[str], alpha: float, *,
                  min_hits: int = 1, max_neurons: int | None = None) -> dict[str, SteeringPlan]:
    """{name: SteeringPlan clamping cluster ``name`` at ``alpha``} over ``action_layers``. A
    cluster with no neuron is left out (its name is absent from the result). Clamped at every
    position the MLPs see, as the paper's hooks do: for pi0 that is the prefix (its VLM MLPs run
    on nothing else); for decoders (OpenVLA, pi0-FAST) the prefill and every decoded token."""
    layers = [l for l in action_layers(policy) if l in dictionary.layers]
    plans = {}
    for name in names:
        c = cluster(dictionary, name, min_hits=min_hits, layers=layers, max_neurons=max_neurons)
        if len(c):
            plans[name] = SteeringPlan(c.neurons, alpha=alpha, positions="all")
    return plans


def file_plans(policy, path: str, names: list[str] | None, alpha: float, *,
               max_neurons: int | None = None) -> dict[str, SteeringPlan]:
    """{name: SteeringPlan} for the clusters ``names`` (default all) of a cluster file in the
    paper's form (``vlafast.interp.cluster_files``: flat ids over this policy's layers), each
    clamped to the constant ``alpha`` at every position (the paper's coefficient), the first
    ``max_neurons`` of each when given."""
    clusters = read_cluster_file(path, policy, names=names)
    return {name: SteeringPlan(neurons[:max_neurons], alpha=alpha, positions="all") for name, neurons in clusters.items()}


def random_like(plan: SteeringPlan, policy, seed: int) -> SteeringPlan:
    """A control for ``plan``: as many neurons in each of its layers, drawn uniformly at random
    (``seed``), same alpha and positions. Tells a cluster's specific effect from what clamping
    any neurons of that many does."""
    from vlafast.interp.dictionary import model_mlps

    mlps = model_mlps(policy)
    g = torch.Generator().manual_seed(seed)
    neurons = []
    for layer, idx in plan.neurons.items():
        F = mlps[layer].down_proj.weight.shape[1]
        neurons += [(layer, int(i)) for i in torch.randperm(F, generator=g)[: len(idx)]]
    return SteeringPlan(neurons, alpha=plan.alpha, positions=plan.positions, max_batch=plan.max_batch)


def default_plans(policy, env, *, dictionary: NeuronDictionary | None = None, clusters: tuple[str, ...] = ("fast", "slow"),
                  alpha: float = 4.0, k: int = 3, max_neurons: int | None = None, direction_alpha: float = 1.0,
                  controls: int = 0, seed: int = 0, cluster_file: str | None = None) -> dict[str, Any]:
    """The plans `vlafast steer` and the demo compare: keyword clusters from ``dictionary`` (built
    here with top-``k`` when None) clamped at ``alpha`` (or, with ``cluster_file``, the file's
    clusters named ``clusters``), ``controls`` random sets of the same sizes per cluster
    ("random:fast#0", ...), and the speed-word direction baseline at +-``direction_alpha``
    ("dir:quickly", "dir:slowly"; none when 0)."""
    if cluster_file is not None:
        plans: dict[str, Any] = dict(file_plans(policy, cluster_file, None if clusters is None else list(clusters), alpha, max_neurons=max_neurons))
    else:
        if dictionary is None:
            dictionary = NeuronDictionary.build(policy, policy.tokenizer, k=k)
        plans = dict(cluster_plans(policy, dictionary, list(clusters), alpha, max_neurons=max_neurons))
    for name in list(plans):
        for i in range(controls):
            plans[f"random:{name}#{i}"] = random_like(plans[name], policy, seed=seed * 1000 + i)
    if direction_alpha:
        for word in ("quickly", "slowly"):
            plans[f"dir:{word}"] = speed_direction(policy, env, alpha=direction_alpha, seed=seed, towards=word)
    return plans


def with_speed_word(instruction: str, word: str) -> str:
    """The instruction with its speed word or synonym (if any) replaced by ``word``."""
    parts = instruction.strip().rsplit(None, 1)
    base = parts[0] if len(parts) == 2 and speed_of(parts[1]) else instruction.strip()
    return f"{base} {word}"


@torch.no_grad()
def prefix_activations(policy, obs, layer: str) -> Tensor:
    """Residual stream after VLM ``layer`` ("vlm.{l}"), averaged over each request's valid prefix
    tokens: [B, D]."""
    l = int(layer.split(".")[1])
    batch = policy.observe(obs)
    model = policy.model
    cache = model.embed_prefix(batch.images, batch.image_masks, batch.tokens, batch.token_masks,
                               keep_hidden_states=True)
    h = cache.hidden_states[l + 1].float()  # [B, P, D]
    m = cache.pad_mask[..., None].float()
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


def speed_direction(policy, env, *, layer: str = "vlm.0", alpha: float = 1.0, seed: int = 0,
                    towards: str = "quickly") -> DirectionPlan:
    """The direction baseline: mean VLM activation difference between the same scenes instructed
    "... quickly" and "... slowly" (``towards="slowly"`` flips it). alpha = 1 shifts a "slowly"
    prompt's mean activation onto the "quickly" one."""
    if towards not in SPEED_WORDS:
        raise ValueError(f"towards must be one of {SPEED_WORDS}, got {towards!r}")
    away = SPEED_WORDS[1 - SPEED_WORDS.index(towards)]
    obs = env.reset(seed=seed)
    acts = {}
    for word in SPEED_WORDS:
        o = dict(obs)
        o["instruction"] = [with_speed_word(s, word) for s in obs["instruction"]]
        acts[word] = prefix_activations(policy, o, layer)
    return DirectionPlan.mean_difference(layer, acts[towards], acts[away], alpha=alpha, positions="prefix")


# ---------------------------------------------------------------------------------------------
# measurement


def bootstrap_ci(x: np.ndarray, *, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of mean(x)."""
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (samples, len(x)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


@torch.no_grad()
def episode_records(policy, env, *, episodes: int, seed: int, num_steps: int = 4) -> list[dict[str, Any]]:
    """Deterministic (ODE) episodes on fixed seeds (``vlafast.eval.evaluate``), sorted by
    (env, index) so two runs under different plans can be compared episode by episode."""
    from vlafast.eval import evaluate

    out = evaluate(policy, env, episodes=episodes, seed=seed, num_steps=num_steps, progress=False)
    return sorted(out["records"], key=lambda r: (r["env"], r["index"]))


def _decode_counts(policy) -> tuple[int, int] | None:
    """(chunks that failed to decode, chunks decoded) so far, for token policies that count them
    (pi0-FAST): a clamp that breaks the token stream holds the arm, which is not steering."""
    if hasattr(policy, "decode_failures") and hasattr(policy, "decoded_chunks"):
        return policy.decode_failures, policy.decoded_chunks
    return None


def _against_controls(records, controls, runs, name, metric, samples, seed) -> dict[str, Any]:
    """A cluster's effect beyond what clamping random neurons of its size does: per episode, its
    speed minus the mean speed of its random sets on that episode ("delta", with a paired
    bootstrap 95% interval); how many sets it is above / below in mean speed, and the rank
    test's one-sided p-values over the sets ("p_faster": (1 + sets at least as fast) / (sets +
    1), "p_slower" likewise; 19 sets can reach p = 0.05)."""
    own = np.array([r[metric] for r in records])
    others = np.array([[r[metric] for r in c] for c in controls])
    diff = own - others.mean(0)
    deltas = [runs[f"random:{name}#{i}"]["delta"] for i in range(len(controls))]
    return {"delta": float(diff.mean()), "ci95": bootstrap_ci(diff, samples=samples, seed=seed),
            "controls": len(controls), "above": sum(runs[name]["delta"] > d for d in deltas),
            "below": sum(runs[name]["delta"] < d for d in deltas),
            "p_faster": (1 + sum(d >= runs[name]["delta"] for d in deltas)) / (len(deltas) + 1),
            "p_slower": (1 + sum(d <= runs[name]["delta"] for d in deltas)) / (len(deltas) + 1)}


def steering_comparison(policy, env, plans: dict[str, Any], episodes: int = 32, seed: int = 100, *,
                        num_steps: int = 4, bootstrap: int = 2000) -> dict[str, Any]:
    """Mean end-effector speed (m per control step) per plan on one fixed seed set.

    plans: {name: SteeringPlan | DirectionPlan}; the unsteered run is added as "baseline".
    ``episodes`` should be a multiple of the env count so every run sees the same episodes.
    Returns {"episodes", "seed", "runs": {name: {"speed", "speed_ci95", "delta", "delta_ci95",
    "success_rate", "by_word": {word: speed}, "neurons"[, "undecoded"][, "vs_controls"]}}};
    "undecoded" (the fraction of chunks whose tokens did not decode) for policies that count it
    (pi0-FAST); "vs_controls" for a plan whose random sets ran as "random:<name>#<i>"
    (``_against_controls``: its effect beyond theirs, paired by episode).
    """
    from vlafast.eval import speed_by_word

    if "baseline" in plans:
        raise ValueError("'baseline' is the unsteered run's name; call your plan something else")
    B = env.spec.num_envs
    if episodes % B:
        raise ValueError(f"episodes must be a multiple of the env count {B} (same episodes for every plan), "
                         f"got {episodes}")
    raw: dict[str, list[dict]] = {}
    undecoded: dict[str, float] = {}
    for name, plan in {"baseline": None, **plans}.items():
        counts = _decode_counts(policy)
        with plan.applied(policy) if plan is not None else contextlib.nullcontext():
            raw[name] = episode_records(policy, env, episodes=episodes, seed=seed, num_steps=num_steps)
        if counts is not None:
            failed, chunks = (b - a for a, b in zip(counts, _decode_counts(policy)))
            undecoded[name] = failed / max(chunks, 1)
    # the env's end-effector speed where it reports one (the built-in task), else the actions' norm
    metric = "speed" if all(np.isfinite(r["speed"]) for r in raw["baseline"]) else "action_norm"
    base = np.array([r[metric] for r in raw["baseline"]])
    runs = {}
    for name, records in raw.items():
        if [r["instruction"] for r in records] != [r["instruction"] for r in raw["baseline"]]:
            raise RuntimeError(f"run {name!r} saw other episodes than the baseline; the env is not seed-deterministic")
        speed = np.array([r[metric] for r in records])
        plan = plans.get(name)
        runs[name] = {
            "speed": float(speed.mean()),
            "speed_ci95": bootstrap_ci(speed, samples=bootstrap, seed=seed),
            "delta": float(speed.mean() - base.mean()),
            "delta_ci95": bootstrap_ci(speed - base, samples=bootstrap, seed=seed),  # paired by episode
            "success_rate": float(np.mean([r["success"] for r in records])),
            "by_word": speed_by_word(records, metric),
            "neurons": len(plan) if isinstance(plan, SteeringPlan) else 0,
        }
        if name in undecoded:
            runs[name]["undecoded"] = undecoded[name]
    for name in plans:
        controls = [raw[c] for c in plans if c.startswith(f"random:{name}#")]
        if controls:
            runs[name]["vs_controls"] = _against_controls(raw[name], controls, runs, name, metric, bootstrap, seed)
    return {"episodes": episodes, "seed": seed, "metric": metric, "runs": runs}


def format_comparison(result: dict[str, Any]) -> str:
    """A plain-text table of ``steering_comparison``'s result (speeds in mm per control step)."""
    runs = result["runs"]
    words = list(next(iter(runs.values()))["by_word"])
    tokens = all("undecoded" in r for r in runs.values())
    head = (f"{'plan':<14}{'neurons':>8}{'speed':>8}{'95% CI':>16}{'delta':>8}{'95% CI':>16}{'success':>9}"
            + (f"{'undecoded':>10}" if tokens else "") + "".join(f"{w:>9}" for w in words))
    what = ("mean end-effector speed, mm per control step" if result.get("metric", "speed") == "speed"
            else "mean action norm (first 3 dims) x 1000 per action")
    lines = [f"{what} ({result['episodes']} episodes, seed {result['seed']})", head]
    for name, r in runs.items():
        lo, hi = r["speed_ci95"]
        dlo, dhi = r["delta_ci95"]
        lines.append(
            f"{name:<14}{r['neurons']:>8}{1e3 * r['speed']:>8.2f}{f'[{1e3 * lo:.2f}, {1e3 * hi:.2f}]':>16}"
            f"{1e3 * r['delta']:>+8.2f}{f'[{1e3 * dlo:+.2f}, {1e3 * dhi:+.2f}]':>16}{r['success_rate']:>9.2f}"
            + (f"{r['undecoded']:>10.2f}" if tokens else "") + "".join(f"{1e3 * r['by_word'].get(w, math.nan):>9.2f}" for w in words))
    for name, r in runs.items():
        if "vs_controls" in r:
            c = r["vs_controls"]
            lo, hi = c["ci95"]
            lines.append(f"{name} against its {c['controls']} random sets: {1e3 * c['delta']:+.2f} [{1e3 * lo:+.2f}, "
                         f"{1e3 * hi:+.2f}] (paired by episode); faster than {c['above']} (p {c['p_faster']:.3f}), "
                         f"slower than {c['below']} (p {c['p_slower']:.3f})")
    return "\n".join(lines)
