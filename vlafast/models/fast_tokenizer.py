"""The FAST action tokenizer (pi0-FAST) as a codec: action chunks <-> BPE token ids.

Encoding, as the public FAST processor (``physical-intelligence/fast``,
``processing_action_tokenizer.py``) does it for a chunk ``x: [T, A]``:

1. ``c = dct(x, axis=0, norm="ortho")``: an orthonormal DCT-II over time, per action dimension;
2. ``q = round(c * scale)`` (round half to even, ``np.around``), scale 10 by default;
3. flatten ``q`` row by row (``q.flatten()`` of the ``[T, A]`` array): frequency 0 of every
   dimension, then frequency 1, ... (symbol ``t * A + a`` is frequency ``t`` of dimension ``a``);
4. shift by ``min_token`` (the smallest symbol seen at ``fit``) and clip below at 0:
   ``s = max(q - min_token, 0)``;
5. map each symbol to the character ``chr(s)`` and BPE-encode the string with a HF ``tokenizers``
   BPE tokenizer (``tokenizer.json``).

Decoding inverts it: BPE ids -> string -> ``ord(ch) + min_token`` -> ``[T, A]`` ->
``idct(q / scale, axis=0, norm="ortho")``. A stream that does not decode to exactly ``T * A``
symbols is a failure: FAST prints an error and returns zeros for that chunk; here the row is
zeros, ``ok[b]`` is False, ``FASTTokenizer.failures`` counts it and a warning is logged. Decode
never raises on the content of a token stream (a model may emit anything).

Round-trip error: each coefficient is off by at most ``0.5 / scale``; the inverse DCT is
orthonormal, so the error of one action is at most ``0.5 * sqrt(T) / scale`` (Cauchy-Schwarz on a
unit column) and the RMS error over a chunk at most ``0.5 / scale`` (unless ``min_token`` clips).

The DCT here is a cached ``[T, T]`` matrix applied to the whole batch at once, the strings are
built and read back through one UTF-32 buffer and the BPE runs batched in Rust; ``encode_ref`` /
``decode_ref`` beside it are a line-by-line transcription of the reference processor (a Python
loop per chunk, ``scipy.fft`` when installed, else an FFT DCT in NumPy): the test oracle and the
benchmark's baseline.

openpi places FAST id ``k`` in PaliGemma's vocabulary as ``257152 - 1 - 128 - k`` (the last 128
ids are skipped; the map is its own inverse): ``fast_to_paligemma`` / ``paligemma_to_fast``.

Saved layout (a folder, as the processor's ``save_pretrained`` writes it): ``processor_config.json``
(``scale``, ``vocab_size``, ``min_token``, ``time_horizon``, ``action_dim``, ``processor_class``),
``tokenizer.json`` (the BPE tokenizer) and ``tokenizer_config.json`` (so HF's
``PreTrainedTokenizerFast`` reads the folder too). ``load`` needs the first two and ignores other
keys (the hub's ``auto_map``).

Details of the reference this follows from memory and chose where unsure:
- ``fit`` builds the tokenizer as FAST does, a ``ByteLevelBPETokenizer`` (byte-level
  pre-tokenizer with its regex split, byte-level decoder and post-processor) trained with
  ``BpeTrainer(vocab_size, min_frequency=2, initial_alphabet=[chr(0) .. chr(max - min)],
  max_token_length=10000)``. ``load`` takes any ``tokenizer.json``, so the hub file decodes
  whatever its pipeline is.
- One deliberate difference in ``fit``: the initial alphabet is FAST's ``chr(0) .. chr(max - min)``
  *plus* the 256 byte-level characters. The byte-level pre-tokenizer turns each symbol into the
  characters of its UTF-8 bytes, which FAST's alphabet does not cover (symbol 5 becomes byte-level
  ``chr(261)``); a BPE without an unknown token drops a character it has not seen, so with FAST's
  alphabet alone a symbol absent from the training data is silently lost and the chunk no longer
  decodes. With the byte alphabet every symbol up to ``MAX_SYMBOL`` encodes losslessly. ``fit``
  requires ``vocab_size`` >= the alphabet's size (FAST asserts ``max - min <= vocab_size``) and warns
  within 100 of it, as FAST does. Its default vocab_size is 2048 (the published universal
  tokenizer's; FAST's ``fit`` defaults to 1024).
- ``fit`` takes ``[N, T, A]`` and stores ``T`` and ``A`` as the decode defaults (FAST takes a list
  of chunks and remembers the shape of the last ``__call__``; this codec keeps no such state).
- The reference does not clip large symbols; characters must be encodable, so ``encode`` rejects
  a symbol above ``0xD7FF`` (the surrogates start there) with a ValueError. So a decoded character
  above it is a failure: U+FFFD, which the decoder gives for ids that do not form valid UTF-8 (a
  stream cut inside a character), or any other that ``encode`` cannot produce. Ids outside
  ``[0, vocab)`` fail too (HF's decoder would skip them silently).
- ``relaxed=True`` is LeRobot's pi0-FAST decode: a stream with the wrong symbol count is cut or
  zero-padded (in the flattened order) to ``T * A`` instead of zeroed; ``ok`` stays False.

Axes: B batch, N training chunks, T horizon, A action dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from vlafast._io import atomic_write_text

log = logging.getLogger(__name__)

PALIGEMMA_VOCAB_SIZE = 257_152
FAST_SKIP_TOKENS = 128  # openpi: the last 128 PaliGemma ids are special tokens, FAST ids go below
PROCESSOR_CONFIG = "processor_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
MAX_SYMBOL = 0xD7FF  # largest shifted symbol: chr() above it reaches the UTF-16 surrogates
_MAX_TOKEN_LENGTH = 10_000


@dataclasses.dataclass(frozen=True)
class FASTConfig:
    """What ``processor_config.json`` holds: quantisation scale, vocabulary, symbol offset and the
    default chunk shape for ``decode`` (None: the caller passes it)."""

    scale: float = 10.0
    vocab_size: int = 2048
    min_token: int = 0
    time_horizon: int | None = None
    action_dim: int | None = None

    def __post_init__(self) -> None:
        real = isinstance(self.scale, (int, float, np.integer, np.floating)) and not isinstance(self.scale, bool)
        if not (real and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {self.scale!r}")
        if not _is_int(self.vocab_size) or self.vocab_size < 1:
            raise ValueError(f"vocab_size must be an integer >= 1, got {self.vocab_size!r}")
        if not _is_int(self.min_token):
            raise ValueError(f"min_token must be an integer, got {self.min_token!r}")
        for name in ("time_horizon", "action_dim"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 1):
                raise ValueError(f"{name} must be None or an integer >= 1, got {v!r}")

    def to_json(self) -> dict[str, Any]:
        return {"action_dim": self.action_dim, "min_token": int(self.min_token),
                "processor_class": "UniversalActionProcessor", "scale": self.scale,
                "time_horizon": self.time_horizon, "vocab_size": int(self.vocab_size)}

    @staticmethod
    def from_json(obj: dict[str, Any]) -> "FASTConfig":
        missing = [k for k in ("scale", "vocab_size", "min_token") if k not in obj]
        if missing:
            raise ValueError(f"{PROCESSOR_CONFIG} lacks {missing}; it needs scale, vocab_size and min_token")
        return FASTConfig(scale=obj["scale"], vocab_size=obj["vocab_size"], min_token=obj["min_token"],
                          time_horizon=obj.get("time_horizon"), action_dim=obj.get("action_dim"))


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------
# the orthonormal DCT as a matrix (the fast path)


@functools.lru_cache(maxsize=64)
def dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix ``C: [n, n]`` (``C @ x == scipy.fft.dct(x, norm="ortho")``
    along axis 0; ``C.T`` is the inverse, DCT-III). Read-only, cached per ``n``."""
    k = np.arange(n, dtype=np.float64)[:, None]
    t = np.arange(n, dtype=np.float64)[None, :]
    c = np.cos(np.pi * k * (2.0 * t + 1.0) / (2.0 * n)) * np.sqrt(2.0 / n)
    c[0] /= np.sqrt(2.0)
    c.setflags(write=False)
    return c


