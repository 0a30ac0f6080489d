"""Fused value-vector -> vocabulary projection with a streaming top-k (docs/architecture.md §2).

``vocab_topk(values, embedding, k)`` returns what ``torch.topk(values @ embedding.T, k)``
means, without ever materialising the ``[N, V]`` logits:

* **Pass 1** (``_partial_kernel``), grid ``(cdiv(N, BLOCK_N), splits)``: each program owns a
  block of rows and a contiguous range of vocabulary tiles. Per tile it runs a GEMM over D in
  ``BLOCK_D`` steps (fp32 accumulation; bf16/fp16 on tensor cores), scales the tile by the
  row's ``scale`` and ``sign`` (-1 for ``largest=False``), and merges the tile into a running
  top-k held in registers as ``k`` unsorted (value, id) slots (padded to a power of two).
  The merge is a *threshold-gated replace-the-worst loop*: while any row's tile maximum beats
  that row's current k-th best, the tile maximum (lowest id among equal maxima) replaces the
  worst slot and is knocked out of the tile. The first tile of a split costs k rounds; later
  tiles few, since only values above the running k-th best enter — so the epilogue stays
  small next to the GEMM (a sorting network over every tile would not). Simulated on random
  data with the GPU tiles (64 rows x 256 tokens): mean rounds per tile 0.89 for a pi0 layer
  (k=10, 1005 tiles per split), 3.2 for an OpenVLA layer (k=10, 3 splits of 42 tiles), 7.7
  for OpenVLA with k=64 (128-token tiles); each round is a few reductions over the tile, next
  to a 64 x 256 x D GEMM per tile.
* **Pass 2** (``_merge_kernel``), grid ``(cdiv(N, BLOCK_M),)``: merges the ``splits`` partial
  lists of each row by k rounds of (max, lowest id) extraction and writes them sorted.

The vocabulary is split across programs only when there are too few row blocks to fill the
GPU (``_pick_splits``); the interpreter uses a small virtual SM count so tests exercise the
merge of several splits.

**Order and ties.** Rows of the result are sorted best first: descending scores for
``largest=True``, ascending for ``largest=False`` (as ``torch.topk``). Among equal scores the
**lower token id comes first**, and it is the lower id that keeps the last slot. Both kernel
and reference honour this rule (the reference through a stable sort). NaN scores have no
defined place.

**Scale.** ``scale: [N]`` multiplies row n's logits before selection (e.g. a norm's weight
folded in): the result is the top-k of ``scale[n] * logits[n]``. A negative scale reverses the
row's order — its top-k are then the tokens with the most negative raw logits — which is why
the scale is applied inside the epilogue, before selection, rather than to the k survivors.

**Precision.** fp32 inputs are multiplied in true fp32 (``input_precision="ieee"``, no TF32),
bf16/fp16 inputs on tensor cores; all accumulation is fp32, so scores differ from the
fp32 reference only by summation order.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Iterator

import torch
import triton
import triton.language as tl

from vlafast import _backend

MAX_K = 64
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Sentinel ids of empty slots: above any real token id (V < 2**30), distinct per slot so the
# "evict the worst (lowest value, highest id)" rule always picks exactly one slot.
_EMPTY_ID = tl.constexpr(1 << 30)
_INT32_MAX = tl.constexpr((1 << 31) - 1)
# Working-set budget per chunk of ``vocab_topk_chunked`` when no chunk size is given.
DEFAULT_MEMORY_BUDGET = 1 << 30
_INTERPRET_SM_COUNT = 2  # virtual SMs in the interpreter: small, so tests hit several splits


# ---------------------------------------------------------------------------------------------
# kernels


@triton.jit
def _partial_kernel(
    values_ptr, emb_ptr, scale_ptr, part_val_ptr, part_id_ptr,
    N, V, D, tiles_per_split, n_tiles, sign,
    stride_vn, stride_vd, stride_ev, stride_ed, stride_s,
    K: tl.constexpr, KP: tl.constexpr, HAS_SCALE: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    # int64 block bases: N * D and V * D may exceed 2**31 elements (a whole model at once).
    values_blk = values_ptr + (pid_n * BLOCK_N).to(tl.int64) * stride_vn
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, KP)
    if HAS_SCALE:
        row_mul = tl.load(scale_ptr + offs_n * stride_s, mask=n_ok, other=0.0).to(tl.float32) * sign
    else:
        row_mul = tl.zeros([BLOCK_N], dtype=tl.float32) + sign

    # Running top-k: K live slots start empty (-inf); padding slots hold +inf so never evicted.
    run_val = tl.where(cols[None, :] < K, float("-inf"), float("inf")) + tl.zeros([BLOCK_N, KP], tl.float32)
    run_id = (_EMPTY_ID + cols[None, :]) + tl.zeros([BLOCK_N, KP], tl.int32)
    kth = tl.full([BLOCK_N], float("-inf"), tl.float32)

    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, n_tiles)
    for tile in range(tile_lo, tile_hi):
        offs_v = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        v_ok = offs_v < V
        emb_blk = emb_ptr + tl.cast(tile, tl.int64) * BLOCK_V * stride_ev
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            a = tl.load(values_blk + rows[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            b = tl.load(emb_blk + tl.arange(0, BLOCK_V)[None, :] * stride_ev + offs_d[:, None] * stride_ed,
                        mask=v_ok[None, :] & d_ok[:, None], other=0.0)
            if UPCAST:  # the interpreter's tl.dot is wrong on bf16/fp16 tiles
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        logit = tl.where(v_ok[None, :], acc * row_mul[:, None], float("-inf"))

        # Merge: while some row's tile maximum beats its k-th best, that maximum (lowest id
        # among ties) replaces the row's worst slot (lowest value, highest id among ties).
        # Tiles arrive in increasing id order, so an equal value never displaces a held one.
        tile_max = tl.max(logit, axis=1)
        need = tile_max > kth
        while tl.max(need.to(tl.int32), axis=0) > 0:
            arg = tl.min(tl.where(logit == tile_max[:, None], offs_v[None, :], _INT32_MAX), axis=1)
            worst_id = tl.max(tl.where(run_val == kth[:, None], run_id, -1), axis=1)
            slot = need[:, None] & (run_val == kth[:, None]) & (run_id == worst_id[:, None])
            run_val = tl.where(slot, tile_max[:, None], run_val)
            run_id = tl.where(slot, arg[:, None], run_id)
            logit = tl.where(need[:, None] & (offs_v[None, :] == arg[:, None]), float("-inf"), logit)
            tile_max = tl.max(logit, axis=1)
            kth = tl.min(run_val, axis=1)
            need = tile_max > kth

    out = offs_n[:, None] * (n_splits * KP) + pid_s * KP + cols[None, :]
    tl.store(part_val_ptr + out, tl.where(cols[None, :] < K, run_val, float("-inf")), mask=n_ok[:, None])
    tl.store(part_id_ptr + out, run_id, mask=n_ok[:, None])


@triton.jit
def _merge_kernel(
    part_val_ptr, part_id_ptr, out_val_ptr, out_id_ptr,
    N, C, sign,
    K: tl.constexpr, CP: tl.constexpr, BLOCK_M: tl.constexpr,
):
    offs_n = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_ok = offs_n < N
    cols = tl.arange(0, CP)
    ptrs = offs_n[:, None] * C + cols[None, :]
    ok = n_ok[:, None] & (cols[None, :] < C)
    vals = tl.load(part_val_ptr + ptrs, mask=ok, other=float("-inf"))
    ids = tl.load(part_id_ptr + ptrs, mask=ok, other=_INT32_MAX)
    for i in range(K):
        best = tl.max(vals, axis=1)
        best_id = tl.min(tl.where(vals == best[:, None], ids, _INT32_MAX), axis=1)
        tl.store(out_val_ptr + offs_n * K + i, best * sign, mask=n_ok)
        tl.store(out_id_ptr + offs_n * K + i, best_id.to(tl.int64), mask=n_ok)
        vals = tl.where(ids == best_id[:, None], float("-inf"), vals)


# ---------------------------------------------------------------------------------------------
# launcher


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _gpu_config(dtype: torch.dtype, KP: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages) for sm_90.

    Chosen from ptxas resource reports (compiled here for sm_90 without a GPU): these are the
    largest tiles that keep the accumulator, the tile being merged and the running top-k in
    registers without spilling (bf16 64x256 k<=16: 219 regs; 128x128 spills 88 B). fp32 runs
    exact FMA dots, no tensor cores: a correctness path, not a fast one. Pending GPU tuning.
    """
    if dtype == torch.float32:
        return 64, 64, 32, 8, 2
    if KP <= 16:
        return 64, 256, 64, 8, 3
    return 64, 128, 64, 8, 3


