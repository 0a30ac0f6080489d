"""Fused value-vector -> vocab top-k against matmul + torch.topk and against the bare matmul.

Shapes (docs/architecture.md §2): OpenVLA N=11008 per layer, V=32064, D=4096, 32 layers (352,256 vectors);
pi0 Gemma-2B N=16384 per layer, V=257152, D=2048, 18 layers (294,912 vectors). ``layer`` times
``vocab_topk`` on one layer; ``model`` times ``vocab_topk_chunked`` on the whole model. Both
baselines run in chunks whose bf16 logits take at most 2 GiB: (a) ``torch.topk(chunk @ E.T)``,
(b) the matmul alone (the floor). TFLOP/s counts 2*N*V*D against ``peak("bf16")``.
Targets: >= 2x faster than (a), <= 1.15x (b); whole model pi0 <= 1.0 s, OpenVLA <= 0.3 s.
On a CPU the same rows come from a tiny shape (the kernel's torch reference there).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from vlafast.bench.core import Row, peak, time_ms

_LOGIT_CHUNK_BYTES = 2 << 30


@dataclasses.dataclass(frozen=True)
class VocabShape:
    name: str
    n_per_layer: int
    vocab: int
    width: int
    layers: int
    target_model_s: float | None = None

    @staticmethod
    def tiny() -> "VocabShape":
        return VocabShape("tiny", 96, 1031, 64, 3)


SHAPES = {
    "openvla": VocabShape("openvla", 11008, 32064, 4096, 32, target_model_s=0.3),
    "pi0": VocabShape("pi0", 16384, 257152, 2048, 18, target_model_s=1.0),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES),
                   help="model shapes to run on a GPU (default: all); a CPU runs a tiny shape")
    p.add_argument("--scopes", nargs="+", choices=("layer", "model"), default=("layer", "model"),
                   help="one layer and/or the whole model (default: both)")
    p.add_argument("--k", type=int, default=10, help="tokens kept per vector (default 10, as the paper)")


def _chunked(values: torch.Tensor, embedding: torch.Tensor, k: int | None):
    """The baseline: [chunk, V] logits via one matmul into a reused buffer, then torch.topk."""
    V = embedding.shape[0]
    rows = max(1, min(values.shape[0], _LOGIT_CHUNK_BYTES // (V * values.element_size())))
    buf = torch.empty((rows, V), dtype=values.dtype, device=values.device)
    emb_t = embedding.T

    def run() -> torch.Tensor | None:
        out = None
        for start in range(0, values.shape[0], rows):
            chunk = values[start:start + rows]
            logits = torch.mm(chunk, emb_t, out=buf[: chunk.shape[0]])
            if k is not None:
                out = torch.topk(logits, k, dim=1)
        return out

    return run, rows


def _measure(shape: VocabShape, scope: str, k: int, device: torch.device, gpu: bool) -> list[Row]:
    from vlafast import _backend
    from vlafast.ops.vocab_topk import vocab_topk, vocab_topk_chunked

    N = shape.n_per_layer * (shape.layers if scope == "model" else 1)
    V, D = shape.vocab, shape.width
    g = torch.Generator(device=device).manual_seed(0)
    values = torch.randn(N, D, device=device, generator=g).to(torch.bfloat16)
    embedding = (torch.randn(V, D, device=device, generator=g) / 4).to(torch.bfloat16)
    backend = _backend.resolve("vocab_topk", device)
    if scope == "model":
        def ours():
            return vocab_topk_chunked(values, embedding, k, progress=False)
        op = "vocab_topk_chunked"
    else:
        def ours():
            return vocab_topk(values, embedding, k)
        op = "vocab_topk"
    # Whole-model runs take ~1 s each on an H100: few repetitions keep `bench all` in budget.
    reps = dict(warmup=1, iters=3) if (gpu and scope == "model") else dict(warmup=2)
    topk_base, rows = _chunked(values, embedding, k)
    mm_base, _ = _chunked(values, embedding, None)
    ours_ms = time_ms(ours, device=device, **reps)
    topk_ms = time_ms(topk_base, device=device, **reps)
    mm_ms = time_ms(mm_base, device=device, **reps)

    extra = {"N": N, "V": V, "D": D, "k": k, "layers": shape.layers if scope == "model" else 1,
             "baseline_chunk_rows": rows, "topk_ms": topk_ms, "matmul_ms": mm_ms,
             "speedup_vs_topk": topk_ms / ours_ms, "ratio_vs_matmul": ours_ms / mm_ms}
    if scope == "layer":  # sanity of the GPU run: agreement with the bf16-logit baseline
        ids = ours()[1]
        base_ids = topk_base()[1] if rows >= N else None
        if base_ids is not None:
            extra["ids_agree_with_topk"] = float((ids == base_ids).float().mean())
    if scope == "model" and shape.target_model_s is not None:
        extra["target_s"] = shape.target_model_s
    flop = 2.0 * N * V * D
    common = dict(bench="vocab-topk", op=op, shape=f"{shape.name} {scope} N={N} V={V} D={D} k={k}",
                  dtype="bf16", backend=backend, median_ms=ours_ms,
                  achieved=flop / (ours_ms * 1e-3) / 1e12, unit="TFLOP/s", peak=peak("bf16"), extra=extra)
    return [
        Row(baseline="matmul+torch.topk (chunked)", baseline_ms=topk_ms, **common),
        Row(baseline="bare matmul (chunked, floor)", baseline_ms=mm_ms, **common),
    ]


def run(args: argparse.Namespace) -> list[Row]:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    shapes = [SHAPES[m] for m in args.models] if gpu else [VocabShape.tiny()]
    rows: list[Row] = []
    for shape in shapes:
        for scope in args.scopes:
            rows += _measure(shape, scope, args.k, device, gpu)
            if gpu:
                torch.cuda.empty_cache()
    return rows
