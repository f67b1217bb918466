"""``eval``: held-out evaluation at start, every few steps and at the end."""

from __future__ import annotations

from dataclasses import dataclass

from areal_hpc.config.fields import need, setting


@dataclass
class EvalConfig:
    """Held-out evaluation: greedy pass@1, and with ``k`` > 1 sampled avg@k and pass@k."""

    enabled: bool = setting(True, "evaluate at start, every eval.every steps and at the end")
    n: int = setting(200, "number of held-out prompts")
    every: int = setting(0, "also evaluate every this many steps (0: only at start and end)")
    k: int = setting(1, "samples per prompt for avg@k and pass@k at rollout.temperature/top_p (1: greedy only)")

    def validate(self) -> None:
        if self.enabled:
            need(self.n >= 1, "eval.n", self.n, "must be >= 1 when eval.enabled",
                 "set eval.n=200 or eval.enabled=false")
        need(self.every >= 0, "eval.every", self.every, "must be >= 0", "set eval.every=0 (start and end only)")
        need(self.k >= 1, "eval.k", self.k, "must be >= 1", "set eval.k=1 (greedy only) or e.g. eval.k=8")
