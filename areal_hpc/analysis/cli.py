"""``areal-hpc analyze``: tables and plots of finished, crashed or running runs from their rollout log.

A sweep folder (``areal-hpc submit --sweep``), its ``sweep.json`` or a glob over it (``SWEEP_DIR/*``) stands for
the sweep's runs: they are labelled by their swept values and compared in one more table and figure. A point
of a sweep that has no log yet is left out with a note; a run folder named on its own must be readable.

Exit codes: 0 ok (damaged shards are skipped with a warning); 1 a damaged shard under ``--strict`` or an output
folder that cannot be written; 2 a RUN_DIR that is missing, empty or not a run folder, or an unreadable sweep.json.
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
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR|SWEEP_DIR", type=Path,
                   help="run folder(s), e.g. runs/quickstart, or a sweep folder (or its contents: SWEEP_DIR/*)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for CSV files and plots (default RUN_DIR/analysis, SWEEP_DIR/analysis for a sweep, "
                        "or ./analysis for several runs)")
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


def _out_dir(args: argparse.Namespace, runs: list[Any], sweep_dir: Path | None) -> Path:
    if args.out is not None:
        return args.out
    if sweep_dir is not None:
        return sweep_dir / "analysis"
    return runs[0].path / "analysis" if len(runs) == 1 else Path("analysis")


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


def _load(args: argparse.Namespace) -> tuple[list[Any], Path | None]:
    """The runs named on the command line, each once; raises what ``run`` turns into exit codes."""
    from areal_hpc.analysis.sweep import common_sweep, expand
    from areal_hpc.analysis.tables import RunFolderError, load_run

    targets = expand(args.run_dirs)
    runs = []
    for t in targets:
        try:
            runs.append(load_run(t.run_dir, strict=args.strict, point=t.point))
        except RunFolderError as e:
            if not t.by_sweep:
                raise
            # a point that failed early or has not started: the other points are still worth comparing
            print(f"areal-hpc analyze: sweep point left out: {e}", file=sys.stderr)
    if not runs:
        raise RunFolderError(f"{common_sweep(targets) or args.run_dirs[0]}: no point of the sweep has a readable "
                             f"log yet; see `areal-hpc status` for their state")
    return runs, common_sweep(targets)


def run(args: argparse.Namespace) -> int:
    """Load every run first (so a bad RUN_DIR fails before any output), then report and plot."""
    from areal_hpc.analysis.plots import plot_loaded
    from areal_hpc.analysis.sweep import SweepFileError
    from areal_hpc.analysis.tables import (
        RunFolderError,
        comparison_table,
        format_table,
        jsonable,
        render_run,
        run_to_json,
        tables_of,
    )
    from areal_hpc.storage.shards import ShardError

    try:
        runs, sweep_dir = _load(args)
    except (RunFolderError, SweepFileError) as e:
        print(f"areal-hpc analyze: {e}", file=sys.stderr)
        return 2
    except ShardError as e:
        print(f"areal-hpc analyze: damaged shard (--strict): {e}", file=sys.stderr)
        return 1
    tables = [tables_of(r, args.bins) for r in runs]
    compare = comparison_table(runs) if len(runs) > 1 else None
    out = _out_dir(args, runs, sweep_dir)
    try:
        written: list[Path] = []
        if args.format == "csv":
            out.mkdir(parents=True, exist_ok=True)
            for prefix, ts in zip(_prefixes(runs), tables):
                written += [_write_csv(df, out / f"{prefix}{name}.csv") for name, df in ts.items()]
            if compare is not None:
                written.append(_write_csv(compare, out / "compare.csv"))
        plots = [] if args.no_plots else plot_loaded(runs, out, args.bins)
    except OSError as e:
        print(f"areal-hpc analyze: cannot write to {out}: {e}", file=sys.stderr)
        return 1
    if args.format != "table":
        # stdout is for machines here; each left-out file is said once, on stderr (the table mode's header says it)
        for r in runs:
            for line in r.problems():
                print(f"areal-hpc analyze: WARNING: {line}", file=sys.stderr)
    if args.format == "json":
        obj: dict[str, Any] = {"runs": [run_to_json(r, t) for r, t in zip(runs, tables)],
                               "plots": [str(p) for p in plots]}
        if compare is not None:
            obj["compare"] = jsonable(compare.astype(object).to_dict("records"))
        if sweep_dir is not None:
            obj["sweep_dir"] = str(sweep_dir)
        print(json.dumps(obj, indent=2, allow_nan=False))
    elif args.format == "csv":
        for p in [*written, *plots]:
            print(p)
    else:
        parts = [render_run(r, t) for r, t in zip(runs, tables)]
        if compare is not None:
            title = f"Runs compared ({'sweep ' + str(sweep_dir) if sweep_dir else 'one row per run'})"
            parts.append(format_table(compare, title))
        print("\n\n\n".join(parts))
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
