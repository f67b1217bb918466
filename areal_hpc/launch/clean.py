"""``areal-hpc clean``: remove the shared-memory segments (/dev/shm) of runs that are no longer alive.

A run's rings and shared weights (``areal_<run id>_*``) and MPICH's own segments (``mpich_shm_*``) live in
/dev/shm, i.e. in memory, until someone unlinks them; a killed job (SIGKILL, out of memory, a node
failure) cannot. The launcher removes dead segments after every job and rank 0 at every start, so this
command is for what a run on this node left without either (a job started by hand with mpiexec, killed).
A live run's segments are never touched (see ``transport.shm_ring.stale_segments``).

Exit codes: 0 cleaned (or nothing to clean).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from areal_hpc.transport.shm_ring import SHM_DIR, cleanup_stale, stale_segments

log = logging.getLogger(__name__)

HELP = "remove the /dev/shm segments of runs (and MPI jobs) on this node that are no longer alive"

# Ours (``transport.shm_ring.ring_name``, ``weights.select``) and MPICH's intranode segments.
SEGMENT_PREFIXES = ("areal_", "mpich_shm_")


def run_id_of(run_dir: Path) -> str:
    """Stable across restarts of the same run, so a later start finds a crashed run's segments."""
    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:10]


def remove_dead_segments() -> list[str]:
    """Unlink every segment of ours or MPICH's on this node whose owner is gone; the names removed."""
    return cleanup_stale(SEGMENT_PREFIXES)


def _size(name: str) -> int:
    try:
        return os.stat(os.path.join(SHM_DIR, name)).st_size
    except OSError:
        return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``clean`` on the top-level ``areal-hpc`` parser."""
    p = subparsers.add_parser("clean", help=HELP, description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="list what would be removed, remove nothing")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    names = stale_segments(SEGMENT_PREFIXES)
    size = sum(_size(n) for n in names)
    if not args.dry_run:
        names = remove_dead_segments()
    if not names:
        print(f"areal-hpc: nothing to clean in {SHM_DIR}")
        return 0
    verb = "would remove" if args.dry_run else "removed"
    print(f"areal-hpc: {verb} {len(names)} segment(s) of dead runs from {SHM_DIR} ({size / 2**20:.1f} MiB):")
    for n in names:
        print(f"  {n}")
    return 0
