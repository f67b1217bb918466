"""``areal-hpc attach RUN_DIR``: extra rollout workers for a running run, as a Slurm job array or here.

Each array task is one worker (one process, its own job: a preemptible partition may take any of them at any
time) that runs the worker loop with the run's own config (``elastic.attachable``). Slurm's two ways of ending a
job both reach the worker: ``--signal=USR1@S`` asks for SIGUSR1 S seconds before the time limit, and a
preemption sends SIGTERM; on either it finishes its open shard and leaves. Neither requeues the task: a worker
that left simply left (its grants go back to the pool), and the user attaches again when GPUs free up.
``--local`` runs the same loop in this process, in the foreground.

submitit is imported lazily, as in ``launch.submit``, so ``--local`` works without it.

Exit codes: 0 submitted (``--local``: the worker's own code); 1 the submission failed; 2 the run cannot take a
worker, or bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import math
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from areal_hpc.config import Config
from areal_hpc.elastic.attachable import AttachError, check_attachable
from areal_hpc.elastic.layout import ElasticFiles
from areal_hpc.launch.submit import UsageError, _key_value, _OverridesAnywhere

log = logging.getLogger(__name__)

HELP = "add rollout workers to a running run: a Slurm job array (submitit) or one worker here (--local)"
DEFAULT_ENTRY = "areal_hpc.elastic.worker:run_worker"
SLURM_DIR = "slurm"  # under RUN/elastic/: submitit's pickles and the array tasks' logs
_ENTRY = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


# --------------------------------------------------------------------------- what every array task runs


def resolve_entry(entry: str) -> Any:
    """``package.module:function`` -> the function."""
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)


class AttachTask:
    """What every array task executes: the worker loop for the run, until the run ends or Slurm stops it.

    Picklable (three strings and a list), so submitit can ship it. Deliberately not a submitit
    ``Checkpointable``: there is nothing to resume, a worker that left is simply gone.
    """

    def __init__(self, run_dir: str, overrides: list[str], entry: str = DEFAULT_ENTRY) -> None:
        self.run_dir = str(run_dir)
        self.overrides = list(overrides)
        self.entry = entry

    def __call__(self) -> int:
        # submitit ignores SIGTERM (it waits for its own USR2) and would requeue on USR2. Until the worker
        # installs its handlers (after imports and building its engine), a preemption's TERM ends the process at
        # once, which costs nothing (nothing granted to it is decoded yet, and its lease expires); a USR2 from
        # `scancel --signal=USR2` or submitit's own interrupt becomes a TERM, so it leaves rather than requeues.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGUSR2, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))
        rc = int(resolve_entry(self.entry)(Path(self.run_dir), self.overrides) or 0)
        if rc:
            raise SystemExit(rc)  # the task (and sacct) show a failure, not submitit's COMPLETED
        return rc

    def __repr__(self) -> str:
        return f"AttachTask({self.run_dir!r}, {self.overrides!r}, entry={self.entry!r})"


# --------------------------------------------------------------------------- Slurm


@dataclass
class AttachOptions:
    """The scheduler side of an attach, from the command line."""

    tasks: int = 1
    parallelism: int | None = None  # at most this many tasks at once (sbatch's %N)
    partition: str | None = None
    time_min: int | None = None  # default: the run's watchdog run.timeout_s plus 10 minutes
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None
    account: str | None = None
    qos: str | None = None
    job_name: str | None = None  # default: RUN_NAME-attach
    signal_delay_s: int = 90
    extra: dict[str, str] = field(default_factory=dict)


def parse_array(spec: str) -> tuple[int, int | None]:
    """sbatch's ``--array`` syntax (``0-7``, ``0-15%4``, ``1,3,5``) -> (number of tasks, parallelism).

    The indices only count tasks: every worker is the same and takes its id when it registers.
    """
    body, pct, limit = spec.strip().partition("%")
    indices: set[int] = set()
    try:
        for part in body.split(","):
            lo, dash, hi = part.partition("-")
            first, last = int(lo), int(hi) if dash else int(lo)
            if first < 0 or last < first:
                raise ValueError(part)
            indices.update(range(first, last + 1))
        parallel = int(limit) if pct else None
    except ValueError:
        raise UsageError(f"--array {spec!r} is not an index range; write it as sbatch does, e.g. --array 0-7 "
                         f"(8 workers) or --array 0-15%4 (16, at most 4 at once)") from None
    if parallel is not None and parallel < 1:
        raise UsageError(f"--array {spec!r}: the limit after % must be >= 1")
    return len(indices), parallel


def slurm_parameters(cfg: Config, opts: AttachOptions) -> dict[str, Any]:
    """sbatch parameters (submitit ``SlurmExecutor`` names) of one worker task."""
    extra: dict[str, Any] = {
        # submitit writes --signal=USR2@...; the worker's signal is USR1 (USR2 would make submitit requeue it)
        "signal": f"USR1@{opts.signal_delay_s}",
        "no_requeue": True,  # nor Slurm itself after a preemption: the user re-attaches
        **opts.extra,
    }
    params: dict[str, Any] = {
        "job_name": opts.job_name or f"{cfg.run.name}-attach",
        "nodes": 1,
        "ntasks_per_node": 1,
        "time": opts.time_min if opts.time_min is not None else math.ceil(cfg.run.timeout_s / 60) + 10,
        "setup": ["export PYTHONUNBUFFERED=1"],
        "additional_parameters": extra,
    }
    if opts.parallelism is not None:
        params["array_parallelism"] = opts.parallelism
    for key in ("partition", "gpus_per_task", "cpus_per_task", "mem", "account", "qos"):
        if getattr(opts, key) is not None:
            params[key] = getattr(opts, key)
    return params


def build_executor(run_dir: Path, cfg: Config, opts: AttachOptions) -> Any:
    """A submitit ``SlurmExecutor`` for the run's workers; its folder (``RUN/elastic/slurm/%j``) holds their logs."""
    import submitit

    folder = ElasticFiles(run_dir.resolve()).root / SLURM_DIR / "%j"
    executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=0)
    executor.update_parameters(**slurm_parameters(cfg, opts))
    return executor


