"""Fused "stochastic denoise step + Gaussian log-prob" (one pass over a [B, N] chunk).

Per element (N = T*A flattened action chunk):

    sample mode:    x' = mean + sigma * eps                (rounded to the output dtype)
    both modes:     z  = (x' - mean) / sigma
                    logp = -log(sigma) - 0.5*log(2*pi) - 0.5*z^2
    per row:        logp_sum[b] = sum_n mask[b, n] * logp[b, n]
                    ent_sum[b]  = sum_n mask[b, n] * (log(sigma) + 0.5*log(2*pi*e))   (entropy)

Elements with ``sigma == 0`` are deterministic (ODE) steps: ``x' = mean`` and they add 0 to
both sums. In sample mode z is recomputed from the *stored* x' (not taken from eps), so the
log-prob computed while sampling and the one recomputed later from a stored chain are the
same arithmetic on the same numbers: bitwise equal for the same backend.

Shapes: mean [B, N]; sigma [B, N] or [B, 1] (per-row scale); mask None, [N] or [B, N]
(bool or float weights); eps / x_next [B, N]. Returns (x_next [B, N], logp_sum [B],
ent_sum [B]), the sums in float32 (float64 for fp64 inputs).

Backends (``vlafast._backend.resolve("gaussian_step", device)``): the Triton kernel for
fp32/bf16/fp16 inputs (math in fp32), ``gaussian_step_ref`` otherwise (and for fp64, which
the gradient checks use). The log-prob is differentiable w.r.t. mean and sigma (and x_next in
evaluate mode), the entropy w.r.t. sigma; sample mode returns detached tensors (sampling
runs under no_grad).
"""

from __future__ import annotations

import math

import torch

from vlafast import _backend

OP = "gaussian_step"
HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
HALF_LOG_2PI_E = 0.5 * math.log(2.0 * math.pi * math.e)
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

try:  # Triton is a core dependency, but keep the reference usable if it is broken.
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only on broken installs
    triton = None
    tl = None


# ---------------------------------------------------------------------------------------------
# reference (oracle and CPU fallback)


