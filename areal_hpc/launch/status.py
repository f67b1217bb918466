"""``areal-hpc status SWEEP_DIR|RUN_DIR``: where each submitted run stands, as a table.

The state comes from the scheduler when it can tell (submitit's ``job.state``, i.e. ``sacct``; then
``squeue -j``, since many small clusters run without accounting), else from the run folder itself (runs
started with ``train`` or ``submit --local`` have no scheduler, so their state is always the folder's):

- RUNNING: a rank of the run is alive (``ranks/rank*.json``: its pid on this host; on another host, the
  run's files written within ``HEARTBEAT_S``);
- PREEMPTED: stopped by a signal or Ctrl-C after a checkpoint; the detail gives the command that resumes it;
- FAILED: a rank recorded an error (``errors/``), or the ranks are gone without a summary; the detail says why;
- DONE: ``summary.json`` of a finished run; PENDING: nothing started yet.

A run with attached rollout workers (``areal-hpc attach``) also gets a table of them, from their leases in
``RUN/elastic/workers/``: starting, ready, left (with why) or expired (no heartbeat within the run's
``elastic.lease_s``: killed, or its node is gone), its weights version, samples and samples/s over its uptime.

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
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from areal_hpc.config import load_config
from areal_hpc.config.elastic import ElasticConfig
from areal_hpc.elastic.layout import ElasticFiles
from areal_hpc.elastic.lease import read_leases
from areal_hpc.launch.failure import first_failure
from areal_hpc.launch.preempt import resume_command
from areal_hpc.launch.run_dir import SUBMIT_FILE, SWEEP_FILE
from areal_hpc.storage.records import strict_json

log = logging.getLogger(__name__)

HELP = "state, latest step and accuracy of the runs of a sweep (or of one run) started by `areal-hpc submit`"

# Scheduler states that say nothing more than the run folder does.
_UNINFORMATIVE = {"", "UNKNOWN", "NA", "N/A"}
# Scheduler states of a job that is queued or still running.
_ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
           "SUSPENDED", "RESIZING", "STAGE_OUT", "SIGNALING"}
# A run whose ranks are on other hosts (no pid to ask) counts as alive while its files changed this recently.
HEARTBEAT_S = 900.0


@dataclass
class RunStatus:
    """One row of the table."""

    name: str
    job_id: str
    state: str
    step: int | None
    accuracy: float | None
    run_dir: str
    detail: str = ""  # RUNNING: which ranks; PREEMPTED: the resume command; FAILED: the cause


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


@dataclass
class FolderState:
    state: str
    detail: str = ""


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _short(host: str) -> str:
    return host.split(".")[0]


def _is_rank(pid: int) -> bool:
    """Whether ``pid`` lives and is one of ours (a recycled pid of another program is not the rank)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        return b"areal_hpc" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return not os.path.isdir("/proc")  # no /proc to ask: the pid's existence must do


def alive(run_dir: Path) -> str | None:
    """Why the run counts as alive ("ranks 0, 1 alive (pids ...)"), or None when nothing of it runs."""
    ranks = [r for r in (_load_json(p) for p in sorted((run_dir / "ranks").glob("rank*.json"))) if isinstance(r, dict)]
    here = _short(socket.gethostname())
    local = [r for r in ranks if _short(str(r.get("host", ""))) == here and isinstance(r.get("pid"), int)]
    if local:  # every rank of an MPI job lives as long as the job: a dead one here means a dead job
        live = [r for r in local if _is_rank(r["pid"])]
        if not live:
            return None
        pids = ", ".join(str(r["pid"]) for r in live)
        return f"{len(live)} rank(s) alive on this host (pids {pids})"
    beats = [run_dir / "metrics.jsonl", *(run_dir / "ranks").glob("rank*.json"), *(run_dir / "logs").glob("*.log")]
    last = max((_mtime(p) for p in beats), default=0.0)
    age = time.time() - last
    if last and age < HEARTBEAT_S:
        where = f"on {', '.join(sorted({str(r.get('host')) for r in ranks}))}" if ranks else "starting"
        return f"{where}; last write {age:.0f} s ago"
    return None


def _first_error(run_dir: Path) -> tuple[str, float] | None:
    """The first failure (the rank that claimed it, whose abort the others follow; ``launch.failure``, which
    the launcher's one line also reads) and the newest error's time."""
    errors = [p for p in (run_dir / "errors").glob("rank*.txt") if p.is_file()]
    if not errors:
        return None
    errors.sort(key=_mtime)
    failure = first_failure(run_dir)
    cause = failure.summary if failure is not None else \
        f"{errors[0].stem} failed; its error file is empty (killed while writing it)"
    if len(errors) > 1:
        cause += f" (+{len(errors) - 1} more in {run_dir / 'errors'})"
    return cause, _mtime(errors[-1])


