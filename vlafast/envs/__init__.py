"""Environments behind one protocol (``VecEnv``): the built-in MuJoCo UR5e tasks here;
LIBERO (``libero.py``) and ManiSkill3 (``maniskill.py``) adapters, imported lazily.
Envs know nothing of models."""

from vlafast.envs.base import EnvSpec, Obs, VecEnv, check_actions, env_seeds

__all__ = ["EnvSpec", "Obs", "VecEnv", "check_actions", "env_seeds", "make_env"]


def make_env(name: str, num_envs: int, seed: int | None = None, **overrides):
    """Build an environment by name: ``ur5e-reach``, ``ur5e-reach2``; ``libero:<suite>`` (e.g.
    ``libero:libero_10``; overrides: ``task_ids``, ``python``, LiberoConfig fields);
    ``maniskill:<task>`` (e.g. ``maniskill:PickCube-v1``; overrides: ManiSkillVecEnv arguments)."""
    if name.startswith("libero:"):
        from vlafast.envs.libero import make_libero

        return make_libero(name.split(":", 1)[1], num_envs, seed=seed, **overrides)
    if name.startswith("maniskill:"):
        from vlafast.envs.maniskill import ManiSkillVecEnv

        return ManiSkillVecEnv(name.split(":", 1)[1], num_envs, seed=seed, **overrides)
    from vlafast.envs.reach import make_env as _make

    return _make(name, num_envs, seed=seed, **overrides)
