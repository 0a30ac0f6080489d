"""`vlafast convert OLD.pt FOLDER`: a policy.pt of an older vlafast -> a policy folder, once."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a policy.pt of an older vlafast into a policy folder (read "
                                       "weights-only: tensors, numbers and strings, never code)")
    p.add_argument("src", help="the old policy.pt")
    p.add_argument("dst", help="the policy folder to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from vlafast.rl.recipe import convert_legacy

    dst = Path(args.dst)
    if dst.exists() and any(dst.iterdir()):
        raise ValueError(f"dst {dst} exists and is not empty: choose a new folder")
    print(f"reading {args.src} with torch.load(weights_only=True): only tensors, numbers, strings and containers "
          "are accepted, so the file cannot run code")
    print(f"wrote {convert_legacy(args.src, dst)}")
    return 0
