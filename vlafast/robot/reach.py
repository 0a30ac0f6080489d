"""A tiny pi0 that reaches joint-space targets on the UR5e: the flow-matching policy the robot
loop's demo (`vlafast robot run --policy pi0-reach`) and ``vlafast bench rtc`` drive.

It is trained here (flow-matching SFT, about a minute on a CPU). Its state is (q, target) and its
chunk is T waypoints of an exponential approach to the target, whose time constant the
demonstrations draw from ``TAU_S``: slow and fast demonstrators, so many plans fit one state and
independently sampled chunks disagree, which is what hand-overs must hide.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from vlafast.robot.servo import UR5E_HOME

TAU_S = (0.35, 0.9)  # the experts' approach time constants (s): uniform, so each state has many plans;
                    # >= 0.35 s keeps the plans' acceleration (<= REACH / tau^2 = 2.4) inside the servo's 8 rad/s^2
DT = 0.05           # waypoint spacing (s)
HORIZON = 16        # chunk length T (0.8 s)
REACH = 0.3         # targets: home + U(-REACH, REACH) per joint (rad)


def expert_chunk(q: np.ndarray, target: np.ndarray, tau: np.ndarray | float) -> np.ndarray:
    """[..., T, 6]: waypoint i (at i * DT from now) of the exponential approach from q with time
    constant tau [...] (s)."""
    i = np.arange(HORIZON)[:, None]
    decay = np.exp(-i * DT / np.asarray(tau, dtype=np.float64)[..., None, None])
    return target[..., None, :] + (q - target)[..., None, :] * decay


def random_target(rng: np.random.Generator) -> np.ndarray:
    return np.asarray(UR5E_HOME) + rng.uniform(-REACH, REACH, 6)


def build_policy(seed: int = 0):
    """(untrained tiny pi0 with joint-position outputs, obs_of(state [B, 12]) -> Pi0Observation)."""
    from vlafast.models import Pi0Config, Pi0Observation, Pi0Policy
    from vlafast.models.normalize import FeatureStats, Normalizer

    torch.manual_seed(seed)
    cfg = Pi0Config.tiny(action_dim=8, state_dim=12, horizon=HORIZON, num_steps=4)
    model = Pi0Policy(cfg)
    h = torch.tensor(np.asarray(UR5E_HOME), dtype=torch.float32)
    model.normalizer = Normalizer(FeatureStats(mean=h.repeat(2), std=torch.full((12,), 0.3)),
                                  FeatureStats(mean=h, std=torch.full((6,), 0.3)), "mean_std", "mean_std", "openpi")
    s = cfg.vision.image_size
    image = torch.zeros(1, 1, 3, s, s)
    tokens = torch.tensor([[2, 3, 4, 5]])

    def obs_of(state: torch.Tensor) -> Pi0Observation:
        B = state.shape[0]
        return Pi0Observation(image.expand(B, -1, -1, -1, -1), torch.ones(B, 1, dtype=torch.bool), tokens.expand(B, -1),
                              torch.ones(B, 4, dtype=torch.bool), state)

    return model, obs_of


def _observer(obs_of: Callable) -> Callable[[np.ndarray], Callable]:
    def make_observe(target: np.ndarray):
        target = np.asarray(target, dtype=np.float64)
        if target.shape != (6,):
            raise ValueError(f"target must be 6 joint positions (rad), got shape {target.shape}")

        def observe(q: np.ndarray, t: float):
            return obs_of(torch.tensor(np.concatenate([q, target]), dtype=torch.float32)[None])
        return observe

    return make_observe


def train_policy(steps: int, seed: int = 0) -> tuple[object, Callable[[np.ndarray], Callable], float]:
    """(tiny pi0 with joint-position outputs, make_observe(target) -> observe(q, t), final loss),
    SFT'd on expert chunks from random (q, target) pairs."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    model, obs_of = build_policy(seed)
    home = np.asarray(UR5E_HOME)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=2e-4)
    model.train()
    for _ in range(steps):
        q = home + rng.uniform(-1.3 * REACH, 1.3 * REACH, (64, 6))
        target = home + rng.uniform(-REACH, REACH, (64, 6))
        state = torch.tensor(np.concatenate([q, target], 1), dtype=torch.float32)
        tau = rng.uniform(*TAU_S, 64)  # demonstrators differ in speed: a distribution of plans per state
        actions = torch.tensor(expert_chunk(q, target, tau), dtype=torch.float32)
        noise = torch.randn(64, HORIZON, model.cfg.action_dim, generator=gen)
        t = torch.rand(64, generator=gen) ** (1 / 1.5) * 0.999 + 0.001
        loss = model.flow_matching_loss(obs_of(state), actions, noise=noise, time=t).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    return model, _observer(obs_of), loss.item()


def load_or_train(path: str | Path, steps: int, seed: int = 0) -> tuple[object, Callable[[np.ndarray], Callable], bool]:
    """The reach policy from ``path`` (its weights, as saved here), else trained with ``steps``
    and saved there (write-then-rename). -> (model, make_observe, loaded)."""
    from vlafast._io import atomic_path

    path = Path(path)
    if path.exists():
        model, obs_of = build_policy(seed)
        state = torch.load(path, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path} is not a pi0-reach checkpoint: missing keys {missing[:3]}, unexpected {unexpected[:3]}")
        model.eval()
        return model, _observer(obs_of), True
    model, make_observe, _ = train_policy(steps, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    return model, make_observe, False
