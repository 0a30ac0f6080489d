"""In-place steering additions inside an MLP, safe under CUDA graph capture (docs/architecture.md §2).

``steer_correction_(y, h_sel, W_sel, alpha, mask)`` clamps the selected neurons without hooks:
with ``y = down_proj(h)``, the exact clamp ``h_S := alpha`` is

    y[b, t, :] += mask[b] * (alpha[b] - h_sel[b, t, :]) @ W_sel.T

``add_direction_(y, direction, alpha, mask)`` is the additive form used by steering vectors:

    y[b, t, :] += mask[b] * alpha[b] * direction

Shapes: y: [B, T, D] (updated in place), h_sel: [B, T, S] (the selected neurons' activations,
the input of down_proj), W_sel: [D, S] (their down_proj columns), direction: [D],
alpha: [B] or [B, S] (correction) / [B] (direction), mask: [B].

**index.** With ``index: [S]`` (int32/int64) the second argument is the whole activation
``h: [B, T, F]`` and the kernel gathers ``h[..., index]`` itself: one kernel instead of an
``index_select`` plus the correction, which matters at batch 1 where each graph node costs
microseconds. Indices are not range-checked (that would need a host sync); out-of-range
indices are undefined behaviour, as in a raw gather.

**mask** is float or bool. A float mask scales the addition (1 on, 0 off, values between blend);
bool means 1.0 / 0.0. Rows whose mask is 0 are not written at all, so switching a request off
leaves its ``y`` bit-exact (not ``y + 0.0``, which would turn -0.0 into +0.0).

**Graph safety.** The launchers only read shapes, strides and dtypes: no ``.item()``, no
``.contiguous()``, no allocation, so a call can sit inside ``torch.cuda.graph`` capture; alpha and
mask are read from device memory at replay time, so writing new values into the same tensors
(``alpha.copy_(...)``) changes the next replay without re-capturing. Any strides are accepted.

**Precision.** Everything is computed in fp32 (the correction's dot without TF32) and rounded
once into y's dtype, as the references do.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from vlafast import _backend

_Y_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _round_bf16_rne(x):
    """fp32 -> fp32 holding the round-to-nearest-even bf16 value. Triton 3.9's interpreter
    truncates fp32 -> bf16 casts (and ignores ``fp_downcast_rounding``); GPUs round to nearest
    even, as torch does, so the launchers apply this only in the interpreter."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _correction_kernel(
    y_ptr, h_ptr, w_ptr, alpha_ptr, mask_ptr, index_ptr,
    R, T, D, S,
    s_yb, s_yt, s_yd, s_hb, s_ht, s_hs, s_wd, s_ws, s_ab, s_as, s_m,
    HAS_INDEX: tl.constexpr, RNE_FIX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < R
    b = rows // T
    t = rows % T
    m = tl.load(mask_ptr + b * s_m, mask=r_ok, other=0).to(tl.float32)
    live = r_ok & (m != 0.0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_ok = offs_s < S
        hs_ok = live[:, None] & s_ok[None, :]
        if HAS_INDEX:
            cols = tl.load(index_ptr + offs_s, mask=s_ok, other=0).to(tl.int64)
        else:
            cols = offs_s.to(tl.int64)
        h = tl.load(h_ptr + b[:, None] * s_hb + t[:, None] * s_ht + cols[None, :] * s_hs, mask=hs_ok, other=0.0)
        a = tl.load(alpha_ptr + b[:, None] * s_ab + offs_s[None, :] * s_as, mask=hs_ok, other=0.0)
        w = tl.load(w_ptr + offs_d[None, :] * s_wd + offs_s[:, None] * s_ws,
                    mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
        diff = a.to(tl.float32) - h.to(tl.float32)
        acc = tl.dot(diff, w.to(tl.float32), acc, input_precision="ieee")
    ptrs = y_ptr + b[:, None] * s_yb + t[:, None] * s_yt + offs_d[None, :] * s_yd
    ok = live[:, None] & d_ok[None, :]
    y = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    out = y + m[:, None] * acc
    if RNE_FIX:
        out = _round_bf16_rne(out)
    tl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _direction_kernel(
    y_ptr, dir_ptr, alpha_ptr, mask_ptr,
    R, T, D,
    s_yb, s_yt, s_yd, s_dir, s_a, s_m,
    RNE_FIX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < R
    b = rows // T
    t = rows % T
    m = tl.load(mask_ptr + b * s_m, mask=r_ok, other=0).to(tl.float32)
    live = r_ok & (m != 0.0)
    gain = m * tl.load(alpha_ptr + b * s_a, mask=live, other=0.0).to(tl.float32)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    direction = tl.load(dir_ptr + offs_d * s_dir, mask=d_ok, other=0.0).to(tl.float32)
    ptrs = y_ptr + b[:, None] * s_yb + t[:, None] * s_yt + offs_d[None, :] * s_yd
    ok = live[:, None] & d_ok[None, :]
    y = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    out = y + gain[:, None] * direction[None, :]
    if RNE_FIX:
        out = _round_bf16_rne(out)
    tl.store(ptrs, out.to(y_ptr.dtype.element_ty), mask=ok)


# ---------------------------------------------------------------------------------------------
# validation (shapes, dtypes, devices only: nothing that syncs or allocates)


def _check_tensor(name: str, x: object, dims: int, what: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.dim() != dims:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a {what} tensor, got {got}")
    return x


def _check_common(y: torch.Tensor, alpha: torch.Tensor, mask: torch.Tensor, others: dict[str, torch.Tensor]) -> None:
    _check_tensor("y", y, 3, "[B, T, D]")
    if y.dtype not in _Y_DTYPES:
        raise ValueError(f"y must be bf16/fp16/fp32, got {y.dtype}")
    B = y.shape[0]
    _check_tensor("mask", mask, 1, "[B]")
    if mask.shape[0] != B:
        raise ValueError(f"mask must be [B] with B={B}, got {list(mask.shape)}")
    if not (mask.is_floating_point() or mask.dtype == torch.bool):
        raise ValueError(f"mask must be float (a gain) or bool (on/off), got {mask.dtype}")
    if not alpha.is_floating_point():
        raise ValueError(f"alpha must be a floating tensor, got {alpha.dtype}; use alpha.float()")
    for name, x in {"alpha": alpha, "mask": mask, **others}.items():
        if x.device != y.device:
            raise ValueError(
                f"{name} must be on {y.device} like y (device buffers, so graphs can replay), got {x.device}"
            )
        if name in others and not x.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {x.dtype}")


def _validate_correction(y, h_sel, W_sel, alpha, mask, index) -> None:
    _check_tensor("y", y, 3, "[B, T, D]")
    B, T, D = y.shape
    name, dims = ("h_sel", "[B, T, S]") if index is None else ("h", "[B, T, F] (with index)")
    _check_tensor(name, h_sel, 3, dims)
    if tuple(h_sel.shape[:2]) != (B, T):
        raise ValueError(f"{name} must be {dims} with B={B}, T={T} like y, got {list(h_sel.shape)}")
    if index is None:
        S = h_sel.shape[2]
    else:
        _check_tensor("index", index, 1, "[S]")
        if index.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"index must be int32 or int64, got {index.dtype}")
        if index.device != y.device:
            raise ValueError(f"index must be on {y.device} like y, got {index.device}")
        S = index.shape[0]
    _check_tensor("W_sel", W_sel, 2, "[D, S]")
    if tuple(W_sel.shape) != (D, S):
        raise ValueError(
            f"W_sel must be [D, S] = [{D}, {S}] (down_proj.weight[:, selected]), got {list(W_sel.shape)}"
        )
    if not isinstance(alpha, torch.Tensor) or alpha.shape not in ((B,), (B, S)):
        got = list(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__
        raise ValueError(f"alpha must be a [B] or [B, S] = [{B}] or [{B}, {S}] device tensor, got {got}")
    _check_common(y, alpha, mask, {name: h_sel, "W_sel": W_sel})


def _validate_direction(y, direction, alpha, mask) -> None:
    _check_tensor("y", y, 3, "[B, T, D]")
    B, _, D = y.shape
    _check_tensor("direction", direction, 1, "[D]")
    if direction.shape[0] != D:
        raise ValueError(f"direction must be [D] with D={D} like y, got {list(direction.shape)}")
    if not isinstance(alpha, torch.Tensor) or alpha.shape != (B,):
        got = list(alpha.shape) if isinstance(alpha, torch.Tensor) else type(alpha).__name__
        raise ValueError(f"alpha must be a [B] = [{B}] device tensor, got {got}")
    _check_common(y, alpha, mask, {"direction": direction})


# ---------------------------------------------------------------------------------------------
# launchers


def _correction_config(R: int, interpret: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_D, BLOCK_S, num_warps). 16-row blocks for decoding (tl.dot's minimum),
    64 x 128 with 8 warps for prefill (ptxas for sm_90: 142 regs / no spill and 255 regs / 16 B
    spill; 64 x 128 with 4 warps spills 560 B)."""
    if interpret:
        return 16, 64, 16, 4
    return (16, 128, 32, 4) if R <= 16 else (64, 128, 32, 8)


def _on_device(y: torch.Tensor, backend: str) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device: make it y's (a host-side cudaSetDevice at
    most; nothing that syncs or allocates, so capture stays valid)."""
    return torch.cuda.device(y.device) if backend == "triton" else contextlib.nullcontext()


def _rne_fix(y: torch.Tensor, backend: str) -> bool:
    return backend == "triton-interpret" and y.dtype == torch.bfloat16


def steer_correction_(
    y: torch.Tensor,
    h_sel: torch.Tensor,
    W_sel: torch.Tensor,
    alpha: torch.Tensor,
    mask: torch.Tensor,
    *,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[b, t] += mask[b] * (alpha[b] - h_sel[b, t]) @ W_sel.T, in place; returns y.

    y: [B, T, D], h_sel: [B, T, S] (or h: [B, T, F] with index: [S]), W_sel: [D, S],
    alpha: [B] or [B, S], mask: [B] (float or bool).
    """
    _validate_correction(y, h_sel, W_sel, alpha, mask, index)
    backend = _backend.resolve("steer_correction", y.device)
    if backend == "torch":
        return steer_correction_ref(y, h_sel, W_sel, alpha, mask, index=index)
    B, T, D = y.shape
    S = W_sel.shape[1]
    R = B * T
    if R == 0 or D == 0 or S == 0:
        return y
    block_m, block_d, block_s, warps = _correction_config(R, backend == "triton-interpret")
    s_as = alpha.stride(1) if alpha.dim() == 2 else 0
    with _on_device(y, backend):
        _correction_kernel[(triton.cdiv(R, block_m), triton.cdiv(D, block_d))](
            y, h_sel, W_sel, alpha, mask, index if index is not None else mask,
            R, T, D, S,
            y.stride(0), y.stride(1), y.stride(2), h_sel.stride(0), h_sel.stride(1), h_sel.stride(2),
            W_sel.stride(0), W_sel.stride(1), alpha.stride(0), s_as, mask.stride(0),
            HAS_INDEX=index is not None, RNE_FIX=_rne_fix(y, backend),
            BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_S=block_s,
            num_warps=warps,
        )
    return y


def add_direction_(y: torch.Tensor, direction: torch.Tensor, alpha: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """y[b, t] += mask[b] * alpha[b] * direction, in place; returns y.

    y: [B, T, D], direction: [D], alpha: [B], mask: [B] (float or bool).
    """
    _validate_direction(y, direction, alpha, mask)
    backend = _backend.resolve("add_direction", y.device)
    if backend == "torch":
        return add_direction_ref(y, direction, alpha, mask)
    B, T, D = y.shape
    R = B * T
    if R == 0 or D == 0:
        return y
    block_m, block_d = 16, 64 if backend == "triton-interpret" else 128  # sm_90: 92 regs, no spill
    with _on_device(y, backend):
        _direction_kernel[(triton.cdiv(R, block_m), triton.cdiv(D, block_d))](
            y, direction, alpha, mask,
            R, T, D,
            y.stride(0), y.stride(1), y.stride(2), direction.stride(0), alpha.stride(0), mask.stride(0),
            RNE_FIX=_rne_fix(y, backend), BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
        )
    return y


# ---------------------------------------------------------------------------------------------
# references (oracle and CPU fallback; graph-capturable on CUDA too, though they allocate)


def _apply(y: torch.Tensor, mask: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """y := round(y + delta) on rows whose mask is nonzero, other rows untouched. delta: fp32,
    already multiplied by the mask (in the order the kernels multiply)."""
    on = (mask.to(torch.float32) != 0)[:, None, None]  # [B, 1, 1]
    return y.copy_(torch.where(on, (y.float() + delta).to(y.dtype), y))


def steer_correction_ref(
    y: torch.Tensor,
    h_sel: torch.Tensor,
    W_sel: torch.Tensor,
    alpha: torch.Tensor,
    mask: torch.Tensor,
    *,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain torch: y[b, t] += mask[b] * (alpha[b] - h_sel[b, t]) @ W_sel.T in fp32, in place
    (h_sel = h[..., index] when index is given)."""
    if index is not None:
        h_sel = h_sel[..., index]  # [B, T, S]
    a = alpha.float()
    a = a[:, None, None] if a.dim() == 1 else a[:, None, :]  # [B, 1, 1] or [B, 1, S]
    corr = (a - h_sel.float()) @ W_sel.float().T  # [B, T, D]
    return _apply(y, mask, mask.to(torch.float32)[:, None, None] * corr)


def add_direction_ref(y: torch.Tensor, direction: torch.Tensor, alpha: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain torch: y[b, t] += mask[b] * alpha[b] * direction in fp32, in place."""
    gain = mask.to(torch.float32) * alpha.float()  # [B]
    return _apply(y, mask, gain[:, None, None] * direction.float()[None, None, :])
