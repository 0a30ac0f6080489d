"""Scripted chunk policies for the robot loop (demo, tests, benchmarks).

A chunk policy is any callable ``policy(q, t) -> chunk`` with an attribute ``dt``: given the
joint positions q: [6] observed at monotonic time t (s), it returns chunk: [T, 6] whose
waypoint i is meant for time t + i * dt. Model policies (pi0, OpenVLA, ...) plug into
``RealtimeRunner`` by wrapping their observation -> action-chunk call in this shape.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from vlafast.robot.servo import DOF, UR5E_HOME


def smoothstep(x: np.ndarray) -> np.ndarray:
    """3x^2 - 2x^3 on [0, 1]: zero slope at both ends."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def smootherstep(x: np.ndarray) -> np.ndarray:
    """6x^5 - 15x^4 + 10x^3 on [0, 1]: zero slope and curvature at both ends; peak second
    derivative 10 / sqrt(3) ~ 5.77."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * x * (x * (6.0 * x - 15.0) + 10.0)


class SinusoidPolicy:
    """q(t) = center + amplitude * ramp(t) * sin(2 pi freq (t - t_start)), t_start = the first
    call's time; ramp rises smoothly from 0 to 1 over ramp_s so the arm starts at rest.
    ``latency_s`` stands in for inference time (the call sleeps that long)."""

    name = "sinusoid"

    def __init__(self, center: Sequence[float] = UR5E_HOME, amplitude: float | Sequence[float] = 0.2,
                 freq_hz: float = 0.5, dt: float = 0.02, horizon: int = 50, ramp_s: float = 1.0,
                 latency_s: float = 0.0):
        self.center = np.asarray(center, dtype=np.float64)
        self.amplitude = np.broadcast_to(np.asarray(amplitude, dtype=np.float64), (DOF,)).copy()
        if self.center.shape != (DOF,):
            raise ValueError(f"center must be [6] joint positions, got {self.center.shape}")
        if dt <= 0 or horizon < 2 or ramp_s <= 0 or latency_s < 0:
            raise ValueError("need dt > 0, horizon >= 2, ramp_s > 0, latency_s >= 0")
        self.freq_hz, self.dt, self.horizon, self.ramp_s, self.latency_s = freq_hz, dt, horizon, ramp_s, latency_s
        self.t_start: float | None = None

    def reference(self, t: np.ndarray) -> np.ndarray:
        """The analytic trajectory: t: [N] (s, monotonic) -> q: [N, 6]."""
        tau = np.asarray(t, dtype=np.float64)[:, None] - (self.t_start or 0.0)
        ramp = smoothstep(tau / self.ramp_s)
        return self.center + self.amplitude * ramp * np.sin(2 * np.pi * self.freq_hz * tau)

    def __call__(self, q: np.ndarray, t: float) -> np.ndarray:
        if self.t_start is None:
            self.t_start = t
        if self.latency_s:
            time.sleep(self.latency_s)
        return self.reference(t + self.dt * np.arange(self.horizon))


POLICIES = {"sinusoid": SinusoidPolicy}


def make_policy(name: str, **kw) -> SinusoidPolicy:
    if name not in POLICIES:
        raise ValueError(f"policy must be one of {sorted(POLICIES)} (model policies plug in through "
                         f"vlafast.robot.RealtimeRunner), got {name!r}")
    return POLICIES[name](**kw)


class Delayed:
    """A chunk policy with ``delay_s`` of inference time at least (sleeps the rest): an injected
    delay, to see hand-overs under slow inference. Other attributes (dt, horizon, guided) are the
    wrapped policy's."""

    def __init__(self, policy: Any, delay_s: float):
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self.policy, self.delay_s = policy, delay_s

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    def __call__(self, q: np.ndarray, t: float, **kw: Any) -> np.ndarray:
        t0 = time.perf_counter()
        chunk = self.policy(q, t, **kw)
        left = self.delay_s - (time.perf_counter() - t0)
        if left > 0:
            time.sleep(left)
        return chunk


class Pi0ChunkPolicy:
    """A pi0 / pi0.5 model as a real-time chunk policy, with real-time chunking.

    ``observe(q [6], t_s) -> Pi0Observation`` (batch 1: the cameras, prompt and state at that
    instant) is the caller's; the model's output actions must be the joint targets the servo
    tracks, [T, 6] (absolute joint positions, rad: the normaliser's action space). ``guided``:
    the runner passes the executing plan as ``prefix`` with its RTC mask, and the chunk is
    sampled by ``Pi0Policy.sample_actions(prefix=, prefix_weights=)``; otherwise it switches
    naively (the runner's blend only). ``noise_seed`` fixes the sampler's noise stream.
    """

    name = "pi0"

    def __init__(self, model: Any, observe: Callable[[np.ndarray, float], Any], *, dt: float, guided: bool = True,
                 num_steps: int | None = None, max_guidance: float = 5.0, noise_seed: int = 0):
        import torch

        if dt <= 0:
            raise ValueError(f"dt must be > 0 (s between waypoints), got {dt}")
        out_dim = model.normalizer.action_dim if model.normalizer is not None else model.cfg.action_dim
        if out_dim != DOF:
            raise ValueError(f"the model's output actions must be the {DOF} joint positions, got {out_dim} dims "
                             "(give the model a normaliser whose action stats have 6 dims)")
        self.model, self.observe, self.dt, self.guided = model, observe, dt, guided
        self.horizon = model.cfg.horizon
        self.num_steps, self.max_guidance = num_steps, max_guidance
        self._torch = torch
        self._gen = torch.Generator(device=model.device).manual_seed(noise_seed)

    def __call__(self, q: np.ndarray, t: float, prefix: np.ndarray | None = None,
                 weights: np.ndarray | None = None) -> np.ndarray:
        """chunk [T, 6] for the robot observed at (q, t); prefix [T, 6] / weights [T] from the runner."""
        torch = self._torch
        obs = self.observe(q, t)
        kw: dict[str, Any] = {}
        if prefix is not None:
            dev = self.model.device
            kw = {"prefix": torch.as_tensor(prefix, dtype=torch.float32, device=dev)[None],
                  "prefix_weights": torch.as_tensor(weights, dtype=torch.float32, device=dev),
                  "max_guidance": self.max_guidance}
        chunk = self.model.sample_actions(obs, generator=self._gen, num_steps=self.num_steps, **kw)
        return chunk[0].double().cpu().numpy()
