"""CUDA-graph runner for the K-step denoise loop (velocity function included).

One graph per input layout (batch B, T, A, dtype, mask shape, ctx layout) for a fixed config
(so per (batch, K)), with static input/output buffers; each call copies the inputs in,
replays, and returns fresh copies of the outputs. Off CUDA, or when capture fails, the call
runs the eager ``sample`` instead and logs why once per layout.

Random numbers inside the graph. The loop draws the hybrid index and the step noise with
``torch.randint`` / ``torch.randn`` (``sampler._draw``), exactly as the eager path does.
PyTorch makes this graph-safe through Philox offsets (Note [CUDA Graph-safe RNG states] in
ATen's CUDAGeneratorImpl.h): during capture, RNG kernels read seed and offset from device
memory that each replay fills from the generator's current state, and the replay then
advances the generator by the offsets the graph consumed. Replays therefore draw fresh
noise every call, and a replay right after ``generator.manual_seed(s)`` draws the same
numbers as the eager path after the same seed (bitwise, by that note's design).

* The default CUDA generator is registered by every capture automatically (every torch this
  library supports, >= 2.4): ``generator=None`` always works.
* A user ``torch.Generator(device="cuda")`` has to be registered with the graph before capture
  through ``CUDAGraph.register_generator_state`` (graph-safe generator states, pytorch#114068,
  2024). Without that method capture raises "philox_cuda_state for an unexpected CUDA generator
  used during capture", so we check for the method rather than a version number and, where it
  is missing, run eagerly with the reason logged. Newer torch (pytorch#176753, 2026) registers
  generators lazily on first use and keeps the method as a deprecated no-op; calling it there
  is harmless and its deprecation warning is silenced.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import torch

from vlafast.flow.sampler import (
    DenoiseTrace,
    SamplerConfig,
    VelocityFn,
    _check_generator,
    _check_noise,
    _flat_mask,
    _grid_for,
    _sample_impl,
    _trace_from,
    sample,
)

log = logging.getLogger(__name__)


def _is_data(ctx: Any) -> bool:
    return dataclasses.is_dataclass(ctx) and not isinstance(ctx, type)


def _ctx_signature(ctx: Any) -> Any:
    """Hashable layout of ctx: tensors by (shape, dtype, device); tuples, lists, dicts and
    dataclass instances (e.g. a prefix KV cache) recursively; hashable scalars by value; any
    other object by identity (captured by reference)."""
    if isinstance(ctx, torch.Tensor):
        return ("T", tuple(ctx.shape), ctx.dtype, str(ctx.device))
    if isinstance(ctx, (list, tuple)):
        return (type(ctx).__name__, tuple(_ctx_signature(c) for c in ctx))
    if isinstance(ctx, dict):
        return ("dict", tuple((k, _ctx_signature(v)) for k, v in ctx.items()))
    if _is_data(ctx):
        return (type(ctx), tuple((f.name, _ctx_signature(getattr(ctx, f.name))) for f in dataclasses.fields(ctx)))
    if ctx is None or isinstance(ctx, (bool, int, float, str)):
        return ("v", ctx)
    return ("obj", id(ctx))


def _clone_ctx(ctx: Any) -> Any:
    if isinstance(ctx, torch.Tensor):
        return ctx.clone()
    if isinstance(ctx, (list, tuple)):
        return type(ctx)(_clone_ctx(c) for c in ctx)
    if isinstance(ctx, dict):
        return {k: _clone_ctx(v) for k, v in ctx.items()}
    if _is_data(ctx):
        return dataclasses.replace(ctx, **{f.name: _clone_ctx(getattr(ctx, f.name))
                                           for f in dataclasses.fields(ctx) if f.init})
    return ctx


def _copy_ctx(dst: Any, src: Any) -> None:
    if isinstance(dst, torch.Tensor):
        if dst.data_ptr() != src.data_ptr():
            dst.copy_(src)
    elif isinstance(dst, (list, tuple)):
        for d, s in zip(dst, src):
            _copy_ctx(d, s)
    elif isinstance(dst, dict):
        for k in dst:
            _copy_ctx(dst[k], src[k])
    elif _is_data(dst):
        for f in dataclasses.fields(dst):
            _copy_ctx(getattr(dst, f.name), getattr(src, f.name))


@dataclasses.dataclass
class _Entry:
    graph: "torch.cuda.CUDAGraph"
    noise: torch.Tensor
    ctx: Any
    mask: torch.Tensor | None
    out: dict


class GraphedSampler:
    """``sample`` through CUDA graphs, cached per input layout.

    sampler = GraphedSampler(flow_sde(num_steps=4), velocity_fn, generator=g)
    actions, trace = sampler(ctx, noise, action_mask=mask)

    ``ctx`` may be a tensor or nested tuples / lists / dicts / dataclasses of tensors (e.g.
    ``(state, prefix_cache)``): its tensors are copied into the graph's static buffers on each
    call (a pi0 prefix KV cache at batch 64 is ~1 GB, ~0.3 ms of copy on an H100), skipped for
    tensors that already are those buffers. Other objects (the model) are captured by
    reference: parameters updated in place (``optimizer.step()``) are seen by later replays,
    parameters replaced by new tensors are not (make a new GraphedSampler). ``velocity_fn``
    must be capturable: no host syncs, no ``.item()``, no data-dependent shapes.
    """

    def __init__(
        self,
        config: SamplerConfig,
        velocity_fn: VelocityFn,
        *,
        generator: torch.Generator | None = None,
        warmup: int = 2,
    ) -> None:
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (Triton compiles and cuBLAS picks kernels before capture), got {warmup}")
        self.config = config
        self.velocity_fn = velocity_fn
        self.generator = generator
        self.warmup = warmup
        self._graphs: dict[Any, _Entry] = {}
        self._fallbacks: dict[Any, str] = {}
        self._pool = None

    @property
    def fallbacks(self) -> dict[Any, str]:
        """Layouts that run eagerly, with the reason."""
        return dict(self._fallbacks)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def _key(self, ctx: Any, noise: torch.Tensor, action_mask: torch.Tensor | None) -> Any:
        mask_sig = None if action_mask is None else (tuple(action_mask.shape), action_mask.dtype)
        return (tuple(noise.shape), noise.dtype, str(noise.device), mask_sig, _ctx_signature(ctx))

    def _eager(self, key: Any, reason: str, ctx, noise, action_mask) -> tuple[torch.Tensor, DenoiseTrace]:
        if key not in self._fallbacks:
            self._fallbacks[key] = reason
            log.warning("GraphedSampler runs eagerly for batch %d: %s", noise.shape[0], reason)
        return sample(self.config, self.velocity_fn, ctx, noise, generator=self.generator, action_mask=action_mask)

    def _capture(self, ctx: Any, noise: torch.Tensor, action_mask: torch.Tensor | None) -> _Entry:
        static_noise = noise.clone()
        static_ctx = _clone_ctx(ctx)
        static_mask = None if action_mask is None else action_mask.clone()
        grid = _grid_for(self.config, noise.device, noise.dtype)  # cached: built outside the capture

        def run() -> dict:
            mask = _flat_mask(static_mask, static_noise.shape, static_noise.device)
            return _sample_impl(self.config, self.velocity_fn, static_ctx, static_noise, mask, self.generator, grid)

        side = torch.cuda.Stream(device=noise.device)
        side.wait_stream(torch.cuda.current_stream(noise.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(self.warmup):
                run()
        torch.cuda.current_stream(noise.device).wait_stream(side)
        torch.cuda.synchronize(noise.device)

        graph = torch.cuda.CUDAGraph()
        if self.generator is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)  # a no-op in torch with lazy registration
                graph.register_generator_state(self.generator)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self._pool):
            out = run()
        return _Entry(graph=graph, noise=static_noise, ctx=static_ctx, mask=static_mask, out=out)

    def __call__(
        self,
        ctx: Any,
        noise: torch.Tensor,
        *,
        action_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, DenoiseTrace]:
        """Same contract as ``sample(config, velocity_fn, ctx, noise, generator=..., action_mask=...)``."""
        _check_noise(noise)
        _check_generator(self.generator, noise.device)
        _flat_mask(action_mask, noise.shape, noise.device)  # validate before any capture
        key = self._key(ctx, noise, action_mask)
        if key in self._fallbacks:
            return self._eager(key, self._fallbacks[key], ctx, noise, action_mask)
        if noise.device.type != "cuda":
            return self._eager(key, f"noise is on {noise.device}: CUDA graphs need a CUDA device", ctx, noise, action_mask)
        if self.generator is not None and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
            return self._eager(
                key,
                f"torch {torch.__version__} cannot register a custom generator with a CUDA graph "
                "(CUDAGraph.register_generator_state is missing); pass generator=None to use the "
                "default CUDA generator, which graphs support",
                ctx, noise, action_mask,
            )
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._capture(ctx, noise, action_mask)
            except Exception as exc:  # capture can fail in many ways; eager always works
                return self._eager(key, f"capture failed ({type(exc).__name__}: {exc})", ctx, noise, action_mask)
            self._graphs[key] = entry
        entry.noise.copy_(noise)
        _copy_ctx(entry.ctx, ctx)
        if entry.mask is not None:
            entry.mask.copy_(action_mask)
        entry.graph.replay()
        out = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in entry.out.items()}
        trace = _trace_from(self.config, out, action_mask)
        return trace.actions, trace