def dct_time(x: np.ndarray) -> np.ndarray:
    """x: [B, T, A] -> orthonormal DCT-II over T: [B, T, A] float64."""
    return np.matmul(dct_matrix(x.shape[1]), x)


def idct_time(c: np.ndarray) -> np.ndarray:
    """c: [B, T, A] -> orthonormal DCT-III (inverse) over T: [B, T, A] float64."""
    return np.matmul(dct_matrix(c.shape[1]).T, c)


# ---------------------------------------------------------------------------------------------
# the codec


class FASTTokenizer:
    """Action chunks ``[B, T, A]`` <-> FAST token ids (one list per chunk).

    ``failures`` counts the token streams ``decode`` could not decode since construction.
    """

    def __init__(self, tokenizer: Tokenizer, config: FASTConfig) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise ValueError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        if not isinstance(config, FASTConfig):
            raise ValueError(f"config must be a FASTConfig, got {type(config).__name__}")
        self.tokenizer = tokenizer
        self.config = config
        self.failures = 0

    @property
    def vocab_size(self) -> int:
        """The BPE vocabulary's actual size V (at most ``config.vocab_size`` after ``fit``)."""
        return self.tokenizer.get_vocab_size()

    # -- fit ------------------------------------------------------------------------------------

    @classmethod
    def fit(cls, actions: np.ndarray | torch.Tensor, scale: float = 10.0, vocab_size: int = 2048,
            min_token: int | None = None) -> "FASTTokenizer":
        """Train a BPE vocabulary on action chunks ``actions: [N, T, A]`` (normalised, e.g. to
        [-1, 1]). ``min_token`` defaults to the smallest quantised coefficient in the data."""
        x = _as_chunks(actions, "actions", allow_2d=False)
        base = FASTConfig(scale=scale, vocab_size=vocab_size)  # validates scale and vocab_size
        q = np.rint(dct_time(x) * base.scale).reshape(x.shape[0], -1)  # [N, T*A]
        lo = int(q.min()) if min_token is None else min_token
        cfg = FASTConfig(scale=base.scale, vocab_size=vocab_size, min_token=lo,
                         time_horizon=x.shape[1], action_dim=x.shape[2])
        sym = np.maximum(q - cfg.min_token, 0)
        top = int(sym.max())
        if top > MAX_SYMBOL:
            raise ValueError(f"actions give symbols up to {top} > {MAX_SYMBOL} at scale {cfg.scale:g}; "
                             "normalise the actions (about [-1, 1]) or lower scale")
        alphabet = sorted({chr(i) for i in range(top + 1)} | set(pre_tokenizers.ByteLevel.alphabet()))
        if len(alphabet) > vocab_size:
            raise ValueError(f"vocab_size must be >= {len(alphabet)} (the initial alphabet: max - min + 1 = "
                             f"{top + 1} symbols at scale {cfg.scale:g} and the 256 byte-level characters), "
                             f"got {vocab_size}")
        if len(alphabet) + 100 > vocab_size:
            log.warning("FAST fit: the initial alphabet (%d characters) is almost as large as vocab_size %d; "
                        "consider a larger vocabulary", len(alphabet), vocab_size)
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=2, show_progress=False, special_tokens=[],
            initial_alphabet=alphabet, max_token_length=_MAX_TOKEN_LENGTH,
        )
        tok.train_from_iterator(_strings(sym), trainer=trainer, length=len(sym))
        return cls(tok, cfg)

    # -- encode / decode ------------------------------------------------------------------------

    def encode(self, chunks: np.ndarray | torch.Tensor) -> list[list[int]]:
        """chunks: [B, T, A] (or one [T, A]) float -> B lists of FAST token ids."""
        x = _as_chunks(chunks, "chunks", allow_2d=True)
        cfg = self.config
        sym = np.maximum(np.rint(dct_time(x) * cfg.scale) - cfg.min_token, 0).reshape(x.shape[0], -1)
        top = int(sym.max())
        if top > MAX_SYMBOL:
            raise ValueError(f"chunks give symbol {top} > {MAX_SYMBOL} (scale {cfg.scale:g}, min_token "
                             f"{cfg.min_token}); FAST expects normalised actions, about [-1, 1]")
        strings = _strings(sym)
        if len(strings) == 1:  # the control loop's case: no thread-pool round trip
            return [self.tokenizer.encode(strings[0]).ids]
        return [e.ids for e in self.tokenizer.encode_batch(strings)]

    def _decode_strings(self, streams: list[list[int]]) -> list[str]:
        if len(streams) == 1:
            return [self.tokenizer.decode(streams[0], skip_special_tokens=False)]
        return self.tokenizer.decode_batch(streams, skip_special_tokens=False) if streams else []

    def decode(self, tokens: Sequence[Sequence[int]] | np.ndarray | torch.Tensor, *,
               time_horizon: int | None = None, action_dim: int | None = None,
               relaxed: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """B token streams -> (actions: [B, T, A] float64, ok: [B] bool).

        A stream with ids outside [0, V), bytes that are not UTF-8 or a symbol count other than
        T*A gives ok False, zeros (``relaxed``: for a wrong count, its symbols cut or zero-padded
        to T*A) and one more ``failures``. T and A default to the config's.
        """
        T = time_horizon if time_horizon is not None else self.config.time_horizon
        A = action_dim if action_dim is not None else self.config.action_dim
        for name, v in (("time_horizon", T), ("action_dim", A)):
            if v is None or not _is_int(v) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1 (pass it, or fit / save it in the "
                                 f"config), got {v!r}")
        if isinstance(tokens, (torch.Tensor, np.ndarray)) and tokens.ndim == 1 or (
                isinstance(tokens, (list, tuple)) and tokens and _is_int(tokens[0])):
            raise ValueError("tokens must be a batch of streams ([B, L] or a list of lists), got one flat "
                             "stream; wrap it as [stream]")
        n = T * A
        V = self.vocab_size
        streams: list[list[int] | None] = []
        reasons: dict[int, str] = {}
        for b, stream in enumerate(tokens):
            try:
                streams.append(_stream_ids(stream, V))
            except (TypeError, ValueError, OverflowError) as e:
                streams.append(None)
                reasons[b] = str(e)
        B = len(streams)
        coef = np.zeros((B, n), dtype=np.float64)
        ok = np.zeros(B, dtype=bool)
        good = [b for b in range(B) if streams[b] is not None]
        try:
            texts = self._decode_strings([streams[b] for b in good])
        except (TypeError, ValueError, OverflowError):  # ids that are numbers but not integers: find the rows
            texts, kept = [], []
            for b in good:
                try:
                    texts.append(self.tokenizer.decode(streams[b], skip_special_tokens=False))
                    kept.append(b)
                except (TypeError, ValueError, OverflowError) as e:
                    reasons[b] = f"ids are not integers ({e})"
            good = kept
        # all decoded strings through one UTF-32 buffer; the usual case (every row exact) in one step
        sym = np.frombuffer("".join(texts).encode("utf-32-le"), dtype="<u4")
        lens = [len(t) for t in texts]
        lo = float(self.config.min_token)
        if all(L == n for L in lens) and (sym.size == 0 or sym.max() <= MAX_SYMBOL):
            coef[good] = sym.reshape(-1, n) + lo
            ok[good] = True
        else:
            pos = 0
            for b, L in zip(good, lens):
                row, pos = sym[pos:pos + L], pos + L
                if L and row.max() > MAX_SYMBOL:
                    reasons[b] = (f"ids decode to character {int(row.max())} > {MAX_SYMBOL} (U+FFFD: bytes that "
                                  "are not UTF-8, e.g. a stream cut inside a symbol)")
                elif L != n:
                    reasons[b] = f"decoded {L} symbols, expected T*A = {T}*{A} = {n}"
                    if relaxed:
                        coef[b, :min(n, L)] = row[:n] + lo
                else:
                    coef[b] = row + lo
                    ok[b] = True
        actions = idct_time(coef.reshape(B, T, A) / self.config.scale)  # failed rows: zero coefficients
        if reasons:
            before = self.failures
            self.failures += len(reasons)
            first = min(reasons)
            # a warning for the first failing call and each time the running count passes a power
            # of ten (a policy that often fails would otherwise log at every control step)
            loud = before == 0 or len(str(self.failures)) > len(str(before))
            log.log(logging.WARNING if loud else logging.DEBUG,
                    "FAST decode: %d of %d token streams failed (%s: %s); their actions are %s (%d failed so far)",
                    len(reasons), B, f"row {first}", reasons[first], "cut / padded" if relaxed else "zeros",
                    self.failures)
        return actions, ok

    # -- save / load ----------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``processor_config.json``
        (each atomically) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / TOKENIZER_FILE, self.tokenizer.to_str())
        atomic_write_text(folder / TOKENIZER_CONFIG, json.dumps(
            {"clean_up_tokenization_spaces": False, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n")
        atomic_write_text(folder / PROCESSOR_CONFIG, json.dumps(self.config.to_json(), indent=2, sort_keys=True) + "\n")
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "FASTTokenizer":
        """Read a saved processor folder (ours or the hub's ``physical-intelligence/fast``)."""
        folder = Path(folder)
        for name in (PROCESSOR_CONFIG, TOKENIZER_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder / name} not found; a FAST processor folder holds "
                                        f"{PROCESSOR_CONFIG} and {TOKENIZER_FILE}")
        try:
            obj = json.loads((folder / PROCESSOR_CONFIG).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{folder / PROCESSOR_CONFIG} is not valid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{folder / PROCESSOR_CONFIG} must hold a JSON object, got {type(obj).__name__}")
        return cls(Tokenizer.from_file(str(folder / TOKENIZER_FILE)), FASTConfig.from_json(obj))


def _as_chunks(x: Any, name: str, *, allow_2d: bool) -> np.ndarray:
    """[B, T, A] (or [T, A] when allowed) finite floats -> float64 ndarray [B, T, A]."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be a real numeric array, got dtype {x.dtype}")
    if allow_2d and x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or 0 in x.shape:
        want = "[B, T, A] or [T, A]" if allow_2d else "[N, T, A]"
        raise ValueError(f"{name} must be {want} with every size >= 1, got shape {tuple(x.shape)}")
    x = x.astype(np.float64, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contain NaN or inf; FAST encodes finite, normalised actions")
    return x


def _stream_ids(stream: Any, V: int) -> list[int]:
    """One token stream (list, 1-d array or tensor of ints) -> list of ids, each in [0, V)."""
    if isinstance(stream, (torch.Tensor, np.ndarray)):
        floating = stream.is_floating_point() if isinstance(stream, torch.Tensor) else stream.dtype.kind not in "iu"
        if stream.ndim != 1 or (floating and len(stream)):
            raise TypeError(f"a stream must be a 1-d list of integers, got dtype {stream.dtype}, "
                            f"shape {tuple(stream.shape)}")
        stream = stream.tolist()
    else:
        stream = list(stream)
    if stream:
        lo, hi = min(stream), max(stream)
        if lo < 0 or hi >= V:
            raise ValueError(f"ids outside [0, {V}): {lo}..{hi}")
    return stream


def _strings(sym: np.ndarray) -> list[str]:
    """sym: [B, S] non-negative symbols <= MAX_SYMBOL -> B strings of chr(symbol), via one buffer."""
    B, S = sym.shape
    text = sym.astype("<u4").tobytes().decode("utf-32-le")
    return [text[b * S:(b + 1) * S] for b in range(B)]


# ---------------------------------------------------------------------------------------------
# openpi's placement of FAST ids in the PaliGemma vocabulary


def fast_to_paligemma(ids: Any, *, paligemma_vocab_size: int = PALIGEMMA_VOCAB_SIZE,
                      skip_tokens: int = FAST_SKIP_TOKENS) -> Any:
    """FAST ids -> PaliGemma ids ``paligemma_vocab_size - 1 - skip_tokens - k`` (openpi's
    ``_act_tokens_to_paligemma_tokens``). A tensor stays a tensor; anything else gives int64 numpy."""
    top = paligemma_vocab_size - 1 - skip_tokens
    arr = ids if isinstance(ids, torch.Tensor) else np.asarray(ids, dtype=np.int64)
    if (arr.numel() if isinstance(arr, torch.Tensor) else arr.size) > 0:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > top:
            raise ValueError(f"FAST ids must be in [0, {top}] (PaliGemma vocab {paligemma_vocab_size} less "
                             f"1 and {skip_tokens} skipped), got {lo}..{hi}")
    return top - arr


def paligemma_to_fast(ids: Any, *, paligemma_vocab_size: int = PALIGEMMA_VOCAB_SIZE,
                      skip_tokens: int = FAST_SKIP_TOKENS) -> Any:
    """PaliGemma ids -> FAST ids (the same map; it is its own inverse). Ids that did not come
    from ``fast_to_paligemma`` (text, special tokens) come out negative or >= the FAST vocab,
    and ``FASTTokenizer.decode`` counts such a stream as a failure rather than raising."""
    top = paligemma_vocab_size - 1 - skip_tokens
    arr = ids if isinstance(ids, torch.Tensor) else np.asarray(ids, dtype=np.int64)
    return top - arr


# ---------------------------------------------------------------------------------------------
# the reference: FAST's processor transcribed (test oracle, benchmark baseline)


def dct_fft(x: np.ndarray, axis: int) -> np.ndarray:
    """Orthonormal DCT-II along ``axis`` through one FFT (Makhoul's reordering), in NumPy."""
    x = np.moveaxis(np.asarray(x, dtype=np.float64), axis, -1)
    n = x.shape[-1]
    v = np.concatenate([x[..., ::2], x[..., 1::2][..., ::-1]], axis=-1)
    k = np.arange(n)
    y = 2.0 * np.real(np.fft.fft(v, axis=-1) * np.exp(-1j * np.pi * k / (2 * n)))
    y = y * np.sqrt(1.0 / (2 * n))
    y[..., 0] /= np.sqrt(2.0)
    return np.moveaxis(y, -1, axis)


def idct_fft(c: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of ``dct_fft`` (orthonormal DCT-III) along ``axis`` through one inverse FFT."""
    c = np.moveaxis(np.asarray(c, dtype=np.float64), axis, -1)
    n = c.shape[-1]
    y = c * np.sqrt(2.0 * n)
    y[..., 0] *= np.sqrt(2.0)
    y_rev = np.concatenate([np.zeros_like(y[..., :1]), y[..., :0:-1]], axis=-1)  # y[n - k], y[n] = 0
    k = np.arange(n)
    v = np.real(np.fft.ifft(0.5 * np.exp(1j * np.pi * k / (2 * n)) * (y - 1j * y_rev), axis=-1))
    x = np.empty_like(v)
    x[..., ::2] = v[..., : (n + 1) // 2]
    x[..., 1::2] = v[..., (n + 1) // 2:][..., ::-1]
    return np.moveaxis(x, -1, axis)


def reference_dct() -> str:
    """Which DCT the reference uses here: 'scipy.fft' when SciPy is installed, else 'numpy.fft'."""
    try:
        import scipy.fft  # noqa: F401
    except ImportError:
        return "numpy.fft"
    return "scipy.fft"


def _ref_dct(x: np.ndarray, axis: int, inverse: bool = False) -> np.ndarray:
    if reference_dct() == "scipy.fft":
        import scipy.fft

        return (scipy.fft.idct if inverse else scipy.fft.dct)(x, axis=axis, norm="ortho")
    return (idct_fft if inverse else dct_fft)(x, axis)


def encode_ref(tokenizer: Tokenizer, config: FASTConfig, action_chunk: np.ndarray) -> list[list[int]]:
    """FAST's ``UniversalActionProcessor.__call__``: action_chunk [B, T, A] -> token lists."""
    dct_coeff = _ref_dct(action_chunk, axis=1)
    dct_coeff = np.around(dct_coeff * config.scale)
    tokens = []
    for elem in dct_coeff:
        token_str = "".join(map(chr, np.maximum(elem.flatten() - config.min_token, 0).astype(int)))
        tokens.append(tokenizer.encode(token_str).ids)
    return tokens


def decode_ref(tokenizer: Tokenizer, config: FASTConfig, tokens: list[list[int]], time_horizon: int,
               action_dim: int) -> np.ndarray:
    """FAST's ``UniversalActionProcessor.decode``: token lists -> actions [B, T, A] (zeros for a
    stream that fails)."""
    decoded_actions = []
    for token in tokens:
        try:
            decoded_tokens = tokenizer.decode(token, skip_special_tokens=False)
            decoded_dct_coeff = np.array(list(map(ord, decoded_tokens))) + config.min_token
            decoded_dct_coeff = decoded_dct_coeff.reshape(-1, action_dim)
            if decoded_dct_coeff.shape != (time_horizon, action_dim):
                raise ValueError(f"decoded DCT coefficients have shape {decoded_dct_coeff.shape}")
        except Exception:  # as FAST: any failure gives zeros for this chunk
            decoded_dct_coeff = np.zeros((time_horizon, action_dim))
        decoded_actions.append(_ref_dct(decoded_dct_coeff / config.scale, axis=0, inverse=True))
    return np.stack(decoded_actions)
