"""Which transport a rollout -> trainer pair uses, decided the same way on both ends."""

from __future__ import annotations

from typing import Any

from areal_hpc.comm.mpi import MPIContext
from areal_hpc.storage.records import RunFiles


def pair_uses_ring(kind: str, ctx: MPIContext, rollout_rank: int, trainer_rank: int) -> bool:
    """shm rings need one node's /dev/shm; ``auto`` falls back to HDF5 shards across nodes."""
    if kind == "auto":
        return ctx.same_node(rollout_rank, trainer_rank)
    if kind == "shm" and not ctx.same_node(rollout_rank, trainer_rank):
        raise RuntimeError(
            f"transport.kind=shm but rollout rank {rollout_rank} ({ctx.hosts[rollout_rank]}) and trainer rank "
            f"{trainer_rank} ({ctx.hosts[trainer_rank]}) are on different nodes; use transport.kind=auto or hdf5"
        )
    return kind == "shm"


def log_attrs(files: RunFiles, run_id: str, rank: int) -> dict[str, Any]:
    """Root attributes every shard of this rank carries (docs/rollout-log.md)."""
    config = files.config.read_text() if files.config.exists() else ""
    return {"run_id": run_id, "config_yaml": config, "rank": rank}
