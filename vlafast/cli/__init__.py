"""Command line: one module per command (`vlafast info | demo | eval | dictionary | steer | train |
robot | convert | bench`). The CLI only wires; the work lives in the library.

Errors a user can fix (a bad argument, a checkpoint that does not fit the job, a damaged file)
end in one sentence on stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys

from vlafast import _threads
from vlafast.cli import bench, convert, demo, dictionary, eval as eval_cmd, info, robot, steer, train

COMMANDS = (info, demo, eval_cmd, dictionary, steer, train, robot, convert, bench)
COMPUTE = ("demo", "eval", "dictionary", "steer", "train", "robot", "convert")  # bench sets its own threads


class UsageError(ValueError):
    """A command-line argument is out of range or does not fit the job (exit 2)."""


def build_parser() -> argparse.ArgumentParser:
    from vlafast import __version__

    parser = argparse.ArgumentParser(prog="vlafast", description="fast vision-language-action models")
    parser.add_argument("--version", action="version", version=f"vlafast {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v info, -vv debug logging")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: half the cores, 1 on a 2-core machine; env VLAFAST_THREADS)")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from vlafast.models.checkpoint import CheckpointError
    from vlafast.policies import PolicyError

    # OSError: a path that is a file where a folder is wanted, a folder that cannot be made or read;
    # ImportError: an optional package a file needs (sentencepiece for a .model tokenizer)
    return (UsageError, PolicyError, CheckpointError, OSError, ValueError, ImportError)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd in COMPUTE:
            line = _threads.configure(args.threads)
            if args.verbose or args.cmd == "demo":
                print(line, file=sys.stderr)
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `vlafast dictionary search ... | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return 0
    except _user_errors() as exc:
        if args.debug:
            raise
        print(f"vlafast {args.cmd}: error: {str(exc).strip()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
