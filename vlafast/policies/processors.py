"""Processors: env observation -> model inputs, one per model family (LeRobot's processor step).

``Pi0Processor`` builds the inputs of a pi0 / pi0.5 from a ``VecEnv`` observation:

* cameras in the given order (``cameras``), resized with padding to the model's image size
  (``preprocess_images``); an absent view would be masked, every given view is valid;
* the prompt, in one of two styles:
  ``"words"``: the built-in tasks' word-level tokenizer, no BOS, right-padded with id 0 to a
  fixed ``max_tokens`` (what the tiny policies trained here see);
  ``"paligemma"``: as openpi / LeRobot build it: pi0 = BOS + cleaned instruction, then "\\n"
  encoded on its own; pi0.5 = ``pi05_state_prompt(instruction, discretize_state(normalised,
  padded state))`` with BOS; padded to the longest prompt of the batch (padding is masked, so
  the length does not change the actions) and cut at ``max_tokens`` (openpi: 48 for pi0, 200
  for pi0.5);
* the state: raw (pi0 normalises and pads it inside the model; the critic reads it raw).

``OpenVLAProcessor`` builds OpenVLA's ``pixel_values`` and prompt ids.

Axes: B envs, V views, L prompt tokens, S state dim.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from vlafast.envs.base import Obs
from vlafast.models.pi0 import Pi0Observation, discretize_state, pi05_state_prompt, preprocess_images

log = logging.getLogger(__name__)

PAD, UNK = "[PAD]", "[UNK]"
PromptStyle = Literal["words", "paligemma"]
MAX_TOKENS = {"pi0": 48, "pi05": 200}  # openpi's max_token_len defaults


# -- tokenizers ---------------------------------------------------------------------------------

def build_word_tokenizer(words: Sequence[str]):
    """A word-level ``tokenizers.Tokenizer`` over ``words`` (lower-cased), id 0 = [PAD],
    1 = [UNK]; what the built-in tasks and tests use where no PaliGemma tokenizer can be had."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {PAD: 0, UNK: 1}
    for w in words:
        vocab.setdefault(w.lower(), len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def words_of(texts: Sequence[str]) -> list[str]:
    """Sorted distinct words of ``texts`` (what ``build_word_tokenizer`` splits on)."""
    return sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]", t.lower())})


