"""A reward worker process: ``python -m areal_hpc.reward.worker READ_FD WRITE_FD``.

Started by :class:`~areal_hpc.reward.pool.RewardPool` as a fresh interpreter (never a fork of the rollout
rank, whose MPI and torch threads a fork would copy in an undefined state). It imports only the reward
package and what its scorer needs (sympy for math; no torch), receives the pickled scorer, says it is
ready, then scores tasks one at a time in its main thread, where math-verify's ``signal.alarm`` works.
The pool owns the deadline: it kills this process (and its children) when a task runs too long.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time
from multiprocessing.connection import Connection

from areal_hpc.reward.result import RewardResult

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the thread that started this process ends, so a rollout rank that dies hard
    leaves no worker behind (a closed pipe alone would not stop a worker busy in a long task)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent was already gone before prctl took effect
        os._exit(0)


def main(argv: list[str]) -> int:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the rank; the pool stops its workers
    tasks, results = Connection(int(argv[1]), writable=False), Connection(int(argv[2]), readable=False)
    try:
        scorer = tasks.recv()
        scorer.warm()
    except Exception as e:
        results.send(("error", f"{type(e).__name__}: {' '.join(str(e).split())}"[:300]))
        return 1
    results.send(("ready", os.getpid()))
    while True:
        try:
            task_id, problem, tokens, text = tasks.recv()
        except (EOFError, OSError):  # the pool closed the pipe: stop
            return 0
        t0 = time.monotonic()
        try:
            result = scorer(problem, tokens, text)
        except Exception as e:  # the problem check (the pool already ran it) or a bug: one result regardless
            result = RewardResult(0.0, time.monotonic() - t0, error=f"{type(e).__name__}: {e}"[:200])
        results.send((task_id, result))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
