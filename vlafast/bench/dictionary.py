"""Whole-model neuron dictionary (``NeuronDictionary.build``) vs the naive materialise-then-topk.

On CUDA: the published sizes with random bf16 weights (docs/architecture.md §7 targets: pi0 <= 1.0 s, OpenVLA
<= 0.3 s), end to end through the public API (per-layer fused projection + top-k, results
copied to the host). The baseline is what the paper's reference code does, moved to the GPU
to be fair: per layer, logits = values @ E^T in row chunks that fit the memory budget, then
``torch.topk``, ids copied to the host. ``extra`` has the agreement of the two id lists on one
layer (bf16 logits round differently, so near-ties may swap).

Only the parts the dictionary reads are allocated (each layer's ``down_proj``, the vocabulary
matrix, the final norm), in a stand-in with the same attribute paths as ``Pi0Policy`` /
``OpenVLAPolicy``. On a CPU: a tiny stand-in in fp32 through the torch reference, to prove the
path runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from torch import nn

from vlafast.bench.core import Row, peak, time_ms


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    width: int      # D
    neurons: int    # N per layer (d_ff)
    vocab: int      # V
    tied: bool      # pi0: tied input embedding; OpenVLA: lm_head
    target_s: float | None


# "pi0" is PaliGemma's Gemma-2B stack (18 x 16384 neurons of width 2048, vocabulary 257152):
# the same for pi0, pi0.5 and pi0-FAST, whose dictionaries this row times.
SHAPES = {
    "pi0": ModelShape("pi0", 18, 2048, 16_384, 257_152, True, 1.0),
    "openvla": ModelShape("openvla", 32, 4096, 11_008, 32_064, False, 0.3),
}
TINY = ModelShape("tiny", 3, 64, 257, 1_009, True, None)


class _Box(nn.Module):
    def __init__(self, **children: nn.Module) -> None:
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


class _Down(nn.Module):
    def __init__(self, D: int, N: int) -> None:
        super().__init__()
        self.down_proj = nn.Linear(N, D, bias=False)
        self.steer = None


class _Norm(nn.Module):
    def __init__(self, D: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(D))


class Pi0StandIn(nn.Module):
    """What the dictionary reads of a ``Pi0Policy`` (``mlps()``, ``language_model.embed_tokens``,
    ``language_model.norm``), random weights."""

    def __init__(self, shape: ModelShape, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        D, V = shape.width, shape.vocab
        with torch.device(device):
            self.layers = nn.ModuleList(_Down(D, shape.neurons) for _ in range(shape.layers))
            self.language_model = self._lm(D, V)
        g = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0.0, 0.02, generator=g)
        self.to(dtype)

    @staticmethod
    def _lm(D: int, V: int) -> nn.Module:
        return _Box(embed_tokens=nn.Embedding(V, D), norm=_Norm(D))

    def mlps(self):
        for l, layer in enumerate(self.layers):
            yield f"vlm.{l}", layer

    @property
    def vocab(self) -> torch.Tensor:
        return self.language_model.embed_tokens.weight


class OpenVLAStandIn(Pi0StandIn):
    """... of an ``OpenVLAPolicy`` (``output_embedding`` = ``lm_head.weight``, ``language_model.model.norm``)."""

    @staticmethod
    def _lm(D: int, V: int) -> nn.Module:
        return _Box(model=_Box(norm=_Norm(D)), lm_head=nn.Linear(D, V, bias=False))

    @property
    def output_embedding(self) -> torch.Tensor:
        return self.language_model.lm_head.weight

    @property
    def vocab(self) -> torch.Tensor:
        return self.output_embedding


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["pi0", "openvla"])
    p.add_argument("--k", type=int, default=10)


def _naive(model: Pi0StandIn, k: int, budget: int = 1 << 30):
    """Per layer: logits chunk = values @ E^T (materialised), torch.topk, ids to the host."""
    E = model.vocab  # [V, D]
    V = E.shape[0]
    rows = max(1, budget // (V * E.element_size()))

    def run() -> torch.Tensor:
        out = []
        for layer in model.layers:
            values = layer.down_proj.weight.T  # [N, D]
            for start in range(0, values.shape[0], rows):
                logits = values[start:start + rows] @ E.T  # [rows, V]
                out.append(torch.topk(logits, k, dim=1).indices.cpu())
        return torch.cat(out)

    return run, rows


@torch.no_grad()
def _measure(shape: ModelShape, k: int, device: torch.device, gpu: bool) -> list[Row]:
    from vlafast import _backend
    from vlafast.interp import NeuronDictionary

    dtype = torch.bfloat16 if gpu else torch.float32
    model = (Pi0StandIn if shape.tied else OpenVLAStandIn)(shape, device, dtype)
    tokens = [f"t{i}" for i in range(shape.vocab)]
    ours = lambda: NeuronDictionary.build(model, tokens, k=k, progress=False)  # noqa: E731
    naive, rows = _naive(model, k)
    reps = dict(warmup=1, iters=3)  # whole-model runs: ~1 s each on an H100
    t0 = time.perf_counter()
    d = ours()
    first_s = time.perf_counter() - t0
    ours_ms = time_ms(ours, device=device, **reps)
    naive_ms = time_ms(naive, device=device, **reps)
    N = shape.layers * shape.neurons
    base_ids = naive()[: shape.neurons]
    agree = float((d.top_ids[0] == base_ids).float().mean())
    flop = 2.0 * N * shape.vocab * shape.width
    return [Row(
        bench="dictionary", op="NeuronDictionary.build",
        shape=f"{shape.name} {shape.layers}x{shape.neurons} -> V={shape.vocab} D={shape.width} k={k}",
        dtype="bf16" if gpu else "fp32", backend=_backend.resolve("vocab_topk", device), median_ms=ours_ms,
        baseline="per-layer matmul + torch.topk (materialised, chunked)", baseline_ms=naive_ms,
        achieved=flop / (ours_ms * 1e-3) / 1e12, unit="TFLOP/s", peak=peak("bf16") if gpu else None,
        extra={"neurons": N, "first_call_s": round(first_s, 3), "naive_chunk_rows": rows,
               "ids_agree_layer0": round(agree, 4), "target_s": shape.target_s,
               "logits_if_materialised_GB": round(N * shape.vocab * 2 / 1e9, 1)},
    )]


def run(args: argparse.Namespace) -> list[Row]:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    rows: list[Row] = []
    for shape in ([SHAPES[m] for m in args.models] if gpu else [TINY]):
        rows += _measure(shape, args.k, device, gpu)
        if gpu:
            torch.cuda.empty_cache()
    return rows
