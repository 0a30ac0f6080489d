"""`vlafast robot run | fake-ur`: the real-time loop with a live readout, and a loopback UR controller.

Policies: ``sinusoid`` (scripted), ``pi0-reach`` (the tiny flow-matching pi0 of
``vlafast.robot.reach``, trained on first use, about a minute on a CPU, then loaded from
``--reach-weights``, moving to ``--target``), or a policy folder (``vlafast.policies.load``)
whose actions are joint positions: it sees the MuJoCo backend's rendered camera, the joint
positions as its state and ``--prompt``. Chunks switch with real-time chunking (``--rtc``),
temporal ensembling (``--ensemble``) or the blend alone.
"""

from __future__ import annotations

import argparse
import os
import sys

from vlafast.robot.backends import make_backend
from vlafast.robot.policies import Delayed, Pi0ChunkPolicy
from vlafast.robot.report import write_cycle_report
from vlafast.robot.runner import RealtimeRunner
from vlafast.robot.servo import DOF, ServoConfig, format_stats


def add_parser(sub) -> None:
    from vlafast.robot import fake_ur

    p = sub.add_parser("robot", help="real-time UR5e control: run (servo loop + policy) | fake-ur (loopback controller)")
    robot_sub = p.add_subparsers(dest="robot_cmd", required=True)
    r = robot_sub.add_parser("run", help="async loop: inference thread + C++ servo on mujoco | ur-rtde | null; "
                             "scripted, pi0-reach or a policy folder (RTC, ensembling); per-cycle report")
    add_arguments(r)
    r.set_defaults(func=run)
    r = robot_sub.add_parser("fake-ur", help="a UR controller on loopback (RTDE, dashboard, script ports) that ur_rtde "
                             "drives: try `robot run --backend ur-rtde --host 127.0.0.1` against it")
    fake_ur.add_arguments(r)
    r.set_defaults(func=fake_ur.main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["mujoco", "ur-rtde", "null"], default="mujoco")
    p.add_argument("--host", default="", help="robot IP address (ur-rtde)")
    p.add_argument("--policy", default="sinusoid",
                   help="sinusoid (scripted), pi0-reach (the tiny pi0 reaching --target), or a policy folder whose "
                        "actions are joint positions")
    p.add_argument("--prompt", default="", help="the instruction a policy folder is given")
    p.add_argument("--joint-positions", action="store_true",
                   help="a policy folder whose spec does not say what its actions are outputs the 6 joint positions")
    p.add_argument("--policy-hz", type=float, default=20.0,
                   help="a policy folder's control rate: its chunk's waypoints are 1/hz apart (default 20)")
    p.add_argument("--tokenizer", default=None, help="a policy folder's tokenizer (default: its own)")
    p.add_argument("--fast-tokenizer", default=None,
                   help="pi0-FAST: its FAST processor folder (default: the policy folder's fast_tokenizer/)")

    p.add_argument("--hz", type=float, default=500.0, help="servo rate: 500 (e-series) or 125 (CB3)")
    p.add_argument("--seconds", type=float, default=None, help="run time (default: until Ctrl-C)")
    p.add_argument("--amplitude", type=float, default=0.2, help="sinusoid amplitude per joint (rad)")
    p.add_argument("--freq", type=float, default=0.5, help="sinusoid frequency (Hz)")
    p.add_argument("--latency-ms", type=float, default=0.0,
                   help="inference time per chunk: simulated (sinusoid), injected on top of the model's (pi0-reach)")
    p.add_argument("--chunk-exec", type=int, default=5, help="waypoints executed per chunk before replanning")
    p.add_argument("--blend", type=float, default=0.1, help="hand-over blend (s)")
    p.add_argument("--interp", choices=["spline", "cubic", "linear"], default="spline",
                   help="servo interpolant: Catmull-Rom (C1), clamped cubic spline (C2) or linear")
    p.add_argument("--no-realtime", action="store_true", help="do not ask for SCHED_FIFO")
    p.add_argument("--cpu", type=int, default=-1, help="pin the servo thread to this CPU")
    p.add_argument("--lookahead", type=float, default=0.1, help="servoJ lookahead (s, ur-rtde)")
    p.add_argument("--gain", type=float, default=300.0, help="servoJ gain (ur-rtde)")
    p.add_argument("--watchdog-hz", type=float, default=10.0,
                   help="the controller's RTDE watchdog stops the robot when the forwarder is silent for 1 / this (ur-rtde; 0: off)")
    p.add_argument("--report", default=None, help="write the per-cycle record, its plot and report.md to this folder")
    g = p.add_argument_group("pi0-reach")
    g.add_argument("--rtc", action="store_true", help="real-time chunking: sample each chunk guided by the executing plan")
    g.add_argument("--ensemble", type=float, default=0.0, help="temporal ensembling weight of each new chunk (0: off)")
    g.add_argument("--target", type=float, nargs=6, default=None, metavar="Q",
                   help="joint target (rad); default: home + U(-0.3, 0.3) per joint from --seed")
    g.add_argument("--seed", type=int, default=0, help="target and sampler noise seed")
    g.add_argument("--reach-weights", default="runs/pi0-reach.pt", help="trained weights: loaded, or trained and saved here")
    g.add_argument("--sft-steps", type=int, default=1500, help="training steps when --reach-weights does not exist")
    g.add_argument("--num-steps", type=int, default=10, help="flow integration steps per chunk")


