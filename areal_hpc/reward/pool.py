"""Reward scoring off the decode loop: worker processes with a hard deadline per task.

The rollout loop ``submit``s a finished response and goes on decoding; it collects scores with ``ready()``
(non-blocking) or ``drain()``. Each worker is a fresh interpreter (``python -m areal_hpc.reward.worker``,
started like ``spawn``: never a fork of an MPI rank with torch threads) in its own session, so it imports no
torch and can be killed with everything it started. One thread per worker in this process feeds it tasks
from a shared queue and waits for its answer up to the deadline, ``max(timeout_s, scorer.limit_s(problem))
+ grace_s``; past it the worker and its children are killed and replaced, and the task scores
``RewardResult(0.0, elapsed, timed_out=True, error="killed after ...")``. A worker that dies (a segfault in a
C extension, ``os._exit``) is replaced the same way and its task scores 0 with the exit status. Every
submitted key gets exactly one RewardResult.

``workers=0`` scores inline in the caller with the same API (debugging, tiny runs); there only the
scorer's own limits apply (math-verify's signal, the sandbox's wall clock), nothing kills a stuck call.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from multiprocessing.connection import Connection
from typing import Any

from areal_hpc.reward.result import RewardResult
from areal_hpc.reward.scorer import Scorer
from areal_hpc.tasks.base import Problem

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # an interpreter importing sympy on a loaded node; not part of any task's deadline


class _WorkerStartError(RuntimeError):
    pass


class _Batch:
    """Tags the tasks of one ``score_all`` call, so they never mix with keys the caller submitted."""

    def __init__(self, n: int) -> None:
        self.results: list[RewardResult | None] = [None] * n
        self.left = n


def _worker_env() -> dict[str, str]:
    """This process's environment with its ``sys.path`` as PYTHONPATH, so the worker imports the same
    ``areal_hpc`` and the same ``reward.fn`` module (which may sit in a directory only this process added)."""
    env = dict(os.environ)
    paths = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children in their own process groups, as a sandbox starts them,
    included), from /proc; empty where there is no /proc."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for d in entries:
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(d))
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a worker, its process group and every process below it; reap the worker."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGSTOP)  # no new children while the tree is collected
        except ProcessLookupError:
            pass
        own = os.getpgrp()
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                group = os.getpgid(pid)
                if group != own:  # the worker's group, or a group a sandbox made for its run
                    os.killpg(group, signal.SIGKILL)
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        log.warning("reward worker %d did not exit after SIGKILL", proc.pid)


def _exit_reason(proc: subprocess.Popen) -> str:
    try:
        rc = proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        rc = proc.returncode
    if rc is not None and rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


class _Worker:
    """One worker process and the two pipes to it."""

    def __init__(self, scorer: Scorer) -> None:
        task_r, task_w = os.pipe()
        res_r, res_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "areal_hpc.reward.worker", str(task_r), str(res_w)],
                pass_fds=(task_r, res_w), stdin=subprocess.DEVNULL, env=_worker_env(), start_new_session=True)
        finally:
            os.close(task_r)
            os.close(res_w)
        self.tasks, self.results = Connection(task_w, readable=False), Connection(res_r, writable=False)
        try:
            self.tasks.send(scorer)
        except BaseException:
            self.kill()
            raise

    def wait_ready(self, timeout_s: float) -> None:
        try:
            if not self.results.poll(timeout_s):
                raise _WorkerStartError(f"not ready after {timeout_s:.0f} s")
            kind, detail = self.results.recv()
        except (EOFError, OSError):
            raise _WorkerStartError(f"died while starting ({_exit_reason(self.proc)})") from None
        if kind != "ready":
            raise _WorkerStartError(str(detail))

    def kill(self) -> None:
        _kill_tree(self.proc)
        self.tasks.close()
        self.results.close()


class _Slot(threading.Thread):
    """Feeds one worker process from the pool's queue and enforces the deadline of each task."""

    def __init__(self, pool: RewardPool, index: int) -> None:
        super().__init__(name=f"reward-worker-{index}", daemon=True)
        self.pool = pool
        self.worker: _Worker | None = None
        self.lock = threading.Lock()
        self.start_error = ""

    def _start_worker(self) -> None:
        with self.lock:
            if self.pool.closed:
                return
            try:
                self.worker = _Worker(self.pool.scorer)
            except Exception as e:  # no process to be had (EAGAIN, ENOMEM), or a scorer that does not pickle
                self.start_error = f"reward worker failed to start: {type(e).__name__}: {e}"[:300]
                log.error("%s", self.start_error)
                return
        try:
            self.worker.wait_ready(START_TIMEOUT_S)
            self.start_error = ""
        except _WorkerStartError as e:
            self._drop_worker()
            if not self.pool.closed:  # not the pool's own close() stopping a worker as it started
                self.start_error = f"reward worker failed to start: {e}"
                log.error("%s", self.start_error)

    def _drop_worker(self) -> None:
        with self.lock:
            worker, self.worker = self.worker, None
        if worker is not None:
            worker.kill()

    def stop(self) -> None:
        self._drop_worker()

    def run(self) -> None:
        pool = self.pool
        while not pool.closed:
            if self.worker is None:
                self._start_worker()
            item = pool.tasks.get()
            if item is None or pool.closed:
                break
            tag, key, problem, tokens, text = item
            try:
                result = self._score(problem, tokens, text)
            except Exception as e:  # a bug here must still give the key its one result, or drain() would hang
                log.exception("reward pool: scoring problem %s failed", problem.prompt_id)
                self._drop_worker()
                result = RewardResult(0.0, 0.0, error=f"reward pool error: {type(e).__name__}: {e}"[:200])
            pool.results.put((tag, key, result))
        self._drop_worker()

    def _score(self, problem: Problem, tokens: Sequence[int], text: str) -> RewardResult:
        worker = self.worker
        if worker is None:
            return RewardResult(0.0, 0.0, error=self.start_error or "reward pool closed")
        deadline = max(self.pool.timeout_s, self.pool.scorer.limit_s(problem)) + self.pool.grace_s
        t0 = time.monotonic()
        try:
            # Plain ints: numpy or torch scalars would make the worker import numpy or torch to unpickle them.
            worker.tasks.send((0, problem, [int(t) for t in tokens], text))
            if worker.results.poll(deadline):
                _, result = worker.results.recv()
                return result
        except (EOFError, OSError):
            elapsed = time.monotonic() - t0
            if self.pool.closed:
                return RewardResult(0.0, elapsed, error="reward pool closed")
            reason = _exit_reason(worker.proc)
            log.warning("reward worker %d died on problem %s (%s); starting another", worker.proc.pid,
                        problem.prompt_id, reason)
            self._drop_worker()
            return RewardResult(0.0, elapsed, error=f"reward worker died ({reason})")
        elapsed = time.monotonic() - t0
        log.warning("reward worker %d killed after %.1f s on problem %s; starting another", worker.proc.pid, elapsed,
                    problem.prompt_id)
        self._drop_worker()
        return RewardResult(0.0, elapsed, timed_out=True, error=f"killed after {elapsed:.1f} s")


