"""``reward``: how responses are scored."""

from __future__ import annotations

from dataclasses import dataclass

from areal_hpc.config.fields import need, setting


@dataclass
class RewardConfig:
    """How responses are scored, off the decode loop."""

    fn: str | None = setting(None, "a reward function by import path 'package.module:function', "
                                   "called as fn(response: str, problem) -> float; overrides the task's verifier")
    workers: int = setting(2, "reward worker processes per rollout rank (0: score inline, for debugging)")
    timeout_s: float = setting(5.0, "math: time limit of one verification; a timeout scores 0 and is counted")

    def validate(self) -> None:
        need(self.workers >= 0, "reward.workers", self.workers, "must be >= 0", "set reward.workers=2")
        need(self.timeout_s > 0, "reward.timeout_s", self.timeout_s, "must be > 0", "set reward.timeout_s=5")
