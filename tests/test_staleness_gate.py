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
