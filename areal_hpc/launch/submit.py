"""``areal-hpc submit``: one run or a sweep of runs as Slurm jobs (through submitit), or on this machine.

One run is one Slurm job whose tasks are the MPI ranks: ``srun --mpi=pmi2`` starts ``n_trainer + n_rollout``
tasks, each unpickles ``RunTask`` and becomes one rank of ``areal_hpc.launch.job.main``. A sweep is the
cartesian product of ``--sweep key=v1,v2`` values; every point is an independent MPI job (array tasks never
share an MPI world) with its own run folder ``SWEEP_DIR/<key=value_...>``, and ``SWEEP_DIR/sweep.json`` records
the points, job ids, run folders and the submitit log folder for ``areal-hpc status``.

Every point's config is loaded (and so validated) before anything is submitted, so a typo in a sweep key fails
at once with the config loader's one-line message instead of N failed jobs. This is the only module besides
``status`` that knows about Slurm or submitit; submitit is imported lazily so ``--local`` works without it.

Exit codes: 0 submitted (or, with ``--local``, all runs finished); 1 a local run or a submission failed;
2 bad arguments or config.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from areal_hpc.config import Config, ConfigError, load_config, save_config
from areal_hpc.launch.mps import shell_lines
from areal_hpc.launch.preflight import PreflightError, check_inputs
from areal_hpc.launch.run_dir import SUBMIT_FILE, SWEEP_FILE, fresh_run_dir, run_dir_of

log = logging.getLogger(__name__)

HELP = "submit a run or a sweep of runs as Slurm jobs via submitit (or run them here with --local)"
SUBMITIT_DIR = "submitit"


class UsageError(ValueError):
    """A bad command line; the message is one actionable line (exit 2)."""


# --------------------------------------------------------------------------- the per-rank callable


def _checkpointable_base() -> type:
    """submitit's Checkpointable when installed, so ``RunTask`` stays importable (and --local usable) without it."""
    try:
        from submitit.helpers import Checkpointable
    except ImportError:  # pragma: no cover - submitit is a hard dependency; keep --local alive without it
        return object
    return Checkpointable


