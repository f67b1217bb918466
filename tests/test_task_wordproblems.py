"""Generated grade-school word problems: deterministic, correct, never negative, held out, varied."""

from __future__ import annotations

import operator
import random
import re
from collections import Counter

import pytest

from areal_hpc.config.loader import load_config
from areal_hpc.tasks import WordProblemTask, build_task
from areal_hpc.tasks.wordproblems import NAMES, SCENES, WordProblem

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def evaluate(wp: WordProblem) -> int:
    """The operations' value, computed here rather than by the generator, checking every partial result."""
    value = wp.start[0] if len(wp.start) == 1 else OPS["*"](*wp.start)
    for op, n in wp.steps:
        value = OPS[op](value, n)
        assert value >= 0
    return value


def test_answers_are_the_operations_told_by_the_text() -> None:
    task = WordProblemTask(max_value=20, max_steps=3, ops="+-*", seed=11, n_eval=10)
    rng = random.Random(0)
    n_ops = Counter()
    for _ in range(3000):
        wp = task.generate(rng)
        value = evaluate(wp)
        assert value >= 1 and str(value) == str(wp.value)
        # the numbers in the story are the operands, in the order they are applied
        assert [int(x) for x in re.findall(r"\d+", wp.text)] == [*wp.start, *(n for _, n in wp.steps)], wp
        assert all(2 <= n <= 20 for n in wp.start) and all(2 <= n <= 20 for _, n in wp.steps)
        assert all(n <= 9 for op, n in wp.steps if op == "*") and (len(wp.start) == 1 or max(wp.start) <= 9)
        assert wp.text.endswith("?") and "{" not in wp.text
        n_ops[len(wp.start) - 1 + len(wp.steps)] += 1
    assert set(n_ops) == {1, 2, 3} and n_ops[1] > n_ops[2] > n_ops[3]  # mostly short problems


def test_problems_are_deterministic_and_seeded() -> None:
    a, b = WordProblemTask(20, 2, "+-*", seed=3, n_eval=20), WordProblemTask(20, 2, "+-*", seed=3, n_eval=20)
    assert a.eval_problems == b.eval_problems
    assert [a.train_problem(i) for i in (7, 0, 123)] == [b.train_problem(i) for i in (7, 0, 123)]
    assert a.train_problem(5).prompt_id == 5 and a.eval_problems[0].prompt_id == -1 and a.epoch_of(10**6) == 0
    other = WordProblemTask(20, 2, "+-*", seed=4, n_eval=20)
    assert [other.train_problem(i).prompt for i in range(20)] != [a.train_problem(i).prompt for i in range(20)]


def test_held_out_problems_never_in_training() -> None:
    task = WordProblemTask(max_value=4, max_steps=1, ops="+", seed=0, n_eval=40)  # a small space: collisions happen
    held = {p.prompt for p in task.eval_problems}
    assert len(held) == 40
    train = [task.train_problem(i) for i in range(3000)]
    assert not held & {p.prompt for p in train}
    assert all(p.answer == str(sum(map(int, re.findall(r"\d+", p.prompt)))) for p in train)


def test_template_variety() -> None:
    task = WordProblemTask(20, 2, "+-*", seed=1, n_eval=5)
    texts = [task.train_problem(i).prompt for i in range(2000)]
    assert len(SCENES) >= 15 and len(set(texts)) >= 1950
    # the surface forms: numbers and names taken out, what is left is the template and its objects
    names = "|".join(n for n, *_ in NAMES)
    forms = Counter(re.sub(rf"\b({names})\b", "X", re.sub(r"\d+", "N", t)) for t in texts)
    openings = Counter(f.split(". ")[0] for f in forms.elements())
    assert len(forms) >= 500 and max(forms.values()) < 0.02 * len(texts)
    assert len(openings) >= 60 and max(openings.values()) < 0.05 * len(texts)


@pytest.mark.parametrize("ops", ["+", "-", "*", "+-", "-*"])
def test_operator_subsets(ops: str) -> None:
    task = WordProblemTask(max_value=12, max_steps=2, ops=ops, seed=2, n_eval=5)
    rng = random.Random(1)
    for _ in range(300):
        wp = task.generate(rng)
        used = {op for op, _ in wp.steps} | ({"*"} if len(wp.start) == 2 else set())
        assert used and used <= set(ops) and evaluate(wp) >= 1, wp


def test_char_model_bounds_and_config() -> None:
    task = build_task(load_config(None, ["task.kind=wordproblems", "task.max_value=50", "task.max_steps=3",
                                         "task.n_eval=30", "task.seed=9"]))
    assert isinstance(task, WordProblemTask) and len(task.eval_problems) == 30
    problems = task.eval_problems + [task.train_problem(i) for i in range(3000)]
    assert all(set(p.prompt + p.answer) <= set(task.alphabet) for p in problems)
    assert max(len(p.prompt) for p in problems) <= task.max_prompt_chars() < 2 * max(len(p.prompt) for p in problems)
    assert max(len(p.answer) for p in problems) <= task.max_answer_chars()
    assert all(p.verifier == "math" and p.messages is None and p.answer.isdigit() for p in problems)
