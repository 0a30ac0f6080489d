"""Smooth real-time control: real-time chunking vs naive switching vs temporal ensembling.

A tiny pi0 is trained here (flow-matching SFT, a minute on a CPU) to move a UR5e in joint space:
its state is (q, target), its chunk T waypoints of an exponential approach to the target whose
time constant the demonstrations draw from ``TAU_S`` (slow and fast demonstrators: many plans
fit one state, so independently sampled chunks disagree, which is what hand-overs must hide). It then drives the simulated UR5e (``MujocoUR5eBackend``, real time,
500 Hz servo) through ``RealtimeRunner`` from home to a target, with an injected inference
delay on top of its own, in three hand-over modes:

- ``naive``: each new chunk replaces the plan at once (no blend, no guidance);
- ``rtc``: the chunk is sampled with real-time chunking on the executing plan (``Pi0ChunkPolicy``,
  guided, no blend): the frozen prefix is what the servo ran during the last hand-over;
- ``ensemble``: temporal ensembling (every plan a recursive average, new chunk weight 0.5).

Per (mode, delay): the RMS jerk of the servo's commands in the 100 ms after each hand-over
(median over hand-overs and episodes; ``runner.boundary_jerk``: the peak saturates where the
servo clamps acceleration), the hand-over jump in position and in velocity before any blending, the servo cycles whose
velocity or acceleration the servo had to clamp,
and task success (max joint error to the target < ``TOL_RAD`` at the end, the arm settled). The
baseline of every row is ``naive`` at the same delay, in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time

import numpy as np
import torch

from vlafast.bench.core import Row

TAU_S = (0.35, 0.9)  # the experts' approach time constants (s): uniform, so each state has many plans;
                    # >= 0.35 s keeps the plans' acceleration (<= REACH / tau^2 = 2.4) inside the servo's 8 rad/s^2
DT = 0.05           # waypoint spacing (s)
HORIZON = 16        # chunk length T (0.8 s)
CHUNK_EXEC = 4      # waypoints executed before the next observation (replanning every 0.2 s)
TOL_RAD = 0.05      # success: every joint within this of the target (3 degrees)
REACH = 0.3         # targets: home + U(-REACH, REACH) per joint (rad)
MODES = ("naive", "rtc", "ensemble")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--delays", type=float, nargs="+", default=[0.0, 100.0, 300.0], help="injected inference delay (ms)")
    p.add_argument("--episodes", type=int, default=5, help="targets per (mode, delay)")
    p.add_argument("--seconds", type=float, default=3.5, help="episode length (s)")
    p.add_argument("--sft-steps", type=int, default=1500, help="SFT steps of the tiny pi0 (1200: ~0.03 rad open-loop error)")


def expert_chunk(q: np.ndarray, target: np.ndarray, tau: np.ndarray | float) -> np.ndarray:
    """[..., T, 6]: waypoint i (at i * DT from now) of the exponential approach from q with time
    constant tau [...] (s)."""
    i = np.arange(HORIZON)[:, None]
    decay = np.exp(-i * DT / np.asarray(tau, dtype=np.float64)[..., None, None])
    return target[..., None, :] + (q - target)[..., None, :] * decay


def train_policy(steps: int, seed: int = 0):
    """(tiny pi0 with joint-position outputs, make_observe(target) -> observe(q, t)), SFT'd on
    expert chunks from random (q, target) pairs."""
    from vlafast.models import Pi0Config, Pi0Observation, Pi0Policy
    from vlafast.models.normalize import FeatureStats, Normalizer
    from vlafast.robot.servo import UR5E_HOME

    home = np.asarray(UR5E_HOME)
    torch.manual_seed(seed)
    cfg = Pi0Config.tiny(action_dim=8, state_dim=12, horizon=HORIZON, num_steps=4)
    model = Pi0Policy(cfg)
    h = torch.tensor(home, dtype=torch.float32)
    model.normalizer = Normalizer(FeatureStats(mean=h.repeat(2), std=torch.full((12,), 0.3)),
                                  FeatureStats(mean=h, std=torch.full((6,), 0.3)), "mean_std", "mean_std", "openpi")
    s = cfg.vision.image_size
    image = torch.zeros(1, 1, 3, s, s)
    tokens = torch.tensor([[2, 3, 4, 5]])

    def obs_of(state: torch.Tensor) -> Pi0Observation:
        B = state.shape[0]
        return Pi0Observation(image.expand(B, -1, -1, -1, -1), torch.ones(B, 1, dtype=torch.bool), tokens.expand(B, -1),
                              torch.ones(B, 4, dtype=torch.bool), state)

    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1), eta_min=2e-4)
    model.train()
    for _ in range(steps):
        q = home + rng.uniform(-1.3 * REACH, 1.3 * REACH, (64, 6))
        target = home + rng.uniform(-REACH, REACH, (64, 6))
        state = torch.tensor(np.concatenate([q, target], 1), dtype=torch.float32)
        tau = rng.uniform(*TAU_S, 64)  # demonstrators differ in speed: a distribution of plans per state
        actions = torch.tensor(expert_chunk(q, target, tau), dtype=torch.float32)
        noise = torch.randn(64, HORIZON, cfg.action_dim, generator=gen)
        t = torch.rand(64, generator=gen) ** (1 / 1.5) * 0.999 + 0.001
        loss = model.flow_matching_loss(obs_of(state), actions, noise=noise, time=t).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()

    def make_observe(target: np.ndarray):
        def observe(q: np.ndarray, t: float) -> Pi0Observation:
            return obs_of(torch.tensor(np.concatenate([q, target]), dtype=torch.float32)[None])
        return observe

    return model, make_observe, loss.item()


@dataclasses.dataclass
class _Delayed:
    """A chunk policy with ``delay_s`` of extra inference time."""

    policy: object
    delay_s: float

    def __getattr__(self, name):  # dt, horizon, guided
        return getattr(self.policy, name)

    def __call__(self, q, t, **kw):
        t0 = time.perf_counter()
        chunk = self.policy(q, t, **kw)
        time.sleep(max(0.0, self.delay_s - (time.perf_counter() - t0)) if self.delay_s else 0.0)
        return chunk


def episode(model, observe, mode: str, delay_s: float, seconds: float, seed: int) -> dict:
    """One reach on the simulated UR5e in real time -> jerk per hand-over, jumps, success."""
    from vlafast.robot.backends import MujocoUR5eBackend
    from vlafast.robot.policies import Pi0ChunkPolicy
    from vlafast.robot.runner import RealtimeRunner, boundary_jerk, command_stream
    from vlafast.robot.servo import ServoConfig

    backend = MujocoUR5eBackend(log_seconds=seconds + 2.0)
    policy = _Delayed(Pi0ChunkPolicy(model, observe, dt=DT, guided=mode == "rtc", num_steps=10, noise_seed=seed), delay_s)
    runner = RealtimeRunner(policy, backend, hz=500.0, chunk_exec=CHUNK_EXEC, blend_s=0.0,
                            config=ServoConfig(hz=500.0, spin_us=0.0), ensemble=0.5 if mode == "ensemble" else 0.0)
    stats = runner.run(seconds)
    log = backend.log()
    pushes = np.array([c["push_s"] for c in runner.cycles[1:]])  # hand-overs (the first chunk starts from rest)
    jerk, _ = boundary_jerk(*command_stream(log), pushes, 0.1, reduce="rms")
    return {"jerk": jerk[np.isfinite(jerk)], "jump": [c["jump_rad"] for c in runner.cycles[1:]],
            "jump_v": [c["jump_rad_s"] for c in runner.cycles[1:]],
            "inference_ms": [c["inference_ms"] for c in runner.cycles], "q_end": log["q"][-1],
            "missed": stats["missed"], "clamped": stats["clamped_cycles"], "error": stats["policy_error"]}


def run(args: argparse.Namespace) -> list[Row]:
    from vlafast.robot.servo import UR5E_HOME

    home = np.asarray(UR5E_HOME)
    t0 = time.perf_counter()
    model, make_observe, loss = train_policy(args.sft_steps)
    train_s = time.perf_counter() - t0
    rng = np.random.default_rng(123)
    targets = [home + rng.uniform(-REACH, REACH, 6) for _ in range(args.episodes)]
    results: dict[tuple[str, float], dict] = {}
    for delay in args.delays:
        for mode in MODES:
            eps = [episode(model, make_observe(tg), mode, delay / 1e3, args.seconds, seed=i) for i, tg in enumerate(targets)]
            errors = [e["error"] for e in eps if e["error"]]
            if errors:
                raise RuntimeError(f"{mode} at {delay:g} ms: the policy failed: {errors[0]}")
            success = [float(np.abs(e["q_end"] - tg).max() < TOL_RAD) for e, tg in zip(eps, targets)]
            results[(mode, delay)] = {
                "jerk": float(np.median(np.concatenate([e["jerk"] for e in eps]))),
                "jump": float(np.median(np.concatenate([e["jump"] for e in eps]))),
                "jump_v": float(np.median(np.concatenate([e["jump_v"] for e in eps]))),
                "inference_ms": float(np.median(np.concatenate([e["inference_ms"] for e in eps]))),
                "success": float(np.mean(success)), "episodes": len(eps),
                "final_error_rad": float(np.median([np.abs(e["q_end"] - tg).max() for e, tg in zip(eps, targets)])),
                "missed": int(sum(e["missed"] for e in eps)),
                "clamped_cycles": float(np.median([e["clamped"] for e in eps])),
            }
    rows = []
    for (mode, delay), r in results.items():
        base = results[("naive", delay)]
        rows.append(Row(
            bench="rtc", op=f"hand-over ({mode}) tiny pi0 on MuJoCo UR5e", shape=f"delay {delay:g} ms, T={HORIZON} dt={DT}s",
            dtype="fp32", backend=mode, median_ms=r["inference_ms"], baseline="naive switching",
            baseline_ms=base["inference_ms"], achieved=r["jerk"], unit="rad/s^3 (median hand-over RMS jerk)",
            extra={**r, "jerk_vs_naive": r["jerk"] / base["jerk"] if base["jerk"] > 0 else math.nan,
                   "jump_vs_naive": r["jump"] / base["jump"] if base["jump"] > 0 else math.nan,
                   "jump_v_vs_naive": r["jump_v"] / base["jump_v"] if base["jump_v"] > 0 else math.nan,
                   "success_naive": base["success"], "sft_loss": loss, "sft_s": train_s, "tol_rad": TOL_RAD}))
    return rows
