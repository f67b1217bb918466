"""``run``: identity, length and bookkeeping of one job."""

from __future__ import annotations

import os
from dataclasses import dataclass

from areal_hpc.config.fields import need, setting


@dataclass
class RunConfig:
    """Identity, length and bookkeeping of one job."""

    name: str = setting("quickstart", "run name; the run folder is output_dir/name")
    output_dir: str = setting("runs", "parent folder of run folders")
    seed: int = setting(1, "global random seed (model init, sampling, data order)")
    steps: int = setting(40, "number of RL training steps")
    cache_dir: str = setting("runs/.cache", "where warm-up checkpoints are cached across runs")
    log_level: str = setting("INFO", "logging level", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    progress: bool = setting(True, "show progress on the console: the first warm-up's and the training's (in place "
                                   "on a terminal, else a line per 15 s)")
    timeout_s: float = setting(1800.0, "whole-job watchdog in seconds; the job aborts after this")
    resume: str = setting(
        "auto",
        "auto: continue from RUN/checkpoints/latest when it exists (a requeued job); never: always start fresh",
        ("auto", "never"),
    )
    final_checkpoint: str = setting(
        "full",
        "what the run saves at its end in RUN/checkpoints/final: full (policy in HF format and the trainer's "
        "optimizer state), policy (the HF policy only; the optimizer state of a 0.5B model is ~6 GB), none",
        ("full", "policy", "none"),
    )
    checkpoint_every: int = setting(0, "write a resumable checkpoint every N steps (0: only on preemption signals)")
    requeue: bool = setting(True, "after a preemption checkpoint under Slurm, requeue the job (scontrol requeue)")

    def validate(self) -> None:
        need(bool(self.name) and "/" not in self.name and os.sep not in self.name, "run.name", self.name,
             "must be a non-empty folder name without '/'",
             "set run.name=<name>; the run folder is run.output_dir/<name>")
        need(bool(self.output_dir), "run.output_dir", self.output_dir, "must be non-empty", "set run.output_dir=runs")
        need(bool(self.cache_dir), "run.cache_dir", self.cache_dir, "must be non-empty",
             "set run.cache_dir=runs/.cache")
        need(self.seed >= 0, "run.seed", self.seed, "must be >= 0", "use a non-negative seed")
        need(self.steps >= 1, "run.steps", self.steps, "must be >= 1", "set run.steps to the number of training steps")
        need(self.timeout_s > 0, "run.timeout_s", self.timeout_s, "must be > 0",
             "set run.timeout_s to the job's wall-clock limit in seconds")
        need(self.checkpoint_every >= 0, "run.checkpoint_every", self.checkpoint_every, "must be >= 0",
             "set run.checkpoint_every=0 (checkpoint on preemption only) or a positive step count")
