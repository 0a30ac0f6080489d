"""Neuron dictionary: each MLP neuron's value vector projected onto the output vocabulary.

Neuron i of layer l writes ``h_i * down_proj.weight[:, i]`` into the residual stream; that
column (its *value vector*, width D) projected onto the vocabulary matrix E [V, D] gives
logits whose top-k tokens say what the neuron promotes (docs/architecture.md §2, arXiv 2509.00328). The
projection runs through the fused ``vocab_topk_chunked`` op, so the [N, V] logits are never
materialised (pi0: 152 GB of them).

Which matrices:

* **OpenVLA**: E = ``lm_head.weight`` [32064, 4096]; every Llama layer (``"vlm.{l}"``).
* **pi0 / pi0.5**: E = the tied input embedding ``embed_tokens.weight`` [257152, 2048]; the
  PaliGemma (Gemma-2B) layers ``"vlm.{l}"``. The action expert's MLPs (``"expert.{l}"``) write
  into a 1024-wide stream that never meets a vocabulary, so they have no dictionary; asking
  for one raises. ``layers=None`` means every VLM layer.

Tokens come from the user's tokenizer (a HF ``tokenizers`` JSON file or object, a
sentencepiece ``.model`` file, or a plain list of strings). E must have exactly as many rows
as the tokenizer has tokens, or that number padded up to a multiple of 64 (OpenVLA pads 32001
tokens to 32064); then only the tokenizer's rows are projected. Any other size is an error.

**Final norm** (off by default, as in the paper). With ``final_norm=True`` the model's final
RMSNorm gain g [D] (Gemma: ``1 + w``; Llama: ``w``) is folded into the value vectors:
logits = E (g * v). The norm's other factor, 1/rms(x), is a positive scalar per position, so
it does not change any ranking; scores are then relative to rms = 1.

Saved as ONE safetensors file (written atomically): tensors ``top_ids`` / ``top_scores``
[L, N, k] (and ``bottom_*`` when built with ``bottom_k=True``), the token strings as UTF-8
bytes (``token_bytes`` + ``token_offsets``), and a JSON metadata entry (format version, model
id, weight fingerprint, k, layers, options).

Axes: L layers, N neurons per layer (d_ff), V vocabulary, D width, k tokens per neuron.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, nn

from vlafast._io import atomic_path

FORMAT = "vlafast.neuron_dictionary/1"
_PAD_ROWS = 64  # an embedding may be the tokenizer's size padded to a multiple of this (OpenVLA)
_SPACE_MARKS = ("\u2581", "\u0120", "##")  # sentencepiece "▁", byte-level BPE "Ġ", WordPiece "##"


# ---------------------------------------------------------------------------------------------
# model surface: which MLPs, which vocabulary matrix, which final norm


def model_mlps(model: nn.Module) -> dict[str, nn.Module]:
    """{name: mlp} of a ``Pi0Policy`` / ``OpenVLAPolicy`` (or a wrapper holding one as ``.model``,
    such as ``vlafast.policies.FlowPolicy``), in layer order."""
    inner = model if hasattr(model, "mlps") else getattr(model, "model", None)
    if inner is None or not hasattr(inner, "mlps"):
        raise TypeError(f"expected a Pi0Policy, OpenVLAPolicy or a wrapper with .model, got {type(model).__name__}")
    return dict(inner.mlps())


def _unwrap(model: nn.Module) -> nn.Module:
    """The model itself: a policy wrapper's ``.model`` when it has one."""
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "mlps") else model


def vocab_surface(model: nn.Module) -> tuple[Tensor, Tensor]:
    """(E: [V, D] the output vocabulary matrix, g: [D] the final norm's gain) of pi0 or OpenVLA."""
    m = _unwrap(model)
    if hasattr(m, "output_embedding"):  # OpenVLA: lm_head, Llama RMSNorm scales by w
        return m.output_embedding, m.language_model.model.norm.weight
    lm = m.language_model  # pi0: tied embedding, Gemma RMSNorm scales by (1 + w)
    return lm.embed_tokens.weight, 1.0 + lm.norm.weight


