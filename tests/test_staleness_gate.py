"""StalenessGate (AReaL's admission rule) on simulated trainer/rollout schedules, and rank_shares."""

from __future__ import annotations

import random

import pytest

from areal_hpc.rollout.staleness import StalenessGate, rank_shares


def simulate(eta: int, share: int, n_steps: int, reject_prob: float = 0.0, seed: int = 0):
    """One rollout rank feeding a trainer that consumes ``share`` accepted groups per step, in admission order.

    The trainer runs step ``v`` with policy version ``v`` (afterwards the version is ``v + 1``). Each time
    the version changes the rollout admits as many groups as the gate allows. With ``reject_prob`` > 0 the
    trainer drops some groups (e.g. zero-variance rewards) and credits them back; when it runs out of
    groups mid-step the rollout admits again under the same version (credits reopened capacity).
    Returns (admission versions in order, staleness of every consumed group, admitted per version).
    """
    rng = random.Random(seed)
    gate = StalenessGate(eta=eta, share=share)
    admitted_at: list[int] = []
    per_version: dict[int, int] = {}
    staleness: list[int] = []
    head = 0  # next group (in admission order) the trainer will look at

    def admit_all(v: int) -> int:
        n = 0
        while gate.admit(v):
            admitted_at.append(v)
            n += 1
        per_version[v] = per_version.get(v, 0) + n
        assert gate.capacity(v) == 0
        return n

    for v in range(n_steps):
        admit_all(v)
        accepted = 0
        while accepted < share:
            if head == len(admitted_at):
                assert admit_all(v) > 0, "trainer starved: the gate never reopened"
            adm = admitted_at[head]
            head += 1
            if rng.random() < reject_prob:
                gate.credit(1)
                continue
            staleness.append(v - adm)
            accepted += 1
    return admitted_at, staleness, per_version, gate


@pytest.mark.parametrize("eta", [0, 1, 2, 4])
@pytest.mark.parametrize("share", [1, 3, 8])
def test_every_consumed_group_is_within_eta(eta: int, share: int) -> None:
    admitted_at, staleness, per_version, _ = simulate(eta, share, n_steps=12)
    assert len(staleness) == 12 * share
    assert min(staleness) >= 0 and max(staleness) <= eta
    assert max(staleness) == eta  # the bound is tight: the gate does not throttle more than needed
    # first version may run eta + 1 steps ahead, afterwards exactly one step's share per version
    assert per_version[0] == (eta + 1) * share
    assert all(per_version[v] == share for v in range(1, 12))
    assert admitted_at == sorted(admitted_at)


def test_eta_zero_is_on_policy_exactly_share_per_version() -> None:
    admitted_at, staleness, per_version, _ = simulate(eta=0, share=5, n_steps=7)
    assert per_version == {v: 5 for v in range(7)}
    assert staleness == [0] * 35
    assert admitted_at == [v for v in range(7) for _ in range(5)]


@pytest.mark.parametrize("eta", [0, 1, 3])
def test_bound_holds_with_rejected_and_credited_groups(eta: int) -> None:
    admitted_at, staleness, _, gate = simulate(eta, share=4, n_steps=30, reject_prob=0.3, seed=eta)
    assert gate.credited > 0  # rejections happened and were credited
    assert len(staleness) == 30 * 4
    assert max(staleness) <= eta and min(staleness) >= 0
    # admit() counted exactly the groups it let through
    assert gate.admitted == len(admitted_at)


def test_capacity_counts_admitted_net_of_credits() -> None:
    gate = StalenessGate(eta=1, share=3)
    assert gate.capacity(0) == 6  # (0 + 1 + 1) * 3
    for _ in range(6):
        assert gate.admit(0)
    assert gate.capacity(0) == 0 and not gate.admit(0)
    assert gate.admitted == 6  # a refused admission is not counted
    gate.credit(2)
    assert gate.capacity(0) == 2
    assert gate.admit(0) and gate.admit(0) and not gate.admit(0)
    assert gate.capacity(1) == 3  # a new version opens one more share
    assert gate.capacity(5) == 15
    assert gate.capacity(-3) == 0  # never negative


@pytest.mark.parametrize("seed", range(5))
def test_random_interleaving_never_exceeds_eta(seed: int) -> None:
    """Rollout admits at random moments (any amount the gate allows); trainer steps when it has a batch."""
    rng = random.Random(seed)
    eta, share = rng.randint(0, 3), rng.randint(1, 4)
    gate = StalenessGate(eta=eta, share=share)
    queue: list[int] = []
    version = 0
    worst = 0
    for _ in range(2000):
        if rng.random() < 0.5:
            for _ in range(rng.randint(1, 3)):
                if gate.admit(version):
                    queue.append(version)
        if len(queue) >= share and rng.random() < 0.3:
            batch, queue = queue[:share], queue[share:]
            worst = max(worst, max(version - v for v in batch))
            version += 1
    assert version > 50
    assert worst <= eta


@pytest.mark.parametrize("groups,n", [(10, 4), (8, 8), (7, 3), (1, 1), (3, 5), (64, 7), (0, 2)])
def test_rank_shares_sum_and_balance(groups: int, n: int) -> None:
    shares = rank_shares(groups, n)
    assert len(shares) == n
    assert sum(shares) == groups
    assert max(shares) - min(shares) <= 1
    assert shares == sorted(shares, reverse=True)  # the remainder goes to the first ranks


def test_rank_shares_examples() -> None:
    assert rank_shares(10, 4) == [3, 3, 2, 2]
    assert rank_shares(3, 5) == [1, 1, 1, 0, 0]
    assert rank_shares(12, 3) == [4, 4, 4]


# -- colocated yield (rollout.gated_yield_ms) --------------------------------------------------------
def _yielder(*, yield_ms=2.0, eta=1, share=4, admitted=8, credited=0, version=0, live=3, max_batch=32, pushed_groups=8,
             G=8):
    from types import SimpleNamespace

    from areal_hpc.rollout.worker import RolloutWorker

    gate = StalenessGate(eta=eta, share=share, admitted=admitted, credited=credited)
    engine = SimpleNamespace(version=version, max_batch=max_batch, num_active=lambda: live)
    fake = SimpleNamespace(cfg=SimpleNamespace(rollout=SimpleNamespace(gated_yield_ms=yield_ms)), gate=gate,
                           engine=engine, pushed=pushed_groups * G, G=G, _groups_base=0)
    return RolloutWorker._yield_now(fake)


def test_yield_only_when_gated_thin_and_the_trainer_has_its_next_batch():
    # version 0, eta 1, share 4: the gate closes at 8 groups admitted; 8 groups delivered = steps 1 and 2
    assert _yielder()
    assert not _yielder(yield_ms=0.0)  # off
    assert not _yielder(admitted=7)  # the gate still admits: fill the batch instead
    assert not _yielder(live=8)  # a quarter of the slots live: not a thin tail
    assert not _yielder(pushed_groups=7)  # the trainer's next batch is not complete: it may wait on this tail
    assert not _yielder(credited=1, admitted=9)  # a rejected group must be regenerated first
    assert _yielder(version=3, admitted=20, pushed_groups=20)  # the same at a later version
    assert not _yielder(version=3, admitted=20, pushed_groups=19)
