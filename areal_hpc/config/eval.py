"""``eval``: held-out evaluation before and after training."""

from __future__ import annotations

from dataclasses import dataclass

from areal_hpc.config.fields import need, setting


@dataclass
class EvalConfig:
    """Held-out evaluation with greedy decoding."""

    enabled: bool = setting(True, "evaluate before and after training")
    n: int = setting(200, "number of held-out prompts")

    def validate(self) -> None:
        if self.enabled:
            need(self.n >= 1, "eval.n", self.n, "must be >= 1 when eval.enabled",
                 "set eval.n=200 or eval.enabled=false")
