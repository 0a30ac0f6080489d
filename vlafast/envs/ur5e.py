"""The UR5e arm for MuJoCo: published kinematics and limits, and a lean MJCF built from them.

The body offsets follow Universal Robots' published UR5e geometry (the same frames as the
MuJoCo Menagerie model): shoulder 0.163 m above the base, upper arm 0.425 m, forearm 0.392 m,
wrist offsets 0.138 / 0.131 / 0.127 / 0.100 / 0.100 m. Links are capsules, so rendering on a
software GL stays fast (~150 frames/s at 128 px on the CI CPU versus ~5 with the full meshes).
When ``MENAGERIE_ROOT`` points at a mujoco_menagerie checkout, ``menagerie_xml()`` returns the
full model instead; both expose the same joint, actuator and site names.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

JOINTS = (
    "shoulder_pan_joint", "shoulder_lift_joint", "elbow_joint",
    "wrist_1_joint", "wrist_2_joint", "wrist_3_joint",
)
NUM_JOINTS = 6
# Limits from the UR5e data sheet: +-360 deg per joint (elbow +-180 deg in practice), 180 deg/s.
JOINT_LIMITS = tuple((-2 * math.pi, 2 * math.pi) if j != "elbow_joint" else (-math.pi, math.pi) for j in JOINTS)
MAX_JOINT_VELOCITY = (math.pi,) * NUM_JOINTS            # rad/s
MAX_JOINT_ACCELERATION = (8.0,) * NUM_JOINTS             # rad/s^2, a conservative servo limit
HOME_QPOS = (-1.5708, -1.5708, 1.5708, -1.5708, -1.5708, 0.0)
EE_SITE = "attachment_site"

_ARM = """
    <body name="base" gravcomp="1" quat="0 0 0 -1">
      <geom class="link" fromto="0 0 0 0 0 0.12" size="0.06"/>
      <body name="shoulder_link" gravcomp="1" pos="0 0 0.163">
        <joint name="shoulder_pan_joint" class="big" axis="0 0 1"/>
        <geom class="link" fromto="0 0 -0.05 0 0 0.05" size="0.06"/>
        <body name="upper_arm_link" gravcomp="1" pos="0 0.138 0" quat="1 0 1 0">
          <joint name="shoulder_lift_joint" class="big"/>
          <geom class="link" fromto="0 0 0 0 0 0.425" size="0.054"/>
          <body name="forearm_link" gravcomp="1" pos="0 -0.131 0.425">
            <joint name="elbow_joint" class="big" range="-3.1416 3.1416"/>
            <geom class="link" fromto="0 0 0 0 0 0.392" size="0.045"/>
            <body name="wrist_1_link" gravcomp="1" pos="0 0 0.392" quat="1 0 1 0">
              <joint name="wrist_1_joint" class="small"/>
              <geom class="link" fromto="0 0 0 0 0.127 0" size="0.04"/>
              <body name="wrist_2_link" gravcomp="1" pos="0 0.127 0">
                <joint name="wrist_2_joint" class="small" axis="0 0 1"/>
                <geom class="link" fromto="0 0 0 0 0 0.1" size="0.04"/>
                <body name="wrist_3_link" gravcomp="1" pos="0 0 0.1">
                  <joint name="wrist_3_joint" class="small"/>
                  <geom class="tool" fromto="0 0 0 0 0.1 0" size="0.035"/>
                  <site name="attachment_site" pos="0 0.1 0" quat="-1 1 0 0" size="0.01"/>
                  <camera name="wrist" pos="0 0.05 0.08" xyaxes="-1 0 0 0 0.5 1" fovy="80"/>
                </body>
              </body>
            </body>
          </body>
        </body>
      </body>
    </body>
"""

_DEFAULTS = """
    <default>
      <default class="ur5e">
        <joint axis="0 1 0" range="-6.2832 6.2832" armature="0.1" damping="5"/>
        <position ctrlrange="-6.2832 6.2832" kp="2000" kv="80"/>
        <default class="big"><joint/><position forcerange="-150 150"/></default>
        <default class="small"><joint/><position forcerange="-28 28"/></default>
        <default class="link"><geom type="capsule" rgba="0.7 0.72 0.75 1" contype="0" conaffinity="0"/></default>
        <default class="tool"><geom type="capsule" rgba="0.2 0.2 0.22 1" contype="0" conaffinity="0"/></default>
      </default>
    </default>
"""

_ELBOW_CTRL = ' ctrlrange="-3.1416 3.1416"'
_ACTUATORS = "\n".join(
    f'      <position class="{"big" if i < 3 else "small"}" name="{j.replace("_joint", "")}" joint="{j}"'
    f'{_ELBOW_CTRL if j == "elbow_joint" else ""}/>'
    for i, j in enumerate(JOINTS)
)


def arm_xml(extra_worldbody: str = "", extra_assets: str = "", timestep: float = 0.002) -> str:
    """A complete MJCF document: the UR5e on the origin plus ``extra_worldbody`` (scene objects)."""
    return f"""<mujoco model="ur5e_lean">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="{timestep}" integrator="implicitfast"/>
  <visual><global offwidth="640" offheight="480"/><quality shadowsize="0"/></visual>
  <asset>{extra_assets}</asset>
{_DEFAULTS}
  <worldbody>
    <light pos="0 -0.5 2.0" dir="0 0.3 -1" diffuse="0.9 0.9 0.9" castshadow="false"/>
    <geom name="floor" type="plane" size="2 2 0.05" rgba="0.85 0.85 0.8 1"/>
    <body childclass="ur5e">
{_ARM}
    </body>
{extra_worldbody}
  </worldbody>
  <actuator>
{_ACTUATORS}
  </actuator>
  <keyframe><key name="home" qpos="{' '.join(map(str, HOME_QPOS))}" ctrl="{' '.join(map(str, HOME_QPOS))}"/></keyframe>
</mujoco>
"""


def menagerie_xml() -> Path | None:
    """Path of Menagerie's ``universal_robots_ur5e/ur5e.xml`` when ``MENAGERIE_ROOT`` is set."""
    root = os.environ.get("MENAGERIE_ROOT")
    if not root:
        return None
    path = Path(root) / "universal_robots_ur5e" / "ur5e.xml"
    if not path.exists():
        raise FileNotFoundError(f"MENAGERIE_ROOT={root} has no universal_robots_ur5e/ur5e.xml")
    return path
