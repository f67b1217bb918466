"""``areal-hpc status SWEEP_DIR|RUN_DIR``: where each submitted run stands, as a table.

The state comes from the scheduler when it can tell (submitit's ``job.state``, i.e. ``sacct``; then
``squeue -j``, since many small clusters run without accounting), else from the run folder itself:
summary.json -> DONE, errors/ -> FAILED, metrics.jsonl -> RUNNING, a config only -> PENDING. Runs started
with ``submit --local`` have no scheduler, so their state is always the folder's.

Exit codes: 0 shown; 2 the path is not a sweep or run folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from areal_hpc.launch.run_dir import SUBMIT_FILE, SWEEP_FILE

log = logging.getLogger(__name__)

HELP = "state, latest step and accuracy of the runs of a sweep (or of one run) started by `areal-hpc submit`"

# Scheduler states that say nothing more than the run folder does.
_UNINFORMATIVE = {"", "UNKNOWN", "NA", "N/A"}
# Scheduler states of a job that is queued or still running.
_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
           "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING"}


@dataclass
class RunStatus:
    """One row of the table."""

    name: str
    job_id: str
    state: str
    step: int | None
    accuracy: float | None
    run_dir: str


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def latest_step(run_dir: Path) -> int | None:
    """``step`` of the last complete line of metrics.jsonl (a line being written is skipped)."""
    path = run_dir / "metrics.jsonl"
    try:
        lines = path.read_bytes().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def file_state(run_dir: Path) -> str:
    """The state the run folder shows, for runs without (reachable) scheduler accounting."""
    if (run_dir / "summary.json").exists():
        return "DONE"
    errors = run_dir / "errors"
    if errors.is_dir() and any(errors.iterdir()):
        return "FAILED"
    if (run_dir / "metrics.jsonl").exists():
        return "RUNNING"
    if not run_dir.exists():
        return "MISSING"
    return "PENDING"


def _squeue_state(job_id: str) -> str:
    if shutil.which("squeue") is None:
        return ""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                             timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    lines = out.stdout.split()
    return lines[0].strip() if out.returncode == 0 and lines else ""


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (child processes' stderr included) for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def scheduler_state(job_id: str | None, log_folder: str | None) -> str:
    """Slurm's word on a job: sacct through submitit, then squeue; '' when neither knows it."""
    if not job_id or job_id.startswith("local") or shutil.which("sacct") is None and shutil.which("squeue") is None:
        return ""
    state = ""
    if shutil.which("sacct") is not None:
        try:
            import submitit

            logging.getLogger("submitit").setLevel(logging.ERROR)  # its sacct warnings would clutter the table
            with _quiet_stderr():  # sacct's own complaints (no accounting, no config) would clutter the table
                state = submitit.SlurmJob(folder=log_folder or ".", job_id=job_id).state or ""
        except Exception as e:  # noqa: BLE001 - accounting off or unreachable: fall back, never fail
            log.debug("sacct state of %s unavailable: %s", job_id, e)
    state = state.split()[0] if state.strip() else ""  # "CANCELLED by 123" -> CANCELLED
    if state.upper() in _UNINFORMATIVE:
        state = _squeue_state(job_id)
    return state.upper()


def run_status(run_dir: Path, job_id: str | None, log_folder: str | None, name: str) -> RunStatus:
    sched = scheduler_state(job_id, log_folder)
    files = file_state(run_dir)
    # A summary beats a scheduler still tearing the job down; a queued or running job (a requeued one
    # included: its errors/ are the interrupted start's) beats the files; else the files, then Slurm.
    if files == "DONE" or not sched:
        state = files
    elif sched in _ACTIVE or files != "FAILED":
        state = sched
    else:
        state = files
    if state == "COMPLETED" and files != "DONE":
        state = "COMPLETED-NO-SUMMARY"
    acc = None
    summary = _load_json(run_dir / "summary.json") if files == "DONE" else None
    if isinstance(summary, dict) and isinstance(summary.get("accuracy_after"), (int, float)):
        acc = float(summary["accuracy_after"])
    return RunStatus(name, job_id or "-", state, latest_step(run_dir), acc, str(run_dir))


def collect(path: Path) -> list[RunStatus]:
    """Rows for a sweep folder (sweep.json) or a single run folder (submit.json, or just its files)."""
    sweep = _load_json(path / SWEEP_FILE)
    if isinstance(sweep, dict):
        rows = []
        for r in sweep.get("runs", []):
            run_dir = Path(r["run_dir"])
            rows.append(run_status(run_dir, r.get("job_id"), r.get("log_folder"), run_dir.name))
        return rows
    if (path / SUBMIT_FILE).exists() or (path / "config.yaml").exists():
        rec = _load_json(path / SUBMIT_FILE) or {}
        runs = rec.get("runs") or [{}]
        return [run_status(path, runs[0].get("job_id"), runs[0].get("log_folder"), path.name)]
    raise FileNotFoundError(f"{path} is neither a sweep folder (no {SWEEP_FILE}) nor a run folder (no config.yaml)")


def format_table(rows: list[RunStatus]) -> str:
    header = ("run", "job", "state", "step", "accuracy")
    body = [(r.name, r.job_id, r.state, "-" if r.step is None else str(r.step),
             "-" if r.accuracy is None or math.isnan(r.accuracy) else f"{r.accuracy:.3f}") for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in (header, *body)]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines.append(f"{len(rows)} run(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("path", type=Path, metavar="SWEEP_DIR|RUN_DIR", help="folder printed by `areal-hpc submit`")
    p.add_argument("--format", choices=("table", "json"), default="table", help="aligned text or one JSON list")
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``status`` on the top-level ``areal-hpc`` parser."""
    p = subparsers.add_parser("status", help=HELP, description=__doc__.split("\n\n")[0])
    configure(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        rows = collect(args.path)
    except FileNotFoundError as e:
        print(f"areal-hpc: {e}", file=sys.stderr)
        return 2
    if args.format == "json":
        print(json.dumps([r.__dict__ for r in rows], indent=2))
    else:
        print(format_table(rows))
    return 0