_MERGE_WIDTH = 4096  # candidates per row in the merge pass (sm_90: 88 regs at 1 x 4096, no spill)


def _pick_splits(n_blocks: int, n_tiles: int, sm_count: int, KP: int) -> int:
    """Vocabulary splits per row block, from a small cost model.

    Time ~ waves x per-program work = ceil(n_blocks * s / SMs) x (ceil(n_tiles / s) + 2), where
    2 tiles stand for a program's fixed cost (prologue, the first tile's k merge rounds, the
    merge pass), assuming one program per SM at a time (~220 registers x 256 threads each).
    The smallest minimiser wins; each split keeps >= 4 tiles and the merge pass at most
    ``_MERGE_WIDTH`` candidates per row. H100 (132 SMs), k=10: OpenVLA layer (172 row blocks,
    126 tiles) -> 3 splits; pi0 layer (256 blocks, 1005 tiles) -> 1; one row of pi0 -> 126.
    """
    cap = max(1, min(n_tiles // 4, _MERGE_WIDTH // KP))
    cost = {s: math.ceil(n_blocks * s / sm_count) * (math.ceil(n_tiles / s) + 2) for s in range(1, cap + 1)}
    return min(cost, key=lambda s: (cost[s], s))


def _validate(values: torch.Tensor, embedding: torch.Tensor, k: int, scale: torch.Tensor | None) -> None:
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        raise ValueError(f"values must be a [N, D] tensor, got {_shape(values)}")
    if not isinstance(embedding, torch.Tensor) or embedding.dim() != 2:
        raise ValueError(f"embedding must be a [V, D] tensor, got {_shape(embedding)}")
    if values.shape[1] != embedding.shape[1]:
        raise ValueError(
            f"values must be [N, D] with D == embedding width {embedding.shape[1]}, "
            f"got {list(values.shape)}"
        )
    if values.dtype not in _DTYPES or embedding.dtype != values.dtype:
        raise ValueError(
            f"values and embedding must share one dtype of bf16/fp16/fp32, got {values.dtype} and "
            f"{embedding.dtype}; cast one with .to()"
        )
    if values.device != embedding.device:
        raise ValueError(
            f"values and embedding must be on one device, got {values.device} and {embedding.device}; "
            "move one with .to()"
        )
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {type(k).__name__}")
    V = embedding.shape[0]
    if not 1 <= k <= MAX_K:
        raise ValueError(f"k must be in 1..{MAX_K}, got {k}; for larger k use vocab_topk_ref")
    if k > V:
        raise ValueError(f"k must be <= the vocabulary size V={V}, got k={k}")
    if V >= _EMPTY_ID.value:
        raise ValueError(f"vocabularies up to {_EMPTY_ID.value - 1} tokens are supported, got V={V}")
    if scale is not None:
        if not isinstance(scale, torch.Tensor) or scale.shape != (values.shape[0],):
            raise ValueError(f"scale must be a [N] tensor with N={values.shape[0]}, got {_shape(scale)}")
        if not scale.is_floating_point():
            raise ValueError(f"scale must be a floating tensor, got {scale.dtype}")
        if scale.device != values.device:
            raise ValueError(f"scale must be on {values.device} like values, got {scale.device}")


def _shape(x: object) -> str:
    return str(list(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def vocab_topk(
    values: torch.Tensor,
    embedding: torch.Tensor,
    k: int,
    *,
    largest: bool = True,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k tokens of each value vector's vocabulary projection, without the [N, V] logits.

    values: [N, D], embedding: [V, D] (same dtype: bf16/fp16/fp32, same device; any strides),
    k in 1..64 and <= V, scale: [N] or None. Returns (scores [N, k] fp32, token_ids [N, k] int64),
    best first; ties go to the lower token id. See the module docstring for the algorithm.
    """
    _validate(values, embedding, k, scale)
    backend = _backend.resolve("vocab_topk", values.device)
    if backend == "torch":
        return vocab_topk_ref(values, embedding, k, largest=largest, scale=scale)
    if backend == "triton-interpret":
        return _launch(values, embedding, k, largest, scale, interpret=True)
    with torch.cuda.device(values.device):  # Triton launches on the current device
        return _launch(values, embedding, k, largest, scale, interpret=False)


def _launch(values, embedding, k, largest, scale, *, interpret):
    N, D = values.shape
    V = embedding.shape[0]
    device = values.device
    scores = torch.empty((N, k), dtype=torch.float32, device=device)
    ids = torch.empty((N, k), dtype=torch.int64, device=device)
    if N == 0:
        return scores, ids
    KP = max(2, triton.next_power_of_2(k))
    if interpret:
        block_n, block_v, block_d, warps, stages = 16, 64, 32, 4, 1
        sm_count = _INTERPRET_SM_COUNT
    else:
        block_n, block_v, block_d, warps, stages = _gpu_config(values.dtype, KP)
        sm_count = _sm_count(torch.cuda.current_device())
    n_blocks = triton.cdiv(N, block_n)
    n_tiles = triton.cdiv(V, block_v)
    splits = _pick_splits(n_blocks, n_tiles, sm_count, KP)
    tiles_per_split = triton.cdiv(n_tiles, splits)
    splits = triton.cdiv(n_tiles, tiles_per_split)
    # Per-split running lists, unsorted: part_val [N, splits * KP] fp32, part_id [N, splits * KP] int32.
    part_val = torch.empty((N, splits * KP), dtype=torch.float32, device=device)
    part_id = torch.empty((N, splits * KP), dtype=torch.int32, device=device)
    sign = 1.0 if largest else -1.0
    _partial_kernel[(n_blocks, splits)](
        values, embedding, scale if scale is not None else values, part_val, part_id,
        N, V, D, tiles_per_split, n_tiles, sign,
        values.stride(0), values.stride(1), embedding.stride(0), embedding.stride(1),
        scale.stride(0) if scale is not None else 0,
        K=k, KP=KP, HAS_SCALE=scale is not None,
        UPCAST=interpret and values.dtype != torch.float32,
        PRECISION="ieee" if values.dtype == torch.float32 else "tf32",
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps, num_stages=stages,
    )
    C = splits * KP
    CP = triton.next_power_of_2(C)
    block_m = max(1, min(64, 4096 // CP))
    _merge_kernel[(triton.cdiv(N, block_m),)](
        part_val, part_id, scores, ids, N, C, sign, K=k, CP=CP, BLOCK_M=block_m, num_warps=4,
    )
    return scores, ids


def vocab_topk_ref(
    values: torch.Tensor,
    embedding: torch.Tensor,
    k: int,
    *,
    largest: bool = True,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch oracle: fp32 logits, then a stable sort so ties keep the lower token id first.

    values: [N, D], embedding: [V, D], scale: [N] or None -> (scores [N, k] fp32, ids [N, k] int64).
    Materialises [N, V]; use ``vocab_topk_chunked`` to bound memory.
    """
    logits = values.float() @ embedding.float().T  # [N, V]
    if scale is not None:
        logits = logits * scale.float()[:, None]
    order = torch.sort(logits, dim=1, descending=largest, stable=True).indices[:, :k]
    return logits.gather(1, order), order


# ---------------------------------------------------------------------------------------------
# streaming over very large N


def _row_bytes(backend: str, V: int, D: int, k: int, elem: int, copy: bool) -> int:
    """Working-set bytes per row of one chunk (inputs copied to the device, outputs, scratch)."""
    per_row = k * 12 + (D * elem if copy else 0)
    if backend == "torch":
        return per_row + V * 16  # fp32 logits + sorted values + int64 order
    return per_row + 64 * 8 * 8  # partial lists: up to 8 splits x 64 slots x (fp32 + int32)


def vocab_topk_chunked(
    values: torch.Tensor,
    embedding: torch.Tensor,
    k: int,
    *,
    largest: bool = True,
    scale: torch.Tensor | None = None,
    chunk_size: int | None = None,
    progress: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``vocab_topk`` over many rows (a whole model: 300k+ value vectors) in chunks of N.

    values: [N, D] on any device (chunks are moved to ``embedding.device``), embedding: [V, D],
    scale: [N] or None. chunk_size=None picks the largest chunk whose working set fits in
    ``DEFAULT_MEMORY_BUDGET`` (the torch backend materialises [chunk, V] logits, the kernel
    does not). progress=None shows a tqdm bar only when the run lasts over 2 s; True always,
    False never. Returns (scores [N, k] fp32, token_ids [N, k] int64) on ``embedding.device``.
    """
    if not isinstance(values, torch.Tensor) or values.dim() != 2:
        raise ValueError(f"values must be a [N, D] tensor, got {_shape(values)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    device = embedding.device if isinstance(embedding, torch.Tensor) else values.device
    N = values.shape[0]
    head = values[:1].to(device)
    _validate(head, embedding, k, None if scale is None else scale[:1].to(device))
    if scale is not None and scale.shape != (N,):
        raise ValueError(f"scale must be a [N] tensor with N={N}, got {_shape(scale)}")
    if chunk_size is None:
        backend = _backend.resolve("vocab_topk", device)
        per_row = _row_bytes(backend, embedding.shape[0], embedding.shape[1], k, values.element_size(),
                             values.device != device)
        chunk_size = max(1, DEFAULT_MEMORY_BUDGET // per_row)
    chunk_size = min(chunk_size, max(N, 1))
    scores = torch.empty((N, k), dtype=torch.float32, device=device)
    ids = torch.empty((N, k), dtype=torch.int64, device=device)
    starts = range(0, N, chunk_size)
    with _progress(progress, len(starts), N) as bar:
        for start in starts:
            stop = min(start + chunk_size, N)
            chunk = values[start:stop].to(device, non_blocking=True)
            chunk_scale = None if scale is None else scale[start:stop].to(device, non_blocking=True)
            s, i = vocab_topk(chunk, embedding, k, largest=largest, scale=chunk_scale)
            scores[start:stop] = s
            ids[start:stop] = i
            if bar is not None:
                bar.update(stop - start)
    return scores, ids


@contextlib.contextmanager
def _progress(progress: bool | None, n_chunks: int, total: int) -> Iterator[object | None]:
    if progress is False or (progress is None and n_chunks < 2):
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="vec", desc="vocab top-k", delay=0.0 if progress else 2.0)
    try:
        yield bar
    finally:
        bar.close()
