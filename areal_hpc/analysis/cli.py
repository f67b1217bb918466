"""``areal-hpc analyze``: tables and plots of finished, crashed or running runs from their rollout log.

Exit codes: 0 ok (damaged shards are skipped with a warning); 1 a damaged shard under ``--strict`` or an output
folder that cannot be written; 2 a RUN_DIR that is missing, empty or not a run folder.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

HELP = "tables and plots of one or several runs from their HDF5 rollout logs"


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", type=Path, help="run folder(s), e.g. runs/quickstart")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for CSV files and plots (default RUN_DIR/analysis, or ./analysis for several runs)")
    p.add_argument("--format", choices=("table", "json", "csv"), default="table",
                   help="table: aligned text; json: one object on stdout; csv: one file per table in --out")
    p.add_argument("--bins", type=_positive_int, default=10, help="step ranges and time buckets per table")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--strict", action="store_true", help="fail on a damaged shard instead of skipping it")
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``analyze`` on the top-level ``areal-hpc`` parser."""
    p = subparsers.add_parser("analyze", help=HELP, description=HELP + ". " + __doc__.split("\n\n", 1)[1].strip())
    configure(p)
    p.set_defaults(func=run)
    return p


def _out_dir(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    return args.run_dirs[0] / "analysis" if len(args.run_dirs) == 1 else Path("analysis")


def _prefixes(runs: list[Any]) -> list[str]:
    """CSV file-name prefixes: none for one run, a unique safe run name for several."""
    if len(runs) == 1:
        return [""]
    out: list[str] = []
    for r in runs:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", r.name) or "run"
        name, k = base, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out.append(name)
    return [p + "_" for p in out]


def _write_csv(df: Any, path: Path) -> Path:
    df.to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL)
    return path


def run(args: argparse.Namespace) -> int:
    """Load every run first (so a bad RUN_DIR fails before any output), then report and plot."""
    from areal_hpc.analysis.plots import plot_loaded
    from areal_hpc.analysis.tables import RunFolderError, load_run, render_run, run_to_json, tables_of
    from areal_hpc.storage.shards import ShardError

    try:
        runs = [load_run(d, strict=args.strict) for d in args.run_dirs]
    except RunFolderError as e:
        print(f"areal-hpc analyze: {e}", file=sys.stderr)
        return 2
    except ShardError as e:
        print(f"areal-hpc analyze: damaged shard (--strict): {e}", file=sys.stderr)
        return 1
    tables = [tables_of(r, args.bins) for r in runs]
    out = _out_dir(args)
    try:
        written: list[Path] = []
        if args.format == "csv":
            out.mkdir(parents=True, exist_ok=True)
            for prefix, ts in zip(_prefixes(runs), tables):
                written += [_write_csv(df, out / f"{prefix}{name}.csv") for name, df in ts.items()]
        plots = [] if args.no_plots else plot_loaded(runs, out, args.bins)
    except OSError as e:
        print(f"areal-hpc analyze: cannot write to {out}: {e}", file=sys.stderr)
        return 1
    if args.format == "json":
        obj = {"runs": [run_to_json(r, t) for r, t in zip(runs, tables)], "plots": [str(p) for p in plots]}
        print(json.dumps(obj, indent=2, allow_nan=False))
    elif args.format == "csv":
        for p in [*written, *plots]:
            print(p)
    else:
        print("\n\n\n".join(render_run(r, t) for r, t in zip(runs, tables)))
        if plots:
            print("\nplots:\n" + "\n".join(f"  {p}" for p in plots))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (tests, ``python -m``); accepts argv with or without the leading ``analyze``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["analyze"]:
        argv = argv[1:]
    args = configure(argparse.ArgumentParser(prog="areal-hpc analyze", description=HELP)).parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
