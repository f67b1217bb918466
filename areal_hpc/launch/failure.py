"""Why a job failed, in one line, from the error files its ranks left in ``RUN/errors/``.

A failing rank writes ``errors/rankN.txt`` (its one-line summary, then the traceback) and the first one
also ``errors/first`` (``comm.mpi.report_failure``). The launcher prints the first cause once, with where
its traceback is, instead of every rank's traceback: when all ranks hit the same bad input, or a rank's
death makes its peers fail, the console showed the same story several times and buried the cause.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from areal_hpc.comm.mpi import FIRST_FAILURE_FILE


@dataclass(frozen=True)
class Failure:
    summary: str  # "rank N failed: Type: message"
    path: Path  # the rank's error file, with the whole traceback


def _summary(path: Path) -> str | None:
    """The file's first line; None for an empty or unreadable file (a rank killed while writing it)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else None


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return 0


def first_failure(run_dir: Path) -> Failure | None:
    """The rank that failed first (the one that claimed ``errors/first``, else the oldest error file)."""
    errors = run_dir / "errors"
    candidates = sorted(errors.glob("rank*.txt"), key=_mtime)
    claimed = _summary(errors / FIRST_FAILURE_FILE)
    if claimed:
        candidates.insert(0, errors / claimed)
    for path in candidates:
        summary = _summary(path)
        if summary:
            return Failure(summary, path)
    return None


def failure_line(rc: int, run_dir: Path) -> str:
    """What the launcher prints when the job ended with exit code ``rc`` != 0."""
    failure = first_failure(run_dir)
    if failure is not None:
        return f"areal-hpc: {failure.summary}; full traceback in {failure.path}"
    empty = sorted(p.name for p in (run_dir / "errors").glob("rank*.txt"))
    note = f" ({', '.join(empty)} in {run_dir}/errors/ empty: killed while reporting)" if empty else ""
    return (f"areal-hpc: the MPI job ended with exit code {rc} and no rank reported an exception{note}: a rank was "
            f"killed (out of memory, a signal, or a node failure); see the mpiexec message above and {run_dir}/logs/")


def errors_aside(run_dir: Path, tag: str = "earlier") -> None:
    """Move an earlier attempt's error files aside when a run resumes: this attempt reports its own failure
    (``errors/first`` would still name the earlier one) and a finished resume is not shown as failed."""
    errors = run_dir / "errors"
    if errors.is_dir():
        errors.rename(errors.with_name(f"errors.{tag}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"))
