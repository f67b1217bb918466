"""Rollout-side staleness gate (AReaL's admission rule), per rollout rank.

Paper rule: with N_r rollouts started so far, batch size B and current version i, a new rollout may
start only if ⌊(N_r − 1)/B⌋ ≤ i + η. Counted in groups and per rank: this rank owns ``share`` of the
B/group_size groups each training step consumes, so it may have at most (i + η + 1)·share groups
admitted (net of groups the trainer rejected and credited back). A sample admitted under that bound
lands in a training step ≤ i + η because the trainer takes exactly each rank's share per step, oldest
first (``train/worker.py``): a faster rank's extra groups wait for a later step instead of pushing a
slower rank's groups a version later. The trainer still checks every sample again (a resumed run's gate
starts from an estimate: ``storage/checkpoint.py``).
"""

from __future__ import annotations

from dataclasses import dataclass


def rank_shares(groups_per_step: int, n_ranks: int) -> list[int]:
    """Split a trainer's groups per step over its rollout ranks as evenly as possible."""
    return [groups_per_step // n_ranks + (1 if i < groups_per_step % n_ranks else 0) for i in range(n_ranks)]


@dataclass
class StalenessGate:
    eta: int
    share: int  # groups per training step this rank is responsible for
    admitted: int = 0  # groups started on this rank
    credited: int = 0  # groups the trainer rejected (they no longer count against the budget)

    def capacity(self, version: int) -> int:
        """Groups this rank may still start under policy version ``version``."""
        return max(0, (version + self.eta + 1) * self.share - (self.admitted - self.credited))

    def admit(self, version: int) -> bool:
        if self.capacity(version) <= 0:
            return False
        self.admitted += 1
        return True

    def credit(self, groups: int) -> None:
        self.credited += groups
