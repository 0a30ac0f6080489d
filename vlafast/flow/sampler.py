"""Flow-matching sampling with exact log-probs: ODE, Flow-SDE, Flow-Noise (pi_RL, docs/architecture.md §3).

Conventions. A chunk x: [B, T, A] (B batch, T horizon, A action dim). Time runs on the grid
t_k = 1 - k/K, k = 0..K, from noise (t=1) to action (t=0); delta d = 1/K; the ODE step is
x <- x - d * v(x, t). The model is a velocity function

    velocity_fn(x: [B, T, A], t: [B], ctx) -> v: [B, T, A]                (ODE, Flow-SDE)
    velocity_fn(x: [B, T, A], t: [B], ctx) -> (v: [B, T, A], h: [B, T, D]) (Flow-Noise)

where ``ctx`` is whatever the model needs (e.g. the prefix KV cache) and ``h`` the hidden
states the noise head reads (pi0: the expert's suffix outputs). Returning ``(v, h)`` is
accepted by every method; Flow-Noise requires it. The sampler keeps the chain in the noise's
dtype (float32 or float64); a bf16 model casts inside velocity_fn.

Methods (each stochastic step is Gaussian, x' = mean + sigma * eps):

* ODE: deterministic, no log-prob. ``guidance=RTCGuidance(prefix, weights, max_guidance)``
  (``vlafast.flow.rtc``) turns every step into a guided one for real-time chunking: the
  plain step plus d c_tau J^T W (Y - x0_hat), a vector-Jacobian product through the denoised
  estimate x0_hat = x - t v. W = 0 gives the plain step.
* Flow-SDE(a, hybrid): sigma_t = a * sqrt(t / (1 - t)), with 1 - t_1 (= d) in the
  denominator at t = 1 where 1 - t is 0 (as RLinf does), so sigma_0 = a * sqrt(K);
  mean = x - d [v + sigma_t^2 / (2t) (x + (1 - t) v)], std = sigma_t * sqrt(d).
  hybrid=True: one step j per sample, drawn uniformly from the generator, is stochastic and
  the others are ODE steps; the chunk's log-prob is step j's. hybrid=False: every step is
  stochastic and the chunk's log-prob is the MEAN over the K+1 Gaussian terms (initial noise
  N(0, I) + K transitions), RLinf's ``joint_logprob``. The mean, not the sum, keeps the
  scale of one Gaussian term, so the PPO ratio exp(logp - logp_old) is the geometric mean of
  the per-term ratios and clip 0.2 means the same thing as in the hybrid case; the true joint
  density of the chain is (K+1) times it.
* Flow-Noise(noise_head): every step stochastic, mean = the ODE step, sigma = the head's
  exp(logvar/2) from h; chunk log-prob = MEAN over the K+1 terms, as above.

Every term is summed over the executed part of the chunk: ``action_mask`` [T, A] or
[B, T, A] (bool or 0/1 float; e.g. the first 5 actions x 7 dims). Entropy per term,
0.5 log(2 pi e sigma^2) summed under the mask, is reported per step for the entropy bonus.

One code path: ``sample`` computes its log-probs with ``_transition`` + ``gaussian_step``,
and ``evaluate`` / ``log_prob`` recompute them from a stored trace through the same two
functions, so on the same backend they agree bitwise (the velocity function is evaluated on
batches of the same size B in both; rows do not interact).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Union

import torch

from vlafast.flow.noise_head import NoiseHead
from vlafast.flow.rtc import RTCGuidance, guided_step
from vlafast.ops.gaussian_step import gaussian_step, gaussian_terms_ref

VelocityOut = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
VelocityFn = Callable[[torch.Tensor, torch.Tensor, Any], VelocityOut]


# ---------------------------------------------------------------------------------------------
# configs


def _check_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps K must be an int >= 1 (pi0 inference uses 10, pi_RL 4), got {num_steps!r}")


@dataclasses.dataclass(frozen=True)
class ODEConfig:
    """Deterministic Euler sampling; no log-probs."""

    num_steps: int = 10

    def __post_init__(self) -> None:
        _check_steps(self.num_steps)


@dataclasses.dataclass(frozen=True)
class FlowSDEConfig:
    """Flow-SDE: noise level ``a`` (pi_RL 0.5; 0.3 for some pi0.5 runs), hybrid ODE/SDE."""

    num_steps: int = 4
    a: float = 0.5
    hybrid: bool = True

    def __post_init__(self) -> None:
        _check_steps(self.num_steps)
        if not (isinstance(self.a, (int, float)) and math.isfinite(self.a) and self.a >= 0):
            raise ValueError(f"Flow-SDE noise level a must be a finite float >= 0 (pi_RL uses 0.5), got {self.a!r}")


@dataclasses.dataclass(frozen=True)
class FlowNoiseConfig:
    """Flow-Noise: a learned per-element sigma from ``noise_head`` (its bounds live on it)."""

    noise_head: NoiseHead
    num_steps: int = 4

    def __post_init__(self) -> None:
        _check_steps(self.num_steps)
        if not isinstance(self.noise_head, NoiseHead):
            raise TypeError(f"flow_noise needs a vlafast.flow.NoiseHead, got {type(self.noise_head).__name__}")


SamplerConfig = Union[ODEConfig, FlowSDEConfig, FlowNoiseConfig]


def ode(num_steps: int = 10) -> ODEConfig:
    return ODEConfig(num_steps=num_steps)


def flow_sde(a: float = 0.5, hybrid: bool = True, *, num_steps: int = 4) -> FlowSDEConfig:
    return FlowSDEConfig(num_steps=num_steps, a=a, hybrid=hybrid)


def flow_noise(noise_head: NoiseHead, *, num_steps: int = 4) -> FlowNoiseConfig:
    """Flow-Noise with ``noise_head``; its log-variance bounds (pi_RL: [log 0.08^2, log 0.16^2])
    are set on the head, ``NoiseHead(..., logvar_bounds=...)``, so they live in one place and
    travel with its state_dict."""
    return FlowNoiseConfig(noise_head=noise_head, num_steps=num_steps)


def _is_hybrid(config: SamplerConfig) -> bool:
    return isinstance(config, FlowSDEConfig) and config.hybrid


def _is_joint(config: SamplerConfig) -> bool:
    return isinstance(config, FlowNoiseConfig) or (isinstance(config, FlowSDEConfig) and not config.hybrid)


# ---------------------------------------------------------------------------------------------
# time grid


def time_grid(num_steps: int) -> list[float]:
    """t_k = 1 - k/K for k = 0..K (python floats; t_0 = 1 noise, t_K = 0 action)."""
    _check_steps(num_steps)
    return [1.0 - k / num_steps for k in range(num_steps + 1)]


def sde_sigmas(num_steps: int, a: float) -> list[float]:
    """sigma_k = a sqrt(t_k / (1 - t_k)) for k = 0..K-1; at t_0 = 1 the denominator is 1 - t_1."""
    t = time_grid(num_steps)
    out = []
    for k in range(num_steps):
        denom = 1.0 - (t[1] if k == 0 else t[k])
        out.append(a * math.sqrt(t[k] / denom) if denom > 0 else 0.0)
    return out


@dataclasses.dataclass(frozen=True)
class _Grid:
    """Per-transition tables, [K] each. The Flow-SDE mean is rewritten as
    x - d[v + c(x + (1-t)v)] = A x - Bv v with c = sigma^2/(2t), A = 1 - d c,
    Bv = d (1 + c (1 - t)); A = 1 and Bv = d give the ODE step x - d v bit for bit."""

    t: torch.Tensor       # t_k
    A: torch.Tensor       # 1 - d c_k
    Bv: torch.Tensor      # d (1 + c_k (1 - t_k))
    std: torch.Tensor     # sigma_k sqrt(d)
    delta: float


@functools.lru_cache(maxsize=64)
def _grid(num_steps: int, a: float, device: torch.device, dtype: torch.dtype) -> _Grid:
    # Cached so the tensors exist before a CUDA graph captures the loop (no H2D copies inside).
    # Coefficients are computed in float64 on the host, then rounded once.
    d = 1.0 / num_steps
    t = time_grid(num_steps)[:-1]
    sig = sde_sigmas(num_steps, a)
    c = [s * s / (2.0 * tk) for s, tk in zip(sig, t)]

    def tensor(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, device=device, dtype=dtype)

    return _Grid(
        t=tensor(t),
        A=tensor([1.0 - d * ck for ck in c]),
        Bv=tensor([d * (1.0 + ck * (1.0 - tk)) for ck, tk in zip(c, t)]),
        std=tensor([s * math.sqrt(d) for s in sig]),
        delta=d,
    )


def _grid_for(config: SamplerConfig, device: torch.device, dtype: torch.dtype) -> _Grid:
    a = float(config.a) if isinstance(config, FlowSDEConfig) else 0.0
    return _grid(config.num_steps, a, torch.device(device), dtype)


# ---------------------------------------------------------------------------------------------
# trace and results


@dataclasses.dataclass(frozen=True, eq=False)
class DenoiseTrace:
    """Everything needed to recompute a chunk's log-prob with new parameters.

    chain: [B, K+1, T, A]  x at t_0 = 1 (the initial noise) ... t_K = 0 (the actions).
    means: [B, K, T, A]    mean of each transition.
    sigmas: [B, K, T, A] (Flow-Noise) or [B, K, 1, 1] (ODE, Flow-SDE): std of each transition
        (0 for deterministic steps).
    stochastic: [B, K] bool  which transitions were stochastic.
    index: [B] long or None  the stochastic step j per sample (Flow-SDE hybrid only).
    step_log_probs, step_entropy: [B, K+1]  masked sums per Gaussian term; column 0 is the
        initial noise term (joint methods), column k+1 transition k; 0 where no term.
    log_prob, entropy: [B]  the chunk's values (step j's, or the mean over the K+1 terms).
    action_mask: None, [T, A] or [B, T, A] float, the mask the log-probs were summed under.
    """

    config: SamplerConfig
    chain: torch.Tensor
    means: torch.Tensor
    sigmas: torch.Tensor
    stochastic: torch.Tensor
    index: torch.Tensor | None
    step_log_probs: torch.Tensor
    step_entropy: torch.Tensor
    log_prob: torch.Tensor
    entropy: torch.Tensor
    action_mask: torch.Tensor | None

    @property
    def actions(self) -> torch.Tensor:
        """[B, T, A] the sampled chunk (x at t = 0)."""
        return self.chain[:, -1]

    def select(self, rows: torch.Tensor | slice) -> "DenoiseTrace":
        """The trace of a subset of the batch (PPO minibatches): rows is an index tensor or slice.

        Recomputing a minibatch's log-probs is exact up to the velocity function's own
        batch-size dependence (GEMM kernels may round differently at another B); the bitwise
        guarantee holds for the batch as sampled.
        """
        mask = self.action_mask
        if mask is not None and mask.dim() == 3:
            mask = mask[rows]
        return dataclasses.replace(
            self,
            chain=self.chain[rows], means=self.means[rows], sigmas=self.sigmas[rows],
            stochastic=self.stochastic[rows], index=None if self.index is None else self.index[rows],
            step_log_probs=self.step_log_probs[rows], step_entropy=self.step_entropy[rows],
            log_prob=self.log_prob[rows], entropy=self.entropy[rows], action_mask=mask,
        )


@dataclasses.dataclass(frozen=True, eq=False)
class FlowLogProb:
    """log_prob, entropy: [B]; step_log_probs, step_entropy: [B, K+1] (see DenoiseTrace);
    element_log_prob: [B, T*A] or None (``evaluate(..., elements=True)``, see
    ``element_log_probs``)."""

    log_prob: torch.Tensor
    entropy: torch.Tensor
    step_log_probs: torch.Tensor
    step_entropy: torch.Tensor
    element_log_prob: torch.Tensor | None = None


def _element_terms(config: SamplerConfig, chain: torch.Tensor, means, sigmas, index: torch.Tensor | None) -> torch.Tensor:
    """[B, T*A] per-element chunk log-prob from the chain and per-transition means / sigmas:
    step j's (hybrid) or the mean over the K+1 terms (initial noise + K transitions, joint).
    Hybrid: ``means`` / ``sigmas`` are step j's ([B, T, A], [B, 1 | T*A]); joint: lists of K."""
    B = chain.shape[0]
    flat = lambda x: x.reshape(B, -1)  # noqa: E731
    if _is_hybrid(config):
        rows = torch.arange(B, device=chain.device)
        return gaussian_terms_ref(flat(chain[rows, index + 1]), flat(means), flat(sigmas))[0]
    x0 = flat(chain[:, 0])
    terms = [gaussian_terms_ref(x0, torch.zeros_like(x0), torch.ones_like(x0[:, :1]))[0]]
    for k, (mean, sigma) in enumerate(zip(means, sigmas)):
        terms.append(gaussian_terms_ref(flat(chain[:, k + 1]), flat(mean), flat(sigma))[0])
    return torch.stack(terms).mean(dim=0)


