"""How the fast engine's prefill and decode run; one object both read, so a greedy evaluation can swap it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepMode:
    """How prefill and decode run, shared by both: ``generate(greedy=True)`` swaps it for its run."""

    temperature: float
    top_p: float
    fused_sampler: bool  # the Triton sampler (temperature > 0, no top-p truncation)
    graphs: bool  # replay CUDA graphs (else every step runs eagerly)
