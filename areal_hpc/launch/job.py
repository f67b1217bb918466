"""What every MPI rank runs: set up, take a role from the topology, run it, tear down.

Started as ``python -m areal_hpc.launch.job RUN_DIR/config.yaml`` by mpiexec/srun (or by
``areal-hpc train`` inside an MPI job). Any exception aborts the whole MPI job (see ``run_or_abort``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from areal_hpc.comm.devices import GpuBinding, bind_gpu, work_stream
from areal_hpc.comm.dist import init_distributed, shutdown_distributed
from areal_hpc.comm.mpi import MPIContext, run_or_abort, world_size
from areal_hpc.config import Config, load_config
from areal_hpc.launch.environment import check_world_matches_launcher
from areal_hpc.launch.mps import PRIORITY_ENV, SM_SHARE_ENV, limit_sm_share, set_client_priority
from areal_hpc.launch.mps import STATE_ENV as MPS_STATE_ENV
from areal_hpc.launch.phases import Phases, outside_steps, process_age_s, since_launch_s
from areal_hpc.launch.preempt import PreemptionFlag, requeue_this_job
from areal_hpc.launch.progress import Progress, summary_table
from areal_hpc.model.build import save_policy
from areal_hpc.model.initial import prepare_initial_policy
from areal_hpc.rollout.evaluate import evaluate
from areal_hpc.storage.checkpoint import load_latest, prune, save_checkpoint
from areal_hpc.storage.records import JsonlWriter, RunFiles
from areal_hpc.tasks import build_task
from areal_hpc.transport.shm_ring import cleanup_stale

log = logging.getLogger("areal_hpc")


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run.output_dir) / cfg.run.name


def run_id_of(run_dir: Path) -> str:
    """Stable across restarts of the same run, so the next start finds a crashed run's segments."""
    return hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:10]


def setup_logging(files: RunFiles, rank: int, role: str, level: str) -> None:
    files.logs.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank} {role}] %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level)
    fh = logging.FileHandler(files.logs / f"rank{rank}.log")
    fh.setFormatter(fmt)
    root.addHandler(fh)
    sh = logging.StreamHandler(sys.stderr)
    sh.setFormatter(fmt)
    sh.setLevel(logging.WARNING)
    root.addHandler(sh)


def _threads_per_rank(world: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // world)


def main(config_path: str) -> None:
    cfg = load_config(config_path)
    check_world_matches_launcher(world_size())
    ctx = MPIContext(cfg.cluster.n_trainer, cfg.cluster.n_rollout)
    files = RunFiles(run_dir_of(cfg))
    setup_logging(files, ctx.rank, ctx.topo.role, cfg.run.log_level)
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
    if topo.is_trainer:  # before any CUDA call of this process (the initial policy, the GPU binding)
        limit_sm_share(cfg.cluster.mps_trainer_sm_percent)
        set_client_priority(cfg.cluster.mps_trainer_priority)
    run_id = run_id_of(files.root)
    task = build_task(cfg)
    policy, resume = None, None
    if ctx.rank == 0:
        removed = cleanup_stale(f"areal_{run_id}_")
        if removed:
            log.warning("removed %d shared-memory segments left by a crashed earlier start: %s", len(removed), removed)
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
         "host": ctx.hostname(), "mps_sm_percent": os.environ.get(SM_SHARE_ENV),
         "mps_priority": os.environ.get(PRIORITY_ENV)}))
    if topo.is_trainer:
        _run_trainer(cfg, ctx, groups, files, policy, run_id, task, resume, preempt, phases)
    else:
        _run_rollout(cfg, ctx, groups, files, policy, run_id, resume, phases, gpu)
    shutdown_distributed()


def _run_rollout(cfg, ctx, groups, files, policy, run_id, resume, phases: Phases, gpu: GpuBinding) -> None:
    from areal_hpc.rollout.worker import RolloutWorker

    with work_stream(cfg.rollout.stream_priority, gpu.device):  # every CUDA call of the role, build included
        with phases.time("build"):  # model load, engine (on CUDA: split tuning), weight receiver, ring
            worker = RolloutWorker(cfg, ctx, groups, files, policy, run_id, resume=resume)
        with phases.time("wait_peers"):
            ctx.world.Barrier()  # trainer 0 evaluates the initial policy meanwhile
        with phases.time("run"):
            stats = worker.run()
        if gpu.device is not None:
            stats["stream_priority"] = torch.cuda.current_stream().priority
    ctx.world.gather({**stats, "phases": phases.as_dict()}, root=0)
    ctx.world.Barrier()


