"""A task is a list of prompts with verifiable answers plus the verifier that scores a response."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Problem:
    """One prompt and what its verifier needs.

    Text tasks fill ``prompt`` (the problem as the user would write it) and ``answer``; the prompt
    builder (``tasks/prompt.py``) turns it into ids, through the chat template or raw. A dataset that
    stores whole conversations (verl's Parquet layout) gives them as ``messages`` ((role, content)
    pairs), used as they are. Token-level tasks (synthetic) carry the prompt as ids, since their prompts
    mean nothing as text, a target response length (``max_tokens``: the engine stops there even without
    EOS; 0 = the engine's limit). ``verifier`` names what scores the response (``reward/``): ``math``
    compares the final answer with ``answer``; ``code`` runs the response's code in the sandbox against
    ``tests`` (each a snippet of asserts, the reward counts whole snippets) that call ``entry_point``,
    after the trusted ``code_prefix`` (imports and helpers the problem statement provides).
    """

    prompt_id: int
    prompt: str
    answer: str
    prompt_tokens: tuple[int, ...] | None = None
    max_tokens: int = 0
    verifier: str = "math"
    messages: tuple[tuple[str, str], ...] | None = None
    tests: tuple[str, ...] = ()
    entry_point: str = ""
    code_prefix: str = ""


class Task(Protocol):
    """What the roles need of a task: training prompts by index (an endless stream), the epoch an index
    falls in (0 for generated streams) and a held-out set."""

    eval_problems: list[Problem]

    def train_problem(self, index: int) -> Problem: ...

    def epoch_of(self, index: int) -> int: ...
