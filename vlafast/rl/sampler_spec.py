"""The stochastic sampler RL collects and updates with, as a typed, JSON-serialisable spec.

``RLConfig.sampler`` holds a ``FlowSDE`` or a ``FlowNoise`` (flow policies: pi0 / pi0.5) or a
``Tokens`` (autoregressive policies: OpenVLA, pi0-FAST). ``sampler_config(spec, noise_head)``
turns a flow spec into the ``flow.SamplerConfig`` that the rollout and the update share, a
token spec into a ``TokenSampler``; ``policy_sampler(spec, policy)`` does so after checking
that the policy samples that way. The spec is plain data (it saves with a recipe or a
checkpoint); the sampler config is not: a Flow-Noise config holds the policy's noise head, a
module being trained. Axes: K denoise steps.

JSON: ``{"kind": "flow_sde", "num_steps": 4, "a": 0.5, "hybrid": true}``,
``{"kind": "flow_noise", "num_steps": 4}`` or ``{"kind": "tokens", "temperature": 1.0}``. RL
configs written before the spec existed carry the flat keys ``method`` / ``num_steps`` /
``sde_a`` / ``sde_hybrid``; ``from_rl_json`` reads both.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, Union

from vlafast import _validate
from vlafast.flow import sampler as flow
from vlafast.policies.base import PolicyError
from vlafast.policies.tokens import TokenSampler


class _Spec:
    """What every spec shares: JSON (``dataclasses.asdict`` carries ``kind``, so a recipe's or a
    checkpoint's ``asdict`` round-trips through ``from_json``)."""

    kind: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


class _FlowSpec(_Spec):
    """What both flow specs share: K denoise steps, validated."""

    num_steps: int

    def __post_init__(self) -> None:
        _validate.number(f"{type(self).__name__}.num_steps (K denoise steps)", self.num_steps, low=1, integer=True)


@dataclasses.dataclass(frozen=True)
class FlowSDE(_FlowSpec):
    """Flow-SDE (pi_RL): sigma_t = a * sqrt(t / (1 - t)). ``hybrid``: one random denoise step
    per chunk is stochastic and the log-prob is its own; otherwise all K are, and the log-prob
    is their joint one."""

    num_steps: int = 4          # K (pi_RL: 4 for pi0, 3-5 for pi0.5)
    a: float = 0.5              # noise level (pi_RL: 0.5; 0.3 for some pi0.5 runs)
    hybrid: bool = True
    kind: Literal["flow_sde"] = dataclasses.field(default="flow_sde", init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        _validate.number("FlowSDE.a (the noise level)", self.a, low=0, low_open=True)
        _validate.of_type("FlowSDE.hybrid", self.hybrid, bool, "true or false")


@dataclasses.dataclass(frozen=True)
class FlowNoise(_FlowSpec):
    """Flow-Noise (pi_RL): the policy's noise head predicts each step's variance; every step is
    stochastic and the log-prob is the mean over the K + 1 terms."""

    num_steps: int = 4          # K
    kind: Literal["flow_noise"] = dataclasses.field(default="flow_noise", init=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Tokens(_Spec):
    """Action tokens drawn from ``softmax(logits / temperature)`` (``policies.tokens``); the
    log-prob of a chunk is the sum over its tokens, as RLinf and SimpleVLA-RL train OpenVLA."""

    temperature: float = 1.0    # 1: the model's own distribution
    kind: Literal["tokens"] = dataclasses.field(default="tokens", init=False, repr=False)

    def __post_init__(self) -> None:
        _validate.number("Tokens.temperature", self.temperature, low=0, low_open=True)


SamplerSpec = Union[FlowSDE, FlowNoise, Tokens]
SPECS: dict[str, type[FlowSDE] | type[FlowNoise] | type[Tokens]] = {
    "flow_sde": FlowSDE, "flow_noise": FlowNoise, "tokens": Tokens,
}
# RLConfig keys before ``sampler``: old key -> spec field
LEGACY_KEYS = {"method": "kind", "num_steps": "num_steps", "sde_a": "a", "sde_hybrid": "hybrid"}


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def sampler_config(spec: SamplerSpec, noise_head=None) -> flow.SamplerConfig | TokenSampler:
    """The sampler of ``spec``; Flow-Noise samples with ``noise_head`` (the policy's)."""
    if isinstance(spec, FlowSDE):
        return flow.flow_sde(a=spec.a, hybrid=spec.hybrid, num_steps=spec.num_steps)
    if isinstance(spec, FlowNoise):
        if noise_head is None:
            raise ValueError("flow_noise needs a policy with a noise head (policy.attach_noise_head())")
        return flow.flow_noise(noise_head, num_steps=spec.num_steps)
    if isinstance(spec, Tokens):
        return TokenSampler(spec.temperature)
    raise TypeError(f"not a sampler spec: {spec!r}; use FlowSDE(...), FlowNoise(...) or Tokens(...)")


def policy_sampler(spec: SamplerSpec, policy) -> flow.SamplerConfig | TokenSampler:
    """``sampler_config`` for ``policy``, refusing a spec of the other kind of policy in one
    sentence (a ``PolicyError``): flow sampling needs a ``FlowPolicy``, token sampling an
    autoregressive policy (any other: OpenVLA, pi0-FAST)."""
    from vlafast.policies.flow import FlowPolicy

    family = getattr(getattr(policy, "spec", None), "family", type(policy).__name__)
    flow_policy = isinstance(policy, FlowPolicy)
    if isinstance(spec, Tokens) and flow_policy:
        raise PolicyError(f"the tokens sampler draws action tokens, but this {family} policy denoises: "
                         "use a flow sampler (flow_sde or flow_noise)")
    if not isinstance(spec, Tokens) and not flow_policy:
        raise PolicyError(f"the {spec.kind} sampler denoises, but this {family} policy decodes action tokens: "
                         "use the tokens sampler ({\"kind\": \"tokens\"}, --method tokens)")
    return sampler_config(spec, getattr(policy, "noise_head", None))


def from_json(data: dict[str, Any], base: SamplerSpec | None = None) -> SamplerSpec:
    """A spec from ``{"kind": ..., **fields}``, possibly partial: a missing kind is ``base``'s,
    and missing fields take ``base``'s values where its kind has them (else the defaults).
    Unknown kinds and fields raise."""
    base = FlowSDE() if base is None else base
    data = dict(data)
    kind = data.pop("kind", base.kind)
    if kind not in SPECS:
        raise ValueError(f"RL needs a stochastic sampler: kind must be one of {sorted(SPECS)}, got {kind!r}")
    cls = SPECS[kind]
    unknown = set(data) - _fields(cls)
    if unknown:
        raise ValueError(f"unknown {kind} sampler fields {sorted(unknown)}; known: {sorted(_fields(cls))}")
    inherited = {k: v for k, v in base.to_json().items() if k in _fields(cls)}
    return cls(**{**inherited, **data})


def from_rl_json(rl: dict[str, Any], base: SamplerSpec | None = None) -> SamplerSpec:
    """The spec of RLConfig JSON ``rl``: its ``sampler`` (a dict or a spec), with the flat keys
    of older configs (``method``, ``num_steps``, ``sde_a``, ``sde_hybrid``) applied on top and
    removed from ``rl``. As before, Flow-SDE's keys are ignored by a Flow-Noise sampler."""
    spec = rl.pop("sampler", {})
    data = dict(spec.to_json() if isinstance(spec, _Spec) else spec)
    legacy = {new: rl.pop(old) for old, new in LEGACY_KEYS.items() if old in rl}
    if legacy:
        data.update(legacy)
        cls = SPECS.get(data.get("kind", (base or FlowSDE()).kind))
        if cls is not None:
            data = {k: v for k, v in data.items() if k == "kind" or k in _fields(cls)}
    return from_json(data, base)
