"""Run folders survive: SIGKILL at any moment then --resume, no run silently overwritten, nothing
written before the inputs are validated, no temporary files left behind, renames fsynced."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vlafast._io import atomic_path, remove_stale_temps
from vlafast.cli import main

SMALL = {"num_envs": 4, "demos": 6, "sft_steps": 10, "eval_episodes": 4, "image_size": 16, "width": 32,
         "rl": {"iterations": 1, "chunks_per_rollout": 2, "ppo": {"minibatch": 8}}}


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    pytest.importorskip("mujoco", reason="the built-in UR5e task simulates in MuJoCo")
    root = tmp_path_factory.mktemp("runs")
    cfg = root / "recipe.json"
    cfg.write_text(json.dumps(SMALL))
    assert main(["train", "sft", "--config", str(cfg), "--out", str(root / "sft"), "--no-progress"]) == 0
    return root / "sft", cfg


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_atomic_path_leaves_nothing_on_failure_and_stale_temps_are_cleaned(tmp_path):
    target = tmp_path / "x.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.json"]
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"")  # what a SIGKILL mid-write leaves
    assert [p.name for p in remove_stale_temps(tmp_path)] == [".checkpoint.pt.abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_existing_run_folder_is_never_overwritten_silently(sft_run, tmp_path, capsys):
    sft, cfg = sft_run
    before = _listing(sft)
    assert main(["train", "sft", "--config", str(cfg), "--out", str(sft), "--no-progress"]) == 2
    assert "already holds a run: add --resume to continue it or --overwrite to replace it" in capsys.readouterr().err
    ppo = tmp_path / "ppo"
    assert main(["train", "ppo", "--init", str(sft), "--out", str(ppo), "--config", str(cfg), "--no-progress"]) == 0
    ppo_before = _listing(ppo)
    for argv in (["train", "ppo", "--init", str(sft), "--out", str(ppo), "--no-progress"],
                 ["train", "ppo", "--out", str(ppo), "--resume", "--method", "flow_noise", "--no-progress"],
                 ["train", "grpo", "--out", str(ppo), "--resume", "--no-progress"],
                 ["train", "ppo", "--out", str(tmp_path / "none"), "--resume", "--no-progress"],
                 ["train", "ppo", "--out", str(ppo), "--resume", "--overwrite", "--no-progress"]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
    assert _listing(sft) == before and _listing(ppo) == ppo_before  # refused before anything was written
    assert not (tmp_path / "none").exists()
    assert main(["train", "ppo", "--init", str(sft), "--out", str(ppo), "--config", str(cfg), "--overwrite",
                 "--no-progress"]) == 0


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume(sft_run, tmp_path):
    """20 times: start (or resume) a PPO run, SIGKILL it at a random moment (start-up, an update,
    a checkpoint write, the final evaluation or save), then resume. The run ends with every
    update exactly once, no temporary file, and a policy equal to its last checkpoint."""
    sft, cfg = sft_run
    out, iterations = tmp_path / "ppo", 12
    rng = np.random.default_rng(0)
    base = [sys.executable, "-m", "vlafast.cli", "train", "ppo", "--out", str(out), "--iterations", str(iterations),
            "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kills = 0
    while kills < 20:
        started = (out / "checkpoint.pt").is_file()
        argv = base + (["--resume"] if started else ["--init", str(sft), "--config", str(cfg), "--overwrite"])
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        try:
            proc.wait(timeout=float(rng.uniform(0.5, 8.0)))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        finally:
            text = proc.stdout.read().decode(errors="replace")
            proc.stdout.close()
        assert proc.returncode == 0, text  # a resumed run never fails; a finished one is simply done again
        if (out / "summary.json").is_file():
            os.remove(out / "summary.json")  # finished before the kill: resume it once more
    assert subprocess.run(base + ["--resume"], env=env, capture_output=True).returncode == 0
    history = json.loads((out / "metrics.json").read_text())
    assert [h["iteration"] for h in history] == list(range(1, iterations + 1))
    assert not [p for p in out.rglob(".*.tmp")]
    from vlafast import policies

    last = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["policy"]
    saved = policies.load(out, device="cpu").state_dict()
    assert set(saved) == set(last) and all(torch.equal(saved[k], v) for k, v in last.items())


def test_a_new_run_over_an_old_one_leaves_nothing_of_it_to_resume(tmp_path, capsys):
    from vlafast.rl.jobs import start_run_dir
    from vlafast.rl.recipe import Recipe

    out = tmp_path / "run"
    (out / "policy").mkdir(parents=True)
    for name in ("checkpoint.pt", "metrics.json", "summary.json", "run.json", "policy/policy.json"):
        (out / name).write_text("old run")
    (out / "notes.txt").write_text("the user's")
    start_run_dir(out, Recipe(), init=None, phase="sft")  # what --overwrite does once the inputs are valid
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "recipe.json", "run.json"]
    assert main(["train", "ppo", "--out", str(out), "--resume"]) == 2  # an sft run's folder: nothing to resume
    assert "has no checkpoint.pt" in capsys.readouterr().err
