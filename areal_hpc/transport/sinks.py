"""The sample path's two ends behind one interface each: rollouts ``put``, trainers ``poll``.

A rollout rank always writes its HDF5 log; a shared-memory ring to its trainer is added where both are
on one node (``transport.kind``). A trainer reads each of its rollout ranks from that rank's ring, or
from its HDF5 shards when there is no ring. The roles' loops see only ``SampleSink``/``SampleSource``
(``api.py``), so the transport can change without touching them.
"""

from __future__ import annotations

from collections.abc import Callable

from areal_hpc.comm.mpi import MPIContext
from areal_hpc.config import Config
from areal_hpc.storage.records import RunFiles
from areal_hpc.storage.writers import RolloutLogWriter
from areal_hpc.trajectory import Trajectory
from areal_hpc.transport.codec import decode, encode_parts
from areal_hpc.transport.hdf5_source import ShardSource
from areal_hpc.transport.select import log_attrs, pair_uses_ring
from areal_hpc.transport.shm_ring import ShmRing, ring_name

#: Records a trainer takes from one ring per poll: enough to drain a step's worth, bounded so one busy ring
#: cannot starve the others.
RING_POP_MAX = 256


class RolloutSink:
    """A rollout rank's ``SampleSink``: the HDF5 log always, and the ring when there is one."""

    def __init__(self, log: RolloutLogWriter, ring: ShmRing | None) -> None:
        self.log, self.ring = log, ring

    def put(self, traj: Trajectory, wait: Callable[[], None]) -> None:
        if self.ring is not None:
            self.ring.push_parts(encode_parts(traj, self.ring.full_waits), poll=wait)
        self.log.add(traj)  # without a ring, the log's shards are the transport

    def flush_if_due(self, idle: bool = False) -> None:
        # Shards are the transport without a ring: a waiting trainer must see what is buffered.
        self.log.flush_if_due(idle=idle and self.ring is None)

    @property
    def full_waits(self) -> int:
        return self.ring.full_waits if self.ring is not None else 0

    @property
    def wait_seconds(self) -> float:
        return self.ring.wait_seconds if self.ring is not None else 0.0

    @property
    def shards_written(self) -> int:
        return self.log.shards_written

    def close(self) -> None:
        self.log.flush()
        if self.ring is not None:
            self.ring.close()


class RingSource:
    """A trainer's ``SampleSource`` over one rollout rank's ring (the trainer created it, and unlinks it)."""

    def __init__(self, ring: ShmRing) -> None:
        self.ring = ring
        self.full_waits = 0  # the producer's count, as its last record said

    def poll(self) -> list[Trajectory]:
        out = []
        for raw in self.ring.pop_many(RING_POP_MAX):
            traj, waits = decode(raw)
            self.full_waits = max(self.full_waits, waits)
            out.append(traj)
        return out

    def close(self) -> None:
        self.ring.unlink()


def rollout_sink(cfg: Config, ctx: MPIContext, files: RunFiles, run_id: str, trainer: int) -> RolloutSink:
    """This rollout rank's sink; attaching its ring waits for the trainer to create it (``trainer_sources``)."""
    ring = None
    if pair_uses_ring(cfg.transport.kind, ctx, ctx.rank, trainer):
        ring = ShmRing.attach(ring_name(run_id, ctx.rank, trainer), timeout=120.0)
    log = RolloutLogWriter(files.rollout_log, ctx.topo.role_rank, attrs=log_attrs(files, run_id, ctx.rank),
                           shard_samples=cfg.log.shard_samples, flush_s=cfg.log.flush_s,
                           compression=cfg.log.compression)
    return RolloutSink(log, ring)


def trainer_sources(cfg: Config, ctx: MPIContext, files: RunFiles, run_id: str) -> dict[int, RingSource | ShardSource]:
    """A source per rollout rank this trainer feeds on, by rank: rings are created here, before the rollouts
    attach to them."""
    topo = ctx.topo
    out: dict[int, RingSource | ShardSource] = {}
    for r in topo.rollouts_of(ctx.rank):
        if pair_uses_ring(cfg.transport.kind, ctx, r, ctx.rank):
            out[r] = RingSource(ShmRing.create(ring_name(run_id, r, ctx.rank), cfg.transport.ring_bytes))
        else:  # rollout ranks on other nodes (or transport.kind=hdf5)
            out[r] = ShardSource(files.rollout_log, r - topo.n_trainer, retain=cfg.transport.retain_shards,
                                 poll_s=cfg.transport.poll_s)
    return out