def gaussian_terms_ref(x: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element (log N(x; mean, sigma^2), entropy), both [B, N], unmasked; 0 where sigma == 0.

    x, mean: [B, N]; sigma: [B, N] | [B, 1]. Math in fp32 for half-precision inputs (fp64 for
    fp64). The fused op's row sums are these summed under the mask; the per-element PPO ratio
    (``rl.losses``, ``ratio="element"``) reads them directly.
    """
    work = torch.float64 if mean.dtype == torch.float64 else torch.float32
    mu, sd = mean.to(work), sigma.to(work)
    zero = sd == 0
    safe = torch.where(zero, torch.ones_like(sd), sd)
    z = (x.to(work) - mu) / safe
    logp = torch.where(zero, torch.zeros_like(z), -torch.log(safe) - HALF_LOG_2PI - 0.5 * z * z)
    ent = torch.where(zero, torch.zeros_like(safe), torch.log(safe) + HALF_LOG_2PI_E).expand_as(logp)
    return logp, ent


def gaussian_step_ref(
    mean: torch.Tensor,
    sigma: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    eps: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch oracle. mean: [B, N], sigma: [B, N] | [B, 1], mask: None | [N] | [B, N].

    Exactly one of ``eps`` (sample) and ``x_next`` (evaluate) is given. Math in fp32 for
    half-precision inputs, in the input dtype for fp32/fp64. Returns (x_next [B, N], logp [B],
    entropy [B]).
    """
    work = torch.float64 if mean.dtype == torch.float64 else torch.float32
    if eps is not None:
        x_out = (mean.to(work) + sigma.to(work) * eps.to(work)).to(mean.dtype)
    else:
        x_out = x_next
    logp, ent = gaussian_terms_ref(x_out, mean, sigma)
    if mask is not None:
        logp = logp * mask.to(logp.dtype)
        ent = ent * mask.to(ent.dtype)
    return x_out, logp.sum(dim=-1), ent.sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# Triton kernel

if triton is not None:

    @triton.jit
    def _gaussian_step_kernel(
        mean_ptr, sigma_ptr, eps_ptr, x_ptr, mask_ptr, out_ptr, logp_ptr, ent_ptr,
        N,
        stride_mean, stride_sig_b, stride_sig_n, stride_eps, stride_x, stride_mask_b, stride_out,
        SAMPLE: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # One program per row: the reduction order depends only on N and BLOCK_N, never on
        # which other rows share the launch (the log-prob recomputation relies on this).
        row = tl.program_id(0).to(tl.int64)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc_h = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            offs = start + tl.arange(0, BLOCK_N)
            valid = offs < N
            mu = tl.load(mean_ptr + row * stride_mean + offs, mask=valid, other=0.0).to(tl.float32)
            sd = tl.load(sigma_ptr + row * stride_sig_b + offs * stride_sig_n, mask=valid, other=1.0).to(tl.float32)
            if SAMPLE:
                e = tl.load(eps_ptr + row * stride_eps + offs, mask=valid, other=0.0).to(tl.float32)
                xo = (mu + sd * e).to(out_ptr.dtype.element_ty)
                tl.store(out_ptr + row * stride_out + offs, xo, mask=valid)
                xv = xo.to(tl.float32)
            else:
                xv = tl.load(x_ptr + row * stride_x + offs, mask=valid, other=0.0).to(tl.float32)
            zero = sd == 0.0
            safe = tl.where(zero, 1.0, sd)
            z = (xv - mu) / safe
            log_sd = tl.log(safe)
            lp = -log_sd - 0.9189385332046727 - 0.5 * z * z    # 0.5 log(2 pi)
            h = log_sd + 1.4189385332046727                      # 0.5 log(2 pi e)
            skip = zero | (~valid)
            lp = tl.where(skip, 0.0, lp)
            h = tl.where(skip, 0.0, h)
            if HAS_MASK:
                m = tl.load(mask_ptr + row * stride_mask_b + offs, mask=valid, other=0.0).to(tl.float32)
                lp = lp * m
                h = h * m
            acc += lp
            acc_h += h
        tl.store(logp_ptr + row, tl.sum(acc, axis=0))
        tl.store(ent_ptr + row, tl.sum(acc_h, axis=0))


def _launch(mean, sigma, mask, eps, x_next):
    B, N = mean.shape
    sample = eps is not None
    out = torch.empty_like(mean) if sample else x_next
    logp = torch.empty(B, device=mean.device, dtype=torch.float32)
    ent = torch.empty(B, device=mean.device, dtype=torch.float32)
    if B == 0:
        return out, logp, ent
    block = min(1024, triton.next_power_of_2(max(N, 16)))
    sig_b, sig_n = sigma.stride(0), (sigma.stride(1) if sigma.shape[1] == N and N > 1 else 0)
    if mask is not None:
        mask = mask.to(torch.float32) if mask.dtype == torch.bool else mask
        mask_b = mask.stride(0) if mask.dim() == 2 else 0
        mask_ptr = mask
    else:
        mask_b, mask_ptr = 0, mean
    ref = eps if sample else x_next
    _gaussian_step_kernel[(B,)](
        mean, sigma, ref, ref, mask_ptr, out, logp, ent,
        N,
        mean.stride(0), sig_b, sig_n, ref.stride(0), ref.stride(0), mask_b, out.stride(0),
        SAMPLE=sample, HAS_MASK=mask is not None, BLOCK_N=block,
        num_warps=4 if block >= 512 else 1,
    )
    return out, logp, ent


class _GaussianLogProb(torch.autograd.Function):
    """Evaluate mode through the kernel, with the analytic backward in torch."""

    @staticmethod
    def forward(ctx, mean, sigma, mask, x_next):
        _, logp, ent = _launch(mean, sigma, mask, None, x_next)
        ctx.save_for_backward(mean, sigma, mask, x_next)
        return logp, ent

    @staticmethod
    def backward(ctx, grad_logp, grad_ent):
        mean, sigma, mask, x_next = ctx.saved_tensors
        mu, sd, xv = mean.float(), sigma.float(), x_next.float()
        zero = sd == 0
        safe = torch.where(zero, torch.ones_like(sd), sd)
        z = (xv - mu) / safe
        w = grad_logp.float()[:, None]
        w_h = grad_ent.float()[:, None]
        if mask is not None:
            w, w_h = w * mask.float(), w_h * mask.float()
        w = torch.where(zero, torch.zeros_like(z), w.expand_as(z))
        w_h = torch.where(zero, torch.zeros_like(z), w_h.expand_as(z))
        d_mean = w * z / safe                                 # d logp / d mean  =  z / sigma
        d_sigma = (w * (z * z - 1.0) + w_h) / safe            # d logp / d sigma = (z^2 - 1) / sigma, dH/dsigma = 1/sigma
        g_mean = d_mean.to(mean.dtype) if ctx.needs_input_grad[0] else None
        g_sigma = d_sigma.sum_to_size(sigma.shape).to(sigma.dtype) if ctx.needs_input_grad[1] else None
        g_x = (-d_mean).to(x_next.dtype) if ctx.needs_input_grad[3] else None
        return g_mean, g_sigma, None, g_x


# ---------------------------------------------------------------------------------------------
# public entry point


def _validate(mean, sigma, mask, eps, x_next) -> None:
    if (eps is None) == (x_next is None):
        raise ValueError("gaussian_step needs exactly one of eps= (sample) or x_next= (evaluate)")
    if mean.dim() != 2:
        raise ValueError(f"mean must be [B, N] (flatten the chunk to N = T*A), got {list(mean.shape)}")
    B, N = mean.shape
    if sigma.dim() != 2 or sigma.shape[0] != B or sigma.shape[1] not in (1, N):
        raise ValueError(f"sigma must be [B, N] or [B, 1] with B={B}, N={N}, got {list(sigma.shape)}")
    ref = eps if eps is not None else x_next
    name = "eps" if eps is not None else "x_next"
    if ref.shape != mean.shape:
        raise ValueError(f"{name} must be [B, N] = {list(mean.shape)} like mean, got {list(ref.shape)}")
    if mask is not None and tuple(mask.shape) not in ((N,), (B, N)):
        raise ValueError(f"mask must be [N] or [B, N] with B={B}, N={N}, got {list(mask.shape)}")
    tensors = [t for t in (mean, sigma, mask, ref) if t is not None]
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"gaussian_step inputs must share one device, got {sorted({str(t.device) for t in tensors})}")
    if not mean.is_floating_point():
        raise ValueError(f"mean must be a floating tensor, got {mean.dtype}")


def gaussian_step(
    mean: torch.Tensor,
    sigma: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    eps: torch.Tensor | None = None,
    x_next: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stochastic step and/or its masked Gaussian log-prob and entropy. See the module docstring.

    mean: [B, N], sigma: [B, N] | [B, 1], mask: None | [N] | [B, N], eps | x_next: [B, N].
    Returns (x_next [B, N] in mean's dtype, logp_sum [B], ent_sum [B]) in float32 (float64 for
    fp64 inputs).
    """
    _validate(mean, sigma, mask, eps, x_next)
    backend = _backend.resolve(OP, mean.device)
    if backend == "torch" or triton is None or mean.dtype not in _KERNEL_DTYPES:
        if eps is not None:
            with torch.no_grad():
                return gaussian_step_ref(mean, sigma, mask, eps=eps)
        return gaussian_step_ref(mean, sigma, mask, x_next=x_next)
    mean_c, sigma_c = mean.contiguous(), sigma
    if sigma_c.shape[1] > 1 and sigma_c.stride(1) != 1:
        sigma_c = sigma_c.contiguous()
    mask_c = mask.contiguous() if mask is not None else None
    if eps is not None:
        with torch.no_grad():
            return _launch(mean_c.detach(), sigma_c.detach(), mask_c, eps.contiguous(), None)
    x_c = x_next.contiguous()
    if torch.is_grad_enabled() and (mean.requires_grad or sigma.requires_grad or x_next.requires_grad):
        if mask_c is not None and mask_c.dtype == torch.bool:
            mask_c = mask_c.float()
        return (x_next, *_GaussianLogProb.apply(mean_c, sigma_c, mask_c, x_c))
    _, logp, ent = _launch(mean_c, sigma_c, mask_c, None, x_c)
    return x_next, logp, ent