def resolve_layers(model: nn.Module, layers: Iterable[int | str] | None) -> list[str]:
    """Layer names ("vlm.{l}") whose MLPs write into the vocabulary's width; None -> all of them."""
    mlps = model_mlps(model)
    E, _ = vocab_surface(model)
    D = E.shape[1]
    # VLM layers only: pi0's expert writes its own stream (1024 wide in pi0; the same width as
    # the VLM in some tiny configs, but still never read out through the vocabulary)
    projectable = [n for n, mlp in mlps.items() if n.startswith("vlm.") and mlp.down_proj.weight.shape[0] == D]
    if layers is None:
        return projectable
    out = []
    for layer in layers:
        name = f"vlm.{layer}" if isinstance(layer, int) and not isinstance(layer, bool) else layer
        if name not in mlps:
            raise ValueError(f"unknown layer {name!r}; this model has {_names(list(mlps))}")
        if name not in projectable:
            width = mlps[name].down_proj.weight.shape[0]
            raise ValueError(
                f"layer {name!r} is in the action expert: it writes the expert's own {width}-wide stream, which is "
                f"never projected onto the vocabulary, so it has no dictionary; pick from {_names(projectable)}"
            )
        if name in out:
            raise ValueError(f"layer {name!r} listed twice")
        out.append(name)
    if not out:
        raise ValueError(f"layers must name at least one VLM layer; pick from {_names(projectable)}")
    return out


def _names(names: Sequence[str]) -> str:
    return f"[{names[0]} .. {names[-1]}] ({len(names)} MLPs)" if len(names) > 4 else str(list(names))


# ---------------------------------------------------------------------------------------------
# tokens


def load_tokens(tokenizer: Any) -> list[str]:
    """Token strings by id from a HF ``tokenizers.Tokenizer`` (object or JSON file), a
    sentencepiece ``.model`` file, or a sequence of strings."""
    if isinstance(tokenizer, (str, os.PathLike)):
        path = Path(tokenizer)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist (a tokenizer.json or a sentencepiece .model)")
        if path.suffix == ".model":
            try:
                import sentencepiece
            except ImportError as e:
                raise ImportError("reading a sentencepiece .model needs `pip install sentencepiece`; "
                                  "or pass the tokenizer.json of a HF tokenizer") from e
            sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
    if hasattr(tokenizer, "id_to_token") and hasattr(tokenizer, "get_vocab_size"):
        n = tokenizer.get_vocab_size(with_added_tokens=True)
        return [tokenizer.id_to_token(i) or f"<unused{i}>" for i in range(n)]
    if isinstance(tokenizer, Sequence) and all(isinstance(t, str) for t in tokenizer):
        return list(tokenizer)
    raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, a file path or a list of strings, got {type(tokenizer).__name__}")


def normalize_token(token: str) -> str:
    """What keyword search compares: lower case, word-start marks and surrounding punctuation removed
    ("▁Quickly" -> "quickly", "Ġup" -> "up")."""
    for mark in _SPACE_MARKS:
        token = token.replace(mark, "")
    return re.sub(r"^\W+|\W+$", "", token.lower())


def _fingerprint(tensors: Sequence[Tensor]) -> str:
    """sha256 over shapes, dtypes and up to 2**16 evenly strided elements of each tensor: cheap
    (a whole pi0's down_proj + embedding: 1.2 M values, milliseconds) and tells checkpoints apart."""
    h = hashlib.sha256()
    for t in tensors:
        flat = t.detach().reshape(-1)
        step = max(1, flat.numel() >> 16)
        h.update(f"{list(t.shape)}{t.dtype}".encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:32]


def weights_fingerprint(model: nn.Module, layers: Sequence[str] | None = None) -> str:
    """The fingerprint a dictionary stores of the weights it was built from."""
    mlps = model_mlps(model)
    names = resolve_layers(model, layers)
    return _fingerprint([vocab_surface(model)[0]] + [mlps[n].down_proj.weight for n in names])


# ---------------------------------------------------------------------------------------------
# the dictionary


@dataclasses.dataclass(frozen=True)
class Explanation:
    """One neuron's entry: (token, score) best first, and the most negative ones if built."""

    layer: str
    neuron: int
    top: list[tuple[str, float]]
    bottom: list[tuple[str, float]] | None

    def __str__(self) -> str:
        line = f"{self.layer}/{self.neuron}: " + " ".join(f"{t!r}({s:+.2f})" for t, s in self.top)
        if self.bottom is not None:
            line += " | bottom: " + " ".join(f"{t!r}({s:+.2f})" for t, s in self.bottom)
        return line


@dataclasses.dataclass(frozen=True)
class SearchHit:
    """A neuron matched by ``search``: how many of its top-k tokens are keywords (``hits``) and
    how high (``score`` = sum over matched ranks r of (k - r) / k)."""

    layer: str
    neuron: int
    hits: int
    score: float
    tokens: tuple[str, ...]


