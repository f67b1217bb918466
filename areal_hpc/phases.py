"""Wall seconds of a rank's one-time phases: where a job's time goes outside its training steps.

A run's samples/s counts only the training loop; the rest (imports, building the initial policy, the
engine's warm-up, compiling, the final save) is easily larger on a short run and must be seen, not guessed.
Each rank times its phases; trainer 0 gathers them into ``summary.json``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


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


# A trainer's phases before its first step and after its last, in the order they run.
SETUP = ("launch", "startup", "initial_policy", "distributed", "build", "eval_before", "wait_peers", "compile")
TEARDOWN = ("stop_rollouts", "eval_after", "save_final")


def outside_steps(phases: dict[str, float]) -> tuple[float, float]:
    """(setup, teardown) seconds of a trainer's phases: everything before the first step, after the last."""
    return sum(phases.get(k, 0.0) for k in SETUP), sum(phases.get(k, 0.0) for k in TEARDOWN)
