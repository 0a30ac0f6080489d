"""The CLI's train / eval jobs and the demo, at smoke-test budgets."""

import json

import pytest

from vlafast import demo
from vlafast.cli import main

SMALL = {"num_envs": 4, "demos": 6, "sft_steps": 10, "eval_episodes": 4, "image_size": 16, "width": 32,
         "rl": {"iterations": 1, "chunks_per_rollout": 2, "ppo": {"minibatch": 8}}}


def test_train_sft_ppo_resume_eval(tmp_path, capsys):
    pytest.importorskip("mujoco", reason="the built-in UR5e task simulates in MuJoCo")
    cfg = tmp_path / "recipe.json"
    cfg.write_text(json.dumps(SMALL))
    run1, run2 = tmp_path / "sft", tmp_path / "ppo"
    assert main(["train", "sft", "--config", str(cfg), "--out", str(run1), "--no-progress"]) == 0
    assert (run1 / "policy" / "policy.json").exists() and (run1 / "policy" / "model.safetensors").exists()
    assert json.loads((run1 / "summary.json").read_text())["phase"] == "sft"
    assert main(["train", "ppo", "--init", str(run1), "--out", str(run2), "--iterations", "1",
                 "--no-progress"]) == 0
    assert main(["train", "ppo", "--out", str(run2), "--resume", "--iterations", "2", "--no-progress"]) == 0
    history = json.loads((run2 / "metrics.json").read_text())
    assert [h["iteration"] for h in history] == [1, 2]
    for run in (run1, run2):  # the final evaluation's episodes, one record each, for paired comparisons
        episodes = json.loads((run / "episodes.json").read_text())
        assert len(episodes) == SMALL["eval_episodes"] and {"env", "index", "success"} <= set(episodes[0])
    assert main(["eval", "--policy", str(run2), "--episodes", "4", "--no-progress"]) == 0
    assert "success" in capsys.readouterr().out
    run3 = tmp_path / "grpo"
    assert main(["train", "grpo", "--init", str(run1 / "policy"), "--out", str(run3), "--groups", "state",
                 "--iterations", "1", "--no-progress"]) == 0
    recipe = json.loads((run3 / "recipe.json").read_text())
    assert recipe["rl"]["algo"] == "grpo" and recipe["rl"]["grpo_groups"] == "state"


def test_train_errors(tmp_path, capsys):
    """Usage errors: exit 2 and one sentence on stderr (no traceback); --debug raises instead."""
    def error(argv: list[str]) -> str:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        return err

    assert "needs --init" in error(["train", "ppo", "--out", str(tmp_path / "x")])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"num_envz": 3}))
    assert "unknown recipe keys ['num_envz']" in error(["train", "sft", "--config", str(bad), "--out", str(tmp_path / "y")])
    assert "no checkpoint at" in error(["eval", "--policy", str(tmp_path / "none")])
    with pytest.raises(ValueError, match="no checkpoint at"):
        main(["--debug", "eval", "--policy", str(tmp_path / "none")])


@pytest.mark.slow
def test_demo_quick_writes_report_and_prints_the_comparisons_rows(tmp_path, capsys):
    """The demo's RL phase is the comparison's computation: its SFT and RL rows equal those
    vlafast.rl.compare computes for the same run (issue 28, item 6), here at --quick's budget."""
    pytest.importorskip("mujoco", reason="the built-in UR5e task simulates in MuJoCo")
    import torch

    from vlafast.rl import compare

    assert main(["demo", "--quick", "--no-progress", "--seconds", "0.2", "--out", str(tmp_path / "demo")]) == 0
    (run,) = (tmp_path / "demo").iterdir()
    report = (run / "report.md").read_text()
    for section in ("Real-time core", "pi_RL on the built-in UR5e reach task", "Steering", "Recipe"):
        assert section in report
    for png in ("training.png", "speed.png"):
        assert (run / png).stat().st_size > 5000
    summary = json.loads((run / "summary.json").read_text())
    out = capsys.readouterr().out
    sft, rl = compare.run_rows(compare.DEMO_QUICK, tmp_path / "compare", threads=torch.get_num_threads())
    for mine, theirs in ((summary["sft"], sft), (summary["rl"], rl)):
        assert {k: v for k, v in mine.items() if k != "seconds"} == {k: v for k, v in theirs.items() if k != "seconds"}
        assert compare.format_row(theirs) in out and compare.format_row(theirs) in report
    assert rl["method"] == compare.DEMO.method and len(summary["history"]) == rl["updates"] == 2
    assert f"| SFT + {demo.METHOD_NAMES[compare.DEMO.method]} |" in out


@pytest.mark.slow
def test_rollout_bench_rows(tmp_path):
    pytest.importorskip("mujoco", reason="the built-in UR5e task simulates in MuJoCo")
    out = tmp_path / "r.csv"
    assert main(["bench", "rollout", "--out", str(out)]) == 0
    from vlafast.bench.core import read_rows

    rows = read_rows(out)
    assert len(rows) == 2 and all(float(r["achieved"]) > 0 for r in rows)
    assert {r["unit"] for r in rows} == {"chunks/s", "env steps/s"}
