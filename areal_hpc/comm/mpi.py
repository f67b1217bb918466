"""MPI world, role communicators and control messages: the only module that calls MPI directly.

Control messages (new version, credit, stop, stopped) are small pickled dicts on one tag. Sends are
non-blocking so a trainer never waits on a rollout rank that is busy decoding; receivers drain them
with ``poll()`` between decode steps and inside every wait loop.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

CONTROL_TAG = 17

def world_size() -> int:
    from mpi4py import MPI

    return MPI.COMM_WORLD.size


def world_rank() -> int:
    from mpi4py import MPI

    return MPI.COMM_WORLD.rank


def world_barrier() -> None:
    from mpi4py import MPI

    MPI.COMM_WORLD.Barrier()


@dataclass(frozen=True)
class Topology:
    """Who is who: ranks [0, n_trainer) train, the next n_rollout ranks generate.

    Rollout i feeds trainer i % n_trainer through its own ring; trainer rank 0 broadcasts weights.
    """

    n_trainer: int
    n_rollout: int
    rank: int

    @property
    def world_size(self) -> int:
        return self.n_trainer + self.n_rollout

    @property
    def is_trainer(self) -> bool:
        return self.rank < self.n_trainer

    @property
    def role(self) -> str:
        return "trainer" if self.is_trainer else "rollout"

    @property
    def role_rank(self) -> int:
        return self.rank if self.is_trainer else self.rank - self.n_trainer

    @property
    def rollout_ranks(self) -> list[int]:
        return list(range(self.n_trainer, self.world_size))

    def trainer_of(self, rollout_world_rank: int) -> int:
        return (rollout_world_rank - self.n_trainer) % self.n_trainer

    def rollouts_of(self, trainer_rank: int) -> list[int]:
        return [r for r in self.rollout_ranks if self.trainer_of(r) == trainer_rank]


class MPIContext:
    """COMM_WORLD split into role communicators, plus control messaging and job-wide abort."""

    def __init__(self, n_trainer: int, n_rollout: int) -> None:
        from mpi4py import MPI

        self._MPI = MPI
        self.world = MPI.COMM_WORLD
        expected = n_trainer + n_rollout
        if self.world.size != expected:
            raise RuntimeError(
                f"MPI world has {self.world.size} ranks but cluster.n_trainer + cluster.n_rollout = {expected}; "
                f"start {expected} ranks (mpiexec -n {expected} / srun -n {expected}) or change the config"
            )
        self.topo = Topology(n_trainer, n_rollout, self.world.rank)
        self.role_comm = self.world.Split(color=0 if self.topo.is_trainer else 1, key=self.world.rank)
        self.hosts: list[str] = self.world.allgather(MPI.Get_processor_name())
        self._pending_sends: list[Any] = []

    @property
    def rank(self) -> int:
        return self.world.rank

    def send(self, dest: int, msg: dict[str, Any]) -> None:
        """Non-blocking control send; completed requests are reaped lazily."""
        self._pending_sends.append(self.world.isend(msg, dest=dest, tag=CONTROL_TAG))
        if len(self._pending_sends) > 64:
            self._pending_sends = [r for r in self._pending_sends if not r.Test()]

    def poll(self) -> list[tuple[int, dict[str, Any]]]:
        """All control messages that have arrived, in order, as (source, message)."""
        out = []
        status = self._MPI.Status()
        while self.world.iprobe(source=self._MPI.ANY_SOURCE, tag=CONTROL_TAG, status=status):
            src = status.Get_source()
            out.append((src, self.world.recv(source=src, tag=CONTROL_TAG)))
        return out

    def flush_sends(self) -> None:
        for r in self._pending_sends:
            r.wait()
        self._pending_sends.clear()

    def any_in_role(self, flag: bool) -> bool:
        """True on every rank of this role if ``flag`` is set on any (ranks agree to stop together)."""
        return bool(self.role_comm.allreduce(int(flag), op=self._MPI.MAX))

    def allgather(self, obj: Any) -> list[Any]:
        """Collective over every rank: each rank's ``obj``, in rank order (e.g. placements)."""
        return self.world.allgather(obj)

    def bcast(self, obj: Any, root: int = 0) -> Any:
        """Collective over every rank: ``root``'s ``obj`` (e.g. a shared-memory handle)."""
        return self.world.bcast(obj, root=root)

    def hostname(self) -> str:
        return self.hosts[self.rank]

    def same_node(self, a: int, b: int) -> bool:
        return self.hosts[a] == self.hosts[b]

    def abort(self, code: int = 1) -> None:
        self.world.Abort(code)


def run_or_abort(fn, *, rank: int, error_dir: str | None = None) -> Any:
    """Run ``fn``; on any exception log it with the rank, write it to the run folder, abort the job.

    Without the abort, peers blocked in a collective or a ring wait would hang until the wall-clock
    limit of the Slurm allocation.
    """
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001 - any failure must take the whole job down
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        text = f"rank {rank} failed: {type(e).__name__}: {e}"
        log.critical("%s\n%s", text, traceback.format_exc())
        if error_dir:
            try:
                os.makedirs(error_dir, exist_ok=True)
                with open(os.path.join(error_dir, f"rank{rank}.txt"), "w") as f:
                    f.write(text + "\n\n" + traceback.format_exc())
            except OSError:
                pass
        print(f"[areal-hpc] {text}; aborting the MPI job", file=sys.stderr, flush=True)
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(1)
        raise
