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


def world_bcast(obj: Any, root: int = 0) -> Any:
    """``root``'s ``obj`` on every rank of COMM_WORLD, before the role communicators exist."""
    from mpi4py import MPI

    return MPI.COMM_WORLD.bcast(obj, root=root)


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
        check_world_size(self.world.size, n_trainer, n_rollout)
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


# Set by a launcher that reads the ranks' error files after the job and prints the first cause itself
# (``areal-hpc train``/``submit --local``): the ranks then leave the console alone.
LAUNCHER_REPORTS_ENV = "AREAL_HPC_LAUNCHER_REPORTS_ERRORS"
FIRST_FAILURE_FILE = "first"  # in the errors folder: the name of the first rank's error file


def error_file_name(rank: int) -> str:
    return f"rank{rank}.txt"


def check_world_size(size: int, n_trainer: int, n_rollout: int) -> None:
    """Raise the one-line error for an MPI world that does not match the config's ranks."""
    expected = n_trainer + n_rollout
    if size != expected:
        raise RuntimeError(
            f"MPI world has {size} ranks but cluster.n_trainer + cluster.n_rollout = {n_trainer} + {n_rollout} = "
            f"{expected}; start {expected} ranks (mpiexec -n {expected} / srun -n {expected}) or change the config"
        )


def failure_summary(rank: int, exc: BaseException) -> str:
    """``rank N failed: Type: first line of the message``: what a console line can hold."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"rank {rank} failed: {type(exc).__name__}" + (f": {lines[0]}" if lines else "")


def report_failure(exc: BaseException, rank: int, error_dir: str | None) -> None:
    """Keep the traceback in the rank log and ``error_dir/rankN.txt``; print one line, once per job.

    A failure shows on every rank that hits it (a bad dataset row, a missing checkpoint) and a rank's
    death makes its peers fail too: the same traceback several times on the console buried the cause.
    The first rank to fail claims the report; under a launcher that reports (``LAUNCHER_REPORTS_ENV``),
    no rank prints at all and the launcher prints the line after the job.
    """
    summary = failure_summary(rank, exc)
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    _log_to_files(summary, exc)
    where = None
    first = True
    if error_dir:
        try:
            os.makedirs(error_dir, exist_ok=True)
            where = os.path.join(error_dir, error_file_name(rank))
            tmp = f"{where}.{os.getpid()}.tmp"  # never an empty or half-written file under the final name
            with open(tmp, "w") as f:
                f.write(f"{summary}\n\n{tb}")
            os.replace(tmp, where)
            first = _claim_first(error_dir, error_file_name(rank))
        except OSError:
            where = None
    if first and not os.environ.get(LAUNCHER_REPORTS_ENV):
        tail = f"; full traceback in {where}" if where else "; the traceback is in this rank's log"
        print(f"areal-hpc: {summary}{tail}", file=sys.stderr, flush=True)


def _claim_first(error_dir: str, name: str) -> bool:
    """True for the first rank of the job to claim the report (exclusive create, atomic on shared filesystems)."""
    try:
        fd = os.open(os.path.join(error_dir, FIRST_FAILURE_FILE), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(name + "\n")
    return True


def _log_to_files(summary: str, exc: BaseException) -> None:
    """The traceback to the rank's log files only: the console gets (at most) one line."""
    root = logging.getLogger()
    record = root.makeRecord(log.name, logging.CRITICAL, __file__, 0, "%s", (summary,),
                             (type(exc), exc, exc.__traceback__))
    for h in root.handlers:
        if isinstance(h, logging.FileHandler) and record.levelno >= h.level:
            h.handle(record)


def _stderr_to_rank_log() -> None:
    """MPICH's own notice of the abort names no cause: send it to the rank log, not the console."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            try:
                sys.stderr.flush()
                with open(h.baseFilename, "a") as f:
                    os.dup2(f.fileno(), 2)
            except OSError:
                pass
            return


def run_or_abort(fn, *, rank: int, error_dir: str | None = None) -> Any:
    """Run ``fn``; on any exception report it (``report_failure``) and abort the job.

    Without the abort, peers blocked in a collective or a ring wait would hang until the wall-clock
    limit of the Slurm allocation.
    """
    try:
        return fn()
    except BaseException as e:  # noqa: BLE001 - any failure must take the whole job down
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        report_failure(e, rank, error_dir)
        _stderr_to_rank_log()
        from mpi4py import MPI

        MPI.COMM_WORLD.Abort(1)
        raise
