"""Trainer 0's side of elastic rollout: the run's record in its folder, and the weights on disk for workers.

``RUN/elastic/run.json`` says the run takes workers: its attempt, the initial policy a worker builds its model
from, the hash of its config (``areal-hpc attach`` refuses a config edited since) and a heartbeat. A thread
renews the heartbeat, so a training step of minutes does not make the run look dead to ``attach``. At the end
the record says ``ended`` (or ``requeued``) and the workers leave.

While any worker of this attempt is attached, every new version is written to the disk channel
(``weights/disk.py``: a snapshot to CPU here, the write in the writer's thread); with none, nothing is.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from areal_hpc.config import Config
from areal_hpc.elastic.layout import ElasticFiles, write_json
from areal_hpc.elastic.lease import read_leases
from areal_hpc.weights.disk import DiskWeightWriter


def disk_dtype(cfg: Config) -> torch.dtype | None:
    """The workers' weight files: the rollout's dtype (half the bytes of fp32 masters on a GPU)."""
    name = cfg.elastic.weights_dtype
    if name == "auto":
        name = cfg.rollout.dtype if cfg.rollout.dtype != "auto" else (
            "bfloat16" if cfg.model.device.startswith("cuda") else cfg.model.dtype)
    return getattr(torch, name, None)


class ElasticHost:
    def __init__(self, cfg: Config, files: ElasticFiles, *, run_id: str, attempt: int, policy_path: str,
                 config_path: Path, version: int) -> None:
        self.cfg, self.files, self.attempt = cfg, files, attempt
        files.workers.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(files.weights, ignore_errors=True)  # an earlier attempt's versions (perhaps newer ones)
        self._record = {
            "run_id": run_id, "attempt": attempt, "state": "running", "policy": str(Path(policy_path).resolve()),
            "config_sha": hashlib.sha256(config_path.read_bytes()).hexdigest(), "time": time.time(),
            "host": socket.gethostname(), "pid": os.getpid(), "version": version}
        self._lock = threading.Lock()
        write_json(files.run, self._record)
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._renew_loop, name="elastic-run-record", daemon=True)
        self._beat.start()
        self.disk: DiskWeightWriter | None = None
        self._next_look = 0.0

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.cfg.elastic.heartbeat_s):
            self._write(time=time.time())

    def _write(self, **fields: object) -> None:
        with self._lock:
            self._record.update(fields)
            write_json(self.files.run, self._record)

    def _live_versions(self) -> list[int] | None:
        """Versions the live workers of this attempt hold (None: no live worker)."""
        now, out, live = time.time(), [], False
        for lease in read_leases(self.files).values():
            if lease.attempt == self.attempt and lease.state != "left" and \
                    not lease.expired(now, self.cfg.elastic.lease_s):
                live = True
                out.extend(lease.held_versions())
        return out if live else None

    def look(self, version: int, params: Callable[[], list[tuple[str, Tensor]]]) -> None:
        """Between steps (at most every ``elastic.poll_s``): once a worker registers, start the disk channel
        with the current version, so it has weights to start from."""
        now = time.monotonic()
        if self.disk is not None or now < self._next_look:
            return
        self._next_look = now + self.cfg.elastic.poll_s
        if self._live_versions() is not None:
            self.disk = DiskWeightWriter(self.files.weights, dtype=disk_dtype(self.cfg))
            self.disk.publish(version, params())

    def published(self, version: int, params: Callable[[], list[tuple[str, Tensor]]]) -> None:
        """A new version: on disk while workers are attached; older files no live worker holds are pruned."""
        with self._lock:
            self._record["version"] = version  # written with the next heartbeat
        if self.disk is None:
            return
        self.disk.publish(version, params())
        held = self._live_versions()
        self.disk.prune(held or [])

    def close(self, state: str) -> None:
        """The run's end (``ended``) or stop for a requeue (``requeued``): the workers finish and leave."""
        self._stop.set()
        self._beat.join()
        self._write(state=state, time=time.time())
        if self.disk is not None:
            self.disk.close()