class RunTask(_checkpointable_base()):  # type: ignore[misc]
    """What every Slurm task of a run executes: this process is one MPI rank of the job.

    Picklable (a config path and a flag), so submitit can ship it and, on preemption or timeout, requeue it:
    ``checkpoint`` returns a ``DelayedSubmission`` of a copy that resumes (``run.resume=auto``) when the job
    supports resuming, else a plain restart of the same config.
    """

    def __init__(self, config_path: str, resumed: bool = False) -> None:
        self.config_path = str(config_path)
        self.resumed = resumed

    def __call__(self) -> dict[str, Any] | None:
        from areal_hpc.comm.mpi import world_barrier, world_rank
        from areal_hpc.launch.failure import errors_aside
        from areal_hpc.launch.job import main as job_main
        from areal_hpc.launch.preflight import check_in_job

        # srun without --mpi=..., a missing checkpoint, a bad dataset row: one line from rank 0, all ranks stop
        problem = check_in_job(load_config(self.config_path))
        if problem is not None:
            if world_rank() == 0:
                print(f"areal-hpc: {problem}", file=sys.stderr, flush=True)
            raise SystemExit(2)
        run_dir = Path(self.config_path).parent
        if self.resumed and world_rank() == 0:
            errors_aside(run_dir, "preempted")  # the interrupted start's SystemExit is not a failure
        world_barrier()
        job_main(self.config_path)
        summary = run_dir / "summary.json"
        return json.loads(summary.read_text()) if world_rank() == 0 and summary.exists() else None

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on rank 0 only, when Slurm signals preemption or the time limit."""
        from submitit.helpers import DelayedSubmission

        from areal_hpc.config.schema import RunConfig

        if hasattr(RunConfig, "resume"):
            cfg = load_config(self.config_path, ["run.resume=auto"])
            tmp = Path(self.config_path).with_suffix(".resume.tmp")
            save_config(cfg, tmp)
            os.replace(tmp, self.config_path)
            log.warning("requeueing %s to resume from its latest checkpoint", self.config_path)
        else:
            log.warning("requeueing %s from the start (this version cannot resume a run)", self.config_path)
        return DelayedSubmission(RunTask(self.config_path, resumed=True))

    def __repr__(self) -> str:
        return f"RunTask({self.config_path!r}, resumed={self.resumed})"


# --------------------------------------------------------------------------- sweeps


def _split_values(text: str) -> list[str]:
    """Split ``v1,v2`` on commas outside brackets, so a list value such as ``[0.9,0.99]`` stays whole."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "[{"
        depth -= ch in "]}"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    out.append(cur.strip())
    return out


def parse_sweeps(specs: list[str] | None) -> list[tuple[str, list[str]]]:
    """``["a.b=1,2", "c.d=x,y"]`` -> ``[("a.b", ["1", "2"]), ("c.d", ["x", "y"])]``."""
    axes: list[tuple[str, list[str]]] = []
    for spec in specs or []:
        key, eq, values = spec.partition("=")
        key = key.strip()
        vals = _split_values(values) if eq else []
        if not key or not eq or not vals or any(v == "" for v in vals):
            raise UsageError(f"malformed --sweep {spec!r}; write it as 'section.key=v1,v2,...', "
                             f"e.g. --sweep trainer.lr=1e-4,2e-4")
        if key in (k for k, _ in axes):
            raise UsageError(f"--sweep key '{key}' given twice; list all its values in one --sweep")
        if len(set(vals)) != len(vals):
            raise UsageError(f"--sweep {spec!r} repeats a value")
        axes.append((key, vals))
    return axes


def sweep_points(axes: list[tuple[str, list[str]]]) -> list[dict[str, str]]:
    """The cartesian product of the sweep axes, one ``{key: value}`` dict per run."""
    keys = [k for k, _ in axes]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in axes))]


def point_label(point: dict[str, str]) -> str:
    """Run-folder name of a sweep point, ``trainer.lr=1e-4_rollout.eta=2``, safe on any filesystem."""
    text = "_".join(f"{k}={v}" for k, v in point.items())
    return re.sub(r"[^A-Za-z0-9._=+-]", "-", text)[:200]


# --------------------------------------------------------------------------- Slurm


@dataclass
class SlurmOptions:
    """The scheduler side of a submission, taken from the command line."""

    partition: str | None = None
    time_min: int | None = None  # default: the run's watchdog run.timeout_s plus a margin
    nodes: int = 1
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    job_name: str = "areal-hpc"
    srun_mpi: str = "pmi2"
    signal_delay_s: int = 120
    max_requeue: int = 3
    extra: dict[str, str] = field(default_factory=dict)


def ranks_of(cfg: Config) -> int:
    return cfg.cluster.n_trainer + cfg.cluster.n_rollout


def time_limit_min(cfg: Config, opts: SlurmOptions) -> int:
    """The job's wall-clock limit: the watchdog plus 10 minutes for start-up and the final checkpoint."""
    return opts.time_min if opts.time_min is not None else math.ceil(cfg.run.timeout_s / 60) + 10


