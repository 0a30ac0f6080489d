"""steer_correction_ / add_direction_: in-place steering additions against their references,
against the clamp identity they implement, and (on a GPU) inside CUDA graph capture."""

from __future__ import annotations

import itertools

import pytest
import torch

from vlafast import _backend
from vlafast.ops.steer import add_direction_, add_direction_ref, steer_correction_, steer_correction_ref

# Kernel and reference compute in fp32 and round once into y's dtype; they differ only in the
# summation order of the S-term dot. fp32: measured max |diff| 1.9e-6 over CASES (|y| <~ 30).
# bf16: measured 0 over CASES; the order can flip one rounding (seen: 1 ulp, 0.0625 at |y| ~ 10,
# on a wider random sample), so rtol is one bf16 ulp.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-6), torch.bfloat16: dict(atol=1e-6, rtol=2**-7)}

# Awkward sizes: 1, primes, non-multiples of the 16 x 64 x 16 interpreter blocks. The full
# product of these (B, T, D, S) x dtypes x alpha/mask forms is ~400 cases; each parameter's
# values are covered by zipping the factors below (every B, T, D, S value with both dtypes
# and both alpha forms), which keeps this file's runtime to seconds.
SHAPES = [(1, 1, 1, 1), (1, 1, 40, 7), (3, 5, 130, 33), (2, 17, 64, 16), (3, 1, 257, 1), (1, 19, 17, 40)]
CASES = [
    (shape, dtype, alpha_form, mask_form)
    for (shape, dtype), alpha_form, mask_form in zip(
        itertools.product(SHAPES, [torch.float32, torch.bfloat16]),
        itertools.cycle(["per_request", "per_neuron", "per_neuron"]),
        itertools.cycle(["float", "bool"]),
    )
]


def _make(B, T, D, S, dtype, alpha_form, mask_form, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(B, T, D, generator=g).to(dtype)
    h_sel = torch.randn(B, T, S, generator=g).to(dtype)
    W_sel = (torch.randn(D, S, generator=g) / S**0.5).to(dtype)
    alpha = 4 * torch.rand((B,) if alpha_form == "per_request" else (B, S), generator=g)
    if mask_form == "bool":
        mask = torch.arange(B) % 2 == 0  # request 0 on, 1 off, 2 on, ...
    else:
        mask = torch.tensor([1.0, 0.0, 0.5])[torch.arange(B) % 3]  # on, off, half
    return y, h_sel, W_sel, alpha, mask


@pytest.mark.parametrize("shape,dtype,alpha_form,mask_form", CASES)
def test_correction_matches_reference(shape, dtype, alpha_form, mask_form):
    y, h_sel, W_sel, alpha, mask = _make(*shape, dtype, alpha_form, mask_form)
    ours, ref = y.clone(), y.clone()
    out = steer_correction_(ours, h_sel, W_sel, alpha, mask)
    assert out is ours
    steer_correction_ref(ref, h_sel, W_sel, alpha, mask)
    torch.testing.assert_close(ours, ref, **TOL[dtype])
    off = mask == 0
    assert torch.equal(ours[off], y[off]), "masked-off requests must stay bit-exact"
    if mask.any():
        assert not torch.equal(ours[mask != 0], y[mask != 0])


@pytest.mark.parametrize("shape,dtype,alpha_form,mask_form", CASES)
def test_direction_matches_reference(shape, dtype, alpha_form, mask_form):
    B, T, D, _ = shape
    y, _, _, _, mask = _make(*shape, dtype, alpha_form, mask_form)
    direction = torch.randn(D).to(dtype)
    alpha = torch.linspace(-3, 5, B)
    ours, ref = y.clone(), y.clone()
    assert add_direction_(ours, direction, alpha, mask) is ours
    add_direction_ref(ref, direction, alpha, mask)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)  # measured: identical (one fp32 FMA-free product)
    # And the definition, in float64, to one rounding of y's dtype.
    m = mask.double()[:, None, None]
    want = y.double() + m * alpha.double()[:, None, None] * direction.double()
    torch.testing.assert_close(ours.double(), want, **TOL[dtype], check_dtype=False)


