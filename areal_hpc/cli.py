"""``areal-hpc``: the command-line entry point."""

from __future__ import annotations

import argparse
import logging
import sys

from areal_hpc.config import ConfigError, load_config, save_config


def _train(args: argparse.Namespace) -> int:
    from areal_hpc.comm.mpi import world_barrier, world_rank, world_size
    from areal_hpc.launch.environment import check_world_matches_launcher, inside_mpi_job
    from areal_hpc.launch.job import main as job_main
    from areal_hpc.launch.job import run_dir_of
    from areal_hpc.launch.local import launch_local

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"areal-hpc: config error: {e}", file=sys.stderr)
        return 2
    run_dir = run_dir_of(cfg)
    resolved = run_dir / "config.yaml"
    if inside_mpi_job():  # started by mpiexec/srun: this process is one rank
        try:
            check_world_matches_launcher(world_size())
        except RuntimeError as e:
            print(f"areal-hpc: {e}", file=sys.stderr)
            return 2
        if world_rank() == 0:
            if not _resumable(cfg, run_dir):
                _fresh_run_dir(run_dir)
            save_config(cfg, resolved)
        world_barrier()
        job_main(str(resolved))
        return 0
    if cfg.cluster.launcher == "none":
        print("areal-hpc: cluster.launcher=none but this process is not an MPI rank; start it with "
              "mpiexec/srun or set cluster.launcher=auto", file=sys.stderr)
        return 2
    if _resumable(cfg, run_dir):
        print(f"areal-hpc: resuming the run in {run_dir} from its latest checkpoint", file=sys.stderr)
    else:
        _fresh_run_dir(run_dir)
    save_config(cfg, resolved)
    print(f"areal-hpc: run folder {run_dir}", file=sys.stderr)
    try:
        return launch_local(cfg, resolved, run_dir)
    except (FileNotFoundError, RuntimeError) as e:  # no mpiexec; cluster.cuda_mps: on that cannot start
        print(f"areal-hpc: {e}", file=sys.stderr)
        return 2


def _resumable(cfg, run_dir) -> bool:
    """A checkpoint exists and the run did not finish: a requeued or restarted job continues it."""
    import json

    if cfg.run.resume != "auto" or not (run_dir / "checkpoints" / "latest.json").exists():
        return False
    summary = run_dir / "summary.json"
    return not summary.exists() or bool(json.loads(summary.read_text()).get("preempted"))


def _fresh_run_dir(run_dir) -> None:
    """Start a run in an empty folder; an earlier run of the same name is moved aside, never deleted."""
    import time

    if run_dir.exists() and any(run_dir.iterdir()):
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
            n += 1
        run_dir.rename(aside)
        print(f"areal-hpc: {run_dir} held an earlier run; moved it to {aside}", file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="areal-hpc", description="Fully asynchronous RL for LLMs on Slurm/MPI")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="run an RL job (starts mpiexec itself unless already an MPI rank)")
    p.add_argument("config", help="YAML config, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as trainer.lr=2e-5 rollout.eta=4")
    p.set_defaults(func=_train)
    from areal_hpc.analysis.cli import add_parser as add_analyze

    add_analyze(sub)
    from areal_hpc.launch.status import add_parser as add_status
    from areal_hpc.launch.submit import add_parser as add_submit

    add_submit(sub)
    add_status(sub)
    from areal_hpc.bench import add_parser as add_bench

    add_bench(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
