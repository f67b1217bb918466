"""One GPU per rank where the node has enough, a shared GPU where it has not.

Ranks on a node are numbered in world-rank order (trainers first), so on a 4-GPU node with 1
trainer and 3 rollouts the trainer gets GPU 0 and each rollout its own GPU; on a 1-GPU node every
rank shares GPU 0 (then weights travel by CUDA IPC and NCCL is not used between them). A launcher
that already restricts each rank to one device (``srun --gpus-per-task=1`` sets
``CUDA_VISIBLE_DEVICES``) leaves one visible GPU, index 0, which is what this picks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from areal_hpc.comm.mpi import MPIContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuBinding:
    local_rank: int
    local_size: int
    n_gpus: int  # visible on this rank's node
    device: int | None  # CUDA index this rank uses, None on CPU
    shared: bool  # some GPU of the job serves more than one rank (NCCL cannot run between those)


def local_ranks(hosts: list[str], rank: int) -> tuple[int, int]:
    """This rank's index among the ranks on its host, and how many ranks that host has."""
    same = [r for r, h in enumerate(hosts) if h == hosts[rank]]
    return same.index(rank), len(same)


def bind_gpu(ctx: MPIContext, device: str) -> GpuBinding:
    """Pick and set this rank's CUDA device (collective: every rank calls it)."""
    use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
    n = torch.cuda.device_count() if use_cuda else 0
    hosts = ctx.allgather(ctx.hostname())
    local, size = local_ranks(hosts, ctx.rank)
    index = local % n if n else None
    if index is not None:
        torch.cuda.set_device(index)
    shared = any(ctx.allgather(bool(n) and size > n))
    binding = GpuBinding(local, size, n, index, shared)
    if index is not None:
        log.info("rank %d: GPU %d of %d on this node (local rank %d of %d)%s", ctx.rank, index, n, local, size,
                 "; GPUs are shared by several ranks" if shared else "")
    return binding
