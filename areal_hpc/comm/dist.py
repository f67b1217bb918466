"""torch.distributed for tensor traffic, with the rendezvous exchanged over MPI.

MPI gives every rank the address of rank 0, so no MASTER_ADDR/PORT has to be configured by hand
on a cluster. Two groups are built: the trainers' data-parallel group and the weight-broadcast
group {trainer 0} ∪ rollout ranks.
"""

from __future__ import annotations

import datetime
import logging
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from areal_hpc.comm.mpi import MPIContext

log = logging.getLogger(__name__)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pick_backend(requested: str, gpu_shared: bool = False) -> str:
    """auto: NCCL when every rank has a GPU of its own; gloo on CPU or when ranks share a GPU
    (NCCL refuses two ranks on one device; those ranks sync weights by CUDA IPC instead)."""
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() and not gpu_shared else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise RuntimeError("weights.backend=nccl needs CUDA, which this rank does not see; use weights.backend=gloo")
    return requested


@dataclass
class DistGroups:
    backend: str
    dp: object | None  # trainers' data-parallel group (None with one trainer)
    weights: object  # trainer 0 + all rollout ranks


def init_distributed(ctx: MPIContext, backend: str, timeout_s: float = 600.0, gpu_shared: bool = False) -> DistGroups:
    """Initialise the default process group over all ranks and create the two sub-groups."""
    backend = pick_backend(backend, gpu_shared)
    addr = None
    if ctx.rank == 0:
        host = socket.gethostname()
        try:
            ip = socket.gethostbyname(host)
        except OSError:
            ip = "127.0.0.1"
        addr = f"tcp://{ip}:{_free_port(ip)}"
    addr = ctx.world.bcast(addr, root=0)
    dist.init_process_group(backend, init_method=addr, rank=ctx.rank, world_size=ctx.world.size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    topo = ctx.topo
    # new_group is collective: every rank calls it for every group, in the same order.
    dp = dist.new_group(list(range(topo.n_trainer))) if topo.n_trainer > 1 else None
    weights = dist.new_group([0, *topo.rollout_ranks])
    log.info("torch.distributed up (%s) at %s", backend, addr)
    return DistGroups(backend=backend, dp=dp if topo.is_trainer else None, weights=weights)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
