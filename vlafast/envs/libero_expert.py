"""Scripted pick-and-place expert for LIBERO (libero_object / libero_spatial pick-and-place tasks).

A phase machine per environment over the poses the worker's ``poses`` command returns (end
effector, gripper fingers, the task's object and its goal: LIBERO's ``obj_of_interest``):
above the object, descend, close the gripper, lift, carry the object above the goal, descend,
open, retreat. Actions are LIBERO's OSC deltas (3 position, 3 rotation, gripper -1 open / +1
close), proportional to the pose error and clipped to [-1, 1]; rotation stays 0 (the gripper
keeps pointing down). Pure numpy: the same code runs in the main process and, for tests, next to
a raw LIBERO env.

A chunk of T actions repeats the action computed from the chunk's first poses (the gain is
divided by T so a chunk does not overshoot); timed phases (closing, opening) count steps.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ABOVE, DESCEND, CLOSE, LIFT, CARRY, LOWER, OPEN, RETREAT = range(8)
PHASES = ("above", "descend", "close", "lift", "carry", "lower", "open", "retreat")


@dataclasses.dataclass
class ExpertConfig:
    hover: float = 0.10          # m above the object's centre before descending
    grasp_dz: float = 0.0        # grasp height relative to the object's centre (m)
    min_grasp_z: float = 0.015   # never lower the fingers below this (table top ~0)
    carry_z: float = 0.25        # m, height of the object's centre while carried
    release_dz: float = 0.12     # object's centre this far above the goal's body when released
    close_steps: int = 12        # steps with the gripper closing before lifting
    open_steps: int = 8
    phase_steps: int = 40        # a descent that stalls (contact, controller offset) ends after this
                                 # many steps (half of it lowering onto the goal)
    lost: float = 0.04           # m, the object this far from where it sat in the hand: dropped
    tol: float = 0.01            # m, position reached
    gain: float = 25.0           # action per metre of error, one-step chunks
    step_m: float = 0.01         # rough eef travel per step at action 1 (OSC, LIBERO's limits)


class PickPlaceExpert:
    """One environment's phase machine. ``act(poses, horizon)`` -> [horizon, 7] actions."""

    def __init__(self, config: ExpertConfig = ExpertConfig()):
        self.cfg = config
        self.reset()

    def reset(self) -> None:
        self.phase, self.timer, self.grip_offset = ABOVE, 0, np.zeros(3)

    def _move(self, eef, target, horizon: int) -> np.ndarray:
        gain = min(self.cfg.gain, 0.8 / (self.cfg.step_m * horizon))
        return np.clip((np.asarray(target) - eef) * gain, -1.0, 1.0)

    def act(self, poses: dict, horizon: int = 1) -> np.ndarray:
        cfg = self.cfg
        eef = np.asarray(poses["eef_pos"], float)
        obj = np.asarray(poses["object_pos"], float)
        goal = np.asarray(poses["goal_pos"], float)
        grasp_z = max(obj[2] + cfg.grasp_dz, cfg.min_grasp_z)
        for _ in range(len(PHASES)):  # advance through phases already satisfied
            grip = -1.0
            if self.phase == ABOVE:
                target = np.array([obj[0], obj[1], obj[2] + cfg.hover])
                if np.linalg.norm((target - eef)[:2]) < cfg.tol and abs(target[2] - eef[2]) < 3 * cfg.tol:
                    self.phase, self.timer = DESCEND, 0
                    continue
            elif self.phase == DESCEND:
                target = np.array([obj[0], obj[1], grasp_z])
                err = target - eef
                if np.linalg.norm(err[:2]) > cfg.tol:  # centre over the object before going lower
                    target[2] = eef[2]
                if (np.linalg.norm(err[:2]) < cfg.tol and abs(err[2]) < 1.2 * cfg.tol) or self.timer >= cfg.phase_steps:
                    self.phase, self.timer = CLOSE, 0
                    continue
            elif self.phase == CLOSE:
                target, grip = eef, 1.0
                if self.timer >= cfg.close_steps:
                    self.phase = LIFT
                    self.grip_offset = obj - eef
                    continue
            elif self.phase in (LIFT, CARRY, LOWER) and np.linalg.norm(obj - eef - self.grip_offset) > cfg.lost:
                self.phase, self.timer = ABOVE, 0  # the object is not in the hand: grasp again
                continue
            elif self.phase == LIFT:
                lift_z = eef[2] + cfg.carry_z - obj[2]  # the object's centre at carry_z
                target, grip = np.array([eef[0], eef[1], lift_z]), 1.0
                if abs(obj[2] - cfg.carry_z) < 3 * cfg.tol:
                    self.phase = CARRY
                    continue
            elif self.phase == CARRY:
                # the object (not the hand) over the goal
                target = np.array([eef[0] + goal[0] - obj[0], eef[1] + goal[1] - obj[1], eef[2] + cfg.carry_z - obj[2]])
                grip = 1.0
                if np.linalg.norm((goal - obj)[:2]) < cfg.tol * 1.5:
                    self.phase, self.timer = LOWER, 0
                    continue
            elif self.phase == LOWER:
                z = eef[2] + (goal[2] + cfg.release_dz - obj[2])
                target, grip = np.array([eef[0] + goal[0] - obj[0], eef[1] + goal[1] - obj[1], z]), 1.0
                if abs(goal[2] + cfg.release_dz - obj[2]) < 1.5 * cfg.tol or self.timer >= cfg.phase_steps // 2:
                    self.phase, self.timer = OPEN, 0
                    continue
            elif self.phase == OPEN:
                target = eef
                if self.timer >= cfg.open_steps:
                    self.phase = RETREAT
                    continue
            else:  # RETREAT
                target = np.array([eef[0], eef[1], cfg.carry_z])
            break
        move = self._move(eef, target, horizon)
        self.timer += horizon
        action = np.concatenate([move, np.zeros(3), [grip]])
        return np.tile(action, (horizon, 1))
