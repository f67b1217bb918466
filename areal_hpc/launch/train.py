"""``areal-hpc train CONFIG [overrides]``: one run, here or as a rank of an MPI job already started.

Started by a person, it prepares the run folder and starts mpiexec itself (``launch.local``); started by
mpiexec/srun, this process is one rank: rank 0 prepares the folder and every rank runs ``launch.job``.

Exit codes: the job's (0 done); 2 a bad config, inputs that fail the checks made before the ranks start
(``launch.preflight``), or a launcher that cannot start.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from areal_hpc.config import ConfigError, load_config, save_config
from areal_hpc.launch.run_dir import fresh_run_dir, resumable, run_dir_of

HELP = "run an RL job (starts mpiexec itself unless already an MPI rank)"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``train`` on the top-level ``areal-hpc`` parser."""
    p = subparsers.add_parser("train", help=HELP)
    p.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as trainer.lr=2e-5 rollout.eta=4")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    # The heavy modules (MPI, torch through launch.job) load only when a run starts, so `--help` stays fast.
    from areal_hpc.comm.mpi import world_barrier, world_rank
    from areal_hpc.launch.environment import inside_mpi_job
    from areal_hpc.launch.failure import errors_aside
    from areal_hpc.launch.job import main as job_main
    from areal_hpc.launch.local import launch_local
    from areal_hpc.launch.preflight import PreflightError, check_in_job, check_inputs

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"areal-hpc: config error: {e}", file=sys.stderr)
        return 2
    run_dir = run_dir_of(cfg)
    resolved = run_dir / "config.yaml"
    if inside_mpi_job():  # started by mpiexec/srun: this process is one rank
        problem = check_in_job(cfg)  # collective: every rank stops, rank 0 says why
        if problem is not None:
            if world_rank() == 0:
                print(f"areal-hpc: {problem}", file=sys.stderr)
            return 2
        if world_rank() == 0:
            if resumable(cfg, run_dir):
                errors_aside(run_dir)
            else:
                fresh_run_dir(run_dir)
            save_config(cfg, resolved)
        world_barrier()
        job_main(str(resolved))
        return 0
    if cfg.cluster.launcher == "none":
        print("areal-hpc: cluster.launcher=none but this process is not an MPI rank; start it with "
              "mpiexec/srun or set cluster.launcher=auto", file=sys.stderr)
        return 2
    try:
        check_inputs(cfg)  # before the run folder is touched: a failed check leaves an earlier run in place
    except PreflightError as e:
        print(f"areal-hpc: {e}", file=sys.stderr)
        return 2
    if resumable(cfg, run_dir):
        print(f"areal-hpc: resuming the run in {run_dir} from its latest checkpoint", file=sys.stderr)
        errors_aside(run_dir)
    else:
        fresh_run_dir(run_dir)
    save_config(cfg, resolved)
    print(f"areal-hpc: run folder {run_dir}", file=sys.stderr)
    try:
        return launch_local(cfg, resolved, run_dir)
    except (FileNotFoundError, RuntimeError) as e:  # no mpiexec; cluster.cuda_mps: on that cannot start
        print(f"areal-hpc: {e}", file=sys.stderr)
        return 2
