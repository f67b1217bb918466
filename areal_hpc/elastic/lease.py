"""An attached worker's registration and lease: the heartbeat a trainer reads to know it is alive.

A worker takes the next free id by creating its folder (``mkdir`` is atomic, also over NFS), then replaces
``lease.json`` every ``elastic.heartbeat_s``. A trainer takes a worker whose lease is older than
``elastic.lease_s`` as gone (killed: SIGKILL leaves no goodbye) and one whose state is ``left`` as gone
after its last shard (it left on Slurm's SIGTERM/SIGUSR1 or was told to stop).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

from areal_hpc.elastic.layout import ElasticFiles, read_json, write_json

State = Literal["starting", "ready", "left"]


@dataclass
class Lease:
    worker: int
    attempt: int  # the run's attempt the worker registered with (a requeued run starts a new one)
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    job: str = field(default_factory=lambda: slurm_job_name())
    state: State = "starting"
    version: int = -1  # the weights version its engine runs (-1: none loaded yet)
    loading: int = -1  # the version being read from disk (-1: none), kept from pruning
    samples: int = 0  # samples written to its shards
    groups: int = 0
    started: float = field(default_factory=time.time)
    time: float = field(default_factory=time.time)
    reason: str = ""  # why it left

    def held_versions(self) -> list[int]:
        return [v for v in (self.version, self.loading) if v >= 0]

    def expired(self, now: float, lease_s: float) -> bool:
        return self.state != "left" and now - self.time > lease_s


def slurm_job_name() -> str:
    """``ARRAY_TASK`` for an array task (what squeue shows, and what scancel takes for this task alone: the first
    task's own job id is the array's, which scancel would take as every task), else the job id, else ``local``."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID", "local")


def register(files: ElasticFiles, attempt: int) -> Lease:
    """Take the next free worker id and write the first lease."""
    files.workers.mkdir(parents=True, exist_ok=True)
    while True:
        ids = files.worker_ids()
        wid = ids[-1] + 1 if ids else 0
        try:
            files.worker(wid).mkdir()
        except FileExistsError:  # another worker took it between the listing and the mkdir
            continue
        lease = Lease(worker=wid, attempt=attempt)
        renew(files, lease)
        return lease


def renew(files: ElasticFiles, lease: Lease) -> None:
    lease.time = time.time()
    write_json(files.lease(lease.worker), asdict(lease))


def read_lease(files: ElasticFiles, wid: int) -> Lease | None:
    """The worker's last lease; None while its folder exists without one (it is registering) or if the
    record cannot be read (a torn copy on a filesystem without atomic rename: the next look reads it)."""
    try:
        rec = read_json(files.lease(wid))
    except ValueError:
        return None
    if rec is None:
        return None
    return Lease(**rec)


def read_leases(files: ElasticFiles) -> dict[int, Lease]:
    out = {}
    for wid in files.worker_ids():
        lease = read_lease(files, wid)
        if lease is not None:
            out[wid] = lease
    return out


class Heartbeat:
    """Renews a lease from a thread every ``every_s``: a model load, an engine build (vLLM's takes minutes) or a
    long decode step must not look like a dead worker. The owner updates the lease's fields as it works."""

    def __init__(self, files: ElasticFiles, lease: Lease, every_s: float) -> None:
        self.files, self.lease = files, lease
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, args=(every_s,), name="elastic-lease", daemon=True)
        self._thread.start()

    def _loop(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            renew(self.files, self.lease)

    def stop(self) -> None:
        """Stop renewing, then write the lease once more as it stands (e.g. ``left`` with its reason)."""
        self._stop.set()
        self._thread.join()
        renew(self.files, self.lease)
