"""`vlafast demo`: the built-in demo (CPU, no downloads)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the built-in demo (CPU, no downloads)")
    p.add_argument("--out", default="runs", help="runs folder; the report goes to <out>/<date>/ (default runs)")
    p.add_argument("--seconds", type=float, default=2.0, help="servo-timing duration")
    p.add_argument("--quick", action="store_true", help="smoke-test budget (seconds, not minutes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlafast import demo

    return demo.main(args)
