"""A real-time run, written for people after it ends: ``cycles.csv`` (one row per inference
cycle, ``runner.CYCLE_FIELDS`` plus the commanded jerk after each hand-over), ``cycles.png`` and
``report.md``. Nothing here runs in the control loop; matplotlib is imported only when a report
is written."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from vlafast._io import atomic_path, atomic_write_text
from vlafast.robot.runner import CYCLE_FIELDS, RealtimeRunner, boundary_jerk, command_stream


def write_cycle_report(runner: RealtimeRunner, stats: dict, out: str | Path, log: dict | None = None) -> list[Path]:
    """The run's per-cycle record as ``cycles.csv``, a plot ``cycles.png`` (inference latency,
    queue depth, frozen prefix vs consumed waypoints, hand-over jump and jerk) and ``report.md``.
    ``log``: the backend's log (``MujocoUR5eBackend.log()``: t_cmd, target) for the jerk of the
    commands at every hand-over. Files are written whole or not at all."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cyc = runner.cycles
    cols = {k: np.array([c[k] for c in cyc], dtype=np.float64) for k in CYCLE_FIELDS}
    jerk, jerk_away = (np.full(len(cyc), np.nan), float("nan"))
    if log is not None and len(log["t_cmd"]):
        jerk, jerk_away = boundary_jerk(*command_stream(log), cols["push_s"], max(runner.blend_s, 0.05))
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow([*CYCLE_FIELDS, "jerk_max"])
    for i, c in enumerate(cyc):
        writer.writerow([f"{c[k]:.6g}" for k in CYCLE_FIELDS] + [f"{jerk[i]:.6g}"])
    atomic_write_text(out / "cycles.csv", buf.getvalue())

    t = cols["obs_s"] - (cols["obs_s"][0] if len(cyc) else 0.0)
    fig, ax = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    ax[0].plot(t, cols["inference_ms"], ".-")
    ax[0].set_ylabel("inference ms")
    ax[1].plot(t, cols["queue_depth"], ".-", label="queue at observation")
    ax[1].plot(t, cols["consumed"], ".-", label="consumed until hand-over")
    ax[1].plot(t, cols["prefix"], ".-", label="RTC prefix d")
    ax[1].set_ylabel("waypoints")
    ax[1].legend(fontsize=8)
    ax[2].plot(t, cols["jump_rad"], ".-")
    ax[2].set_ylabel("hand-over jump rad")
    ax[3].semilogy(t, cols["jerk_plan"], ".-", label="plan jerk across hand-over (waypoints)")
    ax[3].semilogy(t, cols["jerk_new"], ".-", label="plan jerk inside the new chunk")
    ax[3].semilogy(t, jerk, ".-", alpha=0.6, label="max commanded jerk after hand-over (1 kHz)")
    if np.isfinite(jerk_away):
        ax[3].axhline(jerk_away, color="gray", ls="--", label="p99 commanded jerk elsewhere")
    ax[3].set_ylabel("jerk rad/s^3")
    ax[3].set_xlabel("time since first observation (s)")
    ax[3].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(out / "cycles.png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)

    def stat(x: np.ndarray, f=np.median) -> str:
        x = x[np.isfinite(x)]
        return f"{f(x):.3g}" if len(x) else "-"

    lines = [
        "# Real-time run", "",
        f"{len(cyc)} inference cycles, {stats.get('cycles', 0)} servo cycles, {stats.get('missed', 0)} missed deadlines, "
        f"stop: {stats.get('stop_reason', '')}", "",
        "| per cycle | median | max |", "|---|---|---|",
        f"| inference ms | {stat(cols['inference_ms'])} | {stat(cols['inference_ms'], np.max)} |",
        f"| queue depth (waypoints) | {stat(cols['queue_depth'])} | {stat(cols['queue_depth'], np.max)} |",
        f"| RTC prefix d | {stat(cols['prefix'])} | {stat(cols['prefix'], np.max)} |",
        f"| consumed until hand-over | {stat(cols['consumed'])} | {stat(cols['consumed'], np.max)} |",
        f"| hand-over jump (rad) | {stat(cols['jump_rad'])} | {stat(cols['jump_rad'], np.max)} |",
        f"| hand-over velocity jump (rad/s) | {stat(cols['jump_rad_s'])} | {stat(cols['jump_rad_s'], np.max)} |",
        f"| plan jerk across the hand-over (rad/s^3) | {stat(cols['jerk_plan'])} | {stat(cols['jerk_plan'], np.max)} |",
        f"| plan jerk inside the new chunk (rad/s^3) | {stat(cols['jerk_new'])} | {stat(cols['jerk_new'], np.max)} |",
        f"| commanded jerk after hand-over (rad/s^3, 1 kHz-scale: knots included) | {stat(jerk)} | {stat(jerk, np.max)} |", "",
        f"p99 jerk away from hand-overs: {jerk_away:.3g} rad/s^3.", "",
        "![cycles](cycles.png)", "",
        "Columns of cycles.csv: " + "; ".join(f"`{k}` {v}" for k, v in CYCLE_FIELDS.items()) + "; `jerk_max` max |jerk| "
        "of the commanded joints in the blend window after the hand-over.",
    ]
    atomic_write_text(out / "report.md", "\n".join(lines) + "\n")
    return [out / "cycles.csv", out / "cycles.png", out / "report.md"]
