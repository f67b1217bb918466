"""The scorer: dispatch on the problem's verifier, a user's reward.fn, the reward config's checks."""

from __future__ import annotations

import pickle

import pytest

from areal_hpc.config.fields import ConfigError
from areal_hpc.config.reward import RewardConfig
from areal_hpc.reward.result import RewardResult
from areal_hpc.reward.scorer import build_scorer, even_token_reward
from areal_hpc.tasks.base import Problem

MATH = Problem(1, "Natalia sold ...", "72")
EVEN = Problem(2, "", "", prompt_tokens=(5, 6), verifier="even_tokens")


def test_dispatch_on_verifier() -> None:
    score = build_scorer(RewardConfig())
    assert score(MATH, [], "so 72 in all.\n#### 72").reward == 1.0
    assert score(MATH, [], "#### 27").reward == 0.0
    r = score(EVEN, [2, 4, 5, 7], "ignored")
    assert r.reward == 0.5 and r.error == "" and not r.timed_out
    assert score(EVEN, [], "").reward == 0.0


def test_even_token_reward() -> None:
    assert even_token_reward([]) == 0.0
    assert even_token_reward([0, 2, 4]) == 1.0
    assert even_token_reward([1, 2, 3, 5]) == 0.25


def test_unknown_verifier_and_code_without_tests_are_one_line_errors() -> None:
    score = build_scorer(RewardConfig())
    with pytest.raises(ValueError, match=r"^problem 7 names verifier 'maths', not one of math\|code\|even_tokens; "
                                         r"fix the task's verifier or set reward.fn$"):
        score(Problem(7, "q", "1", verifier="maths"), [], "1")
    with pytest.raises(ValueError, match="code problem 8 has no tests") as e:
        score(Problem(8, "write f", "", verifier="code"), [], "def f(): pass")
    assert "\n" not in str(e.value)


def test_code_branch_calls_the_sandbox() -> None:
    pytest.importorskip("areal_hpc.reward.code")
    score = build_scorer(RewardConfig(code_timeout_s=10))
    problem = Problem(3, "add", "", verifier="code", tests=("assert add(2, 3) == 5", "assert add(-1, 1) == 0"),
                      entry_point="add")
    assert score(problem, [], "```python\ndef add(a, b):\n    return a + b\n```").reward == 1.0
    half = "```python\ndef add(a, b):\n    return 5\n```"  # passes the first snippet only
    assert score(problem, [], half).reward == 0.0
    assert build_scorer(RewardConfig(code_partial=True))(problem, [], half).reward == 0.5


def test_user_fn_scores_every_problem_and_is_timed() -> None:
    score = build_scorer(RewardConfig(fn="reward_fns:length"))
    for problem in (MATH, EVEN, Problem(9, "q", "", verifier="anything")):  # reward.fn overrides the verifier
        r = score(problem, [], "x" * 30)
        assert r.reward == pytest.approx(0.3) and r.error == "" and r.seconds >= 0


@pytest.mark.parametrize("response,error", [
    ("1.5", "reward.fn reward_fns:returns returned 1.5, not a number in [0, 1]"),
    ("-0.1", "reward.fn reward_fns:returns returned -0.1, not a number in [0, 1]"),
    ("'abc'", "reward.fn reward_fns:returns returned 'abc', not a number in [0, 1]"),
    ("None", "reward.fn reward_fns:returns returned None, not a number in [0, 1]"),
    ("float('nan')", None),  # not a literal: literal_eval raises ValueError, scored as an exception
])
def test_user_fn_bad_values_score_zero_naming_the_function(response: str, error: str | None) -> None:
    r = build_scorer(RewardConfig(fn="reward_fns:returns"))(MATH, [], response)
    assert r.reward == 0.0 and not r.timed_out
    assert r.error == error if error else r.error.startswith("ValueError: malformed node")


def test_user_fn_good_values() -> None:
    score = build_scorer(RewardConfig(fn="reward_fns:returns"))
    assert score(MATH, [], "True").reward == 1.0
    assert score(MATH, [], "0").reward == 0.0 and score(MATH, [], "0").error == ""
    r = score(MATH, [], "0.25")
    assert r == RewardResult(0.25, r.seconds)


def test_user_fn_exception_scores_zero_with_its_one_line() -> None:
    r = build_scorer(RewardConfig(fn="reward_fns:raises"))(MATH, [], "x")
    assert r.reward == 0.0 and r.error == "KeyError: 'no such field\\nsecond line'"


@pytest.mark.parametrize("path,reason", [
    ("no_such_module_xyz:f", "module 'no_such_module_xyz' does not import (ModuleNotFoundError: "),
    ("reward_fns:missing", "module 'reward_fns' has no attribute 'missing'"),
    ("reward_fns:NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a callable"),
])
def test_user_fn_path_that_does_not_resolve_fails_when_built(path: str, reason: str) -> None:
    with pytest.raises(ValueError) as e:
        build_scorer(RewardConfig(fn=path))
    msg = str(e.value)
    assert msg.startswith(f"reward.fn '{path}': {reason}") and "\n" not in msg
    assert "make sure the module is on PYTHONPATH of every rank" in msg


def test_scorer_pickles_and_reimports_its_fn() -> None:
    for cfg in (RewardConfig(), RewardConfig(fn="reward_fns:length", timeout_s=2)):
        score = pickle.loads(pickle.dumps(build_scorer(cfg)))
        assert score.cfg == cfg
        assert score(MATH, [], "#### 72").reward == (1.0 if cfg.fn is None else pytest.approx(0.07))


def test_limits() -> None:
    score = build_scorer(RewardConfig(timeout_s=3, code_timeout_s=4))
    assert score.limit_s(MATH) == 3
    assert score.limit_s(Problem(1, "", "", verifier="code", tests=("a", "b"))) == 8


# -- config ---------------------------------------------------------------------------------------------
def test_config_defaults_validate() -> None:
    cfg = RewardConfig()
    cfg.validate()
    assert (cfg.code_timeout_s, cfg.code_memory_mb, cfg.code_partial) == (10.0, 1024, False)
    RewardConfig(fn="my_pkg.rewards:score").validate()
    RewardConfig(fn="mod:Class.method").validate()


@pytest.mark.parametrize("field,value,key", [
    ("fn", "my_pkg.rewards.score", "reward.fn"),
    ("fn", "my_pkg/rewards.py:score", "reward.fn"),
    ("fn", "mod:", "reward.fn"),
    ("workers", -1, "reward.workers"),
    ("timeout_s", 0, "reward.timeout_s"),
    ("code_timeout_s", -1.0, "reward.code_timeout_s"),
    ("code_memory_mb", 16, "reward.code_memory_mb"),
    ("code_partial", "yes", "reward.code_partial"),
])
def test_config_errors_name_the_key(field: str, value: object, key: str) -> None:
    with pytest.raises(ConfigError, match=f"^config key '{key}' ") as e:
        RewardConfig(**{field: value}).validate()
    assert "\n" not in str(e.value) and "; " in str(e.value)
