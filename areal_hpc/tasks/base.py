"""A task is a list of prompts with verifiable answers plus the verifier that scores a response."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    prompt_id: int
    prompt: str
    answer: str
