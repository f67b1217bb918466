"""A process's logging: everything into its own file in the run folder, warnings and errors also to stderr.

Every process of a run (an MPI rank, an attached rollout worker) logs this way, each line tagged with who wrote
it, so ``RUN/logs/`` has one file per process and the console only what a person must see.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def setup_logging(path: Path, tag: str, level: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [{tag}] %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    fh = logging.FileHandler(path)
    fh.setFormatter(fmt)
    root.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    sh.setLevel(logging.WARNING)
    root.addHandler(sh)