def _run_trainer(cfg, ctx, groups, files, policy, run_id, task, resume, preempt, phases: Phases) -> None:
    from areal_hpc.train.worker import TrainerWorker

    with phases.time("build"):
        worker = TrainerWorker(cfg, ctx, groups, files, policy, run_id, resume=resume)
    lead = ctx.rank == 0
    n_eval = min(cfg.eval.n, len(task.eval_problems)) if cfg.eval.enabled else 0
    if resume is not None:
        acc_before = resume.accuracy_before
    elif lead and n_eval:
        with phases.time("eval_before"):
            acc_before = evaluate(worker.model, worker.tok, task.eval_problems[:n_eval], cfg.rollout.max_new_tokens)
    else:
        acc_before = float("nan")
    with phases.time("wait_peers"):
        ctx.world.Barrier()
    with phases.time("compile"):
        worker.engine.prepare()  # compiles here, while the rollouts generate the first batch
    metrics = JsonlWriter(files.metrics) if lead else None
    progress = Progress(cfg.run.steps, enabled=lead and cfg.run.progress)
    t_start = time.perf_counter()
    totals = {"samples": 0.0, "tokens": 0.0, "rejected": 0.0, "downweighted": 0.0}
    attempt = resume.attempt + 1 if resume is not None else 0
    preempted = False
    while worker.version < cfg.run.steps:
        local = worker.step()
        parts = ctx.role_comm.gather(local, root=0)
        # Every trainer must leave the loop at the same step: agree on the preemption flag.
        preempted = ctx.any_in_role(preempt.raised)
        periodic = cfg.run.checkpoint_every and worker.version % cfg.run.checkpoint_every == 0
        if periodic and not preempted and worker.version < cfg.run.steps:
            _checkpoint(worker, ctx, files, attempt, acc_before)
        if lead:
            elapsed = time.perf_counter() - t_start
            row = _combine(parts)
            for k in totals:
                totals[k] += row[k]
            row.update(step=worker.version, version=worker.version, elapsed=elapsed, attempt=attempt,
                       samples_per_s=totals["samples"] / elapsed, tokens_per_s=totals["tokens"] / elapsed,
                       rejected_total=totals["rejected"], weight_send_wait_s=worker.sender.seconds_waiting)
            metrics.write(row)
            progress.update(row)
        if preempted:
            break
    train_seconds = time.perf_counter() - t_start
    phases.add("steps", train_seconds)
    progress.close()
    with phases.time("stop_rollouts"):  # the rollouts' last weight receives and final shard writes
        stop = worker.stop_rollouts()
        stops = ctx.role_comm.gather(stop, root=0)
        rollout_stats = ctx.world.gather({}, root=0)
    if preempted:
        ckpt = _checkpoint(worker, ctx, files, attempt, acc_before)
    if lead:
        if preempted:
            acc_after = float("nan")
            log.warning("preempted at version %d: checkpoint %s", worker.version, ckpt)
        else:
            with phases.time("eval_after"):
                acc_after = evaluate(worker.model, worker.tok, task.eval_problems[:n_eval],
                                     cfg.rollout.max_new_tokens) if n_eval else float("nan")
            with phases.time("save_final"):
                ckpt = _save_final(cfg, worker, files)
        rs = [s for s in rollout_stats if s]
        summary = {
            "run_dir": str(files.root), "async": cfg.async_, "eta": cfg.rollout.eta, "steps": cfg.run.steps,
            "n_trainer": cfg.cluster.n_trainer, "n_rollout": cfg.cluster.n_rollout, "preempted": preempted,
            "attempt": attempt, "accuracy_before": acc_before, "accuracy_after": acc_after,
            "train_seconds": train_seconds,
            "samples_trained": totals["samples"], "samples_per_s": totals["samples"] / train_seconds,
            "tokens_per_s": totals["tokens"] / train_seconds, "rejected": totals["rejected"],
            "downweighted": totals["downweighted"],
            "leftover_at_stop": sum(s["leftover"] for s in stops),
            "generated": sum(s["pushed"] for s in rs), "abandoned_in_flight": sum(s["abandoned"] for s in rs),
            "aborted_stale_groups": sum(s.get("aborted_groups", 0) for s in rs),
            "aborted_stale_tokens": sum(s.get("aborted_tokens", 0) for s in rs),
            "abandoned_prompts": sorted(p for s in rs for p in s["abandoned_prompts"]),
            "rollout_idle_fraction": sum(s["idle_seconds"] for s in rs) / max(1e-9, train_seconds * len(rs)),
            "rollout_yield_fraction": sum(s.get("yield_seconds", 0.0) for s in rs) / max(1e-9, train_seconds * len(rs)),
            "ring_full_waits": sum(s["ring_full_waits"] for s in rs),
            "checkpoint": str(ckpt) if ckpt is not None else None,
            "final_version": worker.version,
            "rollout_engines": [s.get("engine", {}) for s in rs],
            "rollout_stream_priority": [s.get("stream_priority") for s in rs],  # None: not on CUDA
            "cuda_mps": os.environ.get(MPS_STATE_ENV, "off (not started by areal-hpc)"),
            "mps_trainer_sm_percent": os.environ.get(SM_SHARE_ENV),
            "mps_trainer_priority": os.environ.get(PRIORITY_ENV),
            # Wall seconds outside the steps (trainer 0's phases; each rollout's beside them)
            "phases": {"trainer": phases.as_dict(), "rollouts": [s.get("phases", {}) for s in rs]},
        }
        summary["setup_seconds"], summary["teardown_seconds"] = outside_steps(phases.as_dict())
        files.summary.write_text(json.dumps(summary, indent=2))
        if not preempted:
            print(summary_table(summary), flush=True)
    ctx.world.Barrier()
    if preempted and lead and cfg.run.requeue:
        requeue_this_job()


