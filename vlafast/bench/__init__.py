"""Benchmarks: one runner, one schema (``vlafast.bench.core``), results per device.

A benchmark is a module with ``add_arguments(parser)`` and ``run(args) -> list[Row]``,
registered below by name; ``vlafast bench <name>`` runs it and merges its rows into
``bench/results/<device>.csv``. ``vlafast bench all`` runs every benchmark that can run here.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from types import ModuleType


@dataclasses.dataclass(frozen=True)
class Benchmark:
    name: str
    module: str
    help: str
    gpu_only: bool = False
    needs: tuple[str, ...] = ()  # modules it imports beyond the core (optional extras)

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)

    def missing(self) -> list[str]:
        """The modules of ``needs`` that do not import here."""
        return [m for m in self.needs if importlib.util.find_spec(m) is None]


# Later issues add their benchmarks here (vocab-topk, steer, flow-sampler, pi0, openvla, servo).
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("servo-timing", "vlafast.bench.servo_timing",
                  "absolute-deadline loop jitter of the _C timing core (SCHED_FIFO vs plain sleep)"),
        Benchmark("servo", "vlafast.bench.servo", "500 Hz servo loop with a synthetic chunk producer: jitter, missed cycles, chunk age"),
        Benchmark("servo-interp", "vlafast.bench.servo_interp",
                  "commanded jerk of a smooth plan through the servo: clamped cubic spline (C2) vs Catmull-Rom (C1)"),
        Benchmark("servo-mujoco", "vlafast.bench.servo_mujoco",
                  "simulated UR5e tracking a sinusoid in real time: max error on undisturbed steps, what the load disturbed",
                  needs=("mujoco",)),
        Benchmark("pi0", "vlafast.bench.pi0", "pi0 chunk latency (1/2/3 views, K=10), eager vs CUDA graph; batched chunks/s"),
        Benchmark("openvla", "vlafast.bench.openvla", "OpenVLA-7B batch-1 action latency (7 tokens), eager vs CUDA-graphed decode",
                  gpu_only=True),
        Benchmark("pi0fast", "vlafast.bench.pi0fast",
                  "pi0-FAST batch-1 action chunk (2 views, 48 FAST tokens), eager vs CUDA-graphed decode; one decode step vs the bandwidth floor"),
        Benchmark("vocab-topk", "vlafast.bench.vocab_topk", "fused value-vector -> vocab top-k vs matmul+torch.topk and the bare matmul; one layer and whole model"),
        Benchmark("steer", "vlafast.bench.steer", "in-place steering correction / direction inside a graph-captured Gemma MLP at batch 1 and 64"),
        Benchmark("envs", "vlafast.bench.envs", "env steps/s: LIBERO per worker count (CPU) vs the openpi loop; ManiSkill GPU sim at 320/1024 envs (CUDA)"),
        Benchmark("rollout", "vlafast.bench.rollout", "chunks/s with log-probs: real pi0 graphed vs eager at B=64/256 (CUDA); tiny pi0 + built-in env (CPU)"),
        Benchmark("dictionary", "vlafast.bench.dictionary", "whole-model neuron dictionary (Gemma-2B 18 x 16384 x 2048 of pi0 / pi0-FAST, OpenVLA sizes) vs materialise-then-topk"),
        Benchmark("steering", "vlafast.bench.steering", "steering plans' overhead on a graphed pi0 chunk at batch 1 and 64 (budget 2%)"),
        Benchmark("rtc", "vlafast.bench.rtc", "real-time chunking vs naive switching vs temporal ensembling: hand-over jerk and success, tiny pi0 on the MuJoCo UR5e at injected delays",
                  needs=("mujoco",)),
        Benchmark("ur-rtde", "vlafast.bench.ur_rtde", "ur_rtde servoJ rate next to inference: child-process forwarder vs a Python thread, real ur_rtde on the loopback UR controller",
                  needs=("rtde_control",)),
        Benchmark("fast-tokenizer", "vlafast.bench.fast_tokenizer",
                  "FAST action tokenizer encode / decode per chunk: batched codec vs FAST's processor loop (NumPy / SciPy)"),
        Benchmark("demo-load", "vlafast.bench.demo_load",
                  "vlafast demo wall time with the thread policy vs torch's default threads, alone and next to 2 busy threads",
                  needs=("mujoco",)),
        Benchmark("flow-sampler", "vlafast.bench.flow_sampler", "flow sampling with log-probs (Flow-SDE / Flow-Noise) vs ODE, eager vs CUDA graph; chunks/s"),
    )
}
