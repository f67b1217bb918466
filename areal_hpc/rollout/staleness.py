"""Rollout-side staleness gate (AReaL's admission rule), per rollout rank.

Paper rule: with N_r rollouts started so far, batch size B and current version i, a new rollout may
start only if ⌊(N_r − 1)/B⌋ ≤ i + η. Counted in groups and per rank: this rank owns ``share`` of the
B/group_size groups each training step consumes, so it may have at most (i + η + 1)·share groups
admitted (net of groups the trainer rejected and credited back). A sample admitted under that bound
lands in a training step ≤ i + η because the trainer takes exactly each rank's share per step, oldest
first (``train/worker.py``): a faster rank's extra groups wait for a later step instead of pushing a
slower rank's groups a version later. The trainer still checks every sample again (a resumed run's gate
starts from an estimate: ``storage/checkpoint.py``).

When rollout workers attach to the run (``elastic/``), the trainer plans each step's groups η+1 versions ahead
and may give a rank a different share of a step, or extra prompts it took back from a worker that left:
``plan`` and ``grant`` change the budget of that one step, announced before the rank can reach it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def rank_shares(groups_per_step: int, n_ranks: int) -> list[int]:
    """Split a trainer's groups per step over its rollout ranks as evenly as possible."""
    return [groups_per_step // n_ranks + (1 if i < groups_per_step % n_ranks else 0) for i in range(n_ranks)]


@dataclass
class StalenessGate:
    eta: int
    share: int  # groups per training step this rank is responsible for
    admitted: int = 0  # groups started on this rank
    credited: int = 0  # groups the trainer rejected (they no longer count against the budget)
    planned: dict[int, int] = field(default_factory=dict)  # step -> this rank's share of it, where the plan differs
    granted: dict[int, int] = field(default_factory=dict)  # step -> prompts taken back from workers, given here
    _folded: int = 0  # the two dicts' extra groups of steps already behind every horizon asked about
    _folded_until: int = -1

    def capacity(self, version: int) -> int:
        """Groups this rank may still start under policy version ``version``."""
        horizon = version + self.eta
        self._fold(horizon)
        extra = sum(n - self.share for step, n in self.planned.items() if step <= horizon)
        extra += sum(n for step, n in self.granted.items() if step <= horizon)
        return max(0, (horizon + 1) * self.share + self._folded + extra - (self.admitted - self.credited))

    def _fold(self, horizon: int) -> None:
        """Sum up the entries of steps the horizon has passed (versions only grow), so each call stays short."""
        below = horizon - 1
        if below <= self._folded_until:
            return
        for step in [s for s in self.planned if s <= below]:
            self._folded += self.planned.pop(step) - self.share
        for step in [s for s in self.granted if s <= below]:
            self._folded += self.granted.pop(step)
        self._folded_until = below

    def plan(self, step: int, share: int) -> None:
        """This rank makes ``share`` of step ``step``'s groups (the trainer's plan; before the rank can reach it)."""
        self.planned[step] = share

    def grant(self, step: int, groups: int) -> None:
        """``groups`` more groups for step ``step``: prompts the trainer took back from an attached worker."""
        self.granted[step] = self.granted.get(step, 0) + groups

    def admit(self, version: int) -> bool:
        if self.capacity(version) <= 0:
            return False
        self.admitted += 1
        return True

    def credit(self, groups: int) -> None:
        self.credited += groups
