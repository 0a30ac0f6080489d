"""Keyword clusters: the neurons whose top-k vocabulary tokens contain a category's words.

Ready sets follow the paper's categories (arXiv 2509.00328: direction up / down, speed fast /
slow, care); a cluster is a plain, sorted list of (layer, neuron) pairs to hand to a
``SteeringPlan``. Deterministic: the same dictionary and keywords give the same neurons in the
same order (ranked by hits, then score, then layer, then neuron).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from vlafast.interp.dictionary import NeuronDictionary

KEYWORDS: dict[str, tuple[str, ...]] = {
    "up": ("up", "upward", "upwards", "raise", "raised", "raising", "lift", "lifted", "lifting", "high", "higher",
           "above", "top", "rise", "ascend", "over"),
    "down": ("down", "downward", "downwards", "lower", "lowered", "lowering", "drop", "dropped", "low", "below",
             "bottom", "descend", "fall", "beneath", "under"),
    "fast": ("fast", "faster", "fastest", "quick", "quickly", "quicker", "rapid", "rapidly", "speed", "speedy",
             "swift", "swiftly", "hurry", "hasty", "brisk", "immediately"),
    "slow": ("slow", "slowly", "slower", "slowest", "gradual", "gradually", "steady", "steadily", "sluggish",
             "leisurely", "unhurried"),
    "care": ("careful", "carefully", "care", "gentle", "gently", "cautious", "cautiously", "caution", "delicate",
             "delicately", "soft", "softly", "safe", "safely", "precise", "precisely"),
}


@dataclasses.dataclass(frozen=True)
class Cluster:
    """neurons: ((layer, neuron), ...) best match first; hits: how many keyword tokens each has."""

    name: str
    keywords: tuple[str, ...]
    neurons: tuple[tuple[str, int], ...]
    hits: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.neurons)

    def layers(self) -> list[str]:
        """Distinct layers of the cluster, in dictionary order of first appearance."""
        return list(dict.fromkeys(layer for layer, _ in self.neurons))


def keywords_for(name_or_words: str | Iterable[str]) -> tuple[str, tuple[str, ...]]:
    """A ready set's name ("fast") -> (name, its words); a list of words -> ("custom", words)."""
    if isinstance(name_or_words, str):
        if name_or_words not in KEYWORDS:
            raise ValueError(f"unknown keyword set {name_or_words!r}; ready sets: {sorted(KEYWORDS)} "
                             "(or pass a list of words)")
        return name_or_words, KEYWORDS[name_or_words]
    words = tuple(name_or_words)
    if not words:
        raise ValueError("keywords must name a ready set or list at least one word")
    return "custom", words


def cluster(
    dictionary: NeuronDictionary,
    keywords: str | Iterable[str],
    min_hits: int = 1,
    layers: Iterable[int | str] | None = None,
    max_neurons: int | None = None,
) -> Cluster:
    """Neurons with at least ``min_hits`` keyword tokens among their top-k, over ``layers`` (None:
    every layer of the dictionary), strongest first, at most ``max_neurons`` (None: all)."""
    if isinstance(min_hits, bool) or not isinstance(min_hits, int) or min_hits < 1:
        raise ValueError(f"min_hits must be an int >= 1, got {min_hits!r}")
    if max_neurons is not None and (isinstance(max_neurons, bool) or not isinstance(max_neurons, int) or max_neurons < 1):
        raise ValueError(f"max_neurons must be a positive int or None, got {max_neurons!r}")
    name, words = keywords_for(keywords)
    found = dictionary.search(words, limit=max_neurons, min_hits=min_hits, layers=layers)
    return Cluster(name, words, tuple((h.layer, h.neuron) for h in found), tuple(h.hits for h in found))
