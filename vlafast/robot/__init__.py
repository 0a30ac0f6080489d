"""Real-time robot control: the C++ servo loop (``vlafast._C``), asynchronous chunk execution,
and backends (ur_rtde, simulated MuJoCo UR5e, null). Importing this package does not import
``_C``, MuJoCo or ur_rtde; they load when a loop or backend is made."""

from vlafast.robot.backends import MujocoUR5eBackend, NullBackend, RecordingBackend, URRTDEBackend, make_backend
from vlafast.robot.policies import Pi0ChunkPolicy, SinusoidPolicy, make_policy
from vlafast.robot.runner import RealtimeRunner, merge_chunk
from vlafast.robot.servo import UR5E_HOME, JointLimits, ServoConfig, ServoLoop, format_stats, interpolate

__all__ = [
    "JointLimits", "MujocoUR5eBackend", "NullBackend", "Pi0ChunkPolicy", "RealtimeRunner", "RecordingBackend", "ServoConfig",
    "ServoLoop", "SinusoidPolicy", "UR5E_HOME", "URRTDEBackend", "format_stats", "interpolate", "make_backend",
    "make_policy", "merge_chunk",
]