def slurm_parameters(cfg: Config, opts: SlurmOptions) -> dict[str, Any]:
    """sbatch parameters (submitit ``SlurmExecutor`` names) for one run of ``cfg``: one task per MPI rank."""
    ranks = ranks_of(cfg)
    if ranks % opts.nodes:
        raise UsageError(f"{ranks} ranks (cluster.n_trainer + cluster.n_rollout) do not split evenly over "
                         f"--nodes {opts.nodes}; pick a node count that divides {ranks}")
    params: dict[str, Any] = {
        "job_name": opts.job_name,
        "nodes": opts.nodes,
        "ntasks_per_node": ranks // opts.nodes,
        "time": time_limit_min(cfg, opts),
        "signal_delay_s": opts.signal_delay_s,
        "srun_args": [f"--mpi={opts.srun_mpi}"],
        # a CUDA MPS daemon for the node's ranks when they share a GPU (cluster.cuda_mps), as run.sbatch does
        "setup": ["export PYTHONUNBUFFERED=1", *shell_lines(cfg.cluster.cuda_mps, ranks // opts.nodes, sys.executable)],
    }
    if opts.partition:
        params["partition"] = opts.partition
    if opts.gpus_per_task is not None:
        params["gpus_per_task"] = opts.gpus_per_task
    if opts.cpus_per_task is not None:
        params["cpus_per_task"] = opts.cpus_per_task
    if opts.extra:
        params["additional_parameters"] = dict(opts.extra)
    return params


def build_executor(folder: Path | str, cfg: Config, opts: SlurmOptions) -> Any:
    """A submitit ``SlurmExecutor`` whose sbatch script starts one MPI job of ``cfg`` (``folder`` holds %j)."""
    import submitit

    executor = submitit.SlurmExecutor(folder=str(folder), max_num_timeout=opts.max_requeue)
    executor.update_parameters(**slurm_parameters(cfg, opts))
    return executor


# --------------------------------------------------------------------------- planning and running


@dataclass
class Planned:
    """One run to start: its sweep point, resolved config and where it lives."""

    point: dict[str, str]
    cfg: Config
    run_dir: Path
    job_id: str | None = None
    log_folder: str | None = None
    returncode: int | None = None


def _sweep_dir(base: Config, config_path: str, name: str | None) -> Path:
    stem = name or Path(config_path).stem
    root = Path(base.run.output_dir) / f"{stem}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = root, 1
    while out.exists():
        out, n = root.with_name(f"{root.name}-{n}"), n + 1
    return out


def plan(config_path: str, overrides: list[str], sweeps: list[str] | None,
         name: str | None) -> tuple[Path | None, list[Planned]]:
    """Load (and so validate) every run's config before anything is written or submitted.

    Returns the sweep folder (None for a single run) and the runs. Raises ``ConfigError``/``UsageError``.
    """
    axes = parse_sweeps(sweeps)
    base = load_config(config_path, overrides)
    if not axes:
        return None, [Planned({}, base, run_dir_of(base))]
    sweep_dir = _sweep_dir(base, config_path, name)
    runs = []
    for point in sweep_points(axes):
        label = point_label(point)
        extra = [f"{k}={v}" for k, v in point.items()] + [f"run.output_dir={sweep_dir}", f"run.name={label}"]
        try:
            cfg = load_config(config_path, [*overrides, *extra])
        except ConfigError as e:
            raise ConfigError(f"sweep point {label}: {e}") from None
        runs.append(Planned(point, cfg, sweep_dir / label))
    return sweep_dir, runs


def _check_inputs(run: Planned) -> None:
    """``launch.preflight.check_inputs`` for a run of this machine, as a usage error naming its sweep point."""
    try:
        check_inputs(run.cfg)
    except PreflightError as e:
        raise UsageError(f"sweep point {point_label(run.point)}: {e}" if run.point else str(e)) from None


def _prepare_run_dir(run: Planned) -> Path:
    """Write the resolved config into a fresh run folder (an earlier run there is moved aside, never deleted)."""
    fresh_run_dir(run.run_dir)
    resolved = (run.run_dir / "config.yaml").resolve()  # ranks may start in another working directory
    save_config(run.cfg, resolved)
    return resolved


def write_record(path: Path, *, config_path: str, overrides: list[str], sweeps: list[str] | None, mode: str,
                 submitit_folder: str | None, runs: list[Planned]) -> None:
    """``sweep.json`` / ``submit.json``: what ``areal-hpc status`` reads back. Written atomically."""
    record = {
        "config": str(Path(config_path).resolve()), "overrides": list(overrides), "sweep": list(sweeps or []),
        "mode": mode, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "submitit_folder": submitit_folder,
        "runs": [{"point": r.point, "run_dir": str(r.run_dir.resolve()), "job_id": r.job_id, "log_folder": r.log_folder,
                  "returncode": r.returncode} for r in runs],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


def run_local(runs: list[Planned], record: Any) -> int:
    """Run the points one after another under mpiexec on this machine (submitit cannot start MPI ranks here)."""
    from areal_hpc.launch.local import launch_local

    failed = 0
    for i, run in enumerate(runs):
        resolved = _prepare_run_dir(run)
        run.job_id, run.log_folder = f"local-{i}", str(run.run_dir / "logs")
        record()
        print(f"areal-hpc: [{i + 1}/{len(runs)}] {run.run_dir} ({ranks_of(run.cfg)} ranks, logs in "
              f"{run.log_folder})", file=sys.stderr, flush=True)
        try:
            run.returncode = launch_local(run.cfg, resolved, run.run_dir)
        except FileNotFoundError as e:  # no mpiexec: the same for every point
            print(f"areal-hpc: {e}", file=sys.stderr)
            run.returncode = 2
            record()
            return 2
        failed += run.returncode != 0
        record()
    if failed:
        print(f"areal-hpc: {failed} of {len(runs)} runs failed", file=sys.stderr)
    return 1 if failed else 0


def submit_slurm(runs: list[Planned], log_root: Path, opts: SlurmOptions) -> None:
    """Submit every run as its own MPI job; runs with the same shape go out as one Slurm array."""
    groups: dict[str, list[tuple[Planned, Path]]] = {}
    for run in runs:
        resolved = _prepare_run_dir(run)
        key = json.dumps(slurm_parameters(run.cfg, opts), sort_keys=True)
        groups.setdefault(key, []).append((run, resolved))
    for members in groups.values():
        executor = build_executor(log_root.resolve() / "%j", members[0][0].cfg, opts)
        with executor.batch():
            jobs = [executor.submit(RunTask(str(resolved))) for _, resolved in members]
        for (run, _), job in zip(members, jobs):
            run.job_id = str(job.job_id)
            run.log_folder = str(job.paths.folder)
            log.info("submitted %s as job %s", run.run_dir, run.job_id)


# --------------------------------------------------------------------------- command line


def _key_value(text: str) -> tuple[str, str]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


class _OverridesAnywhere(argparse.ArgumentParser):
    """Takes ``key=value`` overrides anywhere on the line: ``submit CONFIG --local run.steps=20``.

    argparse fills every positional at the first run of plain words, so words after an option would be
    "unrecognized arguments"; those left over (any that do not start with '-') are more overrides, kept in
    the order given. An unknown option is still an argparse error.
    """

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, extras = super().parse_known_args(args, namespace)
        late = [a for a in extras if not a.startswith("-")]
        if late and hasattr(ns, "overrides"):
            ns.overrides = [*(ns.overrides or []), *late]
            extras = [a for a in extras if a.startswith("-")]
        return ns, extras


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as trainer.lr=2e-5, applied to every run")
    p.add_argument("--sweep", action="append", metavar="KEY=V1,V2", default=None,
                   help="sweep a config key; several --sweep give the cartesian product, one job per point")
    p.add_argument("--local", action="store_true",
                   help="run the job(s) here under mpiexec, one after another, instead of submitting to Slurm")
    p.add_argument("--partition", default=None, help="Slurm partition")
    p.add_argument("--time", type=int, default=None, metavar="MIN",
                   help="time limit per job in minutes (default: run.timeout_s plus 10 minutes)")
    p.add_argument("--nodes", type=int, default=1, help="nodes per run; the ranks are split evenly over them")
    p.add_argument("--gpus-per-task", type=int, default=None, metavar="G", help="GPUs per rank")
    p.add_argument("--cpus-per-task", type=int, default=None, metavar="C", help="CPU cores per rank")
    p.add_argument("--name", default=None,
                   help="Slurm job name and sweep-folder prefix (default: run.name / the config file's stem)")
    p.add_argument("--srun-mpi", choices=("pmi2", "pmix"), default="pmi2",
                   help="how srun wires up MPI for the ranks (srun --mpi=...)")
    p.add_argument("--signal-delay", type=int, default=120, metavar="S",
                   help="seconds before the time limit at which Slurm signals the job to requeue itself")
    p.add_argument("--max-requeue", type=int, default=3, help="requeues after timeouts before giving up")
    p.add_argument("--sbatch", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="any other sbatch option, e.g. --sbatch account=myproj --sbatch qos=high")
    return p


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``submit`` on the top-level ``areal-hpc`` parser."""
    p = subparsers.add_parser("submit", help=HELP, description=__doc__.split("\n\n")[0])
    p.__class__ = _OverridesAnywhere  # subparsers build plain parsers; this one also takes late overrides
    configure(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    try:
        if args.nodes < 1:
            raise UsageError(f"--nodes must be >= 1, got {args.nodes}")
        sweep_dir, runs = plan(args.config, args.overrides, args.sweep, args.name)
        name = args.name or (sweep_dir.name.rsplit("-sweep-", 1)[0] if sweep_dir else runs[0].cfg.run.name)
        opts = SlurmOptions(partition=args.partition, time_min=args.time, nodes=args.nodes,
                            gpus_per_task=args.gpus_per_task, cpus_per_task=args.cpus_per_task, job_name=name,
                            srun_mpi=args.srun_mpi, signal_delay_s=args.signal_delay, max_requeue=args.max_requeue,
                            extra=dict(args.sbatch))
        for r in runs:
            if args.local:  # the inputs as the ranks will see them, before anything is written
                _check_inputs(r)
            else:  # the ranks' node may see other paths and GPUs than this one: they check (RunTask)
                slurm_parameters(r.cfg, opts)  # shape errors (ranks vs nodes) before anything is written
    except (ConfigError, UsageError) as e:
        print(f"areal-hpc: {'config error: ' if isinstance(e, ConfigError) else ''}{e}", file=sys.stderr)
        return 2

    if sweep_dir is not None:
        sweep_dir.mkdir(parents=True)
        record_path, log_root = sweep_dir / SWEEP_FILE, sweep_dir / SUBMITIT_DIR
    else:
        record_path, log_root = runs[0].run_dir / SUBMIT_FILE, runs[0].run_dir / SUBMITIT_DIR
    mode = "local" if args.local else "slurm"

    def record() -> None:
        write_record(record_path, config_path=args.config, overrides=args.overrides, sweeps=args.sweep, mode=mode,
                     submitit_folder=None if args.local else str(log_root.resolve() / "%j"), runs=runs)

    if args.local:
        if sweep_dir is not None:
            record()
            print(f"areal-hpc: sweep of {len(runs)} runs in {sweep_dir}", file=sys.stderr)
        rc = run_local(runs, record)
        if sweep_dir is None:
            record()
        _print_where(sweep_dir, runs, mode)
        return rc

    try:
        submit_slurm(runs, log_root, opts)
    except ImportError:
        print("areal-hpc: submitting to Slurm needs submitit: `pip install 'submitit>=1.5'`", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - sbatch refused (no Slurm, bad partition...): one line, not a traceback
        first = str(e).strip().splitlines()
        print(f"areal-hpc: submission failed: {type(e).__name__}: {first[0] if first else ''}", file=sys.stderr)
        record()
        return 1
    record()
    _print_where(sweep_dir, runs, mode)
    return 0


def _print_where(sweep_dir: Path | None, runs: list[Planned], mode: str) -> None:
    for r in runs:
        print(f"job {r.job_id}  run {r.run_dir}  logs {r.log_folder}")
    target = sweep_dir if sweep_dir is not None else runs[0].run_dir
    verb = "ran" if mode == "local" else "submitted"
    print(f"{verb} {len(runs)} job(s); follow them with: areal-hpc status {target}")


__all__ = ["RunTask", "SlurmOptions", "add_parser", "build_executor", "parse_sweeps", "plan", "slurm_parameters",
           "sweep_points"]
