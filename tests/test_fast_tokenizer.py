"""The FAST action tokenizer against a transcription of FAST's processor (``encode_ref`` /
``decode_ref``: a Python loop per chunk, SciPy's or an FFT DCT), the round-trip error bound of
the orthonormal DCT, failure handling of bad streams, the saved folder and openpi's PaliGemma ids."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vlafast.models.fast_tokenizer import (
    FAST_SKIP_TOKENS, MAX_SYMBOL, PALIGEMMA_VOCAB_SIZE, PROCESSOR_CONFIG, TOKENIZER_FILE, FASTConfig, FASTTokenizer,
    dct_fft, dct_matrix, dct_time, decode_ref, encode_ref, fast_to_paligemma, idct_fft, idct_time, paligemma_to_fast,
)

# (T, A): 1, primes, the LIBERO / DROID-like 10 x 7, a 50-step horizon
SHAPES = [(1, 1), (1, 7), (2, 7), (13, 5), (10, 7), (50, 7)]


def smooth(n: int, T: int, A: int, seed: int = 0) -> np.ndarray:
    """[n, T, A] smooth chunks in [-1, 1]: one slow sinusoid per dimension."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, T)[None, :, None]
    freq, phase, amp = rng.uniform(0.2, 1.5, (n, 1, A)), rng.uniform(0, 1, (n, 1, A)), rng.uniform(0.2, 1, (n, 1, A))
    return amp * np.sin(2 * np.pi * (freq * t + phase))


@pytest.fixture(scope="module")
def _fitted_once() -> tuple[FASTTokenizer, np.ndarray]:
    x = smooth(128, 10, 7)
    return FASTTokenizer.fit(x, vocab_size=512), x


@pytest.fixture
def fitted(_fitted_once) -> tuple[FASTTokenizer, np.ndarray]:
    """A tokenizer fitted on 128 smooth 10 x 7 chunks, with its own failure counter."""
    tok, x = _fitted_once
    return FASTTokenizer(tok.tokenizer, tok.config), x


# ---------------------------------------------------------------------------------------------
# the DCT


@pytest.mark.parametrize("T", [1, 2, 3, 7, 13, 50, 64])
def test_dct_matrix_is_orthonormal_and_matches_the_fft_dct(T):
    C = dct_matrix(T)
    np.testing.assert_allclose(C @ C.T, np.eye(T), atol=1e-12)
    x = np.random.default_rng(T).normal(size=(3, T, 5))
    np.testing.assert_allclose(dct_time(x), dct_fft(x, axis=1), atol=1e-12)
    np.testing.assert_allclose(idct_time(dct_time(x)), x, atol=1e-12)
    np.testing.assert_allclose(idct_fft(dct_fft(x, axis=1), axis=1), x, atol=1e-12)
    assert not C.flags.writeable


@pytest.mark.parametrize("T", [1, 2, 7, 50])
def test_fft_dct_matches_scipy_ortho(T):
    sf = pytest.importorskip("scipy.fft")
    x = np.random.default_rng(T).normal(size=(2, T, 3))
    np.testing.assert_allclose(dct_fft(x, axis=1), sf.dct(x, axis=1, norm="ortho"), atol=1e-12)
    np.testing.assert_allclose(idct_fft(x, axis=1), sf.idct(x, axis=1, norm="ortho"), atol=1e-12)


def test_symbols_are_flattened_time_major():
    """Symbol t*A + a is frequency t of dimension a (FAST's ``[T, A].flatten()``)."""
    T, A = 4, 3
    tok = FASTTokenizer.fit(smooth(8, T, A), vocab_size=512)
    cfg = tok.config
    x = smooth(1, T, A, seed=5)
    q = np.rint(dct_time(x)[0] * cfg.scale)  # [T, A]
    text = tok.tokenizer.decode(tok.encode(x)[0])
    got = np.array([ord(c) for c in text]) + cfg.min_token
    np.testing.assert_array_equal(got, np.maximum(q, cfg.min_token).reshape(-1))
    np.testing.assert_array_equal(got[:A], np.maximum(q[0], cfg.min_token))  # the DC term of every dimension first