def _reach_policy(args: argparse.Namespace):
    """(Pi0ChunkPolicy moving to the target, target [6])."""
    import numpy as np

    from vlafast.robot import reach

    target = np.asarray(args.target) if args.target else reach.random_target(np.random.default_rng(args.seed))
    loaded = os.path.exists(args.reach_weights)
    print(f"pi0-reach: {'loading' if loaded else f'training ({args.sft_steps} steps, ~1 min per 1500)'} "
          f"{args.reach_weights}", flush=True)
    model, make_observe, _ = reach.load_or_train(args.reach_weights, args.sft_steps)
    policy = Pi0ChunkPolicy(model, make_observe(target), dt=reach.DT, guided=args.rtc, num_steps=args.num_steps,
                            noise_seed=args.seed)
    return (Delayed(policy, args.latency_ms / 1e3) if args.latency_ms else policy), target


def _check(args: argparse.Namespace) -> None:
    """Every number in range before anything starts: one sentence naming the argument."""
    import math

    def need(name: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise ValueError(f"--{name.replace('_', '-')} must be {allowed}, got {getattr(args, name)}")

    finite = {k: getattr(args, k) for k in ("hz", "amplitude", "freq", "latency_ms", "blend", "ensemble",
                                            "lookahead", "gain", "policy_hz")}
    for name, v in finite.items():
        need(name, math.isfinite(v), "a finite number")
    need("hz", 1.0 <= args.hz <= 1000.0, "in [1, 1000] (500 for e-series, 125 for CB3)")
    need("seconds", args.seconds is None or (math.isfinite(args.seconds) and args.seconds > 0), "> 0")
    need("amplitude", 0.0 <= args.amplitude <= 1.0, "in [0, 1] rad (the sinusoid's swing per joint)")
    need("freq", 0.0 < args.freq <= 5.0, "in (0, 5] Hz")
    need("latency_ms", args.latency_ms >= 0, ">= 0")
    need("chunk_exec", args.chunk_exec >= 1, ">= 1")
    need("blend", args.blend >= 0, ">= 0")
    need("ensemble", 0.0 <= args.ensemble < 1.0, "in [0, 1)")
    need("num_steps", args.num_steps >= 1, ">= 1")
    need("policy_hz", 0.0 < args.policy_hz <= 1000.0, "in (0, 1000]")
    need("sft_steps", args.sft_steps >= 1, ">= 1")
    if args.ensemble and args.rtc:
        raise ValueError("choose one of --rtc and --ensemble")


class TokenChunkPolicy:
    """A pi0-FAST folder as a real-time chunk policy (unguided: chunks hand over with the runner's
    blend or ensembling): the backend's rendered camera, the joint positions as state, the
    prompt; each call decodes one greedy chunk [T, 6]."""

    name = "pi0fast"
    guided = False

    def __init__(self, policy, render, camera: str, prompt: str, *, dt: float) -> None:
        self.policy, self.render, self.camera, self.prompt, self.dt = policy, render, camera, prompt, dt
        self.horizon = policy.model.cfg.horizon

    def __call__(self, q, t: float, **_) -> "np.ndarray":
        import numpy as np

        image = self.render(self.policy.model.cfg.vision.image_size)[None]
        obs = {"images": {self.camera: image}, "state": np.asarray(q, np.float32)[None], "instruction": [self.prompt]}
        return self.policy.act_obs(obs)[0]


def _folder_policy(args: argparse.Namespace, robot):
    """A joint-position policy folder as a real-time chunk policy: the backend's rendered camera,
    the joint positions as state, ``--prompt`` as instruction."""
    import numpy as np

    from vlafast import policies
    from vlafast.policies.spec import EnvBinding

    policy = policies.load(args.policy, args.tokenizer, fast_tokenizer=args.fast_tokenizer)
    fast = isinstance(policy, policies.FASTPolicy)
    if not isinstance(policy, policies.FlowPolicy) and not fast:
        raise policies.PolicyError(f"{args.policy} is a {policy.spec.family} policy; the robot loop drives pi0 / pi0.5 / "
                                   "pi0-FAST policies whose actions are joint positions")
    if fast and args.rtc:
        raise policies.PolicyError("--rtc guides a flow sampler; pi0-FAST decodes tokens: drop --rtc (chunks hand over "
                                   "with --blend, or use --ensemble)")
    space = policy.spec.action_space
    if space != "joint_position" and not (space == "unknown" and args.joint_positions):
        hint = ("its folder does not say what its actions are: add --joint-positions if they are the UR5e's 6 joint "
                "positions" if space == "unknown" else "use a joint-space policy")
        raise policies.PolicyError(f"{args.policy} outputs {space} actions; the UR5e loop streams joint positions: {hint}")
    render = getattr(robot, "render", None)
    if render is None:
        raise policies.PolicyError(f"--policy {args.policy} needs camera images: use --backend mujoco (it renders the "
                                   f"arm); the {args.backend} backend has no camera here")
    cameras = policy.spec.env.cameras[:1] if policy.spec.env is not None else ("robot",)
    size = policy.model.cfg.vision.image_size
    dt = 1.0 / args.policy_hz  # waypoint spacing of the policy's chunks
    if fast:  # the whole decoded chunk goes to the runner, which executes --chunk-exec of it
        policy.bind(EnvBinding(cameras=cameras, action_dim=DOF, state_dim=DOF), exec_horizon=policy.model.cfg.horizon)
        return TokenChunkPolicy(policy, render, cameras[0], args.prompt, dt=dt)
    policy.bind(EnvBinding(cameras=cameras, action_dim=DOF, state_dim=DOF))

    def observe(q, t):
        image = render(size)[None]
        obs = {"images": {cameras[0]: image}, "state": np.asarray(q, np.float32)[None], "instruction": [args.prompt]}
        return policy.model_inputs(obs)

    return Pi0ChunkPolicy(policy.model, observe, dt=dt, guided=args.rtc, num_steps=args.num_steps, noise_seed=args.seed)


def run(args: argparse.Namespace) -> int:
    import os

    from vlafast.robot.policies import POLICIES, make_policy

    _check(args)
    os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering for policy folders; read when mujoco is imported
    kw = {"lookahead": args.lookahead, "gain": args.gain, "watchdog_hz": args.watchdog_hz} if args.backend == "ur-rtde" else {}
    robot = make_backend(args.backend, host=args.host, hz=args.hz, **kw)
    target = None
    if args.policy == "pi0-reach":
        policy, target = _reach_policy(args)
    elif args.policy in POLICIES:
        policy = make_policy(args.policy, amplitude=args.amplitude, freq_hz=args.freq, latency_s=args.latency_ms / 1e3)
    else:
        try:
            policy = _folder_policy(args, robot)
        except BaseException:
            robot.close()
            raise
        if args.latency_ms:
            policy = Delayed(policy, args.latency_ms / 1e3)
    cfg = ServoConfig(hz=args.hz, realtime=not args.no_realtime, cpu=args.cpu, interp=args.interp)
    runner = RealtimeRunner(policy, robot, hz=args.hz, chunk_exec=args.chunk_exec, blend_s=args.blend, config=cfg,
                            ensemble=args.ensemble)
    tty = sys.stdout.isatty()

    def show(stats: dict) -> None:
        line = format_stats(stats)
        print(f"\r{line}\033[K" if tty else line, end="" if tty else "\n", flush=True)

    mode = " + RTC" if args.rtc else (f" + ensembling {args.ensemble:g}" if args.ensemble else "")
    print(f"robot run: {args.backend} backend, {args.policy} policy{mode}, {args.hz:g} Hz; Ctrl-C brakes to rest and stops")
    code = 0
    try:
        stats = runner.run(args.seconds, on_stats=show)
    except KeyboardInterrupt:
        stats = runner.report(runner.loop.stats())
        code = 130
    if tty:
        print()
    print(format_stats(stats))
    fwd = getattr(robot, "forwarder_stats", None)
    if fwd:
        print(f"servoJ stream: {fwd['hz']:.1f} calls/s over {fwd['periods']} periods, period p50 {fwd['p50_ms']:.2f} ms "
              f"p99 {fwd['p99_ms']:.2f} ms max {fwd['max_ms']:.2f} ms, {fwd['late']} longer than 1.5 periods")
    log = robot.log() if callable(getattr(robot, "log", None)) else None
    if args.report:
        for path in write_cycle_report(runner, stats, args.report, log):
            print(f"wrote {path}")
    if target is not None:
        measured = log is not None and len(log["q"]) > 0
        q_end = log["q"][-1] if measured else stats["q"]
        err = max(abs(a - b) for a, b in zip(q_end, target))
        print(f"reach: max joint error to the target {err:.4f} rad ({'measured' if measured else 'commanded'})")
    if stats["reason"]:
        print(f"note: {stats['reason']}")
    for key in ("policy_error", "backend_error"):
        if stats.get(key):
            print(f"{key.replace('_', ' ')}: {stats[key]}")
            code = code or 1
    if stats["stop_reason"].startswith(("watchdog", "backend fault")):
        code = code or 1
    return code
