"""Preemption and time limits: Slurm signals the job before it ends it; the run checkpoints.

``--signal=USR1@120`` (our sbatch template), submitit's USR2 or a preemption's SIGTERM only raise a flag; the
trainers agree on it at the end of a step, stop the rollouts, write a checkpoint and, under Slurm,
requeue the job, which resumes from that checkpoint (``run.resume: auto``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess

log = logging.getLogger(__name__)


class PreemptionFlag:
    def __init__(self) -> None:
        self.raised = False
        self.signum: int | None = None

    @classmethod
    def install(cls, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)) -> PreemptionFlag:
        """USR1: our sbatch template's ``--signal``; USR2: submitit's (we take it over, so the run
        checkpoints itself before requeueing); TERM: preemption or ``scontrol requeue``."""
        flag = cls()

        def handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
            flag.raised, flag.signum = True, signum

        for s in signals:
            signal.signal(s, handler)
        return flag


def requeue_this_job() -> bool:
    """``scontrol requeue`` the Slurm job this process belongs to; False outside Slurm."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID") and \
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}" or os.environ.get("SLURM_JOB_ID")
    if not job:
        log.warning("preempted outside Slurm: checkpoint written; start the same command again to resume")
        return False
    proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if proc.returncode != 0 and "pending" in proc.stderr.lower():
        log.warning("Slurm job %s is already being requeued (scontrol requeue / preemption)", job)
        return True
    if proc.returncode != 0:
        log.error("scontrol requeue %s failed: %s; resubmit the job to resume", job, proc.stderr.strip())
        return False
    log.warning("requeued Slurm job %s; it resumes from the checkpoint", job)
    return True
