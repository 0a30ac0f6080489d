"""Cluster files in the steering paper's form: named sets of flat neuron ids.

The paper's public code (arXiv 2509.00328) names a neuron by one integer over the language
model's stacked FFNs, ``id = layer * d_ff + neuron`` (pi0-FAST / Gemma-2B: 18 x 16384; OpenVLA /
Llama-2-7B: 32 x 11008), and keeps its clusters in a YAML file of ``name: ids``, where ``ids`` is
either a list or a mapping from id to the neuron's top tokens (kept for the reader; the tokens
are not used to steer):

    high_cluster: [256459, 260217, 40857]
    up_10:
      237682: [up, Up, ...]

A run names a cluster and a coefficient; the intervention overwrites those neurons' inputs to
``down_proj`` with the coefficient (vlafast's ``SteeringPlan(neurons, alpha=coef)``).

``read_cluster_file`` turns such a file (YAML, or the same structure as JSON) into vlafast's
``(layer name, neuron)`` pairs for a given model; ``write_cluster_file`` writes clusters (a
``Cluster`` from ``vlafast.interp.clusters`` or plain pairs) in the same form, with each
neuron's top tokens when a dictionary is given. Flat ids count the language model's layers
only (``vlm.{l}``): pi0's action expert has no place in the paper's numbering.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from torch import nn

from vlafast._io import atomic_write_text
from vlafast.interp.dictionary import NeuronDictionary, model_mlps

LAYER_PREFIX = "vlm."


class ClusterFileError(ValueError):
    """A cluster file that cannot be read for this model: one sentence naming the file."""


def flat_layout(model: nn.Module) -> tuple[int, int]:
    """(layers, d_ff) of the flat numbering for ``model`` (a policy or a model with ``mlps``):
    its language-model MLPs ``vlm.0 .. vlm.{L-1}``, all of one width."""
    mlps = model_mlps(model)
    widths = {name: mlp.down_proj.weight.shape[1] for name, mlp in mlps.items() if name.startswith(LAYER_PREFIX)}
    if not widths:
        raise ClusterFileError(f"{type(model).__name__} has no language-model MLPs ({LAYER_PREFIX}*) to number")
    expected = [f"{LAYER_PREFIX}{l}" for l in range(len(widths))]
    if sorted(widths, key=lambda n: int(n[len(LAYER_PREFIX):])) != expected:
        raise ClusterFileError(f"the model's language-model MLPs are not numbered 0..{len(widths) - 1}: {sorted(widths)}")
    if len(set(widths.values())) != 1:
        raise ClusterFileError(f"flat neuron ids need MLPs of one width; this model's differ: {sorted(set(widths.values()))}")
    return len(widths), next(iter(widths.values()))


def to_flat(layer: str | int, neuron: int, d_ff: int) -> int:
    """("vlm.15", 10315) -> 15 * d_ff + 10315."""
    name = f"{LAYER_PREFIX}{layer}" if isinstance(layer, int) else layer
    if not name.startswith(LAYER_PREFIX):
        raise ValueError(f"only language-model layers ({LAYER_PREFIX}*) have flat ids, got {layer!r}")
    if not 0 <= neuron < d_ff:
        raise ValueError(f"neuron must be in [0, {d_ff}), got {neuron}")
    return int(name[len(LAYER_PREFIX):]) * d_ff + neuron


def from_flat(flat: int, d_ff: int) -> tuple[str, int]:
    """15 * d_ff + 10315 -> ("vlm.15", 10315)."""
    return f"{LAYER_PREFIX}{flat // d_ff}", flat % d_ff


def _load(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ClusterFileError(f"cannot read cluster file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ClusterFileError(f"cluster file {path} is not UTF-8 text") from None
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClusterFileError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    import yaml

    try:
        return yaml.safe_load(text)  # safe_load: plain data only, never Python objects
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ClusterFileError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None


def _flat_id(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ClusterFileError(f"{where}: neuron ids are integers, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)  # JSON object keys are strings
    raise ClusterFileError(f"{where}: neuron ids are integers, got {value!r}")


def read_cluster_file(path: str | os.PathLike, model: nn.Module | None = None, *,
                      layout: tuple[int, int] | None = None,
                      names: Iterable[str] | None = None) -> dict[str, list[tuple[str, int]]]:
    """{cluster name: [(layer name, neuron), ...]} from a paper-form file, for ``model`` (its
    layout decides the numbering) or an explicit ``layout`` = (layers, d_ff). ``names``: the
    clusters to return (default all), each of which must be in the file. Ids outside
    [0, layers * d_ff), duplicates and empty clusters are refused with the file and cluster named."""
    path = Path(path)
    if (model is None) == (layout is None):
        raise ValueError("pass the model the clusters are for, or layout=(layers, d_ff)")
    n_layers, d_ff = layout if layout is not None else flat_layout(model)
    data = _load(path)
    if not isinstance(data, dict) or not data:
        raise ClusterFileError(f"{path} must map cluster names to neuron ids (name: [id, ...]), got "
                               f"{type(data).__name__ if data else 'nothing'}")
    wanted = list(data) if names is None else list(names)
    missing = [n for n in wanted if n not in data]
    if missing:
        raise ClusterFileError(f"{path} has no cluster {missing[0]!r}; it has {sorted(map(str, data))}")
    total = n_layers * d_ff
    out: dict[str, list[tuple[str, int]]] = {}
    for name in wanted:
        raw, where = data[name], f"{path}: cluster {name!r}"
        if isinstance(raw, Mapping):
            ids = [_flat_id(k, where) for k in raw]
        elif isinstance(raw, Sequence) and not isinstance(raw, str):
            ids = [_flat_id(v, where) for v in raw]
        else:
            raise ClusterFileError(f"{where} must be a list of ids or a mapping id -> tokens, got {raw!r}")
        if not ids:
            raise ClusterFileError(f"{where} is empty")
        bad = [i for i in ids if not 0 <= i < total]
        if bad:
            raise ClusterFileError(f"{where}: id {bad[0]} is outside [0, {total}) ({n_layers} layers x {d_ff} neurons"
                                   f"{', this model' if model is not None else ''}){f' and {len(bad) - 1} more' if len(bad) > 1 else ''}")
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ClusterFileError(f"{where}: id {dup} appears twice")
        out[str(name)] = [from_flat(i, d_ff) for i in ids]
    return out


def write_cluster_file(path: str | os.PathLike, clusters: Mapping[str, Any], *, d_ff: int,
                       dictionary: NeuronDictionary | None = None, top: int = 10) -> Path:
    """Write ``clusters`` ({name: a ``Cluster`` or [(layer, neuron), ...]}) in the paper's form:
    YAML (``.yaml`` / ``.yml``) or JSON (``.json``); with ``dictionary``, each id maps to its
    neuron's ``top`` tokens, else each cluster is a list of ids. Atomic (write, fsync, rename)."""
    path = Path(path)
    if path.suffix not in (".yaml", ".yml", ".json"):
        raise ValueError(f"cluster file must end in .yaml, .yml or .json, got {path.name!r}")
    if not clusters:
        raise ValueError("no clusters to write")
    doc: dict[str, Any] = {}
    for name, cluster in clusters.items():
        pairs = list(getattr(cluster, "neurons", cluster))
        if not pairs:
            raise ValueError(f"cluster {name!r} is empty")
        ids = [to_flat(layer, int(neuron), d_ff) for layer, neuron in pairs]
        if dictionary is None:
            doc[str(name)] = ids
        else:
            doc[str(name)] = {i: [t for t, _ in dictionary.explain(layer, int(n)).top[:top]]
                              for i, (layer, n) in zip(ids, pairs)}
    if path.suffix == ".json":
        text = json.dumps({k: ({str(i): t for i, t in v.items()} if isinstance(v, dict) else v) for k, v in doc.items()},
                          indent=1, ensure_ascii=False) + "\n"
    else:
        import yaml

        text = yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, default_flow_style=None)
    atomic_write_text(path, text)
    return path


__all__ = ["ClusterFileError", "flat_layout", "from_flat", "read_cluster_file", "to_flat", "write_cluster_file"]
