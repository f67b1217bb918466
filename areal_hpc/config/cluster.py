"""``cluster``: how many ranks of each role to start, and how."""

from __future__ import annotations

from dataclasses import dataclass

from areal_hpc.config.fields import need, setting


@dataclass
class ClusterConfig:
    """How many ranks of each role to start, and how."""

    n_trainer: int = setting(1, "number of trainer ranks (data parallel)")
    n_rollout: int = setting(2, "number of rollout (generation) ranks")
    launcher: str = setting(
        "auto",
        "how ranks are started: auto (detect Slurm/MPI), mpiexec, or none (already inside MPI)",
        ("auto", "mpiexec", "none"),
    )
    mpiexec: str = setting("mpiexec", "program used to start ranks when launching with mpiexec")
    cuda_mps: str = setting(
        "auto",
        "CUDA MPS daemon for the job, so ranks sharing a GPU run their kernels side by side instead of in "
        "time slices: auto = when ranks share a GPU and nvidia-cuda-mps-control is installed; on = always "
        "(an error if it cannot start); off = never. Started by `areal-hpc train` and slurm/run.sbatch (one node)",
        ("auto", "on", "off"),
    )

    def validate(self) -> None:
        need(self.n_trainer >= 1, "cluster.n_trainer", self.n_trainer, "must be >= 1", "use at least one trainer rank")
        need(self.n_rollout >= 1, "cluster.n_rollout", self.n_rollout, "must be >= 1", "use at least one rollout rank")
        need(bool(self.mpiexec.strip()), "cluster.mpiexec", self.mpiexec, "must name a program",
             "set cluster.mpiexec=mpiexec (or srun)")
