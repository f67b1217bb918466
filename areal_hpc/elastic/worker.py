"""An attached rollout worker: generates the prompt groups a trainer grants it, with the newest weights on disk.

It runs outside the run's MPI job (``areal-hpc attach``: a Slurm array task or a process on any machine that
mounts the run folder). It registers (``lease.py``), loads the newest version from the disk channel, then
loops like an in-job rollout rank (``rollout/producer.py``): service its lease, grants and weights between
decode steps (a new version lands between two steps; each token records the version that sampled it), admit
a granted group once its weights are within η of the grant's step, decode, score, and write the samples as
HDF5 shards ``rollout-r{1000+id}-…`` that the trainer reads.

It leaves when the run ends or is requeued, when the trainer revokes it, or on SIGTERM/SIGUSR1/SIGINT (Slurm's
preemption and time-limit signals): it stops admitting, lets the groups being scored finish, writes its open
shard and marks its lease ``left``. Groups still decoding are abandoned; the trainer gives their grants to
other producers. SIGKILL leaves no goodbye: the lease expires and the same happens.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

import torch

from areal_hpc.config import Config
from areal_hpc.elastic.layout import SHARD_INDEX_BASE, ElasticFiles, read_json
from areal_hpc.elastic.lease import Heartbeat, Lease, register, renew
from areal_hpc.logs import setup_logging
from areal_hpc.model.build import load_policy
from areal_hpc.rollout.producer import GroupProducer, granted_sample_base
from areal_hpc.storage.records import RunFiles
from areal_hpc.storage.writers import RolloutLogWriter
from areal_hpc.transport.select import log_attrs
from areal_hpc.transport.sinks import RolloutSink
from areal_hpc.weights.disk import DiskWeightReader

log = logging.getLogger(__name__)

#: Seconds a leaving worker waits for the groups being scored before it writes its last shard.
SCORING_GRACE_S = 10.0


class AttachedWorker(GroupProducer):
    def __init__(self, cfg: Config, run_dir: Path, record: dict, lease: Lease, signalled: list[str]) -> None:
        self.signalled = signalled  # names of the signals received (set by the handlers: act between steps)
        self.files, self.run_files = ElasticFiles(run_dir), RunFiles(run_dir)
        self.lease, self.attempt = lease, int(record["attempt"])
        wid = lease.worker
        model, tok = load_policy(record["policy"], cfg.model.dtype, cfg.model.device)
        super().__init__(cfg, model, tok, rank=-1, worker=wid, seed=cfg.run.seed * 7919 + 1_000_003 * (wid + 1))
        self.reader = DiskWeightReader(self.files.weights, poll_s=cfg.elastic.poll_s)
        writer = RolloutLogWriter(self.run_files.rollout_log, SHARD_INDEX_BASE + wid,
                                  attrs=log_attrs(self.run_files, record["run_id"], -1),
                                  shard_samples=cfg.log.shard_samples, flush_s=cfg.log.flush_s,
                                  compression=cfg.log.compression)
        self.sink = RolloutSink(writer, None)  # shards are its only transport
        self._queue: list[tuple[int, int, int]] = []  # granted (prompt, issue, step), in the trainer's order
        self._grants_read = 0  # bytes of grants.jsonl already taken
        self._next_look = 0.0
        self.stop = ""  # why it leaves ('' while it works)
        self.versions_applied = 0

    # -- between decode steps ----------------------------------------------------------------------------
    def poll(self) -> None:
        now = time.monotonic()
        if now >= self._next_look:
            self._next_look = now + self.cfg.elastic.poll_s
            self._read_grants()
            self._check_run()
            self.reader.poll()
        if self.signalled and not self.stop:
            self.stop = f"{self.signalled[0]} (preempted or time limit)"
        ready = self.reader.ready()
        if ready is not None:
            version, tensors = ready
            if version > self.engine.version:
                self.engine.update_weights(tensors, version)
                self.versions_applied += 1
        loading = self.reader.loading_version  # the heartbeat thread writes these with the next renewal
        self.lease.version, self.lease.loading = self.engine.version, -1 if loading is None else loading
        self.lease.samples, self.lease.groups = self.pushed, self.pushed // self.G

    def _read_grants(self) -> None:
        try:
            with open(self.files.grants(self.lease.worker), "rb") as f:
                f.seek(self._grants_read)
                data = f.read()
        except FileNotFoundError:
            return
        end = data.rfind(b"\n") + 1  # a line the trainer is still appending is taken next time
        for line in data[:end].splitlines():
            g = json.loads(line)
            self._queue.append((int(g["prompt"]), int(g["issue"]), int(g["step"])))
        self._grants_read += end
        self._queue.sort(key=lambda g: g[2])  # a grant re-issued from a worker that left may be for an earlier step

    def _check_run(self) -> None:
        revoked = read_json(self.files.revoked(self.lease.worker))
        if revoked is not None:
            self.stop = f"told to stop: {revoked.get('reason', '')}"
            return
        run = read_json(self.files.run)
        if run is None or run.get("state") != "running":
            self.stop = f"the run is {run.get('state') if run else 'gone'}"
        elif int(run.get("attempt", -1)) != self.attempt:
            self.stop = "the run restarted (attach again to join its new attempt)"

    def _admit(self) -> None:
        limit = self.engine.version + self.cfg.rollout.eta  # a grant of a later step must wait for newer weights
        while self._queue and self.engine.free_slots() >= self.G and self._queue[0][2] <= limit:
            prompt, issue, _ = self._queue.pop(0)
            self._submit_group(prompt, granted_sample_base(self.attempt, issue, self.G))

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self, first_weights_s: float) -> int:
        version, tensors = self.reader.wait_for(0, timeout=first_weights_s)
        self.engine.update_weights(tensors, version)
        self.lease.state, self.lease.version = "ready", version
        renew(self.files, self.lease)  # ready now, not at the next heartbeat
        log.warning("worker %d ready at version %d", self.lease.worker, version)
        while not self.stop:
            self.poll()
            if self.stop:
                break
            self._admit()
            if self.engine.num_active():
                for g in self.engine.step():
                    self._finish(g)
                pushed = self.pushed
                self._collect()
                # A granted group is awaited by name at its step: its shard closes as soon as it is in.
                self.sink.flush_if_due(idle=self.pushed > pushed)
            else:
                self._collect()
                self.sink.flush_if_due(idle=True)
                time.sleep(0.002)
        return self._leave()

    def _leave(self) -> int:
        """Deliver what is scored (waiting a little for groups in the reward pool), write the open shard, and
        say so in the lease; groups still decoding are abandoned (their grants go to other producers)."""
        deadline = time.monotonic() + SCORING_GRACE_S
        while self._scoring and time.monotonic() < deadline:
            self._collect()
            time.sleep(0.01)
        self.rewards.close()
        self.sink.close()
        self.reader.close()
        self.lease.samples, self.lease.groups = self.pushed, self.pushed // self.G
        self.lease.state, self.lease.reason = "left", self.stop
        log.warning("worker %d left (%s): %d samples delivered", self.lease.worker, self.stop, self.pushed)
        return 0


def _threads() -> int:
    """CPU threads for the worker's torch: its Slurm task's cores, else the cores it is pinned to, else a
    quarter of the machine's (a worker started by hand likely shares the machine with the run's own ranks)."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if cpus.isdigit() and int(cpus) > 0:
        return int(cpus)
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 4)
    return allowed if allowed < (os.cpu_count() or 4) else max(1, allowed // 4)


def run_worker(run_dir: Path, overrides: list[str]) -> int:
    """Attach one rollout worker to the run in ``run_dir`` and work until it leaves; its exit status."""
    from areal_hpc.elastic.attachable import check_attachable

    run_dir = Path(run_dir)
    cfg = check_attachable(run_dir, overrides)
    files = ElasticFiles(run_dir)
    record = read_json(files.run) or {}
    lease = register(files, int(record["attempt"]))
    heartbeat = Heartbeat(files, lease, cfg.elastic.heartbeat_s)
    setup_logging(RunFiles(run_dir).logs / f"worker{lease.worker}.log", f"worker {lease.worker}", cfg.run.log_level)
    torch.set_num_threads(_threads())
    leaving: list[str] = []

    def on_signal(signum: int, _frame) -> None:  # only a flag: the loop leaves between two decode steps
        leaving.append(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        worker = AttachedWorker(cfg, run_dir, record, lease, leaving)
        return worker.run(first_weights_s=max(cfg.run.timeout_s, 4 * cfg.elastic.lease_s))
    except BaseException as e:
        if lease.state != "left":
            lease.state, lease.reason = "left", f"failed: {type(e).__name__}: {e}"
        raise
    finally:
        heartbeat.stop()  # the last renewal says left, and why


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m areal_hpc.elastic.worker RUN_DIR [key=value ...]", file=sys.stderr)
        return 2
    return run_worker(Path(args[0]), args[1:])


if __name__ == "__main__":
    sys.exit(main())