# ---------------------------------------------------------------------------------------------
# round trip and the reference


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
@pytest.mark.parametrize("T,A", SHAPES)
def test_round_trip_error_bound_vs_scale(T, A, scale):
    """Each coefficient is off by <= 0.5/scale; C is orthonormal, so one action is off by
    <= 0.5*sqrt(T)/scale (sum_k |C[k, t]| <= sqrt(T)) and the chunk's RMS error is <= 0.5/scale.
    Measured on uniform [-1, 1] data (scale 1 / 10 / 100): max 0.49 / 0.049 / 0.0047 at T=1, A=7
    (bound 0.5 / 0.05 / 0.005); 1.08 / 0.110 / 0.0102 at T=50 (bound 3.54 / 0.354 / 0.0354); RMS
    0.27-0.30 / 0.027-0.034 / 0.0022-0.0029, about the 0.289/scale of uniform rounding noise."""
    x = np.random.default_rng(T * 100 + A).uniform(-1, 1, (16, T, A))
    tok = FASTTokenizer.fit(x, scale=scale, vocab_size=2048)
    tokens = tok.encode(x)
    y, ok = tok.decode(tokens)
    assert ok.all() and tok.failures == 0 and y.shape == x.shape and y.dtype == np.float64
    err = y - x
    assert np.abs(err).max() <= 0.5 * np.sqrt(T) / scale + 1e-9
    assert np.sqrt((err ** 2).mean()) <= 0.5 / scale + 1e-9
    # the same ids and actions as FAST's processor
    assert tokens == encode_ref(tok.tokenizer, tok.config, x)
    np.testing.assert_allclose(y, decode_ref(tok.tokenizer, tok.config, tokens, T, A), atol=1e-12)


def test_error_shrinks_with_scale():
    x = smooth(32, 10, 7)
    errs = []
    for scale in (2.0, 20.0, 200.0):
        tok = FASTTokenizer.fit(x, scale=scale)
        errs.append(np.abs(tok.decode(tok.encode(x))[0] - x).max())
    assert errs[0] > errs[1] > errs[2]


def test_fit_on_tiny_smooth_data(fitted):
    tok, x = fitted
    T, A = 10, 7
    assert tok.config == FASTConfig(scale=10.0, vocab_size=512, min_token=tok.config.min_token, time_horizon=T, action_dim=A)
    assert tok.config.min_token == int(np.rint(dct_time(x) * 10).min())
    assert 1 < tok.vocab_size <= 512
    tokens = tok.encode(x)
    assert all(0 <= i < tok.vocab_size for s in tokens for i in s)
    lens = np.array([len(s) for s in tokens])
    assert lens.max() < T * A and lens.mean() < 0.5 * T * A  # BPE compresses: measured mean 27.7, max 36 of 70
    held_out = smooth(16, T, A, seed=1)
    y, ok = tok.decode(tok.encode(held_out))
    assert ok.all()
    assert np.abs(y - held_out).max() <= 0.5 * np.sqrt(T) / 10  # bound 0.158, measured 0.075


def test_symbols_unseen_at_fit_still_round_trip():
    """Every symbol 0..599 (the data below spans 0..~30) encodes losslessly: the 256 byte-level
    characters are part of the initial alphabet. With FAST's alphabet alone the byte-level
    pre-tokenizer's character for an unseen symbol is unknown to the BPE and silently dropped."""
    tok = FASTTokenizer.fit(smooth(8, 5, 3), vocab_size=512)
    sym = np.arange(600).reshape(40, 5, 3)
    x = idct_time((sym + tok.config.min_token) / tok.config.scale)  # chunks whose symbols are exactly sym
    tokens = tok.encode(x)
    assert [len(tok.tokenizer.decode(s)) for s in tokens] == [15] * 40
    y, ok = tok.decode(tokens)
    assert ok.all()
    np.testing.assert_allclose(y, x, atol=1e-12)


def test_one_chunk_and_torch_inputs(fitted):
    tok, x = fitted
    assert tok.encode(x[0]) == tok.encode(x[:1])  # [T, A] is a batch of one
    assert tok.encode(torch.from_numpy(x[:3]).float()) == tok.encode(x[:3].astype(np.float32))
    tokens = tok.encode(x[:3])
    L = max(len(s) for s in tokens) + 3
    padded = torch.tensor([s + [0] * (L - len(s)) for s in tokens])  # [B, L] padded with id 0: wrong count
    as_tensors = [torch.tensor(s) for s in tokens]
    y, ok = tok.decode(as_tensors)
    assert ok.all()
    np.testing.assert_allclose(y, tok.decode(tokens)[0])
    _, ok = tok.decode(padded)
    assert not ok.any()


# ---------------------------------------------------------------------------------------------
# failures


