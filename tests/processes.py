"""Watching the processes of a job a test started."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_gone(pids: list[int], timeout: float = 10.0) -> bool:
    """Whether every process in ``pids`` has exited within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(alive(p) for p in pids)


def wait_for_steps(proc: subprocess.Popen, run_dir: Path, steps: int, timeout: float = 240) -> None:
    """Until the running job has written ``steps`` rows of metrics (fails the test if it ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
        time.sleep(0.2)
    pytest.fail(f"job did not reach step {steps}")