def sbatch_script(executor: Any, tasks: int) -> str:
    """The script submitit writes for ``tasks`` workers (an array when more than one), as it would submit it."""
    if tasks > 1:
        executor.parameters["map_count"] = tasks  # what submitit sets for a batch of several submissions
    try:
        return executor._make_submission_file_text(executor._submitit_command_str, "dry-run")
    finally:
        executor.parameters.pop("map_count", None)


def submit_array(run_dir: Path, cfg: Config, overrides: list[str], opts: AttachOptions, entry: str) -> list[Any]:
    """Submit ``opts.tasks`` workers as one job array; returns submitit's jobs."""
    executor = build_executor(run_dir, cfg, opts)
    task = AttachTask(str(run_dir.resolve()), overrides, entry)
    if opts.tasks == 1:
        return [executor.submit(task)]
    with executor.batch():
        jobs = [executor.submit(task) for _ in range(opts.tasks)]
    return jobs


# --------------------------------------------------------------------------- command line


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="folder of the running run (run.output_dir/run.name)")
    p.add_argument("overrides", nargs="*",
                   help="per-worker keys only (rollout.engine, rollout.dtype, model.device, vllm.*, ...); every other "
                        "key must equal the run's")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true",
                       help="run one worker here, in the foreground (add & or use tmux/screen to keep the shell)")
    where.add_argument("--array", metavar="SPEC",
                       help="submit a Slurm job array of workers, sbatch's syntax: 0-7 is 8 workers, 0-15%%4 at most 4 "
                            "at once")
    p.add_argument("--partition", default=None, help="Slurm partition (a scavenger/preemptible one suits workers)")
    p.add_argument("--gpus-per-task", type=int, default=None, metavar="N", help="GPUs per worker")
    p.add_argument("--cpus-per-task", type=int, default=None, metavar="N", help="CPU cores per worker")
    p.add_argument("--time", type=int, default=None, metavar="MIN",
                   help="time limit per worker in minutes (default: the run's run.timeout_s plus 10 minutes)")
    p.add_argument("--mem", default=None, help="memory per node, sbatch's syntax (e.g. 64G)")
    p.add_argument("--account", default=None, help="Slurm account")
    p.add_argument("--qos", default=None, help="Slurm quality of service")
    p.add_argument("--name", default=None, help="Slurm job name (default: RUN_NAME-attach)")
    p.add_argument("--signal-delay", type=int, default=90, metavar="S",
                   help="seconds before the time limit at which Slurm sends SIGUSR1, so the worker finishes its shard")
    p.add_argument("--sbatch", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --sbatch constraint=a100")
    p.add_argument("--dry-run", action="store_true", help="with --array: print the sbatch script, submit nothing")
    p.add_argument("--entry", default=DEFAULT_ENTRY, help=argparse.SUPPRESS)  # tests: their own worker function
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``attach`` on the top-level ``areal-hpc`` parser."""
    p = subparsers.add_parser("attach", help=HELP, description=__doc__.split("\n\n")[0])
    p.__class__ = _OverridesAnywhere  # subparsers build plain parsers; this one also takes late overrides
    configure(p)
    p.set_defaults(func=run)
    return p


def _options(args: argparse.Namespace) -> AttachOptions:
    if args.local and args.dry_run:
        raise UsageError("--dry-run prints the sbatch script of --array; --local submits nothing")
    if not _ENTRY.fullmatch(args.entry) or importlib.util.find_spec(args.entry.partition(":")[0]) is None:
        raise UsageError(f"--entry {args.entry!r} is not an importable 'package.module:function'")
    for flag, value in (("--gpus-per-task", args.gpus_per_task), ("--cpus-per-task", args.cpus_per_task),
                        ("--time", args.time)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    if args.signal_delay < 0:
        raise UsageError(f"--signal-delay must be >= 0, got {args.signal_delay}")
    tasks, parallelism = parse_array(args.array) if args.array is not None else (1, None)
    return AttachOptions(tasks=tasks, parallelism=parallelism, partition=args.partition, time_min=args.time,
                         gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task, mem=args.mem,
                         account=args.account, qos=args.qos, job_name=args.name, signal_delay_s=args.signal_delay,
                         extra=dict(args.sbatch))


def run(args: argparse.Namespace) -> int:
    try:
        cfg = check_attachable(args.run_dir, args.overrides)
        opts = _options(args)
    except (AttachError, UsageError) as e:
        print(f"areal-hpc: {e}", file=sys.stderr)
        return 2
    run_dir: Path = args.run_dir
    if args.local:
        print(f"areal-hpc: a worker attaches to {run_dir} here; stop it with Ctrl-C (it finishes its open shard)",
              file=sys.stderr, flush=True)
        return int(resolve_entry(args.entry)(run_dir, list(args.overrides)) or 0)
    try:
        executor = build_executor(run_dir, cfg, opts)
        if args.dry_run:
            print(sbatch_script(executor, opts.tasks), end="")
            return 0
        jobs = submit_array(run_dir, cfg, list(args.overrides), opts, args.entry)
    except ImportError:
        print("areal-hpc: submitting to Slurm needs submitit: `pip install 'submitit>=1.5'`", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - sbatch refused (no Slurm, bad partition...): one line, not a traceback
        first = str(e).strip().splitlines()
        print(f"areal-hpc: submission failed: {type(e).__name__}: {first[0] if first else ''}", file=sys.stderr)
        return 1
    for job in jobs:
        print(f"job {job.job_id}  logs {job.paths.stdout}")
    array = str(jobs[0].job_id).split("_")[0]
    print(f"submitted {len(jobs)} worker(s) (job {array}) to {run_dir}; follow them with: areal-hpc status {run_dir}")
    return 0


__all__ = ["AttachOptions", "AttachTask", "add_parser", "build_executor", "parse_array", "sbatch_script",
           "slurm_parameters", "submit_array"]