def test_truncated_and_invalid_streams_fail_counted_never_raise(fitted):
    tok, x = fitted
    good = tok.encode(x[:2])
    streams = [
        good[0],
        good[1][:-1],            # truncated: too few symbols
        good[1] + good[1][-1:],  # an extra token: too many
        [],                      # nothing generated
        [-1, 3],                 # negative id (a PaliGemma text id mapped back)
        [tok.vocab_size],        # past the vocabulary
        [10 ** 30],              # does not fit int64
        [1.5, 2.0],              # not integers
        good[0],
    ]
    y, ok = tok.decode(streams)
    assert ok.tolist() == [True] + [False] * 7 + [True]
    assert tok.failures == 7
    assert np.all(y[1:8] == 0.0)
    np.testing.assert_array_equal(y[0], y[8])
    # FAST's processor gives the same zeros for each of them
    ref = decode_ref(tok.tokenizer, tok.config, streams, 10, 7)
    np.testing.assert_allclose(y, ref, atol=1e-12)
    _, ok = tok.decode([good[0][:1]])
    assert not ok[0] and tok.failures == 8


def test_relaxed_decode_cuts_or_pads_as_lerobot(fitted):
    tok, x = fitted
    s = tok.encode(x[:1])[0]
    n = 10 * 7
    text = tok.tokenizer.decode(s[:-1])
    assert len(text) < n
    y, ok = tok.decode([s[:-1], s + s, [-5]], relaxed=True)
    assert not ok.any() and tok.failures == 3
    coef = np.zeros(n)
    coef[: len(text)] = np.array([ord(c) for c in text]) + tok.config.min_token
    np.testing.assert_allclose(y[0], idct_time(coef.reshape(1, 10, 7) / 10.0)[0], atol=1e-12)
    full, _ = tok.decode([s])
    np.testing.assert_allclose(y[1], full[0], atol=1e-12)  # cut back to T*A: the first copy
    assert np.all(y[2] == 0.0)  # invalid ids: still zeros


def test_stream_cut_inside_a_symbol_is_a_failure():
    """A byte-level token holding half of a two-byte character decodes to U+FFFD; FAST would take
    it as symbol 65533 (a huge coefficient). Here it is a failure."""
    x = np.random.default_rng(0).uniform(-1, 1, (16, 10, 7))
    tok = FASTTokenizer.fit(x, scale=100.0, vocab_size=2048)  # symbols past 127: two UTF-8 bytes
    lone = next(i for i in range(tok.vocab_size) if tok.tokenizer.decode([i]) == "\ufffd")
    y, ok = tok.decode([[lone]], time_horizon=1, action_dim=1)
    assert not ok[0] and y[0, 0, 0] == 0.0 and tok.failures == 1
    assert abs(decode_ref(tok.tokenizer, tok.config, [[lone]], 1, 1)[0, 0, 0]) > 100  # the reference's garbage
    # valid UTF-8 for a character encode never makes (past MAX_SYMBOL): a failure too
    byte_char = _bytes_to_unicode()
    emoji = [tok.tokenizer.token_to_id(byte_char[b]) for b in "\U0001F600".encode()]
    assert tok.tokenizer.decode(emoji) == "\U0001F600"
    _, ok = tok.decode([emoji], time_horizon=1, action_dim=1)
    assert not ok[0] and tok.failures == 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table of the byte-level pre-tokenizer."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def test_decode_shape_comes_from_the_config_or_the_call():
    tok = FASTTokenizer.fit(smooth(8, 5, 3), vocab_size=512)
    s = tok.encode(smooth(2, 5, 3, seed=3))
    bare = FASTTokenizer(tok.tokenizer, dataclasses_replace(tok.config, time_horizon=None, action_dim=None))
    with pytest.raises(ValueError, match="time_horizon must be an integer >= 1"):
        bare.decode(s)
    y, ok = bare.decode(s, time_horizon=5, action_dim=3)
    assert ok.all() and y.shape == (2, 5, 3)
    _, ok = tok.decode(s, time_horizon=3, action_dim=5)  # 15 symbols either way: FAST only checks the count
    assert ok.all()
    _, ok = tok.decode(s, time_horizon=4, action_dim=3)
    assert not ok.any()


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


# ---------------------------------------------------------------------------------------------
# save / load


