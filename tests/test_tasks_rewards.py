"""Tasks (arithmetic, JSONL datasets), and the math verifier on their answers (its table: test_reward_math.py)."""

from __future__ import annotations

import random

import pytest

from areal_hpc.reward.math import math_reward
from areal_hpc.tasks import ArithmeticTask, DatasetTask, Fields, Problem, read_dataset


def read_jsonl(path) -> list[tuple[str, str]]:
    return [(p.prompt, p.answer) for p in read_dataset(path)]

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def parse(prompt: str) -> tuple[int, str, int]:
    """'58+67=' -> (58, '+', 67); operands are non-negative, so the operator is the first non-digit."""
    assert prompt.endswith("=")
    i = next(k for k, c in enumerate(prompt) if not c.isdigit())
    return int(prompt[:i]), prompt[i], int(prompt[i + 1:-1])


# -- ArithmeticTask -----------------------------------------------------------------------------------
def test_train_problems_are_deterministic_across_instances() -> None:
    a, b = ArithmeticTask(3, "+-*", seed=7, n_eval=50), ArithmeticTask(3, "+-*", seed=7, n_eval=50)
    idx = list(range(300)) + [10**6, 123_457]
    assert [a.train_problem(i) for i in idx] == [b.train_problem(i) for i in idx]
    assert [a.train_problem(i) for i in reversed(idx)] == [b.train_problem(i) for i in reversed(idx)]  # order-free
    assert a.eval_problems == b.eval_problems
    assert a.train_problem(5).prompt_id == 5
    c = ArithmeticTask(3, "+-*", seed=8, n_eval=50)
    assert [a.train_problem(i) for i in range(50)] != [c.train_problem(i) for i in range(50)]
    assert len({a.train_problem(i).prompt for i in range(300)}) > 250  # a stream, not one problem


