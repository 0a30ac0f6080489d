"""RL on LIBERO from the recipe's tiny pi0: its tokenizer reads LIBERO's instructions, and the
learning-curve tool's bookkeeping (tools/rl_libero.py). The LIBERO run itself is a result
(bench/results/rl_libero.csv), not a test: it takes an hour of CPU."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tools import rl_libero
from vlafast.envs.base import EnvSpec
from vlafast.eval import wilson_interval
from vlafast.policies import build_word_tokenizer
from vlafast.rl.recipe import Recipe, build_policy, task_words

# libero_object's instructions (LIBERO's task language), as the worker reports them
OBJECT_TASKS = [f"pick up the {thing} and place it in the basket" for thing in (
    "alphabet soup", "cream cheese", "salad dressing", "bbq sauce", "ketchup", "tomato sauce", "butter", "milk",
    "chocolate pudding", "orange juice")]
SPATIAL_0 = "pick up the black bowl between the plate and the ramekin and place it on the plate"


def libero_spec(num_envs: int = 2) -> EnvSpec:
    return EnvSpec(num_envs=num_envs, action_dim=7, state_dim=8, cameras=("image", "wrist_image"), image_size=(16, 16),
                   max_episode_steps=280, control_hz=20.0)


def test_libero_recipe_reads_every_instruction_word():
    recipe = Recipe(env="libero:libero_object", image_size=16, width=16, depth=1)
    policy = build_policy(recipe, libero_spec(len(OBJECT_TASKS)))
    unk = build_word_tokenizer(task_words(recipe.env)).token_to_id("[UNK]")
    tokens, masks = policy.processor.tokenize(OBJECT_TASKS + [SPATIAL_0])
    assert not (tokens == unk).any(), "a LIBERO instruction word is unknown to the recipe's tokenizer"
    assert int(masks.sum(1).max()) == len(SPATIAL_0.split())  # the longest instruction is read whole
    objects = tokens[: len(OBJECT_TASKS), 3]  # "pick up the <object>": the tasks differ from the fourth token
    assert len(set(objects.tolist())) == len(OBJECT_TASKS)
    # the built-in task's vocabulary is unchanged (policies trained before keep their ids)
    reach = task_words()
    assert task_words("libero:libero_object")[: len(reach)] == reach
    assert not set(reach) >= {"basket", "soup"}


def history(successes: list[tuple[int, int]]) -> list[dict[str, float]]:
    """A train_rl history of updates with (successes, episodes) each, 512 env steps in 20 s."""
    return [{"success_rate": k / n if n else math.nan, "episodes": n, "env_steps": 512.0, "env_steps_per_s": 25.6,
             "update_s": 1.0, "approx_kl": 1e-3 * i, "clipfrac": 0.01, "explained_variance": 0.5}
            for i, (k, n) in enumerate(successes)]


def test_curve_rows_and_windows():
    h = history([(0, 0), (1, 3), (2, 4), (3, 5), (4, 4)])
    rows = rl_libero.curve_rows(h)
    assert [r["env_steps"] for r in rows] == [512, 1024, 1536, 2048, 2560]
    assert [r["successes"] for r in rows] == [0, 1, 2, 3, 4] and rows[0]["episodes"] == 0
    np.testing.assert_allclose([r["seconds"] for r in rows], [21.0, 42.0, 63.0, 84.0, 105.0])
    w = rl_libero.windows(rows, 6)  # updates 1-3 finish 7 episodes (3 successes), then 4-5 finish 9 (7)
    assert [x[0] for x in w] == [1536, 2560]
    assert w[0][1:] == pytest.approx((3 / 7, *wilson_interval(3, 7)))
    assert w[1][1:] == pytest.approx((7 / 9, *wilson_interval(7, 9)))
    assert rl_libero.windows(rows, 100) == []  # a window never closes on too few episodes


def test_curve_csv_and_plot(tmp_path):
    rows = rl_libero.curve_rows(history([(1, 4)] * 6))
    rl_libero.write_csv(rows, tmp_path / "curve.csv")
    lines = (tmp_path / "curve.csv").read_text().splitlines()
    assert lines[0].split(",") == list(rl_libero.COLUMNS) and len(lines) == 7
    ev = rl_libero.success([{"success": s} for s in [True, False, False, True]])
    assert ev["success"] == 0.5 and (ev["ci_low"], ev["ci_high"]) == pytest.approx(wilson_interval(2, 4))
    rl_libero.plot(rows, ev, ev, ev, "test", tmp_path / "curve.png", window=8)
    assert (tmp_path / "curve.png").stat().st_size > 5000


def test_eval_rows_pair_sft_and_result(tmp_path):
    """The evaluation csv: SFT and the result on the same (env, index) episodes, then their paired gain."""
    from vlafast.eval import paired_difference

    sft = [{"env": e, "index": i, "instruction": "pick up the butter", "success": (e + i) % 3 == 0}
           for e in range(2) for i in range(4)]
    ppo = [dict(r, success=r["success"] or r["index"] == 1) for r in sft]
    gain = paired_difference(ppo, sft)
    sampled = [dict(r, success=r["success"] and r["env"] == 0) for r in sft]
    rows = rl_libero.eval_rows(6, 2048, *map(rl_libero.success, (sft, sampled, ppo)), gain)
    assert [r["policy"] for r in rows] == ["sft", "sft_sampled_flow_sde", "ppo_flow_sde", "gain_paired"]
    assert rows[1]["success"] < rows[0]["success"] and rows[1]["env_steps"] == 0
    assert rows[3]["success"] == pytest.approx(rows[2]["success"] - rows[0]["success"]) and rows[3]["success"] > 0
    assert rows[3]["ci_low"] < rows[3]["success"] < rows[3]["ci_high"]
    rl_libero.write_csv(rows, tmp_path / "eval.csv", rl_libero.EVAL_COLUMNS)
    lines = (tmp_path / "eval.csv").read_text().splitlines()
    assert lines[0].split(",") == list(rl_libero.EVAL_COLUMNS) and lines[3].startswith("6,ppo_flow_sde,2048,8,")
