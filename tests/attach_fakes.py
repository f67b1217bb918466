"""Stand-ins for the attached worker's loop (``areal-hpc attach --entry``): a lease and a goodbye, no engine.

They do what the real loop does towards the run folder and Slurm (register, renew the lease, leave on
SIGTERM/SIGUSR1 with the reason), so the launch side can be tested without a model.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from areal_hpc.elastic.layout import ElasticFiles, read_json
from areal_hpc.elastic.lease import register, renew

HEARTBEAT_S = 0.2
MAX_S = 120.0  # a worker nobody stops ends by itself, so a failed test leaves no job behind


def lease_until_signal(run_dir: Path, overrides: list[str]) -> int:
    """Register, heartbeat as ``ready`` until SIGTERM or SIGUSR1, then write ``left`` with the signal's name."""
    files = ElasticFiles(run_dir)
    caught: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: caught.append(signal.Signals(signum).name))
    lease = register(files, attempt=int((read_json(files.run) or {}).get("attempt", 0)))
    lease.state = "ready"
    deadline = time.monotonic() + MAX_S
    while not caught and time.monotonic() < deadline:
        lease.samples += 1
        renew(files, lease)
        time.sleep(HEARTBEAT_S)
    lease.state, lease.reason = "left", caught[0] if caught else "nobody stopped it"
    renew(files, lease)
    return 0


def lease_once(run_dir: Path, overrides: list[str]) -> int:
    """Register and leave at once, the overrides as the reason; exit code 3 (tests see it passed through)."""
    files = ElasticFiles(run_dir)
    lease = register(files, attempt=0)
    lease.state, lease.reason = "left", " ".join(overrides)
    renew(files, lease)
    return 3


def usr2_to_self(run_dir: Path, overrides: list[str]) -> int:
    """Send itself SIGUSR2 (submitit's requeue signal) with only a SIGTERM handler of its own: 0 when that
    handler ran (the array task turned the USR2 into a TERM), 5 when not."""
    caught: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
    os.kill(os.getpid(), signal.SIGUSR2)
    deadline = time.monotonic() + 5
    while not caught and time.monotonic() < deadline:
        time.sleep(0.01)
    return 0 if caught else 5
