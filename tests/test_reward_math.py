"""The math verifier against the verdicts a human grader gives, on answers in the formats models write."""

from __future__ import annotations

import pytest

from areal_hpc.reward.math import final_answer, last_boxed, math_reward

NATALIA = ("Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n"
           "#### 72")

# (response, reference, the verdict a human grader gives: True = full marks)
TABLE = [
    # LaTeX fractions against plain references
    (r"So the probability is $\frac{1}{2}$.", "1/2", True),
    (r"The answer is $\boxed{\dfrac{3}{4}}$.", "0.75", True),
    (r"Thus $p = \tfrac{2}{3}$, so the answer is \boxed{\tfrac{2}{3}}", "2/3", True),
    (r"\boxed{\frac{1}{2}}", "1/2", True),  # nested braces inside the box
    (r"We get \boxed{\frac{\sqrt{2}}{2}}.", r"\frac{\sqrt{2}}{2}", True),
    (r"\boxed{\frac{1}{\sqrt{2}}}", r"\frac{\sqrt{2}}{2}", True),  # the same number, not rationalised
    (r"\boxed{\sqrt{12}}", r"2\sqrt{3}", True),
    # GSM8K style
    (NATALIA, "72", True),
    (NATALIA, "Natalia sold 24 clips in May, 72 in all.\n#### 72", True),  # GSM8K's own answer field
    ("She pays 3 * $4 = $12 for the pens.\n#### 12\n", "12", True),
    ("It takes 3.5 hours.\n#### 3.5", "7/2", True),
    ("So he earns 18 dollars.\n#### 18 dollars", "18", True),  # units after the number: a grader ignores them
    ("#### The answer is $1,250.", "1250", True),
    (r"\boxed{18 \text{ dollars}}", "18", True),
    ("#### 18 dollars", "81", False),
    # thousands separators and a closing full stop
    ("The total cost is 1,000.", "1000", True),
    ("#### 1,000", "1000", True),
    (r"\boxed{1{,}250}", "1250", True),
    (r"\boxed{12\,000}", "12000", True),
    ("#### 1,234,567.", "1234567", True),
    # Percentages. A reference "50\%" names the quantity 50/100: a grader of a "what percent" question accepts
    # "50" (the % sign left off, which is how most people answer that question) and "0.5" (the same quantity
    # as a fraction). A reference "50" asked for a percent accepts "50\%"; a reference 0.5 accepts "50\%" too, which
    # is 0.5 written with its unit. But a reference that is a plain fraction (0.5) does not accept "50": that is
    # a different number, and a grader cannot know the model meant percent.
    (r"The discount is \boxed{50\%}.", r"50\%", True),
    (r"\boxed{50\%}", "0.5", True),
    (r"\boxed{50}", r"50\%", True),
    (r"\boxed{0.5}", r"50\%", True),
    (r"\boxed{50\%}", "50", True),
    (r"\boxed{50}", "0.5", False),
    # intervals and tuples
    (r"The solution set is $\boxed{[1, 3)}$.", "[1, 3)", True),
    (r"\boxed{(-\infty, 2]}", r"(-\infty, 2]", True),
    (r"The point is \boxed{(1, 2)}.", "(1, 2)", True),
    (r"\boxed{[1, 3]}", "[1, 3)", False),  # the closed end point is wrong
    (r"\boxed{[1, 4)}", "[1, 3)", False),  # a wrong end point
    (r"\boxed{(2, 1)}", "(1, 2)", False),  # an ordered pair in the wrong order
    # symbolic equalities
    (r"Solving, we find $x = 3$.", "3", True),
    (r"\boxed{3}", "x = 3", True),
    (r"\boxed{\pi \cdot 2}", r"2\pi", True),
    (r"\boxed{2 + 3x}", "3x+2", True),
    (r"\boxed{x^2 - 1}", "(x-1)(x+1)", True),
    # decimals against fractions, negative numbers
    (r"\boxed{0.25}", r"\frac{1}{4}", True),
    (r"\boxed{-\frac{3}{2}}", "-1.5", True),
    ("#### -7", "-7", True),
    (r"\boxed{7}", "-7", False),
    # wrong answers that look right
    ("Natalia sold 48+24 = 72 clips. But she returned 2, so she has 70.\n#### 70", "72", False),
    (r"At first I thought \boxed{72}, but rechecking, the answer is \boxed{70}.", "72", False),
    (r"\boxed{12}", "21", False),
    (r"\boxed{2}", "1/2", False),
    (r"\boxed{\frac{2}{1}}", "1/2", False),
    ("The answer is 0.51.", "0.5", False),
    (r"\boxed{720}", "72", False),
    # nothing to grade
    ("", "72", False),
    ("I don't know.", "72", False),
]


@pytest.mark.parametrize("response,reference,verdict", TABLE)
def test_math_verdicts_match_a_human_grader(response: str, reference: str, verdict: bool) -> None:
    result = math_reward(response, reference, timeout_s=5)
    assert result.reward == (1.0 if verdict else 0.0), (response, reference, result)
    assert not result.timed_out and result.seconds >= 0


# Bare answers as a small model writes them (the arithmetic task's format): still graded as a person would.
@pytest.mark.parametrize("response,reference,verdict", [
    (r"\boxed{1/2}", "0.5", True), (" 42 ", "42", True), ("42.", "42", True), ("$42$", "42", True),
    ("-3.0", "-3", True), ("2/4", "0.5", True), (r"\boxed{7} no wait \boxed{8}", "8", True), ("x+1", "x + 1", True),
    ("43", "42", False), ("0.51", "0.5", False), ("-42", "42", False), (r"\boxed{7} no wait \boxed{8}", "7", False),
    ("420", "42", False), ("", "", False), ("1/0", "1/0", False),
])
def test_bare_answers(response: str, reference: str, verdict: bool) -> None:
    assert math_reward(response, reference).reward == (1.0 if verdict else 0.0)


def test_table_is_large_and_has_both_verdicts() -> None:
    assert len(TABLE) >= 30
    assert sum(v for _, _, v in TABLE) >= 10 and sum(not v for _, _, v in TABLE) >= 10


def test_last_boxed_and_final_answer() -> None:
    assert last_boxed(r"\boxed{1} then \boxed{\frac{a}{b^{2}}} end") == r"\frac{a}{b^{2}}"
    assert last_boxed(r"\boxed{\frac{1}{2}") is None  # never closed
    assert last_boxed("no box") is None
    assert final_answer("work\n#### 72\nextra line") == "72"
    assert final_answer(r"#### 5 and \boxed{6}") == r"5 and \boxed{6}"  # GSM8K marker wins: it comes last
    assert final_answer(r"\boxed{6}") == "6"
    assert final_answer("plain 6") is None


def test_empty_and_unanswered_responses_say_why() -> None:
    assert math_reward("   ", "72").error == "empty response"
    r = math_reward("I have no idea.", "72")
    assert r.reward == 0.0 and r.error == "no answer found"
    r = math_reward("#### ", "72")
    assert r.reward == 0.0 and r.error == "no answer found"
    assert "does not parse" in math_reward(r"\boxed{1}", "").error


def test_timeout_scores_zero_and_is_reported() -> None:
    # Comparing a power tower makes sympy evaluate it: math-verify's signal stops it at the limit.
    r = math_reward(r"\boxed{9^{9^{9^{9}}}}", "1", timeout_s=1)
    assert r == r.__class__(0.0, r.seconds, timed_out=True, error="timeout")
    assert 0.9 < r.seconds < 3.0
