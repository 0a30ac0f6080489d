"""`vlafast demo`: the built-in demo (CPU, no downloads).

For now it shows what this install can do and measures the real-time timing core; it grows
into the full steering + RL demo as those capabilities land.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlafast import info
from vlafast._io import atomic_write_text
from vlafast.bench import servo_timing


def main(args: argparse.Namespace) -> int:
    facts = info.collect()
    print("== vlafast info")
    print(info.render(facts))

    hz, seconds = 500.0, float(args.seconds)
    print(f"\n== servo timing: {hz:g} Hz absolute-deadline loop for {seconds:g} s, twice")
    ours = servo_timing.measure(hz, seconds, spin_us=100.0, realtime=True)
    base = servo_timing.measure(hz, seconds, spin_us=0.0, realtime=False)
    lines = [
        "| loop | policy | p50 us | p99 us | max us | missed / cycles |",
        "|---|---|---|---|---|---|",
    ]
    for label, r in (("vlafast (sleep + 100 us spin)", ours), ("baseline (sleep only)", base)):
        lines.append(
            f"| {label} | {r['policy']} | {r['p50_us']:.1f} | {r['p99_us']:.1f} | {r['max_us']:.1f} "
            f"| {r['missed']} / {r['cycles']} |"
        )
    table = "\n".join(lines)
    print(table)
    if ours["reason"]:
        print(f"note: {ours['reason']}")
    budget = servo_timing.JITTER_BUDGET_US
    verdict = "within" if ours["p99_us"] <= budget and ours["missed"] == 0 else "OUTSIDE"
    print(f"p99 jitter {ours['p99_us']:.1f} us is {verdict} the {budget:g} us budget")

    out = Path(args.out)
    facts_md = "\n".join(f"- **{k}**: {v}" for k, v in facts.items())
    report = f"# vlafast demo report\n\n## This install\n\n{facts_md}\n\n## Servo timing at {hz:g} Hz\n\n{table}\n"
    atomic_write_text(out / "report.md", report)
    print(f"\nreport written to {out / 'report.md'}")
    return 0
