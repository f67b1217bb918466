"""``warmup``: a supervised pass before RL."""

from __future__ import annotations

from dataclasses import dataclass

from areal_hpc.config.fields import need, setting


@dataclass
class WarmupConfig:
    """Supervised pass before RL, so a tiny model starts with non-zero reward."""

    enabled: bool = setting(True, "run the supervised warm-up before RL")
    steps: int = setting(300, "warm-up optimizer steps")
    batch_size: int = setting(64, "warm-up examples per step")
    lr: float = setting(1e-3, "warm-up learning rate")
    flaw: float = setting(
        0.0,
        "fraction of warm-up answers taken from a flawed teacher (arithmetic: forgotten carries); "
        "RL must then fix what the imperfect SFT data taught",
    )

    def validate(self) -> None:
        if self.enabled:
            need(self.steps >= 1, "warmup.steps", self.steps, "must be >= 1 when warmup.enabled",
                 "set warmup.steps to a positive number or warmup.enabled=false")
        need(self.batch_size >= 1, "warmup.batch_size", self.batch_size, "must be >= 1", "set warmup.batch_size=64")
        need(self.lr > 0, "warmup.lr", self.lr, "must be > 0", "set warmup.lr=1e-3")
        need(0.0 <= self.flaw < 1.0, "warmup.flaw", self.flaw, "must be in [0, 1)", "set warmup.flaw=0.6 or 0")
