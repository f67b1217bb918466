"""A task is a list of prompts with verifiable answers plus the verifier that scores a response."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class Problem:
    """One prompt and what its verifier needs.

    Text tasks (arithmetic, jsonl) fill ``prompt``/``answer`` only. Token-level tasks (synthetic) also
    carry the prompt as ids, since their prompts mean nothing as text, a target response length
    (``max_tokens``: the engine stops there even without EOS; 0 = the engine's limit) and the name of
    the verifier that scores response ids (``verifier``; see ``rollout/reward.py``).
    """

    prompt_id: int
    prompt: str
    answer: str
    prompt_tokens: tuple[int, ...] | None = None
    max_tokens: int = 0
    verifier: str = "math"


class Task(Protocol):
    """What the roles need of a task: training prompts by index (an endless stream) and a held-out set."""

    eval_problems: list[Problem]

    def train_problem(self, index: int) -> Problem: ...


def prompt_ids(problem: Problem, tokenizer: Encoder) -> list[int]:
    """The ids the engine is given: the problem's own ids when it has them, else the encoded text."""
    if problem.prompt_tokens is not None:
        return list(problem.prompt_tokens)
    return tokenizer.encode(problem.prompt)