@pytest.mark.parametrize("gather", ["caller", "kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_correction_is_the_exact_clamp(dtype, gather):
    # docs/architecture.md §2: down_proj(h) + correction == down_proj(h with h_S := alpha).
    B, T, F, D = 3, 7, 50, 37
    g = torch.Generator().manual_seed(1)
    h = torch.randn(B, T, F, generator=g)
    W = torch.randn(D, F, generator=g) / F**0.5  # down_proj.weight: [D, F]
    sel = torch.tensor([3, 11, 12, 29, 47])
    alpha = torch.tensor([[4.0], [2.0], [20.0]]).expand(B, len(sel)).contiguous()
    mask = torch.tensor([True, True, False])
    y = (h @ W.T).to(dtype)  # [B, T, D]
    if gather == "caller":
        steer_correction_(y, h[..., sel].to(dtype), W[:, sel].to(dtype), alpha, mask)
    else:  # the kernel reads h[..., sel] itself
        steer_correction_(y, h.to(dtype), W[:, sel].to(dtype), alpha, mask, index=sel)
    clamped = h.clone()
    clamped[..., sel] = alpha[:, None, :]
    want = clamped @ W.T
    want[2] = h[2] @ W.T  # request 2 is off
    # fp32: measured 9.5e-7. bf16: h_sel, W_sel and y rounded to bf16: measured 1.6e-2 (|want| <= 4.9).
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=6e-2, rtol=2e-2)
    torch.testing.assert_close(y.float(), want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_index_gathers_like_h_sel(dtype, index_dtype):
    B, T, F, D, S = 3, 5, 70, 130, 33
    g = torch.Generator().manual_seed(5)
    h = torch.randn(B, T, F, generator=g).to(dtype)
    index = torch.randperm(F, generator=g)[:S].to(index_dtype)  # unsorted, like a cluster
    y, _, W_sel, alpha, mask = _make(B, T, D, S, dtype, "per_neuron", "float")
    a, b, r = y.clone(), y.clone(), y.clone()
    steer_correction_(a, h, W_sel, alpha, mask, index=index)
    steer_correction_(b, h[..., index.long()], W_sel, alpha, mask)
    steer_correction_ref(r, h, W_sel, alpha, mask, index=index)
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # same loads, same order: identical
    torch.testing.assert_close(a, r, **TOL[dtype])


def test_alpha_per_neuron_equals_per_request_when_constant():
    y, h_sel, W_sel, alpha, mask = _make(3, 5, 40, 7, torch.float32, "per_request", "float")
    a, b = y.clone(), y.clone()
    steer_correction_(a, h_sel, W_sel, alpha, mask)
    steer_correction_(b, h_sel, W_sel, alpha[:, None].expand(3, 7), mask)  # stride-0 [B, S]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_negative_zero_survives_mask_off():
    y = torch.full((2, 3, 40), -0.0)
    h_sel, W_sel = torch.randn(2, 3, 5), torch.randn(40, 5)
    steer_correction_(y, h_sel, W_sel, torch.ones(2), torch.tensor([0.0, 0.0]))
    assert torch.signbit(y).all()
    add_direction_(y, torch.randn(40), torch.ones(2), torch.tensor([False, False]))
    assert torch.signbit(y).all()


def test_strided_views_update_in_place():
    base = torch.randn(4, 6, 2, 50)
    y = base[:, :, 1, :45].transpose(0, 1)  # [B=6, T=4, D=45], non-contiguous view
    untouched = base.clone()
    h_big = torch.randn(6, 4, 20)
    h_sel = h_big[..., ::3]  # [6, 4, 7] strided
    W_sel = torch.randn(7, 45).T  # [45, 7] transposed
    alpha, mask = torch.rand(6, 7), torch.ones(6)
    want = y.clone()
    steer_correction_ref(want, h_sel, W_sel, alpha, mask)
    steer_correction_(y, h_sel, W_sel, alpha, mask)
    torch.testing.assert_close(y, want, **TOL[torch.float32])
    assert torch.equal(base[:, :, 0], untouched[:, :, 0]) and torch.equal(base[:, :, 1, 45:], untouched[:, :, 1, 45:])


def test_torch_backend_matches_kernel():
    y, h_sel, W_sel, alpha, mask = _make(3, 5, 130, 33, torch.bfloat16, "per_neuron", "float")
    ours, via_torch = y.clone(), y.clone()
    steer_correction_(ours, h_sel, W_sel, alpha, mask)
    with _backend.override("torch"):
        steer_correction_(via_torch, h_sel, W_sel, alpha, mask)
    torch.testing.assert_close(ours, via_torch, **TOL[torch.bfloat16])


def _good(B=2, T=3, D=8, S=4):
    return dict(y=torch.zeros(B, T, D), h_sel=torch.zeros(B, T, S), W_sel=torch.zeros(D, S),
                alpha=torch.zeros(B), mask=torch.ones(B))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(y=torch.zeros(2, 8)), r"y must be a \[B, T, D\] tensor, got \[2, 8\]"),
        (dict(y=torch.zeros(2, 3, 8, dtype=torch.int32)), r"y must be bf16/fp16/fp32"),
        (dict(h_sel=torch.zeros(2, 4, 4)), r"h_sel must be \[B, T, S\] with B=2, T=3"),
        (dict(W_sel=torch.zeros(4, 8)), r"W_sel must be \[D, S\] = \[8, 4\]"),
        (dict(alpha=torch.zeros(3)), r"alpha must be a \[B\] or \[B, S\] = \[2\] or \[2, 4\]"),
        (dict(alpha=4.0), r"alpha must be a \[B\] or \[B, S\]"),
        (dict(alpha=torch.zeros(2, dtype=torch.long)), r"alpha must be a floating tensor"),
        (dict(mask=torch.ones(3)), r"mask must be \[B\] with B=2"),
        (dict(mask=torch.ones(2, dtype=torch.int64)), r"mask must be float .* or bool"),
        (dict(alpha=torch.zeros(2, device="meta")), r"alpha must be on cpu like y"),
        (dict(W_sel=torch.zeros(8, 4, device="meta")), r"W_sel must be on cpu like y"),
        (dict(h_sel=torch.zeros(2, 3, 4, dtype=torch.int8)), r"h_sel must be a floating tensor"),
        (dict(h_sel=torch.zeros(2, 3, 9), index=torch.tensor([0, 1, 2])), r"W_sel must be \[D, S\] = \[8, 3\]"),
        (dict(h_sel=torch.zeros(2, 9), index=torch.arange(4)), r"h must be a \[B, T, F\] \(with index\) tensor"),
        (dict(h_sel=torch.zeros(2, 3, 9), index=torch.arange(4.0)), r"index must be int32 or int64"),
        (dict(h_sel=torch.zeros(2, 3, 9), index=torch.arange(4)[None]), r"index must be a \[S\] tensor"),
        (dict(h_sel=torch.zeros(2, 3, 9), index=torch.arange(4, device="meta")), r"index must be on cpu like y"),
    ],
)
def test_correction_bad_inputs_raise(change, match):
    args = {**_good(), **change}
    args.setdefault("index", None)
    with pytest.raises(ValueError, match=match):
        steer_correction_(**args)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(direction=torch.zeros(7)), r"direction must be \[D\] with D=8"),
        (dict(direction=torch.zeros(1, 8)), r"direction must be a \[D\] tensor"),
        (dict(alpha=torch.zeros(2, 4)), r"alpha must be a \[B\] = \[2\] device tensor"),
        (dict(mask=torch.ones(2, device="meta")), r"mask must be on cpu like y"),
    ],
)
def test_direction_bad_inputs_raise(change, match):
    args = {"y": torch.zeros(2, 3, 8), "direction": torch.zeros(8), "alpha": torch.zeros(2), "mask": torch.ones(2)}
    with pytest.raises(ValueError, match=match):
        add_direction_(**{**args, **change})


