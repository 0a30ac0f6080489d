"""The UR5e for the built-in tasks: the project's one lean UR5e model (``vlafast/assets/ur5e.xml``,
published DH kinematics and link masses, capsule geometry, gravity-compensated PD + velocity
feed-forward servo; shared with the robot loop's MuJoCo backend) with task objects and cameras
added through ``mujoco.MjSpec``. Capsules keep software-GL rendering fast (~150 frames/s at
128 px on the CI CPU against ~5 with the full meshes)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import mujoco

ASSET = Path(__file__).resolve().parents[1] / "assets" / "ur5e.xml"
NUM_JOINTS = 6
HOME_QPOS = (-1.5708, -1.5708, 1.5708, -1.5708, -1.5708, 0.0)  # arm raised, tool pointing down
EE_SITE = "flange"


def build_model(add_scene: Callable[[mujoco.MjSpec], None] | None = None) -> mujoco.MjModel:
    """Compile the UR5e with whatever ``add_scene(spec)`` adds (bodies, cameras), a wrist
    camera and a "home" keyframe. Actuators 0-5 take joint targets (rad), 6-11 joint
    velocities (rad/s)."""
    spec = mujoco.MjSpec.from_file(str(ASSET))
    spec.visual.global_.offwidth, spec.visual.global_.offheight = 640, 480
    spec.body("wrist_3_link").add_camera(name="wrist", pos=[0, 0.05, 0.08], xyaxes=[-1, 0, 0, 0, 0.5, 1], fovy=80)
    if add_scene is not None:
        add_scene(spec)
    model = spec.compile()
    model.light_castshadow[:] = 0      # shadows cost most of a software-GL frame
    model.vis.quality.shadowsize = 0
    if model.nu != 2 * NUM_JOINTS:
        raise ValueError(f"{ASSET} must have 6 position + 6 velocity actuators, has {model.nu}")
    return model