class PromptTokenizer:
    """A tokenizer the user supplies or the policy carries: a HF ``tokenizers`` JSON file, a
    sentencepiece ``.model``, or an in-memory ``tokenizers.Tokenizer``."""

    def __init__(self, source: str | os.PathLike | Any):
        self._sp = self._hf = None
        if not isinstance(source, (str, os.PathLike)):
            if not hasattr(source, "encode") or not hasattr(source, "get_vocab_size"):
                raise TypeError(f"tokenizer must be a path or a tokenizers.Tokenizer, got {type(source).__name__}")
            self.path, self._hf = None, source
            self.vocab_size = int(source.get_vocab_size(with_added_tokens=True))
            return
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found: pass --tokenizer with the model's "
                                    "tokenizer.json or sentencepiece .model (PaliGemma's for pi0 / pi0.5)")
        self.path = path
        if path.suffix == ".model":
            try:
                import sentencepiece
            except ImportError:
                raise ImportError(f"{path} is a sentencepiece model: `pip install sentencepiece`, or pass the "
                                  "tokenizer.json of the same tokenizer") from None
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            self.vocab_size = int(self._sp.get_piece_size())
        else:
            from tokenizers import Tokenizer

            try:
                self._hf = Tokenizer.from_file(str(path))
            except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
                raise ValueError(f"{path} is not a HF tokenizers JSON file ({exc}); pass tokenizer.json or a "
                                 "sentencepiece .model") from None
            self.vocab_size = int(self._hf.get_vocab_size(with_added_tokens=True))

    @property
    def hf(self):
        """The ``tokenizers.Tokenizer`` (None for a sentencepiece model)."""
        return self._hf

    def encode(self, text: str, *, bos: bool) -> list[int]:
        """Token ids of ``text``; ``bos``: with the tokenizer's beginning-of-sequence handling."""
        if self._sp is not None:
            return list(self._sp.encode(text, add_bos=bos))
        return list(self._hf.encode(text, add_special_tokens=bos).ids)

    def encode_words(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text without special tokens (the "words" prompt style)."""
        if self._sp is not None:
            return [list(self._sp.encode(t)) for t in texts]
        return [list(e.ids) for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]

    def id_to_token(self, i: int) -> str | None:
        return self._sp.id_to_piece(i) if self._sp is not None else self._hf.id_to_token(i)

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.vocab_size


def as_prompt_tokenizer(tokenizer: Any) -> PromptTokenizer:
    return tokenizer if isinstance(tokenizer, PromptTokenizer) else PromptTokenizer(tokenizer)


def paligemma_prompt_ids(tok: PromptTokenizer, instruction: str, state_bins: Tensor | None) -> list[int]:
    """pi0 (``state_bins`` None): BOS + cleaned instruction, then "\\n" on its own; pi0.5: the
    ``pi05_state_prompt`` with BOS. state_bins: [S]."""
    if state_bins is not None:
        return tok.encode(pi05_state_prompt(instruction, state_bins), bos=True)
    cleaned = instruction.strip().replace("_", " ").replace("\n", " ")
    return tok.encode(cleaned, bos=True) + tok.encode("\n", bos=False)


# -- model-ready batches ------------------------------------------------------------------------

@dataclasses.dataclass
class Batch:
    """Model-ready observations: images [B, V, 3, H, W] in [-1, 1], image_masks [B, V],
    tokens / token_masks [B, L], state [B, S] raw."""

    images: Tensor
    image_masks: Tensor
    tokens: Tensor
    token_masks: Tensor
    state: Tensor

    @property
    def size(self) -> int:
        return self.images.shape[0]

    def index(self, idx: Tensor) -> "Batch":
        return Batch(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self)))

    @staticmethod
    def cat(batches: Sequence["Batch"]) -> "Batch":
        """Concatenate batches along B; prompts of different lengths are right-padded (masked)."""
        L = max(b.tokens.shape[1] for b in batches)

        def padded(b: "Batch", name: str) -> Tensor:
            t = getattr(b, name)
            return torch.nn.functional.pad(t, (0, L - t.shape[1])) if name in ("tokens", "token_masks") else t

        return Batch(*(torch.cat([padded(b, f.name) for b in batches]) for f in dataclasses.fields(Batch)))

    def as_pi0(self, with_state: bool = True) -> Pi0Observation:
        """The model's inputs; pi0.5 reads its state from the prompt (``with_state=False``)."""
        return Pi0Observation(self.images, self.image_masks, self.tokens, self.token_masks,
                              self.state if with_state else None)


def check_cameras(obs: Obs, cameras: Sequence[str]) -> None:
    missing = [c for c in cameras if c not in obs["images"]]
    if missing:
        raise ValueError(f"observation lacks cameras {missing} (has {sorted(obs['images'])})")


@dataclasses.dataclass(frozen=True)
class ProcessorConfig:
    """How observations become model inputs; saved in the ``PolicySpec``."""

    prompt: PromptStyle = "words"
    max_tokens: int = 16

    def __post_init__(self) -> None:
        if self.prompt not in ("words", "paligemma"):
            raise ValueError(f"prompt style must be 'words' or 'paligemma', got {self.prompt!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")


def model_tokenizer(tokenizer: Any, vocab_size: int, published: str) -> PromptTokenizer:
    """``tokenizer`` as a ``PromptTokenizer``, refused when it has more tokens than the model's
    embedding (``vocab_size``) holds; ``published`` names the models the hint is about."""
    tok = as_prompt_tokenizer(tokenizer)
    if tok.vocab_size > vocab_size:
        where = f" {tok.path}" if tok.path else ""
        raise ValueError(f"tokenizer{where} has {tok.vocab_size} tokens but the model's embedding only "
                         f"{vocab_size}: pass the tokenizer the checkpoint was trained with "
                         f"(PaliGemma's for the published {published})")
    return tok


class Pi0Processor:
    """Env observation -> ``Batch`` for one pi0 / pi0.5 model (module docstring)."""

    def __init__(self, model, tokenizer: Any, config: ProcessorConfig) -> None:
        self.model, self.config = model, config
        self.tokenizer = model_tokenizer(tokenizer, model.cfg.vocab_size, "pi0 / pi0.5")

    def tokenize(self, texts: Sequence[str], state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """texts (and, pi0.5 PaliGemma prompts, the raw state [B, S]) -> tokens [B, L], masks [B, L]."""
        cfg = self.model.cfg
        L = self.config.max_tokens
        if self.config.prompt == "words":
            rows = [ids[:L] for ids in self.tokenizer.encode_words(texts)]
            width = L
        else:
            bins = None
            if cfg.is_pi05:
                norm = self.model.normalizer
                s = norm.normalize_state(state) if norm is not None else state
                bins = discretize_state(torch.nn.functional.pad(s.float(), (0, cfg.state_dim - s.shape[1])))
            rows = [paligemma_prompt_ids(self.tokenizer, text, None if bins is None else bins[b])
                    for b, text in enumerate(texts)]
            too_long = [len(r) for r in rows if len(r) > L]
            if too_long:
                log.warning("prompt of %d tokens cut to max_tokens=%d", max(too_long), L)
            rows = [r[:L] for r in rows]
            width = max(1, max(len(r) for r in rows))
        tokens = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        if self.config.prompt == "words":
            return tokens, tokens != 0
        masks = torch.zeros_like(tokens, dtype=torch.bool)
        for i, r in enumerate(rows):
            masks[i, : len(r)] = True
        if int(tokens.max()) >= cfg.vocab_size:
            raise ValueError(f"token id {int(tokens.max())} >= the model's vocabulary {cfg.vocab_size}")
        return tokens, masks

    def __call__(self, obs: Obs, cameras: Sequence[str]) -> Batch:
        """Env observation -> model inputs on the model's device."""
        check_cameras(obs, cameras)
        model, dev = self.model, self.model.device
        frames = torch.from_numpy(np.stack([obs["images"][cam] for cam in cameras], axis=1))  # [B, V, H, W, 3]
        images = preprocess_images(frames, model.cfg.vision.image_size)  # [B, V, 3, H, W]
        state = torch.from_numpy(np.asarray(obs["state"], np.float32))
        tokens, token_masks = self.tokenize(obs["instruction"], state.to(dev))
        return Batch(
            images=images.to(dev, model.dtype),
            image_masks=torch.ones(images.shape[:2], dtype=torch.bool, device=dev),
            tokens=tokens.to(dev),
            token_masks=token_masks.to(dev),
            state=state.to(dev),
        )


class OpenVLAProcessor:
    """Env observation -> (pixel_values [B, 6, S, S], input_ids [B, L]) for OpenVLA: the first
    camera, OpenVLA's prompt with BOS; rows are padded to one length on the left of the prompt
    text is not possible (OpenVLA decodes without padding), so a batch is one prompt length:
    rows of other lengths are decoded in groups of equal length."""

    def __init__(self, model, tokenizer: Any) -> None:
        self.model, self.tokenizer = model, as_prompt_tokenizer(tokenizer)
        if self.tokenizer.vocab_size > model.cfg.llm.vocab_size:
            raise ValueError(f"tokenizer has {self.tokenizer.vocab_size} tokens but the model's vocabulary only "
                             f"{model.cfg.llm.vocab_size}: pass the checkpoint's Llama-2 tokenizer")

    def prompt_ids(self, instruction: str) -> list[int]:
        from vlafast.models.openvla import openvla_prompt

        return self.tokenizer.encode(openvla_prompt(instruction.strip().lower()), bos=True)

    def pixel_values(self, obs: Obs, camera: str) -> Tensor:
        from vlafast.models.openvla import openvla_pixel_values

        check_cameras(obs, [camera])
        frames = torch.from_numpy(np.ascontiguousarray(obs["images"][camera]))
        return openvla_pixel_values(frames, self.model.cfg.vision.image_size).to(self.model.device, self.model.dtype)


__all__ = ["Batch", "MAX_TOKENS", "OpenVLAProcessor", "Pi0Processor", "ProcessorConfig", "PromptTokenizer",
           "as_prompt_tokenizer", "build_word_tokenizer", "paligemma_prompt_ids", "words_of"]
