"""Preemption and time limits: Slurm signals the job before it ends it; the run checkpoints.

``--signal=USR1@120`` (our sbatch template), submitit's USR2 or a preemption's SIGTERM only raise a flag; the
trainers agree on it at the end of a step, stop the rollouts, write a checkpoint and, under Slurm,
requeue the job, which resumes from that checkpoint (``run.resume: auto``).

A user's Ctrl-C (SIGINT) is the same stop, except that it is not requeued: it says how to resume instead.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
from pathlib import Path

import yaml

log = logging.getLogger(__name__)


class PreemptionFlag:
    def __init__(self) -> None:
        self.raised = False
        self.signum: int | None = None

    @classmethod
    def install(cls, signals: tuple[int, ...] = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT),
                ) -> PreemptionFlag:
        """USR1: our sbatch template's ``--signal``; USR2: submitit's (we take it over, so the run
        checkpoints itself before requeueing); TERM: preemption or ``scontrol requeue``; INT: a user's
        Ctrl-C (forwarded by ``areal-hpc train`` or by mpiexec), instead of a KeyboardInterrupt in every
        rank. Repeats change nothing: mpiexec forwards a Ctrl-C that the terminal may also have sent, and
        a second Ctrl-C stops the job at once from the launcher (or from mpiexec), not here."""
        flag = cls()

        def handler(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
            flag.raised, flag.signum = True, signum

        for s in signals:
            signal.signal(s, handler)
        return flag

    @property
    def by_user(self) -> bool:
        """Stopped by Ctrl-C: a person wants the job to end, not to be requeued."""
        return self.signum == signal.SIGINT


def resume_command(run_dir: Path) -> str:
    """The command that continues a stopped run from its latest checkpoint, typed in the current folder."""
    cmd = ["areal-hpc", "train", str(run_dir / "config.yaml")]
    try:
        run = yaml.safe_load((run_dir / "config.yaml").read_text())["run"]
        found = (Path(run["output_dir"]) / run["name"]).resolve()
        auto = run.get("resume", "auto") == "auto"
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        found, auto = None, True
    if found != run_dir.resolve():  # a relative run.output_dir read from another folder, or a moved run
        cmd += [f"run.output_dir={run_dir.resolve().parent}", f"run.name={run_dir.name}"]
    if not auto:
        cmd.append("run.resume=auto")
    return shlex.join(cmd)


def requeue_this_job() -> bool:
    """``scontrol requeue`` the Slurm job this process belongs to; False outside Slurm (or if it fails)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID") and \
        f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}" or os.environ.get("SLURM_JOB_ID")
    if not job:
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
