"""The built-in reaching task's language: ball colours, speed words and verbs.

Kept apart from ``reach.py`` (which needs MuJoCo) so that tokenizers, recipes and the CLI can be
built on machines without a simulator, e.g. the GPU image.
"""

COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.15, 0.75, 0.2), "blue": (0.15, 0.3, 0.9)}
SPEEDS = {"slowly": 0.35, "": 0.65, "quickly": 1.0}  # fraction of the maximum step displacement
VERBS = ("touch", "reach", "go to", "move to")
# Other words for each speed (``ReachConfig(speed_synonyms=True)``), all in the steering
# paper's "fast" / "slow" keyword sets and in the tiny tokenizer's vocabulary: a model that
# hears each speed in several words learns what they share, so the keywords its neuron
# dictionary searches for mean something to it (with one word per speed the other keywords'
# embeddings are never trained).
SPEED_SYNONYMS = {"slowly": ("slowly", "slow", "steady"), "quickly": ("quickly", "fast", "quick", "rapid")}


def speed_of(word: str) -> str:
    """The speed ("slowly", "quickly" or "") a speed word or any of its synonyms names; "" for
    any other word."""
    return next((speed for speed, words in SPEED_SYNONYMS.items() if word in words), "")
