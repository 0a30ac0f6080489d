"""Environments behind one protocol (``VecEnv``): the built-in MuJoCo UR5e tasks here;
LIBERO and ManiSkill adapters follow. Envs know nothing of models."""

from vlafast.envs.base import EnvSpec, Obs, VecEnv, check_actions, env_seeds

__all__ = ["EnvSpec", "Obs", "VecEnv", "check_actions", "env_seeds", "make_env"]


def make_env(name: str, num_envs: int, seed: int | None = None, **overrides):
    """Build an environment by name (``ur5e-reach``, ``ur5e-reach2``)."""
    from vlafast.envs.reach import make_env as _make

    return _make(name, num_envs, seed=seed, **overrides)
