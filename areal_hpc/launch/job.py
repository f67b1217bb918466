"""What every MPI rank runs: set up, take a role from the topology, run it, tear down.

Started as ``python -m areal_hpc.launch.job RUN_DIR/config.yaml`` by mpiexec/srun (or by
``areal-hpc train`` inside an MPI job). Any exception aborts the whole MPI job (see ``run_or_abort``).
"""

from __future__ import annotations

import json
import logging
import os
import sys

import torch

from areal_hpc.comm.devices import bind_gpu
from areal_hpc.comm.dist import init_distributed, shutdown_distributed
from areal_hpc.comm.mpi import MPIContext, run_or_abort, world_rank, world_size
from areal_hpc.config import Config, load_config
from areal_hpc.launch.clean import remove_dead_segments, run_id_of
from areal_hpc.launch.environment import check_world_matches_launcher
from areal_hpc.launch.mps import STATE_ENV as MPS_STATE_ENV
from areal_hpc.launch.phases import process_age_s, since_launch_s
from areal_hpc.launch.preempt import PreemptionFlag, requeue_this_job, resume_command
from areal_hpc.launch.run_dir import run_dir_of
from areal_hpc.logs import setup_logging
from areal_hpc.model.initial import prepare_initial_policy
from areal_hpc.phases import Phases
from areal_hpc.storage.checkpoint import load_latest
from areal_hpc.storage.records import RunFiles
from areal_hpc.tasks import build_task

log = logging.getLogger("areal_hpc")


def _threads_per_rank(world: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // world)


def main(config_path: str) -> None:
    cfg = load_config(config_path)
    files = RunFiles(run_dir_of(cfg))

    def context() -> MPIContext:  # a world that does not fit the config is one line too, not a traceback a rank
        check_world_matches_launcher(world_size())
        return MPIContext(cfg.cluster.n_trainer, cfg.cluster.n_rollout)

    ctx = run_or_abort(context, rank=world_rank(), error_dir=str(files.errors))
    setup_logging(files.logs / f"rank{ctx.rank}.log", f"rank {ctx.rank} {ctx.topo.role}", cfg.run.log_level)
    run_or_abort(lambda: _run(cfg, ctx, files), rank=ctx.rank, error_dir=str(files.errors))


def _run(cfg: Config, ctx: MPIContext, files: RunFiles) -> None:
    phases = Phases()
    age, launched = process_age_s(), since_launch_s()
    if age is not None:
        phases.add("startup", age)  # interpreter, imports, MPI init, config
        if launched is not None:
            phases.add("launch", launched - age)  # the launcher before this process (MPS daemon, mpiexec)
    torch.set_num_threads(_threads_per_rank(ctx.world.size))
    torch.manual_seed(cfg.run.seed + ctx.rank)
    topo = ctx.topo
    run_id = run_id_of(files.root)
    task = build_task(cfg)
    policy, resume = None, None
    if ctx.hosts.index(ctx.hostname()) == ctx.rank:  # the first rank on each node
        # Any run's (and MPI job's) whose processes are gone, not only this run's earlier start: a killed
        # job on this node leaves its memory in /dev/shm until someone removes it. Live ones are kept, the
        # segments this job's other ranks may be creating meanwhile included.
        removed = remove_dead_segments()
        if removed:
            log.warning("removed %d shared-memory segments left in /dev/shm by killed jobs: %s", len(removed), removed)
    if ctx.rank == 0:
        if cfg.run.resume == "auto":
            resume = load_latest(files.checkpoints)
        if resume is not None:
            log.warning("resuming from %s (version %d, attempt %d)", resume.path, resume.version, resume.attempt + 1)
            policy = str(resume.path)
        else:
            with phases.time("initial_policy"):
                policy = prepare_initial_policy(cfg, task)
    policy, resume = ctx.world.bcast((policy, resume), root=0)
    preempt = PreemptionFlag.install()
    gpu = bind_gpu(ctx, cfg.model.device)
    with phases.time("distributed"):
        groups = init_distributed(ctx, cfg.weights.backend, timeout_s=cfg.run.timeout_s, gpu_shared=gpu.shared)
    log.info("rank %d: %s %d of %d on %s", ctx.rank, topo.role, topo.role_rank,
             topo.n_trainer if topo.is_trainer else topo.n_rollout, ctx.hostname())
    (files.root / "ranks").mkdir(exist_ok=True)
    (files.root / "ranks" / f"rank{ctx.rank}.json").write_text(json.dumps(
        {"rank": ctx.rank, "role": topo.role, "role_rank": topo.role_rank, "pid": os.getpid(),
         "host": ctx.hostname()}))
    if topo.is_trainer:
        from areal_hpc.train.loop import run_trainer

        launcher = {"cuda_mps": os.environ.get(MPS_STATE_ENV, "off (not started by areal-hpc)")}
        preempted = run_trainer(cfg, ctx, groups, files, policy, run_id, task, resume, lambda: preempt.raised,
                                phases, launcher)
        if preempted and ctx.rank == 0:
            # A person's Ctrl-C ends the job; the scheduler's signals requeue it where it can be.
            requeued = cfg.run.requeue and not preempt.by_user and requeue_this_job()
            if not requeued:
                how = "Ctrl-C" if preempt.by_user else "a signal"
                log.warning("stopped by %s: checkpoint written; resume with: %s", how, resume_command(files.root))
    else:
        _run_rollout(cfg, ctx, groups, files, policy, run_id, resume, phases)
    shutdown_distributed()


def _run_rollout(cfg: Config, ctx: MPIContext, groups, files: RunFiles, policy: str, run_id: str, resume,
                 phases: Phases) -> None:
    from areal_hpc.rollout.worker import RolloutWorker

    with phases.time("build"):  # model load, engine (on CUDA: split tuning), weight receiver, ring
        worker = RolloutWorker(cfg, ctx, groups, files, policy, run_id, resume=resume)
    with phases.time("warm_up"):  # the engine's graph capture and compiling, out of the first steps
        worker.engine.warm_up()
    with phases.time("wait_peers"):
        ctx.world.Barrier()  # trainer 0 evaluates the initial policy meanwhile
    with phases.time("run"):
        stats = worker.run()
    stats.phases = phases.as_dict()
    ctx.world.gather(stats, root=0)
    ctx.world.Barrier()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m areal_hpc.launch.job RUN_DIR/config.yaml")
    main(sys.argv[1])
