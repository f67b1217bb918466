"""Verifiers: a response earns 1.0 when its final answer equals the reference after normalisation.

Token-level tasks (synthetic) score the response ids instead; :func:`problem_reward` picks the verifier
a problem names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from fractions import Fraction

from areal_hpc.tasks.base import Problem

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def normalize_math(text: str) -> str:
    """Canonical form of a math answer: boxed content, no spaces/commas/$, numbers as exact fractions."""
    t = text.strip()
    boxed = _BOXED.findall(t)
    if boxed:
        t = boxed[-1]
    t = t.replace("$", "").replace(" ", "").replace("\\!", "").rstrip(".")
    if _NUMBER.fullmatch(t):
        try:
            value = Fraction(t.replace(",", ""))
            return str(value)
        except (ValueError, ZeroDivisionError):
            return t
    return t


def math_reward(response: str, answer: str) -> float:
    """1.0 if the response's answer equals the reference (after :func:`normalize_math`), else 0.0."""
    if not response.strip():
        return 0.0
    return 1.0 if normalize_math(response) == normalize_math(answer) else 0.0


def even_token_reward(tokens: Sequence[int]) -> float:
    """Fraction of response ids that are even (0.0 for an empty response).

    About 0.5 under a random policy with per-sample spread, so group-normalised advantages carry signal
    from the first step and a policy learning to prefer even ids shows a rising curve.
    """
    if not tokens:
        return 0.0
    return sum(1 for t in tokens if int(t) % 2 == 0) / len(tokens)


def problem_reward(problem: Problem, tokens: Sequence[int], text: str) -> float:
    """The reward of a response (ids without EOS, and their text) under the problem's verifier."""
    if problem.verifier == "even_tokens":
        return even_token_reward(tokens)
    if problem.verifier == "math":
        return math_reward(text, problem.answer)
    raise ValueError(f"problem {problem.prompt_id} names an unknown verifier {problem.verifier!r}")