def test_save_load_round_trip(fitted, tmp_path):
    tok, x = fitted
    folder = tok.save(tmp_path / "fast")
    assert sorted(p.name for p in folder.iterdir()) == [PROCESSOR_CONFIG, TOKENIZER_FILE, "tokenizer_config.json"]
    cfg = json.loads((folder / PROCESSOR_CONFIG).read_text())
    assert cfg["processor_class"] == "UniversalActionProcessor"
    assert {k: cfg[k] for k in ("scale", "vocab_size", "min_token", "time_horizon", "action_dim")} == {
        "scale": 10.0, "vocab_size": 512, "min_token": tok.config.min_token, "time_horizon": 10, "action_dim": 7}
    back = FASTTokenizer.load(folder)
    assert back.config == tok.config and back.vocab_size == tok.vocab_size
    tokens = tok.encode(x)
    assert back.encode(x) == tokens
    np.testing.assert_array_equal(back.decode(tokens)[0], tok.decode(tokens)[0])
    # a hub-style config: extra keys, null shape
    cfg.update(auto_map={"AutoProcessor": "processing_action_tokenizer.UniversalActionProcessor"},
               time_horizon=None, action_dim=None)
    (folder / PROCESSOR_CONFIG).write_text(json.dumps(cfg))
    hub = FASTTokenizer.load(folder)
    assert hub.config.time_horizon is None and hub.encode(x) == tokens


