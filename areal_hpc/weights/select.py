"""Which weight-sync path a job uses (``weights.kind``), decided identically on every rank.

Every rank reports where its model lives (host, device, GPU UUID, dtype); the choice is a pure
function of that list, so trainers and rollouts agree without further messages. With ``shared``,
trainer rank 0 creates the buffers and broadcasts their handle once over MPI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from areal_hpc.api import WeightReceiver as Receiver
from areal_hpc.api import WeightSender as Sender
from areal_hpc.comm.mpi import MPIContext
from areal_hpc.config.schema import WeightsConfig
from areal_hpc.weights.broadcast import WeightReceiver, WeightSender
from areal_hpc.weights.shared import SharedWeightReceiver, SharedWeightSender

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Placement:
    """Where one rank's model lives."""

    host: str
    device: str  # "cpu" or "cuda:<index>"
    gpu_uuid: str | None
    dtype: str  # e.g. "bfloat16"

    def where(self) -> str:
        return f"{self.host} {self.device}" + (f" (GPU {self.gpu_uuid})" if self.gpu_uuid else "")


def placement_of(host: str, device: torch.device, dtype: torch.dtype) -> Placement:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = str(getattr(torch.cuda.get_device_properties(index), "uuid", "")) or None
        return Placement(host, f"cuda:{index}", uuid, str(dtype).removeprefix("torch."))
    return Placement(host, device.type, None, str(dtype).removeprefix("torch."))


def _mismatch(trainer: Placement, other: Placement) -> str | None:
    """Why ``other`` cannot map trainer 0's buffers, or None when it can."""
    if other.host != trainer.host:
        return "is on another node"
    if trainer.device.startswith("cuda") != other.device.startswith("cuda"):
        return "is on another device type"
    if trainer.gpu_uuid and other.gpu_uuid:
        return None if trainer.gpu_uuid == other.gpu_uuid else "is on another GPU"
    return None if trainer.device == other.device else "is on another GPU"


def choose_kind(kind: str, placements: list[Placement], rollout_ranks: list[int]) -> str:
    """``shared`` or ``broadcast`` for ``weights.kind`` given every rank's placement (index = rank)."""
    if kind == "broadcast":
        return kind
    trainer = placements[0]
    for r in rollout_ranks:
        why = _mismatch(trainer, placements[r])
        if why is None:
            continue
        if kind == "shared":
            raise RuntimeError(
                f"weights.kind=shared but rollout rank {r} ({placements[r].where()}) {why} than trainer rank 0 "
                f"({trainer.where()}); place every rollout rank on trainer 0's node and GPU, or set "
                "weights.kind=auto (falls back to broadcast) or weights.kind=broadcast")
        return "broadcast"
    if kind not in ("auto", "shared"):
        raise ValueError(f"weights.kind={kind!r}: choose auto, broadcast or shared")
    return "shared"


def shared_path(run_id: str) -> str:
    """The /dev/shm file name; matches the start-up ``cleanup_stale(f"areal_{run_id}_")``."""
    return f"/dev/shm/areal_{run_id}_weights"


def _agree(cfg: WeightsConfig, ctx: MPIContext, device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    placements = ctx.allgather(placement_of(ctx.hostname(), device, dtype))
    kind = choose_kind(cfg.kind, placements, ctx.topo.rollout_ranks)
    rollout_dtype = placements[ctx.topo.rollout_ranks[0]].dtype if ctx.topo.rollout_ranks else "float32"
    if ctx.rank == 0:
        log.info("weights.kind=%s -> %s (trainer 0 on %s)", cfg.kind, kind, placements[0].where())
    return kind, rollout_dtype


def build_sender(cfg: WeightsConfig, ctx: MPIContext, group, params: list[tuple[str, torch.Tensor]],
                 device: torch.device, run_id: str, timeout_s: float) -> Sender | None:
    """Collective with ``build_receiver``: every trainer rank calls it; only rank 0 gets a sender."""
    kind, rollout_dtype = _agree(cfg, ctx, device, params[0][1].dtype)
    if kind == "broadcast":
        return WeightSender(params, group, cfg.bucket_mb, device, dtype=getattr(torch, rollout_dtype)) \
            if ctx.rank == 0 else None
    sender = None
    if ctx.rank == 0:
        sender = SharedWeightSender(params, path=shared_path(run_id), n_readers=ctx.topo.n_rollout,
                                    dtype=getattr(torch, rollout_dtype), device=device, timeout_s=timeout_s)
    ctx.bcast(sender.handle() if sender is not None else None, root=0)
    return sender


def build_receiver(cfg: WeightsConfig, ctx: MPIContext, group, params: list[tuple[str, torch.Tensor]],
                   device: torch.device, timeout_s: float) -> Receiver:
    """Collective with ``build_sender``: every rollout rank calls it."""
    kind, _ = _agree(cfg, ctx, device, params[0][1].dtype)
    if kind == "broadcast":
        return WeightReceiver(params, group, cfg.bucket_mb, device)
    handle = ctx.bcast(None, root=0)
    return SharedWeightReceiver(handle, ctx.topo.role_rank, device, params, timeout_s=timeout_s)
