"""The CLI's train / eval jobs and the demo, at smoke-test budgets."""

import json

import pytest

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
def test_demo_quick_writes_report(tmp_path, capsys):
    pytest.importorskip("mujoco", reason="the built-in UR5e task simulates in MuJoCo")
    assert main(["demo", "--quick", "--no-progress", "--seconds", "0.2", "--out", str(tmp_path)]) == 0
    (run,) = tmp_path.iterdir()
    report = (run / "report.md").read_text()
    for section in ("Real-time core", "pi_RL on the built-in UR5e reach task", "Steering", "Recipe"):
        assert section in report
    for png in ("training.png", "speed.png"):
        assert (run / png).stat().st_size > 5000
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["sft"]["success_rate"] <= 1.0 and len(summary["history"]) == 2
    assert "success SFT + GRPO over states (ODE / SDE)" in capsys.readouterr().out
    assert 0.0 <= summary["rl_sde"]["success_rate"] <= 1.0


@pytest.mark.slow
def test_rollout_bench_rows(tmp_path):
    pytest.importorskip("mujoco", reason="the built-in UR5e task simulates in MuJoCo")
    out = tmp_path / "r.csv"
    assert main(["bench", "rollout", "--out", str(out)]) == 0
    from vlafast.bench.core import read_rows

    rows = read_rows(out)
    assert len(rows) == 2 and all(float(r["achieved"]) > 0 for r in rows)
    assert {r["unit"] for r in rows} == {"chunks/s", "env steps/s"}