def test_saved_tokenizer_reads_in_transformers(fitted, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok, x = fitted
    folder = tok.save(tmp_path / "fast")
    hf = transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
    text = tok.tokenizer.decode(tok.encode(x[:1])[0])
    assert hf(text)["input_ids"] == tok.encode(x[:1])[0]


def test_load_errors_name_the_file(tmp_path, fitted):
    with pytest.raises(FileNotFoundError, match="processor_config.json"):
        FASTTokenizer.load(tmp_path)
    folder = fitted[0].save(tmp_path / "f")
    (folder / PROCESSOR_CONFIG).write_text('{"scale": 10}')
    with pytest.raises(ValueError, match=r"lacks \['vocab_size', 'min_token'\]"):
        FASTTokenizer.load(folder)
    (folder / PROCESSOR_CONFIG).write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        FASTTokenizer.load(folder)


# ---------------------------------------------------------------------------------------------
# PaliGemma ids


def test_paligemma_mapping_both_ways(fitted):
    top = PALIGEMMA_VOCAB_SIZE - 1 - FAST_SKIP_TOKENS
    assert top == 257_023
    assert int(fast_to_paligemma(0)) == 257_023 and int(fast_to_paligemma(2047)) == 257_023 - 2047
    ids = np.arange(2048)
    pg = fast_to_paligemma(ids)
    assert pg.dtype == np.int64 and pg.max() == 257_023 and pg.min() == 254_976
    assert pg.max() < PALIGEMMA_VOCAB_SIZE - FAST_SKIP_TOKENS  # the last 128 ids stay free
    np.testing.assert_array_equal(paligemma_to_fast(pg), ids)
    t = torch.tensor([[0, 5, 17]])
    assert torch.equal(paligemma_to_fast(fast_to_paligemma(t)), t) and isinstance(fast_to_paligemma(t), torch.Tensor)
    # a model's stream through PaliGemma's vocabulary and back decodes the same
    tok, x = fitted
    tokens = tok.encode(x[:4])
    back = [paligemma_to_fast(fast_to_paligemma(s)).tolist() for s in tokens]
    assert back == tokens
    # a text id (e.g. "|" or EOS) is not a FAST id: the stream fails, counted
    _, ok = tok.decode([paligemma_to_fast([1] + fast_to_paligemma(tokens[0]).tolist())])
    assert not ok[0] and tok.failures == 1
    assert fast_to_paligemma([]).size == 0


@pytest.mark.parametrize("ids", [[-1], [257_024], [0, 300_000]])
def test_fast_to_paligemma_rejects_out_of_range(ids):
    with pytest.raises(ValueError, match=r"FAST ids must be in \[0, 257023\]"):
        fast_to_paligemma(ids)


# ---------------------------------------------------------------------------------------------
# bad inputs


@pytest.mark.parametrize("kw,match", [
    (dict(scale=0.0), "scale must be a finite number > 0, got 0.0"),
    (dict(scale=float("nan")), "scale must be a finite number > 0"),
    (dict(vocab_size=0), "vocab_size must be an integer >= 1, got 0"),
    (dict(vocab_size=8), r"vocab_size must be >= \d+ \(the initial alphabet"),
    (dict(min_token=1.5), "min_token must be an integer, got 1.5"),
])
def test_fit_rejects_bad_settings(kw, match):
    with pytest.raises(ValueError, match=match):
        FASTTokenizer.fit(smooth(4, 10, 7), **kw)


@pytest.mark.parametrize("actions,match", [
    (np.zeros((10, 7)), r"actions must be \[N, T, A\] with every size >= 1, got shape \(10, 7\)"),
    (np.zeros((0, 10, 7)), r"got shape \(0, 10, 7\)"),
    (np.full((2, 3, 2), np.nan), "actions contain NaN or inf"),
    (np.array([[["a"]]]), "actions must be a real numeric array"),
    (np.full((2, 3, 2), 1e5), r"symbols up to \d+ > 55295"),
])
def test_fit_rejects_bad_actions(actions, match):
    with pytest.raises(ValueError, match=match):
        FASTTokenizer.fit(actions)


def test_encode_and_decode_reject_bad_inputs(fitted):
    tok, _ = fitted
    with pytest.raises(ValueError, match=r"chunks must be \[B, T, A\] or \[T, A\]"):
        tok.encode(np.zeros(7))
    with pytest.raises(ValueError, match="chunks contain NaN or inf"):
        tok.encode(np.full((1, 10, 7), np.inf))
    with pytest.raises(ValueError, match=f"> {MAX_SYMBOL}"):
        tok.encode(np.full((1, 10, 7), 1e5))
    for flat in (np.arange(5), [1, 2, 3], torch.arange(3)):
        with pytest.raises(ValueError, match=r"tokens must be a batch of streams .* wrap it as \[stream\]"):
            tok.decode(flat)
    y, ok = tok.decode([])
    assert y.shape == (0, 10, 7) and ok.shape == (0,)
    with pytest.raises(ValueError, match="action_dim must be an integer >= 1"):
        tok.decode([[1]], action_dim=0)
    with pytest.raises(ValueError, match="tokenizer must be a tokenizers.Tokenizer"):
        FASTTokenizer("tokenizer.json", tok.config)


def test_large_chunks_clip_below_at_min_token(fitted):
    """As FAST: symbols below min_token clip to it (lossy), larger ones pass (lossless)."""
    tok, x = fitted
    y, ok = tok.decode(tok.encode(np.full((1, 10, 7), -3.0)))
    assert ok.all() and y.min() > -3.0 + 0.5
    big = np.full((1, 10, 7), 3.0)
    y, ok = tok.decode(tok.encode(big))
    assert ok.all() and np.abs(y - big).max() <= 0.5 * np.sqrt(10) / 10


# ---------------------------------------------------------------------------------------------
# benchmark rows


def test_bench_rows_have_the_schema(monkeypatch):
    import argparse

    from vlafast.bench import BENCHMARKS
    from vlafast.bench.core import COLUMNS

    monkeypatch.setenv("VLAFAST_BENCH_TIME_SCALE", "0.02")
    bench = BENCHMARKS["fast-tokenizer"]
    mod = bench.load()
    p = argparse.ArgumentParser()
    mod.add_arguments(p)
    rows = mod.run(p.parse_args(["--shapes", "5x3", "--batches", "1", "4", "--fit-chunks", "16"]))
    assert {(r.op, r.shape) for r in rows} == {(op, f"B={b} T=5 A=3") for op in ("encode", "decode") for b in (1, 4)}
    for r in rows:
        rec = r.as_record()
        assert tuple(rec) == COLUMNS and rec["bench"] == "fast-tokenizer"
        assert r.median_ms > 0 and r.baseline_ms > 0 and r.ratio is not None
        assert r.baseline.startswith("FAST reference loop") and r.unit == "chunks/s"
        extra = json.loads(rec["extra"])
        assert extra["ok"] and 0 < extra["tokens_per_chunk"] <= 15


def test_decode_failures_warn_first_and_at_each_power_of_ten(fitted, caplog):
    """A policy that often fails to decode must not log at every control step: the first failing
    call warns, then one warning each time the running count passes 10, 100, ...; the rest go to
    debug, and ``failures`` counts them all."""
    import logging

    tok, _ = fitted
    bad = [[]] * 3  # three empty streams per call
    with caplog.at_level(logging.DEBUG, logger="vlafast.models.fast_tokenizer"):
        for _ in range(5):
            tok.decode(bad, time_horizon=10, action_dim=7)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert tok.failures == 15
    assert [r.getMessage().endswith(f"({n} failed so far)") for r, n in zip(warnings, (3, 12))] == [True, True]
    assert len(warnings) == 2 and len(caplog.records) == 5
