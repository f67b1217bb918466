"""Verifiers: a response earns 1.0 when its final answer equals the reference after normalisation."""

from __future__ import annotations

import re
from fractions import Fraction

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