def element_log_probs(trace: DenoiseTrace) -> torch.Tensor:
    """[B, T*A] the chunk's log-prob per action element, as sampled (from the stored means and
    sigmas, no model call): what a per-element (token-level) PPO ratio compares against
    ``evaluate(..., elements=True).element_log_prob``. Unmasked; summed under the trace's
    action mask it is ``trace.log_prob`` up to rounding (the fused op's summation order)."""
    config = trace.config
    if isinstance(config, ODEConfig):
        raise ValueError("an ODE trace has no log-prob: sample with flow_sde(...) or flow_noise(...) for RL")
    if _is_hybrid(config):
        rows = torch.arange(trace.chain.shape[0], device=trace.chain.device)
        return _element_terms(config, trace.chain, trace.means[rows, trace.index], trace.sigmas[rows, trace.index],
                              trace.index)
    return _element_terms(config, trace.chain, list(trace.means.unbind(1)), list(trace.sigmas.unbind(1)), None)


# ---------------------------------------------------------------------------------------------
# validation helpers


def _check_noise(noise: torch.Tensor) -> None:
    if not isinstance(noise, torch.Tensor) or noise.dim() != 3:
        shape = list(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
        raise ValueError(f"noise must be a [B, T, A] tensor (batch, horizon, action dim), got {shape}")
    if noise.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"noise must be float32 or float64 (the chain is kept in full precision; a bf16 model "
            f"casts inside velocity_fn), got {noise.dtype}"
        )


