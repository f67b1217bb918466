"""``areal-hpc``: the command-line entry point.

This module only wires the sub-commands together; each lives with its part (``launch.train``,
``launch.evaluate``, ``launch.submit``, ``launch.status``, ``launch.clean``, ``analysis.cli``, ``bench``) and
none imports this one.
"""

from __future__ import annotations

import argparse
import logging
import sys

from areal_hpc.analysis.cli import add_parser as add_analyze
from areal_hpc.bench import add_parser as add_bench
from areal_hpc.launch.attach import add_parser as add_attach
from areal_hpc.launch.clean import add_parser as add_clean
from areal_hpc.launch.evaluate import add_parser as add_eval
from areal_hpc.launch.status import add_parser as add_status
from areal_hpc.launch.submit import add_parser as add_submit
from areal_hpc.launch.train import add_parser as add_train


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="areal-hpc", description="Fully asynchronous RL for LLMs on Slurm/MPI")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_train, add_eval, add_analyze, add_submit, add_attach, add_status, add_clean, add_bench):
        add(sub)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # before a command's own handler is up (imports, the MPS daemon's start)
        print("areal-hpc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
