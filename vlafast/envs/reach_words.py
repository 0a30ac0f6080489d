"""The built-in reaching task's language: ball colours, speed words and verbs.

Kept apart from ``reach.py`` (which needs MuJoCo) so that tokenizers, recipes and the CLI can be
built on machines without a simulator, e.g. the GPU image.
"""

COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.15, 0.75, 0.2), "blue": (0.15, 0.3, 0.9)}
SPEEDS = {"slowly": 0.35, "": 0.65, "quickly": 1.0}  # fraction of the maximum step displacement
VERBS = ("touch", "reach", "go to", "move to")