def _flat_mask(action_mask: torch.Tensor | None, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """action_mask: None | [T, A] | [B, T, A] -> None | [N] | [B, N] float32 (N = T*A)."""
    if action_mask is None:
        return None
    B, T, A = shape
    if tuple(action_mask.shape) == (T, A):
        flat = action_mask.reshape(T * A)
    elif tuple(action_mask.shape) == (B, T, A):
        flat = action_mask.reshape(B, T * A)
    else:
        raise ValueError(
            f"action_mask must be [T, A] = [{T}, {A}] or [B, T, A] = [{B}, {T}, {A}] "
            f"(e.g. ones over the first 5 actions x 7 dims), got {list(action_mask.shape)}"
        )
    if action_mask.device != device:
        raise ValueError(f"action_mask is on {action_mask.device} but the chunk is on {device}")
    return flat.to(torch.float32)


def _check_generator(generator: torch.Generator | None, device: torch.device) -> None:
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but the noise is on {device}; "
            f"pass torch.Generator(device={str(device)!r})"
        )


# ---------------------------------------------------------------------------------------------
# the one code path shared by sampling and log-prob recomputation


def _call_velocity(config: SamplerConfig, velocity_fn: VelocityFn, x: torch.Tensor, t: torch.Tensor, ctx: Any):
    out = velocity_fn(x, t, ctx)
    if isinstance(out, (tuple, list)):
        if len(out) != 2:
            raise TypeError(f"velocity_fn must return v or (v, hidden), got a {len(out)}-tuple")
        v, hidden = out
    else:
        v, hidden = out, None
    if not isinstance(v, torch.Tensor) or v.shape != x.shape:
        got = list(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"velocity_fn must return v shaped like x {list(x.shape)} ([B, T, A]), got {got}")
    if isinstance(config, FlowNoiseConfig) and hidden is None:
        raise TypeError(
            "flow_noise needs velocity_fn to return (v, hidden) with hidden: [B, T, D] the states "
            "the noise head reads (pi0: the expert's suffix outputs)"
        )
    return v.to(x.dtype), hidden


