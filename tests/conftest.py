"""Test set-up. TRITON_INTERPRET must be set before any @triton.jit function is defined, i.e.
before vlafast is imported, or Triton reports "0 active drivers" on CPU-only machines; MUJOCO_GL
before mujoco is imported."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Headless MuJoCo rendering; read when mujoco is first imported, which a test's
# `pytest.importorskip("mujoco")` may do before vlafast.envs.reach sets the same default.
os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """The device kernels run on in this session: CUDA when present, else CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="module")
def env():
    """The built-in reach task, small (4 envs, 16 px, 12 steps), one per test module: the RL tests'
    env. A module that defines its own ``env`` fixture overrides this one."""
    pytest.importorskip("mujoco", reason="the built-in UR5e task simulates in MuJoCo")
    from vlafast.envs import make_env

    e = make_env("ur5e-reach", 4, seed=0, image_size=16, slot_jitter=0.04, max_episode_steps=12)
    yield e
    e.close()
