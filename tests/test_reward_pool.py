"""The reward pool: scoring off the caller's thread, a hard deadline per task, workers that die, a clean close.

The misbehaving rewards are in tests/reward_fns.py (``by_command`` does what the response says). A worker
starts in well under a second (a Python interpreter plus the reward package; sympy for math), so each
pool here costs about that.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from areal_hpc.config.reward import RewardConfig
from areal_hpc.reward.pool import RewardPool, _descendants
from areal_hpc.reward.result import RewardResult
from areal_hpc.reward.scorer import build_scorer
from areal_hpc.tasks.base import Problem

P = Problem(1, "q", "72")


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def commands_pool(workers: int = 2, timeout_s: float = 0.5, grace_s: float = 0.5) -> RewardPool:
    return RewardPool(build_scorer(RewardConfig(fn="reward_fns:by_command", timeout_s=timeout_s)), workers,
                      timeout_s, grace_s=grace_s)


def test_spinning_task_is_killed_at_its_deadline_while_others_complete() -> None:
    with commands_pool() as pool:
        pool.submit("spin", P, [], "spin")
        for i in range(8):
            pool.submit(i, P, [], "x" * (10 * i))
        t0 = time.monotonic()
        got = dict(pool.drain(timeout_s=30))
        waited = time.monotonic() - t0
        assert pool.pending == 0
        assert set(got) == {"spin", *range(8)}
        for i in range(8):  # the other worker scored them while one spun
            assert got[i] == RewardResult(min(i / 10, 1.0), got[i].seconds)
        spin = got["spin"]
        assert spin.reward == 0.0 and spin.timed_out and re.fullmatch(r"killed after \d\.\d s", spin.error)
        assert 1.0 <= spin.seconds < 3.0 and waited < 15
        # the killed worker was replaced: the pool still scores
        assert [r.reward for r in pool.score_all([(P, [], "x" * 50)] * 3)] == [0.5, 0.5, 0.5]


def test_math_timeout_through_the_pool() -> None:
    """A pathological sympy input: math-verify's own limit answers first, within the pool's deadline."""
    with RewardPool(build_scorer(RewardConfig(timeout_s=1)), 1, 1) as pool:
        slow, ok = pool.score_all([(P, [], r"\boxed{9^{9^{9^{9}}}}"), (P, [], "#### 72")])
    assert slow == RewardResult(0.0, slow.seconds, timed_out=True, error="timeout") and slow.seconds < 3
    assert ok.reward == 1.0


def test_submit_does_not_block_while_workers_are_busy() -> None:
    with commands_pool(workers=1, timeout_s=10) as pool:
        pool.score_all([(P, [], "warm")])  # the worker is up
        pool.submit("busy", P, [], "sleep:1.5")
        t0 = time.monotonic()
        for i in range(200):
            pool.submit(i, P, [], "x")
        submitted = time.monotonic() - t0
        assert pool.ready() == []
        polled = time.monotonic() - t0
        assert pool.pending == 201
        assert submitted < 0.2 and polled < 0.25, (submitted, polled)
        got = dict(pool.drain(timeout_s=30))
        assert got["busy"].reward == 1.0 and got["busy"].seconds >= 1.5 and len(got) == 201
        assert pool.pending == 0 and pool.ready() == [] and pool.drain() == []


@pytest.mark.parametrize("command,error", [("exit", "reward worker died (exit status 3)"),
                                           ("segfault", "reward worker died (killed by SIGSEGV)")])
def test_dying_worker_is_replaced_and_its_task_scores_zero(command: str, error: str) -> None:
    with commands_pool(workers=1, timeout_s=10) as pool:
        before = pool.score_all([(P, [], "warm")])
        pids = pool.worker_pids()
        died, after = pool.score_all([(P, [], command), (P, [], "x" * 20)])
        assert before[0].reward == 0.04
        assert died.reward == 0.0 and not died.timed_out and died.error == error
        assert after == RewardResult(0.2, after.seconds)
        assert pool.worker_pids() != pids and not alive(pids[0])


def test_kill_takes_the_workers_children_and_close_leaves_no_process(tmp_path) -> None:
    before = set(_descendants(os.getpid()))
    pidfile = tmp_path / "child.pid"
    pool = commands_pool(workers=2)
    pool.submit("child", P, [], f"child:{pidfile}")
    pool.submit("quick", P, [], "x")
    got = dict(pool.drain(timeout_s=30))
    assert got["child"].timed_out and got["quick"].reward == 0.01
    child = int(pidfile.read_text())
    assert not alive(child)  # in its own session, like a sandbox run, and still killed with the worker
    pool.submit("spin", P, [], "spin")  # a task in flight when the pool closes
    end = time.monotonic() + 20
    while len(pool.worker_pids()) < 2 and time.monotonic() < end:  # the killed worker's replacement
        time.sleep(0.05)
    workers = pool.worker_pids()
    assert len(workers) == 2 and all(alive(p) for p in workers)
    pool.close()
    pool.close()  # idempotent
    assert not any(alive(p) for p in workers)
    assert {p for p in _descendants(os.getpid()) if alive(p)} <= before
    with pytest.raises(RuntimeError, match="closed"):
        pool.submit("late", P, [], "x")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_workers_die_with_a_rank_that_is_killed() -> None:
    """A rollout rank killed with SIGKILL runs no close(): its workers, one busy spinning, must go anyway."""
    code = ("import sys, time\n"
            "from areal_hpc.config.reward import RewardConfig\n"
            "from areal_hpc.reward import RewardPool, build_scorer\n"
            "from areal_hpc.tasks.base import Problem\n"
            "pool = RewardPool(build_scorer(RewardConfig(fn='reward_fns:by_command')), 2, 60)\n"
            "pool.score_all([(Problem(1, 'q', ''), [], 'warm')] * 2)\n"
            "pool.submit(0, Problem(1, 'q', ''), [], 'spin')\n"
            "time.sleep(0.5)\n"  # the task reaches a worker, which no longer reads its pipe
            "print(*pool.worker_pids(), flush=True)\n"
            "time.sleep(60)\n")
    rank = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        pids = [int(p) for p in rank.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
    finally:
        rank.kill()
        rank.wait()
    end = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    assert not any(alive(p) for p in pids)


def test_inline_mode_gives_the_same_results() -> None:
    items = [(P, [], "#### 72"), (P, [], r"\boxed{\frac{144}{2}}"), (P, [], "#### 71"), (P, [], ""),
             (Problem(2, "", "", verifier="even_tokens"), [2, 3, 4], "")]
    scorer = build_scorer(RewardConfig())
    with RewardPool(scorer, 0, 5) as inline, RewardPool(scorer, 2, 5) as pooled:
        for pool in (inline, pooled):
            for i, item in enumerate(items):
                pool.submit(i, *item)
        a, b = dict(inline.ready()), dict(pooled.drain(timeout_s=30))
        assert inline.pending == 0 and pooled.pending == 0
        assert inline.worker_pids() == []
        strip = [(r.reward, r.timed_out, r.error) for r in (a[i] for i in range(len(items)))]
        assert strip == [(b[i].reward, b[i].timed_out, b[i].error) for i in range(len(items))]
        assert strip == [(1.0, False, ""), (1.0, False, ""), (0.0, False, ""), (0.0, False, "empty response"),
                         (2 / 3, False, "")]
        assert [r.reward for r in inline.score_all(items)] == [r for r, _, _ in strip]


def test_unknown_verifier_fails_in_submit_not_in_a_worker() -> None:
    with RewardPool(build_scorer(RewardConfig()), 1, 5) as pool:
        with pytest.raises(ValueError, match="names verifier 'nope'"):
            pool.submit(0, Problem(3, "q", "1", verifier="nope"), [], "1")
        assert pool.pending == 0


def test_workers_import_no_torch() -> None:
    """What a worker imports: the reward package, sympy for math, the user's module; never torch or numpy."""
    with commands_pool(workers=1, timeout_s=10) as pool:
        assert pool.score_all([(P, [], "modules")])[0].reward == 1.0
    code = ("import sys, areal_hpc.reward.worker, areal_hpc.reward.math, areal_hpc.reward.scorer; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
    assert out.strip() == "[]"


def test_a_worker_that_cannot_start_scores_zero_saying_why(monkeypatch) -> None:
    scorer = build_scorer(RewardConfig(fn="reward_fns:length"))
    scorer.cfg = RewardConfig(fn="reward_fns_gone:length")  # imports here, not in the worker
    with RewardPool(scorer, 1, 5) as pool:
        r = pool.score_all([(P, [], "x")])[0]
    assert r.reward == 0.0 and r.error.startswith("reward worker failed to start: ValueError: reward.fn "
                                                  "'reward_fns_gone:length': module 'reward_fns_gone' does not import")
