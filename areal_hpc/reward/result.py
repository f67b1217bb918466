"""What scoring one response gives: the reward and how it went (time, timeout, why it failed)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RewardResult:
    """``reward`` in [0, 1]; ``seconds`` the scoring time (logged per sample); ``timed_out`` when a time limit
    cut it short (scored 0 and counted); ``error`` a short reason when the response could not be scored
    (no answer found, a syntax error, a sandbox kill), empty otherwise."""

    reward: float
    seconds: float = 0.0
    timed_out: bool = False
    error: str = ""
