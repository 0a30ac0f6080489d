"""FAST action tokenizer: encode and decode per chunk, this codec against FAST's processor loop.

Both sides use the same fitted BPE tokenizer (``tokenizers``, Rust) on the same chunks, measured
in the same run. Ours: one DCT matrix product for the batch, symbols <-> strings through one
UTF-32 buffer, ``encode_batch`` / ``decode_batch``. Baseline: ``encode_ref`` / ``decode_ref``, the
reference processor transcribed (a Python loop per chunk, ``scipy.fft`` when installed, else an
FFT DCT in NumPy). ``median_ms`` and ``baseline_ms`` are per chunk (a batch's time / B);
``achieved`` is our chunks/s. The tokenizer is fitted on smooth synthetic chunks (``--fit-chunks``)
with FAST's defaults (scale 10); shapes are T x A (10 x 7: LIBERO / DROID-like pi0-FAST chunks).
"""

from __future__ import annotations

import argparse

import numpy as np

from vlafast.bench.core import Row, time_ms


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shapes", nargs="+", default=["10x7", "50x14"], help="chunk shapes TxA (default 10x7 50x14)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32], help="chunks per call (default 1 32)")
    p.add_argument("--fit-chunks", type=int, default=512, help="synthetic chunks the BPE vocabulary is fitted on")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary size (default 2048)")


def _smooth(n: int, T: int, A: int, seed: int) -> np.ndarray:
    """[n, T, A] smooth chunks in [-1, 1] (slow sinusoids with a little noise)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.0, 1.0, T)[None, :, None]
    x = rng.uniform(0.2, 1.0, (n, 1, A)) * np.sin(2 * np.pi * (rng.uniform(0.2, 1.5, (n, 1, A)) * t
                                                               + rng.uniform(0, 1, (n, 1, A))))
    return np.clip(x + 0.01 * rng.normal(size=x.shape), -1.0, 1.0)


def _parse_shape(s: str) -> tuple[int, int]:
    try:
        T, A = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise ValueError(f"--shapes entries must be TxA like 10x7, got {s!r}") from None
    if T < 1 or A < 1:
        raise ValueError(f"--shapes entries need T >= 1 and A >= 1, got {s!r}")
    return T, A


def run(args: argparse.Namespace) -> list[Row]:
    from vlafast.models.fast_tokenizer import FASTTokenizer, decode_ref, encode_ref, reference_dct

    if any(b < 1 for b in args.batches):
        raise ValueError(f"--batches must all be >= 1, got {args.batches}")
    if args.fit_chunks < 1:
        raise ValueError(f"--fit-chunks must be >= 1, got {args.fit_chunks}")
    baseline = f"FAST reference loop ({reference_dct()})"
    rows: list[Row] = []
    for spec in args.shapes:
        T, A = _parse_shape(spec)
        tok = FASTTokenizer.fit(_smooth(args.fit_chunks, T, A, seed=0), vocab_size=args.vocab_size)
        cfg = tok.config
        for B in args.batches:
            x = _smooth(B, T, A, seed=1 + B)
            tokens = tok.encode(x)
            ref_tokens = encode_ref(tok.tokenizer, cfg, x)
            actions, ok = tok.decode(tokens)
            ref_actions = decode_ref(tok.tokenizer, cfg, tokens, T, A)
            same = tokens == ref_tokens and bool(np.allclose(actions, ref_actions, atol=1e-9))
            n_tok = float(np.mean([len(s) for s in tokens]))
            extra = {"ok": bool(ok.all()) and same, "tokens_per_chunk": round(n_tok, 2),
                     "compression": round(T * A / n_tok, 2), "vocab": tok.vocab_size, "min_token": cfg.min_token,
                     "max_abs_err": float(np.abs(actions - x).max())}
            timed = {
                "encode": (lambda: tok.encode(x), lambda: encode_ref(tok.tokenizer, cfg, x)),
                "decode": (lambda: tok.decode(tokens), lambda: decode_ref(tok.tokenizer, cfg, tokens, T, A)),
            }
            for op, (ours, ref) in timed.items():
                ms = time_ms(ours, warmup=2, min_time_s=0.3) / B
                base_ms = time_ms(ref, warmup=2, min_time_s=0.3) / B
                rows.append(Row(
                    bench="fast-tokenizer", op=op, shape=f"B={B} T={T} A={A}", dtype="fp64",
                    backend="numpy matmul DCT + batched tokenizers", median_ms=ms, baseline=baseline,
                    baseline_ms=base_ms, achieved=1e3 / ms, unit="chunks/s", extra=extra))
    return rows
