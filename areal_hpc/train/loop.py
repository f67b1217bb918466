"""The trainer role's outer loop: evaluate, step until done or stopped, checkpoint, summarise.

``launch/job.py`` sets a rank up and calls ``run_trainer``; everything a trainer does from its build to
its summary is here, so the launcher knows nothing of training and the trainer nothing of Slurm (a
preemption arrives as ``should_stop``; requeueing is the launcher's business).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from areal_hpc.comm.dist import DistGroups
from areal_hpc.comm.mpi import MPIContext
from areal_hpc.config import Config
from areal_hpc.model.build import save_policy
from areal_hpc.phases import Phases, outside_steps
from areal_hpc.reward.pool import RewardPool
from areal_hpc.reward.scorer import build_scorer
from areal_hpc.rollout.evaluate import evaluate
from areal_hpc.storage.checkpoint import ResumeState, prune, save_checkpoint
from areal_hpc.storage.records import JsonlWriter, RunFiles, strict_json
from areal_hpc.tasks.base import Task
from areal_hpc.tasks.prompt import PromptBuilder
from areal_hpc.train.progress import Progress, summary_table
from areal_hpc.train.worker import TrainerWorker
from areal_hpc.trajectory import RolloutStats, combine

log = logging.getLogger(__name__)


class Evaluator:
    """Trainer 0's held-out evaluation: at start, every ``eval.every`` steps and at the end, each result a
    line of ``eval.jsonl`` in the run folder (beside metrics.jsonl, whose lines stay one per step), a record
    in the HDF5 trainer log and a console line."""

    def __init__(self, cfg: Config, worker: TrainerWorker, task: Task, files: RunFiles) -> None:
        self.cfg, self.worker, self.files = cfg, worker, files
        self.records: JsonlWriter | None = None  # eval.jsonl appears with the first evaluation
        self.problems = task.eval_problems[:min(cfg.eval.n, len(task.eval_problems))] if cfg.eval.enabled else []
        self.prompts = PromptBuilder(cfg.prompt, worker.tok)
        self._pool: RewardPool | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.problems)

    def due(self, step: int) -> bool:
        return self.enabled and self.cfg.eval.every > 0 and step % self.cfg.eval.every == 0

    def run(self, step: int) -> dict[str, Any]:
        if self._pool is None:
            self._pool = RewardPool(build_scorer(self.cfg.reward), self.cfg.reward.workers, self.cfg.reward.timeout_s)
        r, e = self.cfg.rollout, self.cfg.eval
        t = time.perf_counter()
        out = evaluate(self.worker.model, self.worker.tok, self.prompts, self.problems, self._pool,
                       max_new_tokens=r.max_new_tokens, k=e.k, temperature=r.temperature, top_p=r.top_p,
                       seed=self.cfg.run.seed + step)
        out["seconds"] = time.perf_counter() - t
        self.worker.steps_log.add_eval(step, out)
        if self.records is None:
            self.records = JsonlWriter(self.files.root / "eval.jsonl")
        self.records.write({"step": step, **out})
        log.warning("eval at step %d: %s", step, "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in out.items()))
        return out

    def close(self) -> None:
        if self.records is not None:
            self.records.close()
        if self._pool is not None:
            self._pool.close()


def run_trainer(cfg: Config, ctx: MPIContext, groups: DistGroups, files: RunFiles, policy: str, run_id: str,
                task: Task, resume: ResumeState | None, should_stop: Callable[[], bool], phases: Phases,
                launcher: dict[str, Any]) -> bool:
    """Train until ``run.steps`` or until any trainer's ``should_stop()``; True when stopped early
    (a preemption: a checkpoint was written and the run resumes from it). ``launcher``: what the launcher
    reports of itself in ``summary.json`` (e.g. whether it started CUDA MPS)."""
    with phases.time("build"):
        worker = TrainerWorker(cfg, ctx, groups, files, policy, run_id, resume=resume)
    lead = ctx.rank == 0
    evaluator = Evaluator(cfg, worker, task, files) if lead else None
    if resume is not None:
        acc_before = resume.accuracy_before
    elif evaluator is not None and evaluator.enabled:
        with phases.time("eval_before"):
            acc_before = evaluator.run(0)["pass@1"]
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
        # Every trainer must leave the loop at the same step: agree on the stop flag.
        preempted = ctx.any_in_role(should_stop())
        periodic = cfg.run.checkpoint_every and worker.version % cfg.run.checkpoint_every == 0
        if periodic and not preempted and worker.version < cfg.run.steps:
            _checkpoint(worker, ctx, files, attempt, acc_before)
        if lead:
            elapsed = time.perf_counter() - t_start
            row = combine(parts)
            for k in totals:
                totals[k] += row[k]
            row.update(step=worker.version, version=worker.version, elapsed=elapsed, attempt=attempt,
                       samples_per_s=totals["samples"] / elapsed, tokens_per_s=totals["tokens"] / elapsed,
                       rejected_total=totals["rejected"], weight_send_wait_s=worker.sender.seconds_waiting)
            metrics.write(row)
            if evaluator is not None and evaluator.due(worker.version) and worker.version < cfg.run.steps:
                with phases.time("eval_during"):
                    evaluator.run(worker.version)
            progress.update(row)
        if preempted:
            break
    train_seconds = time.perf_counter() - t_start
    phases.add("steps", train_seconds)
    progress.close()
    with phases.time("stop_rollouts"):  # the rollouts' last weight receives and final shard writes
        worker.close_elastic(preempted)  # attached workers finish their open shard and leave
        stop = worker.stop_rollouts()
        stops = ctx.role_comm.gather(stop, root=0)
        rollout_stats = ctx.world.gather(None, root=0)
    ckpt = _checkpoint(worker, ctx, files, attempt, acc_before) if preempted else None
    # A collective under Megatron model parallelism or its distributed optimizer (every rank's shard is
    # gathered): every trainer rank asks.
    final_state = worker.engine.state_dict() if not preempted and cfg.run.final_checkpoint == "full" else None
    if lead:
        if preempted:
            acc_after = float("nan")
            log.warning("preempted at version %d: checkpoint %s", worker.version, ckpt)
        else:
            final_eval: dict[str, Any] = {}
            if evaluator is not None and evaluator.enabled:
                with phases.time("eval_after"):
                    final_eval = evaluator.run(worker.version)
            acc_after = final_eval.get("pass@1", float("nan"))
            with phases.time("save_final"):
                ckpt = _save_final(cfg, worker, files, final_state)
        rs = [s for s in rollout_stats if s is not None]
        summary = _summary(cfg, files, worker, preempted=preempted, attempt=attempt, acc_before=acc_before,
                           acc_after=acc_after, train_seconds=train_seconds, totals=totals,
                           leftover=sum(s["leftover"] for s in stops), rollouts=rs, ckpt=ckpt, phases=phases)
        summary.update(launcher)
        if evaluator is not None:
            evaluator.close()
            summary["eval_final"] = final_eval if not preempted else {}
        files.summary.write_text(json.dumps(strict_json(summary), indent=2, allow_nan=False))
        if not preempted:
            print(summary_table(summary), flush=True)
    ctx.world.Barrier()
    return preempted


def _summary(cfg: Config, files: RunFiles, worker: TrainerWorker, *, preempted: bool, attempt: int,
             acc_before: float, acc_after: float, train_seconds: float, totals: dict[str, float], leftover: int,
             rollouts: list[RolloutStats], ckpt: Path | None, phases: Phases) -> dict[str, Any]:
    busy = max(1e-9, train_seconds * len(rollouts))
    summary = {
        "run_dir": str(files.root), "async": cfg.async_, "eta": cfg.rollout.eta, "steps": cfg.run.steps,
        "n_trainer": cfg.cluster.n_trainer, "n_rollout": cfg.cluster.n_rollout, "preempted": preempted,
        "attempt": attempt, "accuracy_before": acc_before, "accuracy_after": acc_after,
        "train_seconds": train_seconds,
        "samples_trained": totals["samples"], "samples_per_s": totals["samples"] / train_seconds,
        "tokens_per_s": totals["tokens"] / train_seconds, "rejected": totals["rejected"],
        "downweighted": totals["downweighted"],
        "leftover_at_stop": leftover,
        "generated": sum(s.pushed for s in rollouts),
        # Slightly high: the rollouts start generating before the trainer's step clock (at most eta+1 batches).
        "generated_tokens_per_s": sum(s.tokens_generated for s in rollouts) / train_seconds,
        "abandoned_in_flight": sum(s.abandoned for s in rollouts),
        "aborted_stale_groups": sum(s.aborted_groups for s in rollouts),
        "aborted_stale_tokens": sum(s.aborted_tokens for s in rollouts),
        "abandoned_prompts": sorted(p for s in rollouts for p in s.abandoned_prompts),
        "rollout_idle_fraction": sum(s.idle_seconds for s in rollouts) / busy,
        # Verifier time per sample (in the reward pools, off the decode loops) and samples a time limit cut short.
        "reward_seconds_per_sample": sum(s.reward_seconds for s in rollouts) / max(1, sum(s.pushed for s in rollouts)),
        "reward_timeouts": sum(s.reward_timeouts for s in rollouts),
        "ring_full_waits": sum(s.ring_full_waits for s in rollouts),
        "checkpoint": str(ckpt) if ckpt is not None else None,
        "final_version": worker.version,
        "rollout_engines": [s.engine for s in rollouts],
        # Wall seconds outside the steps (trainer 0's phases; each rollout's beside them)
        "phases": {"trainer": phases.as_dict(), "rollouts": [s.phases for s in rollouts]},
    }
    summary["setup_seconds"], summary["teardown_seconds"] = outside_steps(phases.as_dict())
    return summary


def _save_final(cfg: Config, worker: TrainerWorker, files: RunFiles, state: dict | None) -> Path | None:
    """``run.final_checkpoint``: the policy (HF format), with or without the trainer's optimizer state."""
    if cfg.run.final_checkpoint == "none":
        return None
    path = save_policy(worker.model, worker.tok, files.checkpoints / "final")
    if state is not None:
        torch.save(state, files.checkpoints / "final" / "trainer_state.pt")
    return path


def _checkpoint(worker: TrainerWorker, ctx: MPIContext, files: RunFiles, attempt: int,
                acc_before: float) -> Path | None:
    """Gather what every trainer consumed; trainer 0 writes the checkpoint (DP replicas are identical)."""
    consumed = ctx.role_comm.gather(worker.consumed_prompts(), root=0)
    state = worker.engine.state_dict()  # a collective under Megatron's model parallelism or distributed optimizer
    if ctx.rank != 0:
        return None
    path = save_checkpoint(files.checkpoints, write_policy=functools.partial(save_policy, worker.model, worker.tok),
                           trainer_state={**state, "torch_rng": torch.get_rng_state()},
                           version=worker.version, attempt=attempt,
                           consumed_prompts=np.concatenate(consumed), accuracy_before=acc_before)
    prune(files.checkpoints)
    return path
