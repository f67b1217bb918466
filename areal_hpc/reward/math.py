"""The ``math`` verifier: the response's final answer against the reference, compared by math-verify.

A grader reads the *final* answer, so the response is cut to it first: text after the last GSM8K ``####``,
else the content of the last ``\\boxed{...}`` (braces nested), else whatever math-verify's own extraction
finds (its anchors such as "the answer is", then the last LaTeX or plain expression). The extracted answer
and the reference are parsed the same way (as the content of a ``\\boxed{}``, so a plain ``1/2`` and a
LaTeX ``\\frac{\\sqrt{2}}{2}`` both parse) and math-verify decides equality with sympy: ``\\dfrac{1}{2}``,
``0.5`` and ``1/2`` match, ``x = 3`` matches ``3``, ``[1, 3)`` does not match ``[1, 3]``.

Time: math-verify bounds each parse and each comparison with ``signal.alarm`` (whole seconds, main thread
only). This module spends one budget over all of them, so a call takes about ``timeout_s`` at most; the
reward pool's hard kill covers what a signal cannot interrupt (a long computation inside C).
"""

from __future__ import annotations

import math
import re
import threading
import time
from decimal import Decimal

from math_verify import parse, verify
from math_verify.errors import TimeoutException
from math_verify.parser import ExprExtractionConfig, LatexExtractionConfig

from areal_hpc.reward.result import RewardResult

_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
# A whole answer that is one number with thousands separators: "1,000", "1\,000", "1{,}000", "1 000".
_GROUPED = re.compile(r"[-+]?\d{1,3}(?:(?:,|\\,|\{,\}| )\d{3})+(?:\.\d+)?")
_SEPARATOR = re.compile(r",|\\,|\{,\}| ")
_PLAIN = re.compile(r"[-+]?\d+(?:\.\d+)?")  # a number and nothing else, after _clean
# A word outside LaTeX commands ("dollars", "The answer is"): such an answer is prose, which math-verify's
# free-text extraction reads ("18 dollars" -> 18); a formula without words is parsed as LaTeX, where a word
# would become a product of symbols.
_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")
_LATEX_AND_EXPR = (LatexExtractionConfig(), ExprExtractionConfig())


class _Budget:
    """One time budget spent over several math-verify calls, each given the whole seconds left."""

    def __init__(self, timeout_s: float) -> None:
        self.deadline = time.monotonic() + timeout_s
        # signal.alarm only works in the main thread: elsewhere (inline scoring from a thread) calls run
        # without a limit of their own and only the pool's hard kill bounds them.
        self.signals = threading.current_thread() is threading.main_thread()

    def seconds(self) -> int | None:
        if not self.signals:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutException("budget spent")
        return max(1, math.ceil(left))


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox``), nested braces included; None if there is none
    or it is not closed."""
    starts = [m.end() for m in _BOX.finditer(text)]
    if not starts:
        return None
    depth, start = 1, starts[-1]
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start:i]
    return None


def final_answer(text: str) -> str | None:
    """The answer a grader reads: after the last ``####`` (to the end of that line), else the last boxed
    content; None when the response has neither (math-verify then searches the whole text)."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else ""
    return last_boxed(text)


def _clean(answer: str) -> str:
    """What math-verify's LaTeX parser misreads in a final answer: surrounding ``$``, a closing full stop,
    and thousands separators (``1,000.`` would parse as a string, ``1 000`` as a product)."""
    a = answer.strip().strip("$").strip()
    a = a[:-1].rstrip() if a.endswith(".") else a
    if _GROUPED.fullmatch(a):
        a = _SEPARATOR.sub("", a)
    return a


def _parse_answer(answer: str, budget: _Budget) -> list:
    """A final answer cut from a response, or a reference, as math-verify's candidates: a formula parsed as
    the content of a ``\\boxed{}`` (else as a plain expression), prose by math-verify's free-text rules."""
    a = _clean(answer)
    if not a:
        return []
    found = []
    if _WORD.search(a):
        found = parse(a, _LATEX_AND_EXPR, parsing_timeout=budget.seconds(), raise_on_error=True)
    if not found:
        found = parse(f"\\boxed{{{a}}}", _LATEX_AND_EXPR, parsing_timeout=budget.seconds(), raise_on_error=True)
    if not found:
        found = parse(a, _LATEX_AND_EXPR, parsing_timeout=budget.seconds(), raise_on_error=True)
    return found


def _parse_response(response: str, budget: _Budget) -> list:
    answer = final_answer(response)
    if answer is not None:
        return _parse_answer(answer, budget)
    found = parse(response, _LATEX_AND_EXPR, parsing_timeout=budget.seconds(), raise_on_error=True)
    bare = response.strip()
    # A one-line formula ("x+1"): math-verify's plain-expression rule takes no variables, so read it as an answer.
    if not found and len(bare) <= 80 and "\n" not in bare and not _WORD.search(bare):
        found = _parse_answer(bare, budget)
    return found


def _parse_reference(reference: str, budget: _Budget) -> list:
    # A reference may itself be a worked solution (GSM8K's answer field ends in "#### 72").
    answer = final_answer(reference)
    return _parse_answer(reference if answer is None else answer, budget)


def _plain_numbers(response: str, reference: str) -> tuple[Decimal, Decimal] | None:
    """Both final answers as decimals when both are plain numbers (``42``, ``-3.5``, ``1,000``), else None.

    Why: most answers of arithmetic and GSM8K-style tasks are plain numbers, where equality needs no
    symbolic parse; skipping sympy makes scoring them about a thousand times cheaper, so the reward workers
    keep pace with a fast rollout (a late group would reach the trainer a version staler)."""
    answer = final_answer(response)
    answer = response if answer is None else answer
    gold = final_answer(reference)
    gold = reference if gold is None else gold
    a, g = _clean(answer), _clean(gold)
    if not (_PLAIN.fullmatch(a) and _PLAIN.fullmatch(g)):
        return None
    return Decimal(a), Decimal(g)


def math_reward(response: str, reference: str, timeout_s: float = 5.0) -> RewardResult:
    """1.0 when the response's final answer equals the reference, else 0.0; a timeout scores 0 and says so."""
    t0 = time.monotonic()
    if not response.strip():
        return RewardResult(0.0, time.monotonic() - t0, error="empty response")
    plain = _plain_numbers(response, reference)
    if plain is not None:
        return RewardResult(float(plain[0] == plain[1]), time.monotonic() - t0)
    budget = _Budget(timeout_s)
    try:
        gold = _parse_reference(reference, budget)
        if not gold:
            return RewardResult(0.0, time.monotonic() - t0, error=f"reference answer {reference[:40]!r} does not parse")
        pred = _parse_response(response, budget)
        if not pred:
            return RewardResult(0.0, time.monotonic() - t0, error="no answer found")
        for g in gold:
            for p in pred:
                try:
                    if verify(g, p, timeout_seconds=budget.seconds(), raise_on_error=True):
                        return RewardResult(1.0, time.monotonic() - t0)
                except Exception:  # sympy cannot compare this pair (math-verify's own rule: not equal)
                    continue
    except TimeoutException:
        return RewardResult(0.0, time.monotonic() - t0, timed_out=True, error="timeout")
    except Exception as e:  # a parse that raised: the answer cannot be read
        return RewardResult(0.0, time.monotonic() - t0, error=f"unparsable answer: {type(e).__name__}")
    return RewardResult(0.0, time.monotonic() - t0)
