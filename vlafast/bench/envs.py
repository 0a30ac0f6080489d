"""Env steps/s through the VecEnv adapters.

- LIBERO (CPU): ``LiberoVecEnv`` at each worker count, against the plain openpi-style loop in
  the same run (one env, one process, every camera rendered at every control step).
- ManiSkill3 (CUDA): ``ManiSkillVecEnv`` on the GPU sim, state and RGB observations, at 320
  (pi_RL) and 1024 envs, against ManiSkill's own batched ``env.step`` loop (the adapter's
  overhead: chunk bookkeeping, numpy conversion). Anchor: PickCube ~318k state / ~18.5k RGB
  env steps/s at 4096 envs on an RTX 4090 (ManiSkill3 paper).

On a CPU machine the defaults are small (LIBERO 1 and 2 workers, 128 px, a few chunks) so
``vlafast bench all`` stays short; LIBERO rows need ``make libero`` (skipped with a message
otherwise) and ManiSkill rows a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time

import numpy as np
import torch

from vlafast.bench.core import Row, time_ms

log = logging.getLogger(__name__)

MANISKILL_ANCHOR = {"state": 318_000.0, "rgb": 18_500.0}  # env steps/s, PickCube, 4096 envs, RTX 4090

# The baseline LIBERO loop (run under the LIBERO interpreter): openpi's evaluation pattern.
_OPENPI_LOOP = r"""
import json, os, sys, time
os.environ.setdefault("MUJOCO_GL", "egl")
from libero.libero import benchmark, get_libero_path
from libero.libero.envs import OffScreenRenderEnv
suite, task_id, size, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = benchmark.get_benchmark_dict()[suite]()
task = s.get_task(task_id)
env = OffScreenRenderEnv(bddl_file_name=os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file),
                         camera_heights=size, camera_widths=size)
env.seed(0); env.reset(); env.set_init_state(s.get_task_init_states(task_id)[0])
noop = [0.0] * 6 + [-1.0]
for _ in range(3): env.step(noop)
t0 = time.perf_counter()
for _ in range(steps): env.step(noop)
print(json.dumps({"s_per_step": (time.perf_counter() - t0) / steps}))
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    p.add_argument("--suite", default="libero_10", help="LIBERO suite (default libero_10)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8, 16] if cuda else [1, 2],
                   help="LIBERO worker counts (default 1 2 on CPU)")
    p.add_argument("--render", type=int, default=256 if cuda else 128, help="LIBERO render size in px")
    p.add_argument("--chunk", type=int, default=5, help="actions per chunk (openpi LIBERO replans every 5)")
    p.add_argument("--chunks", type=int, default=3 if not cuda else 10, help="timed chunks per configuration")
    p.add_argument("--envs", type=int, nargs="+", default=[320, 1024], help="ManiSkill env counts (CUDA)")
    p.add_argument("--task", default="PickCube-v1", help="ManiSkill task")
    p.add_argument("--no-libero", action="store_true", help="skip the LIBERO rows")
    p.add_argument("--no-maniskill", action="store_true", help="skip the ManiSkill rows")


def _libero_rows(args: argparse.Namespace) -> list[Row]:
    from vlafast.envs.libero import LiberoConfig, LiberoVecEnv, find_libero_python

    try:
        python = find_libero_python()
    except FileNotFoundError as exc:
        log.warning("envs bench: LIBERO rows skipped: %s", exc)
        return []
    base = subprocess.run([python, "-c", _OPENPI_LOOP, args.suite, "0", str(args.render), str(2 * args.chunk)],
                          capture_output=True, text=True, check=True, timeout=600)
    base_s = json.loads(base.stdout.strip().splitlines()[-1])["s_per_step"]
    rows = []
    for n in args.workers:
        cfg = LiberoConfig(render_size=args.render, image_size=args.render)
        t0 = time.perf_counter()
        with LiberoVecEnv(args.suite, range(n), n, cfg, seed=0, python=python) as env:
            startup_s = time.perf_counter() - t0
            env.reset(seed=0)
            actions = np.zeros((n, args.chunk, 7))
            actions[..., 6] = -1.0
            ms = time_ms(lambda: env.step(actions), warmup=1, iters=args.chunks)
        steps_per_s = n * args.chunk / (ms / 1e3)
        rows.append(Row(
            bench="envs", op="libero_chunk", shape=f"{args.suite} B={n} T={args.chunk} {args.render}px", dtype="-",
            backend="LiberoVecEnv (1 process/env)", median_ms=ms,
            baseline="openpi loop, 1 env, render every step", baseline_ms=base_s * args.chunk * 1e3,
            achieved=steps_per_s, unit="env steps/s",
            extra={"baseline_steps_per_s": 1.0 / base_s, "startup_s": round(startup_s, 2), "workers": n},
        ))
    return rows


def _maniskill_rows(args: argparse.Namespace) -> list[Row]:
    from vlafast.envs.maniskill import ManiSkillVecEnv

    rows = []
    for obs_mode in ("state", "rgb"):
        for n in args.envs:
            with ManiSkillVecEnv(args.task, n, obs_mode, "physx_cuda", seed=0) as env:
                env.reset(seed=0)
                A = env.spec.action_dim
                actions = np.zeros((n, args.chunk, A))
                ms = time_ms(lambda: env.step(actions), warmup=2, iters=args.chunks)
                raw = env._gpu  # the batched ManiSkill env itself: the baseline loop
                a = torch.zeros((n, A), device=raw.unwrapped.device)

                def bare():
                    for _ in range(args.chunk):
                        raw.step(a)
                    torch.cuda.synchronize()

                base_ms = time_ms(bare, warmup=2, iters=args.chunks)
            rows.append(Row(
                bench="envs", op="maniskill_chunk", shape=f"{args.task} B={n} T={args.chunk} {obs_mode}", dtype="-",
                backend="ManiSkillVecEnv physx_cuda", median_ms=ms,
                baseline="ManiSkill batched env.step", baseline_ms=base_ms,
                achieved=n * args.chunk / (ms / 1e3), unit="env steps/s",
                extra={"baseline_steps_per_s": n * args.chunk / (base_ms / 1e3),
                       "anchor_4096_envs_rtx4090": MANISKILL_ANCHOR[obs_mode]},
            ))
    return rows


def run(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    if not args.no_libero:
        rows += _libero_rows(args)
    if not args.no_maniskill:
        if torch.cuda.is_available():
            rows += _maniskill_rows(args)
        else:
            log.warning("envs bench: ManiSkill rows need a CUDA device (GPU sim); skipped")
    return rows