def _sde_rows(grid: _Grid, step: int | torch.Tensor, stochastic: torch.Tensor | None):
    """(A, Bv, std) for one transition: 0-d views when every row takes step ``step``; [B] when
    ``step`` is a [B] tensor (hybrid recomputation) or ``stochastic`` [B] turns rows into ODE
    steps (A=1, Bv=d, std=0; hybrid sampling)."""
    if isinstance(step, torch.Tensor):
        return grid.A[step], grid.Bv[step], grid.std[step]
    A, Bv, std = grid.A[step], grid.Bv[step], grid.std[step]
    if stochastic is None:
        return A, Bv, std
    return torch.where(stochastic, A, 1.0), torch.where(stochastic, Bv, grid.delta), torch.where(stochastic, std, 0.0)


def _per_row(value: torch.Tensor, B: int, trailing: int) -> torch.Tensor:
    """A 0-d or [B] coefficient shaped to broadcast against [B, *] with ``trailing`` dims."""
    return value if value.dim() == 0 else value.reshape(B, *([1] * trailing))


def _transition(
    config: SamplerConfig,
    velocity_fn: VelocityFn,
    ctx: Any,
    x: torch.Tensor,
    t: torch.Tensor,
    rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    grid: _Grid,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One denoise transition from x at t. x: [B, T, A], t: [B], rows: ``_sde_rows`` (Flow-SDE).

    Returns (mean [B, T, A], sigma): [B, 1] (Flow-SDE; 0 on ODE rows), [B, T, A] (Flow-Noise),
    None (ODE).
    """
    v, hidden = _call_velocity(config, velocity_fn, x, t, ctx)
    B = x.shape[0]
    if isinstance(config, FlowSDEConfig):
        A, Bv, std = rows
        mean = x * _per_row(A, B, 2) - v * _per_row(Bv, B, 2)
        return mean, (std.expand(B, 1) if std.dim() == 0 else std[:, None])
    mean = x - grid.delta * v
    if isinstance(config, FlowNoiseConfig):
        return mean, config.noise_head.std(hidden).to(x.dtype)     # [B, T, A]
    return mean, None


def _initial_term(x0: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """log N(x0; 0, I) and its entropy, masked sums. x0: [B, N] -> ([B], [B])."""
    ones = torch.ones(1, 1, device=x0.device, dtype=x0.dtype).expand(x0.shape[0], 1)
    _, lp, h = gaussian_step(torch.zeros_like(x0), ones, mask, x_next=x0)
    return lp, h


def _step_term(mean: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor | None, *, eps=None, x_next=None):
    """Gaussian term of one transition on the flattened chunk. mean: [B, T, A] -> (x' [B, T, A], lp [B], H [B])."""
    B = mean.shape[0]
    n = mean[0].numel()
    x_flat, lp, h = gaussian_step(
        mean.reshape(B, n), sigma.reshape(B, -1), mask,
        eps=None if eps is None else eps.reshape(B, n),
        x_next=None if x_next is None else x_next.reshape(B, n),
    )
    return x_flat.reshape(mean.shape), lp, h


def _reduce(config: SamplerConfig, step_values: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """[B, K+1] per-term values -> [B] chunk value (step j's, or the mean over the K+1 terms)."""
    if _is_hybrid(config):
        return step_values.gather(1, (index + 1)[:, None])[:, 0]
    return step_values.mean(dim=1)


def _draw(config: SamplerConfig, noise: torch.Tensor, generator: torch.Generator | None):
    """All randomness of one chunk, drawn in one fixed order: (index [B] | None, eps [K, B, T, A] | None)."""
    if isinstance(config, ODEConfig):
        return None, None
    K = config.num_steps
    B = noise.shape[0]
    index = None
    if _is_hybrid(config):
        index = torch.randint(0, K, (B,), device=noise.device, generator=generator)
    eps = torch.randn((K, *noise.shape), device=noise.device, dtype=noise.dtype, generator=generator)
    return index, eps


def _t_rows(grid: _Grid, B: int) -> torch.Tensor:
    """[K, B] t_k repeated per row (contiguous rows for velocity_fn), one kernel."""
    return grid.t[:, None].expand(grid.t.shape[0], B).contiguous()


def _stochastic(config: SamplerConfig, index: torch.Tensor | None, B: int, device: torch.device) -> torch.Tensor:
    """[B, K] bool: which transitions are stochastic."""
    K = config.num_steps
    if index is not None:
        return index[:, None] == torch.arange(K, device=device)
    return torch.full((B, K), not isinstance(config, ODEConfig), device=device, dtype=torch.bool)


def _guided_transition(
    config: SamplerConfig,
    velocity_fn: VelocityFn,
    ctx: Any,
    x: torch.Tensor,
    t_row: torch.Tensor,
    t: float,
    grid: _Grid,
    targets: tuple[torch.Tensor, torch.Tensor],
    guidance: RTCGuidance,
) -> torch.Tensor:
    """One RTC-guided ODE step from x [B, T, A] at t (t_row: [B] the same time as a tensor)."""
    def velocity(xg: torch.Tensor) -> torch.Tensor:
        return _call_velocity(config, velocity_fn, xg, t_row, ctx)[0]

    return guided_step(velocity, x, t, grid.delta, *targets, guidance.max_guidance)


def _sample_impl(
    config: SamplerConfig,
    velocity_fn: VelocityFn,
    ctx: Any,
    noise: torch.Tensor,
    mask: torch.Tensor | None,
    generator: torch.Generator | None,
    grid: _Grid,
    guidance: RTCGuidance | None = None,
) -> dict[str, torch.Tensor | None]:
    """The K-step loop, free of host syncs and H2D copies so a CUDA graph can capture it."""
    B = noise.shape[0]
    K = config.num_steps
    device = noise.device
    index, eps = _draw(config, noise, generator)
    t_rows = _t_rows(grid, B)
    stochastic = _stochastic(config, index, B, device)
    if guidance is not None:
        times = time_grid(K)
        targets = guidance.targets(noise.dtype)
    x = noise
    chain, means, sigmas = [x], [], []
    step_lp: list[torch.Tensor] = []
    step_h: list[torch.Tensor] = []
    for k in range(K):
        if guidance is not None:  # ODE only (checked in ``sample``): the guided step is the mean
            x = _guided_transition(config, velocity_fn, ctx, x, t_rows[k], times[k], grid, targets, guidance)
            chain.append(x)
            means.append(x)
            continue
        rows = None
        if isinstance(config, FlowSDEConfig):
            rows = _sde_rows(grid, k, stochastic[:, k] if index is not None else None)
        mean, sigma = _transition(config, velocity_fn, ctx, x, t_rows[k], rows, grid)
        if sigma is None:  # ODE
            x = mean
        else:
            x, lp, h = _step_term(mean, sigma, mask, eps=eps[k])
            sigmas.append(sigma.reshape(B, *(mean.shape[1:] if sigma.shape[1] > 1 else (1, 1))))
            step_lp.append(lp)
            step_h.append(h)
        chain.append(x)
        means.append(mean)
    if isinstance(config, ODEConfig):
        zeros = torch.zeros(B, K + 1, device=device, dtype=torch.float32 if noise.dtype == torch.float32 else noise.dtype)
        return {
            "chain": torch.stack(chain, dim=1), "means": torch.stack(means, dim=1),
            "sigmas": torch.zeros(B, K, 1, 1, device=device, dtype=noise.dtype), "stochastic": stochastic,
            "index": None, "step_log_probs": zeros, "step_entropy": zeros,
            "log_prob": zeros[:, 0], "entropy": zeros[:, 0],
        }
    if _is_joint(config):
        lp0, h0 = _initial_term(noise.reshape(B, -1), mask)
    else:
        lp0 = h0 = torch.zeros_like(step_lp[0])
    step_lp_t = torch.stack([lp0, *step_lp], dim=1)
    step_h_t = torch.stack([h0, *step_h], dim=1)
    return {
        "chain": torch.stack(chain, dim=1),
        "means": torch.stack(means, dim=1),
        "sigmas": torch.stack(sigmas, dim=1),
        "stochastic": stochastic,
        "index": index,
        "step_log_probs": step_lp_t,
        "step_entropy": step_h_t,
        "log_prob": _reduce(config, step_lp_t, index),
        "entropy": _reduce(config, step_h_t, index),
    }


def _trace_from(config: SamplerConfig, out: dict, action_mask: torch.Tensor | None) -> DenoiseTrace:
    mask = None if action_mask is None else action_mask.to(torch.float32)
    return DenoiseTrace(config=config, action_mask=mask, **out)


# ---------------------------------------------------------------------------------------------
# public API


def sample(
    config: SamplerConfig,
    velocity_fn: VelocityFn,
    ctx: Any,
    noise: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    action_mask: torch.Tensor | None = None,
    guidance: RTCGuidance | None = None,
) -> tuple[torch.Tensor, DenoiseTrace]:
    """Denoise ``noise`` [B, T, A] in K steps. Returns (actions [B, T, A], DenoiseTrace).

    ``generator`` (on the noise's device) draws the hybrid index j and the step noise; the
    default generator is used when None. ``action_mask`` [T, A] or [B, T, A] selects the
    executed part of the chunk the log-probs are summed over (all of it when None). Runs
    without autograd; gradients come from ``log_prob`` / ``evaluate`` on the trace.
    ``guidance`` (ODE only): real-time chunking towards a prefix, ``RTCGuidance``; each step
    then runs one vector-Jacobian product through velocity_fn (under grad mode).
    """
    if not isinstance(config, (ODEConfig, FlowSDEConfig, FlowNoiseConfig)):
        raise TypeError(f"config must be a sampler config (flow.ode, flow.flow_sde or flow.flow_noise), got "
                        f"{type(config).__name__}: an RL recipe's sampler spec becomes one with "
                        f"vlafast.rl.sampler_spec.policy_sampler")
    _check_noise(noise)
    _check_generator(generator, noise.device)
    mask = _flat_mask(action_mask, noise.shape, noise.device)
    if guidance is not None:
        if not isinstance(guidance, RTCGuidance):
            raise TypeError(f"guidance must be a vlafast.flow.RTCGuidance, got {type(guidance).__name__}")
        if not isinstance(config, ODEConfig):
            raise ValueError(
                f"guidance (real-time chunking) runs with the ODE sampler only, got {type(config).__name__}: "
                f"sample with flow.ode(num_steps={config.num_steps}), or drop guidance= for RL rollouts"
            )
        guidance.check(noise)
    grid = _grid_for(config, noise.device, noise.dtype)
    with torch.no_grad():
        out = _sample_impl(config, velocity_fn, ctx, noise, mask, generator, grid, guidance)
    trace = _trace_from(config, out, action_mask)
    return trace.actions, trace


def evaluate(
    velocity_fn: VelocityFn,
    ctx: Any,
    trace: DenoiseTrace,
    *,
    action_mask: torch.Tensor | None = None,
    elements: bool = False,
) -> FlowLogProb:
    """Recompute the trace's log-probs and entropies with the current parameters (differentiable).

    ``action_mask`` defaults to the mask used when sampling. Flow-SDE hybrid re-runs only
    step j (one velocity call); the joint methods re-run all K steps. ``elements`` also
    returns the per-element log-prob [B, T*A] (``element_log_probs`` is its rollout twin).
    """
    config = trace.config
    if isinstance(config, ODEConfig):
        raise ValueError("an ODE trace has no log-prob: sample with flow_sde(...) or flow_noise(...) for RL")
    chain = trace.chain
    B, K1, T, A = chain.shape
    K = config.num_steps
    if K1 != K + 1:
        raise ValueError(f"trace chain has {K1} states but its config has K={K} steps (expected K+1={K + 1})")
    shape = torch.Size((B, T, A))
    mask = _flat_mask(trace.action_mask if action_mask is None else action_mask, shape, chain.device)
    grid = _grid_for(config, chain.device, chain.dtype)
    if _is_hybrid(config):
        j = trace.index
        rows = torch.arange(B, device=chain.device)
        x, x_next = chain[rows, j], chain[rows, j + 1]
        mean, sigma = _transition(config, velocity_fn, ctx, x, grid.t[j], _sde_rows(grid, j, None), grid)
        _, lp, h = _step_term(mean, sigma, mask, x_next=x_next)
        zeros = torch.zeros(B, K + 1, device=chain.device, dtype=lp.dtype)
        col = (j + 1)[:, None]
        step_lp = zeros.scatter(1, col, lp[:, None])
        step_h = zeros.scatter(1, col, h[:, None])
        elem = _element_terms(config, chain, mean, sigma, j) if elements else None
    else:
        t_rows = _t_rows(grid, B)
        lp0, h0 = _initial_term(chain[:, 0].reshape(B, -1), mask)
        lps, hs, means, sigmas = [lp0], [h0], [], []
        for k in range(K):
            rows = _sde_rows(grid, k, None) if isinstance(config, FlowSDEConfig) else None
            mean, sigma = _transition(config, velocity_fn, ctx, chain[:, k], t_rows[k], rows, grid)
            _, lp, h = _step_term(mean, sigma, mask, x_next=chain[:, k + 1])
            lps.append(lp)
            hs.append(h)
            means.append(mean)
            sigmas.append(sigma)
        step_lp, step_h = torch.stack(lps, dim=1), torch.stack(hs, dim=1)
        elem = _element_terms(config, chain, means, sigmas, None) if elements else None
    return FlowLogProb(
        log_prob=_reduce(config, step_lp, trace.index),
        entropy=_reduce(config, step_h, trace.index),
        step_log_probs=step_lp,
        step_entropy=step_h,
        element_log_prob=elem,
    )


def log_prob(
    velocity_fn: VelocityFn,
    ctx: Any,
    trace: DenoiseTrace,
    *,
    action_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """[B] the chunk log-prob of ``trace`` under the current parameters (see ``evaluate``)."""
    return evaluate(velocity_fn, ctx, trace, action_mask=action_mask).log_prob
