"""Scale-out on Ray (vlafast.rl.dist): a local loopback cluster started by the module fixture,
rollout workers on env slices, one learner. Same maths as the in-process run, worker deaths
survived, resume from the learner's checkpoint."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import os
import signal

import numpy as np
import pytest
import torch

pytest.importorskip("mujoco", reason="the built-in UR5e task simulates in MuJoCo")
ray = pytest.importorskip("ray", reason="the scale-out mode needs vlafast[dist]")

from vlafast.rl import train as T  # noqa: E402
from vlafast.rl.buffer import pool_slices  # noqa: E402
from vlafast.rl.dist import DistConfig, LearnerGroup, RayCollector, split_envs, trainable_names  # noqa: E402
from vlafast.rl.losses import PPOConfig  # noqa: E402
from vlafast.rl.recipe import Recipe, build_env, build_policy, env_slice, save_policy  # noqa: E402
from vlafast.rl.sampler_spec import FlowNoise, FlowSDE  # noqa: E402

RECIPE = dataclasses.replace(Recipe(), num_envs=4, image_size=16, width=32, depth=1, horizon=6, exec_horizon=3,
                             demos=2, eval_episodes=4)
GRPO_STATE = T.RLConfig(algo="grpo", grpo_groups="state", group_size=2, sampler=FlowSDE(num_steps=3), iterations=1,
                        chunks_per_rollout=2, rehearsal_bootstrap=False, critic_warmup=0,
                        ppo=PPOConfig(actor_lr=1e-3, minibatch=8, epochs=1))
PPO = T.RLConfig(algo="ppo", sampler=FlowNoise(num_steps=3), iterations=2, chunks_per_rollout=3, critic_warmup=1,
                 ppo=PPOConfig(actor_lr=1e-3, critic_lr=1e-3, minibatch=6, epochs=2))


@pytest.fixture(scope="module")
def cluster():
    """A private single-node cluster on loopback, 4 logical CPUs (2 workers + headroom)."""
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", object_store_memory=256 * 2**20,
             logging_level="WARNING")
    yield
    ray.shutdown()


def make(recipe: Recipe, rl: T.RLConfig):
    recipe = dataclasses.replace(recipe, rl=rl)
    env = build_env(recipe)
    return recipe, env, build_policy(recipe, env.spec)


def collector(policy, recipe: Recipe, workers: int, seed: int, **dist) -> RayCollector:
    return RayCollector(policy, functools.partial(env_slice, recipe), functools.partial(build_policy, recipe), recipe.rl,
                        DistConfig(workers=workers, **dist), seed=seed, num_envs=recipe.num_envs)


def test_split_envs():
    assert split_envs(16, 3) == [(0, 6), (6, 5), (11, 5)]
    assert split_envs(16, 3, multiple=4) == [(0, 8), (8, 4), (12, 4)]
    assert split_envs(5, 5) == [(i, 1) for i in range(5)]
    with pytest.raises(ValueError, match="cannot share 8 envs in groups of 4: use 1..2 workers"):
        split_envs(8, 3, multiple=4)
    with pytest.raises(ValueError, match="multiple of 4"):
        split_envs(10, 2, multiple=4)
    with pytest.raises(ValueError, match="workers and learners must be >= 1, got 0, 1"):
        DistConfig(workers=0)
    opts = DistConfig(workers=2, max_restarts=5, cpus_per_worker=2, gpus_per_worker=0.5).actor_options()
    assert opts == {"num_cpus": 2, "num_gpus": 0.5, "max_restarts": 5, "max_task_retries": 0}


def test_pool_slices_of_one_part_is_flat():
    recipe, env, pol = make(RECIPE, PPO)
    stats = T.new_stats()
    ro, _, adv, ret = T.collect_iteration(pol, env, env.reset(seed=1), PPO, 0, 0, torch.Generator().manual_seed(0), stats)
    pooled, padv, pret = pool_slices([(ro, adv, ret)], "cpu", T.rl_sampler(pol, PPO))
    batch, trace = ro.flat()
    assert torch.equal(pooled.batches[0].images, batch.images) and torch.equal(pooled.traces[0].chain, trace.chain)
    assert torch.equal(padv[0], adv.reshape(-1)) and torch.equal(pret[0], ret.reshape(-1))
    for key, value in ro.stacked().items():
        assert torch.equal(pooled.stacked()[key][0], value.reshape(-1)), key
    with pytest.raises(ValueError, match="every slice has critic targets or none"):
        pool_slices([(ro, adv, ret), (ro, adv, None)], "cpu", T.rl_sampler(pol, PPO))
    env.close()


@pytest.mark.parametrize("rl", [GRPO_STATE, dataclasses.replace(PPO, iterations=1)], ids=["grpo-state", "ppo-flow-noise"])
def test_one_worker_first_update_equals_in_process(cluster, rl):
    """Same seeds: one Ray worker collects exactly what the in-process run collects, so the
    first update leaves the same weights (measured: bit-identical, max |diff| = 0)."""
    recipe, env, local = make(RECIPE, rl)
    remote = copy.deepcopy(local)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker (Ray gives an actor OMP_NUM_THREADS = its CPUs): same CPU kernels
    try:
        h_local = T.train_rl(local, env, rl, seed=3, progress=False)
        with collector(remote, recipe, 1, seed=3) as col:
            h_ray = T.train_rl(remote, env, rl, seed=3, progress=False, collector=col)
    finally:
        torch.set_num_threads(threads)
    changed = 0
    for (name, a), b in zip(local.named_parameters(), remote.parameters()):
        assert torch.equal(a, b), f"{name}: max |diff| {(a - b).abs().max():.3g}"
    for a, b in zip(local.parameters(), build_policy(recipe, env.spec).parameters()):
        changed += not torch.equal(a, b)
    assert changed > 0  # the update did move weights (not a vacuous equality)
    for key in ("policy_loss", "approx_kl", "env_steps", "episodes"):
        if key in h_local[0]:
            assert h_local[0][key] == h_ray[0][key], key
    assert h_ray[0]["workers"] == 1 and h_ray[0]["worker_restarts"] == 0
    env.close()


def test_workers_share_the_rollout_distribution(cluster):
    """Two workers: each global env starts from the seed it has in-process (first observations
    equal), the workers draw distinct noise, and the sampled chunks' statistics agree with the
    in-process run's (|z| < 4 on the log-prob mean and each action dim's mean)."""
    rl = dataclasses.replace(PPO, sampler=FlowSDE(num_steps=3), chunks_per_rollout=12)
    recipe, env, pol = make(dataclasses.replace(RECIPE, num_envs=8), rl)
    local_stats, ray_stats = T.new_stats(), T.new_stats()
    ro_l, _, _, _ = T.LocalCollector(env, rl, 5, torch.Generator().manual_seed(5)).collect(pol, 0, local_stats)
    with collector(pol, recipe, 2, seed=5) as col:
        assert [s for s in col.slices] == [(0, 4), (4, 4)]
        ro_r, _, _, info = col.collect(pol, 0, ray_stats)
    batch_l, trace_l = ro_l.flat()
    batch_r, trace_r = ro_r.flat()
    envs_r = ro_r.envs[0]
    assert len(envs_r) == len(trace_l.log_prob) == 8 * 12 and info["workers"] == 2
    for e in range(8):  # first sample of env e in a worker's part is its chunk step 0
        first = int(torch.nonzero(envs_r == e)[0])
        assert torch.equal(batch_r.state[first], batch_l.state[e]) and torch.equal(batch_r.images[first], batch_l.images[e])
    noise_w0, noise_w1 = trace_r.chain[envs_r < 4, 0], trace_r.chain[envs_r >= 4, 0]
    assert not torch.isclose(noise_w0[:, None], noise_w1[None]).all(-1).all(-1).any()  # no shared noise draws

    def z(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.mean() - b.mean()) / torch.sqrt(a.var() / len(a) + b.var() / len(b)))

    assert abs(z(trace_l.log_prob, trace_r.log_prob)) < 4
    acts_l, acts_r = trace_l.actions[:, :3, :4].reshape(-1, 4), trace_r.actions[:, :3, :4].reshape(-1, 4)
    for d in range(4):
        assert abs(z(acts_l[:, d], acts_r[:, d])) < 4, d
    assert sum(ray_stats["env_steps"]) == sum(local_stats["env_steps"])  # no early ends: same steps
    env.close()


def test_worker_killed_run_goes_on_and_resumes(cluster, tmp_path):
    """Kill a worker process (SIGKILL) mid-run: Ray restarts it, the run finishes every update,
    and the checkpoint it leaves resumes (the learner-restart path) to the same history."""
    recipe, env, pol = make(RECIPE, dataclasses.replace(PPO, iterations=3))
    killed = []
    with collector(pol, recipe, 2, seed=0, max_restarts=2) as col:
        before = col.pids()

        def kill(it, row):
            if it == 1:
                os.kill(before[1], signal.SIGKILL)
                killed.append(before[1])

        hist = T.train_rl(pol, env, recipe.rl, seed=0, run_dir=tmp_path, progress=False, on_iteration=kill,
                          collector=col)
        after = col.pids()
    assert killed and after[0] == before[0] and after[1] != before[1]
    assert [r["iteration"] for r in hist] == [1, 2, 3]
    assert hist[0]["worker_restarts"] == 0 and hist[-1]["worker_restarts"] == 1
    assert all(np.isfinite(r["policy_loss"]) for r in hist[1:])
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert state["iteration"] == 3 and json.loads((tmp_path / "metrics.json").read_text())[-1]["iteration"] == 3

    # Learner restart: a new learner process would load the same files.
    _, _, pol2 = make(RECIPE, recipe.rl)
    more = dataclasses.replace(recipe.rl, iterations=4)
    with collector(pol2, dataclasses.replace(recipe, rl=more), 2, seed=0) as col:
        hist2 = T.train_rl(pol2, env, more, seed=0, run_dir=tmp_path, resume=True, progress=False, collector=col)
    assert json.dumps(hist2[:3]) == json.dumps(hist) and hist2[3]["iteration"] == 4  # (json: NaN == NaN)
    env.close()


def test_cluster_too_small_is_a_clear_error(cluster):
    recipe, env, pol = make(RECIPE, GRPO_STATE)
    with pytest.raises(RuntimeError, match=r"cannot place the rollout workers: CPU needed 200, [0-9.]+ free"):
        collector(pol, recipe, 2, seed=0, cpus_per_worker=100)
    env.close()


def test_two_learners_track_one(cluster):
    """Data-parallel learners (gloo): two ranks, each half of every minibatch, gradients summed,
    end two PPO updates (critic warm-up, then actor) where one learner does, up to the order of
    float sums (measured: max |diff| 1.4e-7 over every weight); the replica equals rank 0 bit for bit."""
    recipe, env, single = make(RECIPE, PPO)
    double = copy.deepcopy(single)
    h1 = T.train_rl(single, env, PPO, seed=0, progress=False)
    group = LearnerGroup(functools.partial(build_policy, recipe), PPO, DistConfig(workers=1, learners=2))
    try:
        h2 = T.train_rl(double, env, PPO, seed=0, progress=False, learners=group)
        names = trainable_names(double)
        replica = group.replica_weights(1, names)
    finally:
        group.close()
    params = dict(double.named_parameters())
    assert all(torch.equal(replica[n], params[n]) for n in names)
    with torch.no_grad():
        diff = max(float((a - b).abs().max()) for a, b in zip(single.parameters(), double.parameters()))
        start = build_policy(recipe, env.spec).parameters()
        moved = max(float((a - b).abs().max()) for a, b in zip(single.parameters(), start))
    assert diff < 1e-5 and moved > 1e-3, (diff, moved)
    for a, b in zip(h1, h2):
        for key in ("policy_loss", "value_loss", "entropy", "approx_kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    with pytest.raises(ValueError, match=">= 2 learners"):
        LearnerGroup(functools.partial(build_policy, recipe), PPO, DistConfig(workers=1))
    env.close()


def test_train_cli_job_with_workers(cluster, tmp_path):
    """`vlafast train grpo --workers 2 --learners 2`'s job: a recipe policy, Ray rollouts, two
    learner ranks, eval, files."""
    from vlafast.rl import jobs

    recipe, env, pol = make(RECIPE, GRPO_STATE)
    save_policy(pol, recipe, tmp_path / "sft")
    env.close()
    summary = jobs.run_rl(tmp_path / "sft", tmp_path / "rl", progress=False,
                          recipe_overrides={"rl": {"iterations": 2}}, dist=DistConfig(workers=2, learners=2))
    assert [h["workers"] for h in summary["history"]] == [2.0, 2.0]
    assert summary["eval"]["episodes"] == RECIPE.eval_episodes
    assert (tmp_path / "rl" / "policy" / "policy.json").exists() and (tmp_path / "rl" / "checkpoint.pt").exists()


SIM_RECIPES = {
    # one task on both envs: global env 1 walks the task's init states from the second, which a
    # slice built without its place in the whole would not (it would start at the first)
    "libero": dataclasses.replace(RECIPE, env="libero:libero_spatial", num_envs=2, image_size=32, patch_size=16,
                                  horizon=4, exec_horizon=2,
                                  env_kwargs={"task_ids": [0], "render_size": 64, "max_episode_steps": 8,
                                              "cameras": ["image"]}),
    "maniskill": dataclasses.replace(RECIPE, env="maniskill:PickCube-v1", num_envs=2, image_size=16, patch_size=8,
                                     horizon=4, exec_horizon=2,
                                     env_kwargs={"obs_mode": "rgb", "sim_backend": "physx_cpu", "max_episode_steps": 6}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["libero", pytest.param("maniskill", marks=pytest.mark.vulkan)])
def test_workers_on_libero_and_maniskill(cluster, name):
    """Two workers, one env each, on a real LIBERO / ManiSkill task: each worker's env starts where
    that env starts in-process (same first observation), and a PPO update runs on their rollouts."""
    if name == "maniskill":
        from vlafast.envs.maniskill import renderer_unavailable

        if renderer_unavailable():
            pytest.skip(renderer_unavailable())
    rl = dataclasses.replace(PPO, sampler=FlowSDE(num_steps=2), iterations=1, chunks_per_rollout=2)
    recipe, env, pol = make(SIM_RECIPES[name], rl)
    try:
        ro_l, _, _, _ = T.LocalCollector(env, rl, 1, torch.Generator().manual_seed(1)).collect(pol, 0, T.new_stats())
        with collector(pol, recipe, 2, seed=1) as col:
            stats = T.new_stats()
            ro_r, adv, ret, _ = col.collect(pol, 0, stats)
            hist = T.train_rl(pol, env, rl, seed=1, progress=False, collector=col)
    finally:
        env.close()
    batch_l, batch_r, envs_r = ro_l.flat()[0], ro_r.flat()[0], ro_r.envs[0]
    for e in range(2):
        first = int(torch.nonzero(envs_r == e)[0])
        assert torch.equal(batch_r.state[first], batch_l.state[e]) and torch.equal(batch_r.images[first], batch_l.images[e])
    assert adv.shape == ret.shape == (1, 4) and sum(stats["env_steps"]) > 0
    assert hist[0]["workers"] == 2 and np.isfinite(hist[0]["value_loss"])


def test_scaling_benchmark_rows(cluster):
    """`vlafast bench rollout --workers ...`: one row per worker count, in the common schema, with
    the in-process baseline of the same run and the weight-sync cost."""
    from vlafast.bench import rollout
    from vlafast.cli.bench import _bench_parser

    args = _bench_parser("rollout").parse_args(["--workers", "1", "2", "--envs", "4", "--chunks", "1", "--repeats", "1"])
    rows = rollout.run(args)
    assert [r.backend for r in rows] == ["ray-1w", "ray-2w"]
    for r, n in zip(rows, (1, 2)):
        rec = r.as_record()
        extra = json.loads(rec["extra"])
        assert extra["workers"] == n and r.median_ms > 0 and r.baseline_ms > 0 and r.unit == "env steps/s"
        assert extra["speedup"] == pytest.approx(r.baseline_ms / r.median_ms) and extra["weight_sync_ms"] > 0
        assert extra["weight_bytes"] > 0 and rec["ratio"] != ""


def test_cli_ray_options_need_workers(tmp_path, capsys):
    from vlafast.cli import main

    assert main(["train", "ppo", "--init", str(tmp_path / "p"), "--out", str(tmp_path), "--learners", "2"]) == 2
    assert "options of the Ray mode: give --workers N too" in capsys.readouterr().err
    assert main(["train", "sft", "--out", str(tmp_path), "--workers", "2"]) == 2
    assert "--workers applies to ppo/grpo" in capsys.readouterr().err