def folder_state(run_dir: Path) -> FolderState:
    """The state the run folder (and this host's processes) show, for runs without scheduler accounting."""
    if not run_dir.exists():
        return FolderState("MISSING")
    started_t = max((_mtime(p) for p in (run_dir / "ranks").glob("rank*.json")), default=0.0)
    summary_t = _mtime(run_dir / "summary.json")
    summary = _load_json(run_dir / "summary.json") if summary_t >= started_t else None  # not an earlier attempt's
    summary = summary if isinstance(summary, dict) else None
    # A finished run's summary beats ranks still tearing down.
    if summary is not None and not summary.get("preempted"):
        return FolderState("DONE")
    resumable = (run_dir / "checkpoints" / "latest.json").exists()
    resume = f"; resume from its last checkpoint with: {resume_command(run_dir)}" if resumable else ""
    # An error of this attempt ends the job (the rank aborts it), even while its peers are still exiting.
    error = _first_error(run_dir)
    if error is not None and error[1] >= started_t and (summary is None or error[1] > summary_t):
        return FolderState("FAILED", error[0] + resume)
    why_alive = alive(run_dir)
    if why_alive:
        return FolderState("RUNNING", why_alive)
    if summary is not None and summary.get("preempted"):
        step = f"at step {summary.get('final_version')} of {summary.get('steps')}"
        if not resumable:
            return FolderState("PREEMPTED", f"stopped {step}, but no checkpoint is left: the run starts over")
        return FolderState("PREEMPTED", f"stopped {step}; resume with: {resume_command(run_dir)}")
    if started_t or (run_dir / "metrics.jsonl").exists() or any((run_dir / "logs").glob("*.log")):
        return FolderState("FAILED", "the ranks are gone without a summary or an error record: killed (a "
                                     "second Ctrl-C, out of memory, a signal, a node failure); see "
                                     f"{run_dir / 'logs'}{resume}")
    return FolderState("PENDING")


def file_state(run_dir: Path) -> str:
    """``folder_state``'s state alone."""
    return folder_state(run_dir).state


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
    files = folder_state(run_dir)
    # A summary beats a scheduler still tearing the job down; a queued or running job (a requeued one
    # included: its errors/ are the interrupted start's) beats the files; a stop the files explain beats
    # Slurm's word for it (CANCELLED, COMPLETED); else Slurm's (TIMEOUT, OUT_OF_MEMORY...).
    if files.state == "DONE" or not sched:
        state = files.state
    elif sched in _ACTIVE or files.state not in ("PREEMPTED", "FAILED"):
        state = sched
    else:
        state = files.state
    if state == "COMPLETED" and files.state != "DONE":
        state = "COMPLETED-NO-SUMMARY"
    acc = None
    summary = _load_json(run_dir / "summary.json") if state == "DONE" else None
    if isinstance(summary, dict) and isinstance(summary.get("accuracy_after"), (int, float)):
        acc = float(summary["accuracy_after"])
        acc = acc if math.isfinite(acc) else None
    detail = files.detail if state == files.state else ""
    return RunStatus(name, job_id or "-", state, latest_step(run_dir), acc, str(run_dir), detail)


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
    header = ("run", "job", "state", "step", "accuracy", "detail")
    body = [(r.name, r.job_id, r.state, "-" if r.step is None else str(r.step),
             "-" if r.accuracy is None or math.isnan(r.accuracy) else f"{r.accuracy:.3f}", r.detail) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in (header, *body)]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines.append(f"{len(rows)} run(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)


@dataclass
class WorkerStatus:
    """One attached worker, from its last lease."""

    worker: int
    job: str
    host: str
    state: str  # starting | ready | left | expired
    version: int  # weights version its engine runs (-1: none loaded yet)
    samples: int
    samples_per_s: float | None  # over its uptime; None before its first heartbeat after the start
    uptime_s: float  # from its start to its last heartbeat
    heartbeat_age_s: float
    reason: str = ""  # why it left


def _lease_s(run_dir: Path) -> float:
    """The run's ``elastic.lease_s``; the default when its config does not load here (a model path of another
    machine): the table is still worth showing."""
    try:
        return load_config(run_dir / "config.yaml").elastic.lease_s
    except (ValueError, OSError):
        return ElasticConfig().lease_s


def workers(run_dir: Path, now: float | None = None) -> list[WorkerStatus]:
    """The run's attached workers, by id; empty when none ever attached."""
    files = ElasticFiles(run_dir)
    leases = read_leases(files)
    if not leases:
        return []
    now = time.time() if now is None else now
    lease_s = _lease_s(run_dir)
    rows = []
    for wid, lease in sorted(leases.items()):
        uptime = max(0.0, lease.time - lease.started)
        rows.append(WorkerStatus(
            worker=wid, job=lease.job, host=_short(lease.host),
            state="expired" if lease.expired(now, lease_s) else lease.state, version=lease.version,
            samples=lease.samples, samples_per_s=lease.samples / uptime if uptime > 0 else None, uptime_s=uptime,
            heartbeat_age_s=max(0.0, now - lease.time), reason=lease.reason))
    return rows


def _duration(s: float) -> str:
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def format_workers(name: str, rows: list[WorkerStatus]) -> str:
    header = ("worker", "job", "host", "state", "version", "samples", "samples/s", "uptime", "heartbeat", "reason")
    body = [(f"w{r.worker:04d}", r.job, r.host, r.state, "-" if r.version < 0 else str(r.version), str(r.samples),
             "-" if r.samples_per_s is None else f"{r.samples_per_s:.2f}", _duration(r.uptime_s),
             f"{r.heartbeat_age_s:.0f}s ago", r.reason) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    lines = [f"attached workers of {name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in (header, *body)]
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
    attached = {r.run_dir: workers(Path(r.run_dir)) for r in rows}
    if args.format == "json":
        out = [{**asdict(r), "workers": [asdict(w) for w in attached[r.run_dir]]} if attached[r.run_dir] else asdict(r)
               for r in rows]
        print(json.dumps(strict_json(out), indent=2, allow_nan=False))
    else:
        print(format_table(rows))
        for r in rows:
            if attached[r.run_dir]:
                print(f"\n{format_workers(r.name, attached[r.run_dir])}")
    return 0