class RewardPool:
    """Scores responses in ``workers`` processes (0: inline) so the caller never waits on a verifier.

    ``submit`` only queues; ``ready`` returns what is done; ``drain`` waits for the rest; ``score_all`` is a
    blocking ordered map for evaluation. Close it (``close()``, ``with``, or garbage collection) to stop the
    workers.
    """

    def __init__(self, scorer: Scorer, workers: int, timeout_s: float, grace_s: float = 2.0) -> None:
        if workers < 0:
            raise ValueError(f"reward.workers must be >= 0, got {workers}; set reward.workers=2")
        self.scorer, self.workers, self.timeout_s, self.grace_s = scorer, workers, timeout_s, grace_s
        self.closed = False
        self.tasks: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.results: queue.SimpleQueue[tuple[_Batch | None, Any, RewardResult]] = queue.SimpleQueue()
        self._done: list[tuple[Any, RewardResult]] = []
        self._submitted = 0  # the caller's keys only (not score_all's)
        self._arrived = 0
        self._slots = [_Slot(self, i) for i in range(workers)]
        for s in self._slots:
            s.start()

    # -- the caller's side ------------------------------------------------------------------------------
    def submit(self, key: Any, problem: Problem, tokens: Sequence[int], text: str) -> None:
        """Queue one response for scoring (inline mode: score it now); its result comes back under ``key``."""
        self._check_open()
        self.scorer.check(problem)
        self._submitted += 1
        if self.workers == 0:
            self._done.append((key, self.scorer(problem, tokens, text)))
            self._arrived += 1
        else:
            self.tasks.put((None, key, problem, tokens, text))

    def ready(self) -> list[tuple[Any, RewardResult]]:
        """The results that are back, each once, without waiting."""
        self._collect(block=False)
        out, self._done = self._done, []
        return out

    def drain(self, timeout_s: float | None = None) -> list[tuple[Any, RewardResult]]:
        """Wait until every submitted key is back (or ``timeout_s`` passes), then return what is back."""
        self._collect(block=True, timeout_s=timeout_s)
        out, self._done = self._done, []
        return out

    @property
    def pending(self) -> int:
        """Submitted keys whose result the caller has not yet received from ``ready``/``drain``."""
        return self._submitted - self._arrived + len(self._done)

    def score_all(self, items: Iterable[tuple[Problem, Sequence[int], str]]) -> list[RewardResult]:
        """Score ``(problem, tokens, text)`` items, blocking, in order. Keys submitted before stay pending."""
        self._check_open()
        items = list(items)
        for problem, _, _ in items:
            self.scorer.check(problem)
        if self.workers == 0:
            return [self.scorer(p, t, x) for p, t, x in items]
        batch = _Batch(len(items))
        for i, (problem, tokens, text) in enumerate(items):
            self.tasks.put((batch, i, problem, tokens, text))
        while batch.left:
            self._route(self.results.get())
        return [r for r in batch.results if r is not None]

    def _collect(self, block: bool, timeout_s: float | None = None) -> None:
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if block and self._arrived < self._submitted:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return
                try:
                    self._route(self.results.get(timeout=left))
                except queue.Empty:
                    return
            else:
                try:
                    self._route(self.results.get_nowait())
                except queue.Empty:
                    return

    def _route(self, item: tuple[_Batch | None, Any, RewardResult]) -> None:
        batch, key, result = item
        if batch is None:
            self._done.append((key, result))
            self._arrived += 1
        else:
            batch.results[key] = result
            batch.left -= 1

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("the reward pool is closed; build a new RewardPool")

    # -- lifetime -----------------------------------------------------------------------------------------
    def worker_pids(self) -> list[int]:
        """The live worker processes (for tests and diagnostics)."""
        return [w.proc.pid for s in self._slots if (w := s.worker) is not None and w.proc.poll() is None]

    def close(self) -> None:
        """Stop every worker (a task in flight is abandoned) and its children; safe to call twice."""
        if self.closed:
            return
        self.closed = True
        for _ in self._slots:
            self.tasks.put(None)
        for s in self._slots:
            s.stop()
        for s in self._slots:
            s.join(timeout=10)
            s.stop()  # a worker the thread was starting while we stopped it

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
