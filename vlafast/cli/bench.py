"""`vlafast bench list | plot CSV | import DIR | all | <name>`: benchmarks in the one result schema."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub) -> None:
    from vlafast.bench import BENCHMARKS

    p = sub.add_parser(
        "bench", help="run benchmarks; results go to bench/results/<device>.csv",
        description="vlafast bench list | plot CSV | import DIR | all | <name> [options]  (see `vlafast bench <name> -h`)",
    )
    p.add_argument("bench_cmd", choices=["list", "plot", "import", "all", *BENCHMARKS],
                   metavar="{list,plot,import,all,<name>}")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.bench_cmd == "import":
        return _cmd_bench_import(args.rest)
    if args.bench_cmd == "plot":
        q = argparse.ArgumentParser(prog="vlafast bench plot", description="turn a results CSV into PNGs")
        q.add_argument("csv")
        q.add_argument("-o", "--out-dir", default=None, help="default: <csv folder>/plots")
        args = argparse.Namespace(**vars(args), **vars(q.parse_args(args.rest)))
    return _cmd_bench(args)


def _where_parser(prog: str = "vlafast bench all", add_help: bool = True) -> argparse.ArgumentParser:
    """Options shared by every benchmark run: where the results CSV goes."""
    p = argparse.ArgumentParser(prog=prog, add_help=add_help)
    p.add_argument("--results-dir", default="bench/results", help="where <device>.csv goes")
    p.add_argument("--out", default=None, help="explicit CSV path (overrides --results-dir)")
    return p


def _bench_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of one benchmark: its own options plus where results go."""
    from vlafast.bench import BENCHMARKS

    bench = BENCHMARKS[name]
    p = argparse.ArgumentParser(
        prog=f"vlafast bench {name}", description=bench.help, parents=[_where_parser(add_help=False)]
    )
    bench.load().add_arguments(p)
    return p


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from vlafast.bench import BENCHMARKS
    from vlafast.bench.core import default_results_path, format_table, write_rows

    if args.bench_cmd == "list":
        for b in BENCHMARKS.values():
            print(f"{b.name:16s} {'[gpu] ' if b.gpu_only else ''}{b.help}")
        return 0
    if args.bench_cmd == "plot":
        from vlafast.bench.plot import plot_results

        for path in plot_results(args.csv, args.out_dir or Path(args.csv).parent / "plots"):
            print(f"wrote {path}")
        return 0

    if args.bench_cmd == "all":
        # Each benchmark with its own defaults; only where results go is shared.
        where = _where_parser().parse_args(args.rest)
        runs = [(name, _bench_parser(name).parse_args([])) for name in BENCHMARKS]
        for _, ns in runs:
            ns.results_dir, ns.out = where.results_dir, where.out
    else:
        where = _bench_parser(args.bench_cmd).parse_args(args.rest)
        runs = [(args.bench_cmd, where)]

    rows = []
    for name, ns in runs:
        bench = BENCHMARKS[name]
        if bench.gpu_only and not torch.cuda.is_available():
            print(f"skip {name}: needs a CUDA device")
            continue
        missing = bench.missing()
        if missing:
            print(f"skip {name}: needs {', '.join(missing)} (pip install 'vlafast[robot,sim]')")
            continue
        print(f"== {name}: {bench.help}", flush=True)
        rows += bench.load().run(ns)
    if not rows:
        print("no benchmark rows produced")
        return 1
    print(format_table(rows))
    out = Path(where.out) if where.out else default_results_path(where.results_dir)
    write_rows(rows, out)
    print(f"wrote {len(rows)} row(s) to {out}")
    return 0


def _cmd_bench_import(rest: list[str]) -> int:
    import importlib.util

    import vlafast

    # Developer tooling, not shipped in the wheel: this checkout's tools/harvest.py.
    harvest_py = Path(vlafast.__file__).resolve().parent.parent / "tools" / "harvest.py"
    if not harvest_py.is_file():
        print(f"vlafast bench import runs from a source checkout (it needs tools/harvest.py, not found at {harvest_py})",
              file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("tools.harvest", harvest_py)
    harvest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harvest)
    import_run = harvest.import_run

    q = argparse.ArgumentParser(prog="vlafast bench import",
                                description="file a `make gpu-check OUT=DIR` run into bench/results and docs/benchmarks.md")
    q.add_argument("dir", help="the OUT folder of gpu-check")
    q.add_argument("--results-dir", default="bench/results")
    q.add_argument("--readme", default="docs/benchmarks.md",
                   help="the document whose bench-table is rewritten ('' for none)")
    q.add_argument("--no-plots", action="store_true")
    a = q.parse_args(rest)
    for path in import_run(a.dir, a.results_dir, a.readme or None, plots=not a.no_plots):
        print(f"wrote {path}")
    return 0