@dataclasses.dataclass(frozen=True, eq=False)
class NeuronDictionary:
    """top_ids / top_scores: [L, N, k]; bottom_ids / bottom_scores: [L, N, k] or None (the k most
    negative logits, most negative first); tokens: V strings; layers: L names ("vlm.{l}");
    meta: model_id, fingerprint, final_norm, ... (JSON-serialisable)."""

    layers: tuple[str, ...]
    tokens: tuple[str, ...]
    top_ids: Tensor
    top_scores: Tensor
    bottom_ids: Tensor | None = None
    bottom_scores: Tensor | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def k(self) -> int:
        return self.top_ids.shape[2]

    @property
    def neurons_per_layer(self) -> int:
        return self.top_ids.shape[1]

    # -- building ------------------------------------------------------------------------------

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: nn.Module,
        tokenizer: Any,
        k: int = 10,
        layers: Iterable[int | str] | None = None,
        bottom_k: bool = False,
        *,
        final_norm: bool = False,
        model_id: str = "",
        progress: bool | None = None,
        chunk_size: int | None = None,
    ) -> "NeuronDictionary":
        """Project every neuron of ``layers`` (None: all VLM layers) onto the vocabulary; keep the
        top ``k`` tokens (and the bottom ``k`` with ``bottom_k``). Runs where the model's weights
        are (the fused kernel on CUDA). ``progress``: tqdm over neurons (None: only if > 2 s);
        ``chunk_size``: rows per kernel call (None: from the op's memory budget)."""
        from vlafast.ops.vocab_topk import vocab_topk_chunked

        names = resolve_layers(model, layers)
        mlps = model_mlps(model)
        tokens = load_tokens(tokenizer)
        E, gain = vocab_surface(model)
        V = E.shape[0]
        n_tok = len(tokens)
        if V not in (n_tok, -(-n_tok // _PAD_ROWS) * _PAD_ROWS):
            raise ValueError(
                f"tokenizer has {len(tokens)} tokens but the model's vocabulary matrix has {V} rows; "
                "pass the tokenizer this checkpoint was trained with"
            )
        E = E[: len(tokens)]  # [V', D]: padding rows past the tokenizer are never a token
        gain = gain.detach().to(E.dtype) if final_norm else None
        N = mlps[names[0]].down_proj.weight.shape[1]
        # results stay on the device until the end: no host sync between layers
        top_ids = torch.empty(len(names), N, k, dtype=torch.int64, device=E.device)
        top_scores = torch.empty(len(names), N, k, dtype=torch.float32, device=E.device)
        bottom = (torch.empty_like(top_ids), torch.empty_like(top_scores)) if bottom_k else None
        passes = [(True, top_ids, top_scores)] + ([(False, *bottom)] if bottom else [])
        bar = _bar(progress, len(names) * N * len(passes))
        try:
            for i, name in enumerate(names):
                W = mlps[name].down_proj.weight  # [D, N]
                if W.shape[1] != N:
                    raise ValueError(f"layers must share one MLP width to share a dictionary: {names[0]} has {N} "
                                     f"neurons, {name} has {W.shape[1]}")
                values = (W if gain is None else W * gain[:, None]).T.contiguous()  # [N, D] value vectors
                for largest, ids_out, scores_out in passes:
                    scores, ids = vocab_topk_chunked(values, E, k, largest=largest, chunk_size=chunk_size,
                                                     progress=False)
                    ids_out[i].copy_(ids)
                    scores_out[i].copy_(scores)
                    if bar is not None:
                        bar.update(N)
        finally:
            if bar is not None:
                bar.close()
        meta = {"format": FORMAT, "model_id": model_id, "fingerprint": weights_fingerprint(model, names),
                "k": k, "layers": names, "bottom_k": bottom_k, "final_norm": final_norm,
                "vocab_rows": V, "width": E.shape[1]}
        return cls(tuple(names), tuple(tokens), top_ids.cpu(), top_scores.cpu(),
                   bottom[0].cpu() if bottom else None, bottom[1].cpu() if bottom else None, meta)

    # -- files ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write one safetensors file atomically (a crash leaves any old file intact)."""
        from safetensors.torch import save_file

        encoded = [t.encode("utf-8") for t in self.tokens]
        offsets = torch.zeros(len(encoded) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor([len(b) for b in encoded], dtype=torch.int64).cumsum(0)
        blob = b"".join(encoded)
        tensors = {
            "top_ids": self.top_ids.to(torch.int32).contiguous(),
            "top_scores": self.top_scores.contiguous(),
            "token_offsets": offsets,
            "token_bytes": torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.zeros(0, dtype=torch.uint8),
        }
        if self.bottom_ids is not None:
            tensors["bottom_ids"] = self.bottom_ids.to(torch.int32).contiguous()
            tensors["bottom_scores"] = self.bottom_scores.contiguous()
        meta = {**self.meta, "format": FORMAT, "layers": list(self.layers), "k": self.k}
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"vlafast": json.dumps(meta)})
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "NeuronDictionary":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no neuron dictionary at {path}; build one with `vlafast dictionary build`")
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get("vlafast")
                t = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as exc:  # SafetensorError: truncated or not safetensors at all
            raise ValueError(f"{path} is not a readable safetensors file ({exc}): rebuild it with "
                             "`vlafast dictionary build`") from None
        try:
            meta = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            meta = {}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a vlafast neuron dictionary ({FORMAT}); got format {meta.get('format')!r}")
        blob = t["token_bytes"].numpy().tobytes()
        off = t["token_offsets"].tolist()
        tokens = tuple(blob[a:b].decode("utf-8") for a, b in zip(off[:-1], off[1:]))
        bottom = "bottom_ids" in t
        return cls(tuple(meta["layers"]), tokens, t["top_ids"].long(), t["top_scores"],
                   t["bottom_ids"].long() if bottom else None, t["bottom_scores"] if bottom else None, meta)

    # -- queries -------------------------------------------------------------------------------

    def layer_index(self, layer: int | str) -> int:
        name = f"vlm.{layer}" if isinstance(layer, int) and not isinstance(layer, bool) else layer
        if name not in self.layers:
            raise ValueError(f"layer {layer!r} is not in this dictionary; it has {_names(list(self.layers))}")
        return self.layers.index(name)

    def explain(self, layer: int | str, neuron: int) -> Explanation:
        """The top (and bottom) tokens of one neuron with their scores."""
        li = self.layer_index(layer)
        N = self.neurons_per_layer
        if isinstance(neuron, bool) or not isinstance(neuron, int) or not 0 <= neuron < N:
            raise ValueError(f"neuron must be an int in [0, {N}), got {neuron!r}")

        def entries(ids: Tensor, scores: Tensor) -> list[tuple[str, float]]:
            return [(self.tokens[i], float(s)) for i, s in zip(ids[li, neuron].tolist(), scores[li, neuron].tolist())]

        bottom = None if self.bottom_ids is None else entries(self.bottom_ids, self.bottom_scores)
        return Explanation(self.layers[li], neuron, entries(self.top_ids, self.top_scores), bottom)

    def keyword_mask(self, words: Iterable[str]) -> Tensor:
        """[V] bool: tokens whose normalised form (``normalize_token``) is one of ``words``."""
        wanted = {normalize_token(w) for w in words} - {""}
        if not wanted:
            raise ValueError("give at least one non-empty keyword")
        return torch.tensor([normalize_token(t) in wanted for t in self.tokens], dtype=torch.bool)

    def match(self, words: Iterable[str], layers: Iterable[int | str] | None = None) -> tuple[Tensor, Tensor, list[int]]:
        """(hits [L', N] int, score [L', N] fp32, layer indices) over the chosen layers' top-k lists."""
        idx = list(range(len(self.layers))) if layers is None else [self.layer_index(l) for l in layers]
        mask = self.keyword_mask(words)
        matched = mask[self.top_ids[idx]]  # [L', N, k]
        k = self.k
        weight = (k - torch.arange(k, dtype=torch.float32)) / k  # rank 0 -> 1, rank k-1 -> 1/k
        return matched.sum(-1), (matched.float() * weight).sum(-1), idx

    def search(self, words: Iterable[str], *, limit: int | None = 20, min_hits: int = 1,
               layers: Iterable[int | str] | None = None) -> list[SearchHit]:
        """Neurons whose top-k tokens contain the words, ranked by (hits, score) descending, then
        layer and neuron ascending (deterministic). ``limit=None`` returns all."""
        words = list(words)
        hits, score, idx = self.match(words, layers)
        sel = (hits >= max(1, min_hits)).nonzero().tolist()
        sel.sort(key=lambda p: (-int(hits[p[0], p[1]]), -float(score[p[0], p[1]]), p[0], p[1]))
        mask = self.keyword_mask(words)
        out = []
        for li, n in sel[: limit if limit is not None else len(sel)]:
            ids = self.top_ids[idx[li], n].tolist()
            out.append(SearchHit(self.layers[idx[li]], n, int(hits[li, n]), float(score[li, n]),
                                 tuple(self.tokens[i] for i in ids if mask[i])))
        return out

    def matches(self, model: nn.Module) -> bool:
        """Whether ``model``'s weights are the ones this dictionary was built from (fingerprint)."""
        return self.meta.get("fingerprint") == weights_fingerprint(model, list(self.layers))


def _bar(progress: bool | None, total: int):
    if progress is False:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="neuron", desc="neuron dictionary", delay=0.0 if progress else 2.0)
