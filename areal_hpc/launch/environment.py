"""How this process was started: by mpiexec, by srun, or by a person (then we start mpiexec)."""

from __future__ import annotations

import os

# Environment variables that process managers set for every rank they start.
_MPI_ENV = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALRANKID", "HYDI_CONTROL_FD")


def inside_mpi_job() -> bool:
    """True when a process manager (mpiexec, or srun starting several tasks) made this process a rank."""
    if any(k in os.environ for k in _MPI_ENV):
        return True
    return "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1


def check_world_matches_launcher(world_size: int) -> None:
    """srun without MPI wiring starts N tasks that each see an MPI world of one: say so, clearly."""
    tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "0") or 0)
    if "SLURM_STEP_ID" in os.environ and tasks > 1 and world_size == 1:
        raise RuntimeError(
            f"srun started {tasks} tasks but MPI sees a world of 1 in each: srun did not wire MPI up. "
            f"Use `srun --mpi=pmi2` (or --mpi=pmix, as your site's MPI needs) or set MpiDefault in slurm.conf"
        )