# ---------------------------------------------------------------------------------------------
# GPU: realistic shapes, allocation- and sync-free launches, CUDA graph capture + replay


@pytest.fixture
def exact_fp32_matmul():
    """The fp32 references must not silently run in TF32 if another test enabled it."""
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = prev


def _gpu_case(B, T, D=2048, S=64, F=16384, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    y = torch.randn(B, T, D, device="cuda", generator=g).bfloat16()
    h_sel = torch.randn(B, T, S, device="cuda", generator=g).bfloat16()
    W_sel = (torch.randn(D, S, device="cuda", generator=g) / F**0.5).bfloat16()
    alpha = torch.full((B, S), 4.0, device="cuda")
    mask = (torch.arange(B, device="cuda") % 2 == 0).float()
    return y, h_sel, W_sel, alpha, mask


@pytest.mark.gpu
@pytest.mark.usefixtures("exact_fp32_matmul")
@pytest.mark.parametrize("B,T", [(1, 1), (64, 1), (2, 817), (7, 33)])
def test_gpu_correction_realistic(B, T):
    y, h_sel, W_sel, alpha, mask = _gpu_case(B, T)
    ours, ref = y.clone(), y.clone()
    steer_correction_(ours, h_sel, W_sel, alpha, mask)
    steer_correction_ref(ref, h_sel, W_sel, alpha, mask)
    torch.testing.assert_close(ours, ref, **TOL[torch.bfloat16])  # GPU figure not yet measured
    h = torch.randn(B, T, 16384, device="cuda").bfloat16()
    index = torch.randperm(16384, device="cuda")[:64]
    ours, ref = y.clone(), y.clone()
    steer_correction_(ours, h, W_sel, alpha, mask, index=index)
    steer_correction_ref(ref, h, W_sel, alpha, mask, index=index)
    torch.testing.assert_close(ours, ref, **TOL[torch.bfloat16])
    direction = torch.randn(2048, device="cuda").bfloat16()
    ours, ref = y.clone(), y.clone()
    add_direction_(ours, direction, alpha[:, 0], mask)
    add_direction_ref(ref, direction, alpha[:, 0], mask)
    torch.testing.assert_close(ours, ref, **TOL[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_launch_allocates_nothing_and_never_syncs():
    y, h_sel, W_sel, alpha, mask = _gpu_case(4, 3)
    direction = torch.randn(2048, device="cuda").bfloat16()
    h, index = torch.randn(4, 3, 16384, device="cuda").bfloat16(), torch.arange(0, 16384, 256, device="cuda")
    steer_correction_(y, h_sel, W_sel, alpha, mask)  # compile outside the measured calls
    steer_correction_(y, h, W_sel, alpha, mask, index=index)
    add_direction_(y, direction, alpha[:, 0], mask)
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            steer_correction_(y, h_sel, W_sel, alpha, mask)
            steer_correction_(y, h, W_sel, alpha, mask, index=index)
            add_direction_(y, direction, alpha[:, 0], mask)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before


@pytest.mark.gpu
@pytest.mark.usefixtures("exact_fp32_matmul")
@pytest.mark.parametrize("alpha_shape", ["per_request", "per_neuron"])
def test_gpu_graph_capture_and_replay_with_new_alpha(alpha_shape):
    B, T, D, S = 8, 5, 2048, 64
    y0, h_sel, W_sel, _, _ = _gpu_case(B, T, D, S)
    alpha = torch.zeros((B,) if alpha_shape == "per_request" else (B, S), device="cuda")
    mask = torch.zeros(B, device="cuda")
    direction = torch.randn(D, device="cuda").bfloat16()
    y = torch.empty_like(y0)

    def step():
        y.copy_(y0)
        steer_correction_(y, h_sel, W_sel, alpha, mask)
        add_direction_(y, direction, alpha.view(B, -1)[:, 0], mask)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile the kernels before capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()

    g = torch.Generator(device="cuda").manual_seed(3)
    for trial in range(4):
        alpha.copy_(torch.rand(alpha.shape, device="cuda", generator=g) * 20 - 5)
        mask.copy_((torch.rand(B, device="cuda", generator=g) > 0.4).float() * (1 + trial))
        graph.replay()
        want = y0.clone()
        steer_correction_ref(want, h_sel, W_sel, alpha, mask)
        add_direction_ref(want, direction, alpha.view(B, -1)[:, 0], mask)
        torch.cuda.synchronize()
        torch.testing.assert_close(y, want, atol=1e-6, rtol=2 * 2**-7)  # two roundings: one ulp each
        off = mask == 0
        assert torch.equal(y[off], y0[off])
    mask.zero_()
    graph.replay()
    assert torch.equal(y, y0), "mask 0 must restore the unsteered output bit-exactly"


def test_benchmark_runs_on_cpu():
    import argparse
    import importlib

    bench = importlib.import_module("vlafast.bench.steer")
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    rows = bench.run(parser.parse_args(["--batch", "1", "3", "--selected", "5", "--layers", "1"]))
    assert [(r.op, r.baseline) for r in rows] == [
        ("steer_correction_", "MLP (graph)"), ("steer_correction_", "down_proj alone (graph)"), ("add_direction_", "MLP (graph)"),
    ] * 2
    assert all(r.median_ms > 0 and r.baseline_ms > 0 and r.unit == "% overhead" for r in rows)
