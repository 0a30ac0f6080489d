"""OpenVLA action tokens against an independent numpy transcription of OpenVLA's ActionTokenizer
(np.digitize over linspace edges, token = vocab - bin, decode via clipped bin centres)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vlafast.models.action_tokenizer import (
    ActionStats, ActionTokenizer, StatsError, parse_dataset_statistics, select_stats,
)

VOCAB = 32_000


def np_encode(a: np.ndarray, n_bins: int = 256) -> np.ndarray:
    bins = np.linspace(-1, 1, n_bins)
    return VOCAB - np.digitize(np.clip(a, -1.0, 1.0), bins)


def np_decode(t: np.ndarray, n_bins: int = 256) -> np.ndarray:
    bins = np.linspace(-1, 1, n_bins)
    centers = (bins[:-1] + bins[1:]) / 2.0
    return centers[np.clip(VOCAB - t - 1, 0, centers.shape[0] - 1)]


def edge_cases() -> np.ndarray:
    bins = np.linspace(-1, 1, 256)
    nudged = np.concatenate([bins, np.nextafter(bins, -2), np.nextafter(bins, 2)])
    return np.concatenate([nudged, [-1.0, 1.0, 0.0, -1.5, 1.5, -1e9, 1e9, 1e-12, -1e-12]])


@pytest.mark.parametrize("n", [1, 7, 257])
def test_encode_matches_numpy(n):
    rng = np.random.default_rng(n)
    a = np.concatenate([rng.uniform(-1.2, 1.2, size=n * 7), edge_cases()])
    ours = ActionTokenizer().encode(torch.from_numpy(a))
    assert ours.dtype == torch.int64
    np.testing.assert_array_equal(ours.numpy(), np_encode(a))
    assert ours.min() >= VOCAB - 256 and ours.max() <= VOCAB - 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encode_low_precision_input(dtype):
    a = torch.linspace(-1.1, 1.1, 1001).to(dtype)
    np.testing.assert_array_equal(ActionTokenizer().encode(a).numpy(), np_encode(a.double().numpy()))


def test_decode_matches_numpy_including_out_of_range_ids():
    ids = np.concatenate([np.arange(VOCAB - 300, VOCAB + 70), [0, 5, 32_063]])
    ours = ActionTokenizer().decode(torch.from_numpy(ids))
    np.testing.assert_allclose(ours.numpy(), np_decode(ids), rtol=0, atol=1e-7)  # fp32 of the fp64 centres: measured max 3.0e-8


def test_round_trip_and_clipping():
    tok = ActionTokenizer()
    a = torch.from_numpy(np.concatenate([np.linspace(-1, 1, 4099), edge_cases()]))
    back = tok.decode(tok.encode(a)).double()
    # A decoded action is its bin's centre: at most half a bin (1/255) from the clipped input.
    assert (back - a.clamp(-1, 1)).abs().max() <= 1.0 / 255 + 1e-7
    assert torch.equal(tok.encode(torch.tensor([1.0, 1.5, 1e9])), torch.full((3,), VOCAB - 256))
    assert torch.equal(tok.encode(torch.tensor([-1.0, -1.5, -1e9])), torch.full((3,), VOCAB - 1))
    ids = torch.arange(VOCAB - 255, VOCAB)
    assert torch.equal(tok.encode(tok.decode(ids)), ids)
    # Bin 256 (a == +1) has no centre of its own: it decodes to the last centre, which re-encodes to bin 255.
    assert tok.encode(tok.decode(torch.tensor([VOCAB - 256]))).item() == VOCAB - 255


def test_errors():
    tok = ActionTokenizer()
    with pytest.raises(ValueError, match="NaN"):
        tok.encode(torch.tensor([0.1, float("nan")]))
    with pytest.raises(ValueError, match="floating"):
        tok.encode(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integers"):
        tok.decode(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="n_bins"):
        ActionTokenizer(vocab_size=100, n_bins=256)


def test_unnormalize_matches_openvla_formula_with_mask():
    rng = np.random.default_rng(0)
    q01, q99 = rng.normal(size=7) - 1, rng.normal(size=7) + 1
    mask = np.array([True] * 6 + [False])
    stats = parse_dataset_statistics({"bridge": {"action": {"q01": q01.tolist(), "q99": q99.tolist(),
                                                            "mask": mask.tolist(), "mean": [0.0] * 7}}})
    a = rng.uniform(-1, 1, size=(3, 7))
    want = np.where(mask, 0.5 * (a + 1) * (q99 - q01) + q01, a)
    got = stats["bridge"].unnormalize(torch.from_numpy(a).float())
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)  # float32 output: measured max 6.0e-8
    no_mask = ActionStats.from_dict({"q01": q01.tolist(), "q99": q99.tolist()})
    assert bool(no_mask.mask.all())


def test_stats_selection_errors():
    entry = {"action": {"q01": [0.0] * 7, "q99": [1.0] * 7}}
    one = parse_dataset_statistics({"a": entry})
    two = parse_dataset_statistics({"a": entry, "b": entry})
    assert select_stats(one, None) is one["a"]
    with pytest.raises(StatsError, match="pass unnorm_key"):
        select_stats(two, None)
    with pytest.raises(StatsError, match="unknown unnorm_key 'c'"):
        select_stats(two, "c")
    with pytest.raises(StatsError, match="lack"):
        parse_dataset_statistics({"a": {"action": {"q01": [0.0]}}})
    with pytest.raises(StatsError, match="no 'action'"):
        parse_dataset_statistics({"a": {"proprio": {}}})