@pytest.mark.parametrize("digits,ops,n_eval", [(1, "+-*", 10**6), (2, "+-", 200)])
def test_held_out_pairs_never_in_training_stream(digits: int, ops: str, n_eval: int) -> None:
    task = ArithmeticTask(digits, ops, seed=3, n_eval=n_eval)
    held = {parse(p.prompt) for p in task.eval_problems}
    space = (10**digits) ** 2 * len(ops)
    assert len(held) == len(task.eval_problems) == min(n_eval, space // 2)
    assert all(p.prompt_id < 0 for p in task.eval_problems)
    seen = set()
    for i in range(20000):
        p = task.train_problem(i)
        key = parse(p.prompt)
        assert key not in held, f"training problem {i} {p.prompt} is held out"
        seen.add(key)
    if digits == 1:  # half the space held out: training still covers the other half
        assert len(seen) == space - len(held)


def test_answers_are_correct_and_parse() -> None:
    task = ArithmeticTask(3, "+-*", seed=1, n_eval=100)
    problems = [task.train_problem(i) for i in range(500)] + task.eval_problems
    assert {parse(p.prompt)[1] for p in problems} == {"+", "-", "*"}
    for p in problems:
        a, op, b = parse(p.prompt)
        assert 0 <= a <= 999 and 0 <= b <= 999
        assert int(p.answer) == OPS[op](a, b)
        assert set(p.prompt + p.answer) <= set(task.alphabet)
        assert len(p.prompt) <= task.max_prompt_chars() and len(p.answer) <= task.max_answer_chars()
        assert math_reward(p.answer, p.answer).reward == 1.0


def test_invalid_task_arguments() -> None:
    with pytest.raises(ValueError):
        ArithmeticTask(0, "+", 0, 10)
    with pytest.raises(ValueError):
        ArithmeticTask(2, "+/", 0, 10)
    with pytest.raises(ValueError):
        ArithmeticTask(2, "", 0, 10)


@pytest.mark.parametrize("prompt,flawed", [
    ("58+67=", "15"),  # 5+6=11 -> 1, 8+7=15 -> 5
    ("99+1=", "90"),   # 9+0 -> 9, 9+1=10 -> 0
    ("5+7=", "2"),
    ("50+50=", "0"),   # "00" -> 0
    ("12+34=", "46"),  # no carries: the flawed answer is the right one
    ("123+9=", "122"),
    ("12*34=", "408"),  # '*' has no flaw
])
def test_flawed_answer_drops_carries(prompt: str, flawed: str) -> None:
    task = ArithmeticTask(3, "+-*", seed=0, n_eval=10)
    a, op, b = parse(prompt)
    assert task.flawed_answer(Problem(0, prompt, str(OPS[op](a, b)))) == flawed


def test_flawed_answer_matches_digitwise_sum_on_training_stream() -> None:
    task = ArithmeticTask(3, "+", seed=5, n_eval=10)
    wrong = 0
    for i in range(300):
        p = task.train_problem(i)
        a, _, b = parse(p.prompt)
        sa, sb = str(a).zfill(3), str(b).zfill(3)
        expected = int("".join(str((int(x) + int(y)) % 10) for x, y in zip(sa, sb)))
        assert task.flawed_answer(p) == str(expected)
        wrong += task.flawed_answer(p) != p.answer
    assert wrong > 100  # carries are common, so the flaw is real


def test_flawed_answer_only_flaws_addition() -> None:
    task = ArithmeticTask(2, "+-*", seed=0, n_eval=10)
    assert task.flawed_answer(Problem(0, "52-37=", "15")) == "15"
    assert task.flawed_answer(Problem(0, "12*13=", "156")) == "156"
    assert task.flawed_answer(Problem(0, "58+67=", "125")) == "15"


# -- JSONL ------------------------------------------------------------------------------------------------
def test_read_jsonl_rows_and_blank_lines(tmp_path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "1+1=", "answer": "2"}\n\n   \n{"prompt": "x", "answer": 3, "extra": 1}\n')
    assert read_jsonl(f) == [("1+1=", "2"), ("x", "3")]


@pytest.mark.parametrize("bad", ['{"prompt": "a", "answer": ', '{"prompt": "a"}', '[1, 2]', '"text"', "null",
                                 '{"answer": "1"}'])
def test_read_jsonl_bad_line_names_file_and_line(tmp_path, bad: str) -> None:
    f = tmp_path / "train.jsonl"
    f.write_text('{"prompt": "1", "answer": "1"}\n\n' + bad + '\n{"prompt": "2", "answer": "2"}\n')
    with pytest.raises(ValueError) as e:
        read_jsonl(f)
    assert f"{f}:3:" in str(e.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_read_jsonl_empty_file(tmp_path, content: str) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text(content)
    with pytest.raises(ValueError, match="no problems found"):
        read_jsonl(f)


def test_jsonl_task(tmp_path) -> None:
    train, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("".join(f'{{"prompt": "q{i}", "answer": "{i}"}}\n' for i in range(3)))
    ev.write_text("".join(f'{{"prompt": "e{i}", "answer": "{10 + i}"}}\n' for i in range(5)))
    task = DatasetTask.from_files(str(train), str(ev), Fields(), n_eval=2, seed=0, shuffle=False)
    assert [task.train_problem(i) for i in (0, 1, 2, 3, 7)] == [
        Problem(0, "q0", "0"), Problem(1, "q1", "1"), Problem(2, "q2", "2"), Problem(3, "q0", "0"),
        Problem(7, "q1", "1")]
    assert task.eval_problems == [Problem(-1, "e0", "10"), Problem(-2, "e1", "11")]
    assert set(task.alphabet) == set("q012e1")
    assert task.max_prompt_chars() == 2 and task.max_answer_chars() == 2  # held-out rows count too


# -- the math verifier on the task's own answers -------------------------------------------------------
def test_math_reward_on_arithmetic_task_answers() -> None:
    task = ArithmeticTask(2, "+-*", seed=2, n_eval=10)
    rng = random.Random(0)
    for i in range(200):
        p = task.train_problem(i)
        assert math_reward(p.answer, p.answer).reward == 1.0
        assert math_reward(str(int(p.answer) + rng.choice([-1, 1, 10])), p.answer).reward == 0.0