def _save_final(cfg: Config, worker, files: RunFiles) -> Path | None:
    """``run.final_checkpoint``: the policy (HF format), with or without the trainer's optimizer state."""
    if cfg.run.final_checkpoint == "none":
        return None
    path = save_policy(worker.model, worker.tok, files.checkpoints / "final")
    if cfg.run.final_checkpoint == "full":
        torch.save(worker.engine.state_dict(), files.checkpoints / "final" / "trainer_state.pt")
    return path


def _checkpoint(worker, ctx, files: RunFiles, attempt: int, acc_before: float):
    """Gather what every trainer consumed; trainer 0 writes the checkpoint (DP replicas are identical)."""
    consumed = ctx.role_comm.gather(worker.consumed_prompts(), root=0)
    if ctx.rank != 0:
        return None
    path = save_checkpoint(files.checkpoints, model=worker.model, tokenizer=worker.tok,
                           trainer_state={**worker.engine.state_dict(), "torch_rng": torch.get_rng_state()},
                           version=worker.version, attempt=attempt,
                           consumed_prompts=np.concatenate(consumed), accuracy_before=acc_before)
    prune(files.checkpoints)
    return path


def _combine(parts: list[dict[str, float]]) -> dict[str, float]:
    """Merge per-trainer step stats: sums for counts, max for maxima; the engine's train stats are
    already global (reduced over the data-parallel group), so their mean is the value itself."""
    n = sum(p["n"] for p in parts)
    row: dict[str, float] = {
        "samples": n, "reward": sum(p["reward_sum"] for p in parts) / n,
        "accuracy": sum(p["correct"] for p in parts) / n, "tokens": sum(p["tokens"] for p in parts),
        "staleness_mean": sum(p["stale_sum"] for p in parts) / n,
        "staleness_max": max(p["stale_max"] for p in parts), "rejected": sum(p["rejected"] for p in parts),
        "downweighted": sum(p["downweighted"] for p in parts),
        "ring_full_waits": sum(p["ring_full_waits"] for p in parts),
        "interrupted": sum(p["interrupted"] for p in parts), "multi_version": sum(p["multi_version"] for p in parts),
        "t_data": max(p["t_data"] for p in parts), "t_step": max(p["t_step"] for p in parts),
    }
    for k in parts[0]:
        if k.startswith("train/"):
            row[k] = sum(p[k] for p in parts) / len(parts)
    return row


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m areal_hpc.launch.job RUN_DIR/config.yaml")
    main(sys.argv[1])
