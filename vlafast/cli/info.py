"""`vlafast info`: versions, devices, backends, whether _C is built."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="versions, devices, backends, whether _C is built")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vlafast import info

    print(info.render(info.collect()))
    return 0
