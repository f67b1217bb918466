"""A user's reward function given by import path (``reward.fn: package.module:function``).

The function is called as ``fn(response: str, problem: Problem) -> float``. Whatever goes wrong inside it
scores 0 with a one-line reason rather than stopping the rollout: a user's task should not bring down a
run over one odd response. A path that does not import is the opposite: it fails when the scorer is built.
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable

from areal_hpc.reward.result import RewardResult
from areal_hpc.tasks.base import Problem

RewardFn = Callable[[str, Problem], float]


def load_reward_fn(path: str) -> RewardFn:
    """The callable ``path`` ('package.module:function') names; ValueError (one line) if it cannot be had."""
    module_name, _, attr = path.partition(":")

    def fail(reason: str) -> ValueError:
        return ValueError(f"reward.fn '{path}': {reason}; make sure the module is on PYTHONPATH of every rank "
                          f"and names a function fn(response: str, problem) -> float")

    if not module_name or not attr:
        raise fail("not of the form 'package.module:function'")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the module raised while importing
        raise fail(f"module '{module_name}' does not import ({type(e).__name__}: {_one_line(e)})") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise fail(f"module '{module_name}' has no attribute '{attr}'") from None
    if not callable(obj):
        raise fail(f"'{attr}' is a {type(obj).__name__}, not a callable")
    return obj


def _one_line(e: object) -> str:
    text = " ".join(str(e).split())
    return text[:200] if text else type(e).__name__


def custom_reward(fn: RewardFn, path: str, response: str, problem: Problem) -> RewardResult:
    """``fn(response, problem)`` as a RewardResult: its time; an exception or a value that is not a number in
    [0, 1] scores 0 with the reason."""
    t0 = time.monotonic()
    try:
        value = fn(response, problem)
    except Exception as e:
        return RewardResult(0.0, time.monotonic() - t0, error=f"{type(e).__name__}: {_one_line(e)}")
    seconds = time.monotonic() - t0
    try:
        reward = float(value)
    except (TypeError, ValueError):
        reward = math.nan
    if not (0.0 <= reward <= 1.0):  # NaN fails this too
        return RewardResult(0.0, seconds, error=f"reward.fn {path} returned {_one_line(repr(value))[:60]}, "
                                                f"not a number in [0, 1]")
    return RewardResult(reward, seconds)
