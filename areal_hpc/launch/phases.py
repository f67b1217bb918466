"""Wall seconds of a rank's one-time phases: where a job's time goes outside its training steps.

A run's samples/s counts only the training loop. On a fresh GPU machine a 48-step benchmark run took
300 s of wall time for 162 s of steps (tools/bench/NOTES.md, seventh session) and nothing said where
the rest went: imports, building the initial policy, the engine's tuning, compiling, the final save.
Each rank times its phases; trainer 0 gathers them into ``summary.json``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

# Set by the launcher to its start (epoch seconds), so the ranks can also count what came before them
# (the MPS daemon, mpiexec starting the interpreters).
LAUNCH_TIME_ENV = "AREAL_HPC_LAUNCH_TIME"


class Phases:
    """Named wall-clock durations, summed when a name repeats, in the order first seen."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + max(0.0, seconds)

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t)

    def as_dict(self) -> dict[str, float]:
        return dict(self.seconds)


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``): interpreter start, imports and MPI init
    before the first timed phase. None where ``/proc`` does not say."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))  # field 22: start time in ticks
    except (OSError, ValueError, IndexError):
        return None


def since_launch_s(environ: dict[str, str] | None = None) -> float | None:
    """Seconds since ``areal-hpc train`` started (from ``AREAL_HPC_LAUNCH_TIME``), None when not set."""
    value = (os.environ if environ is None else environ).get(LAUNCH_TIME_ENV)
    try:
        return max(0.0, time.time() - float(value)) if value else None
    except ValueError:
        return None


# A trainer's phases before its first step and after its last, in the order they run.
SETUP = ("launch", "startup", "initial_policy", "distributed", "build", "eval_before", "wait_peers", "compile")
TEARDOWN = ("stop_rollouts", "eval_after", "save_final")


def outside_steps(phases: dict[str, float]) -> tuple[float, float]:
    """(setup, teardown) seconds of a trainer's phases: everything before the first step, after the last."""
    return sum(phases.get(k, 0.0) for k in SETUP), sum(phases.get(k, 0.0) for k in TEARDOWN)
