"""Reward functions for the reward tests, imported by path (``reward.fn=reward_fns:NAME``) in the test process
and in the pool's workers (pytest puts tests/ on sys.path; the pool hands its sys.path to the workers).

Each misbehaves in one way a user's function can: spins, dies, segfaults, starts a child, raises, returns
something that is not a reward.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import time

NOT_CALLABLE = 42


def length(response: str, problem) -> float:
    """A deterministic reward: the response's length in hundreds, capped at 1."""
    return min(len(response) / 100, 1.0)


def by_command(response: str, problem) -> float:
    """Does what the response says: ``spin``, ``sleep:SECONDS``, ``exit``, ``segfault``, ``child:PIDFILE``
    (start a sleeping child in its own session, as a sandbox would, write its pid, then spin),
    ``modules`` (1.0 only when this process imported no torch/numpy); anything else scores by length."""
    if response == "spin":
        while True:
            pass
    if response.startswith("sleep:"):
        time.sleep(float(response.split(":")[1]))
        return 1.0
    if response == "exit":
        os._exit(3)
    if response == "segfault":
        ctypes.string_at(0)
    if response.startswith("child:"):
        child = subprocess.Popen(["sleep", "1000"], start_new_session=True)
        with open(response.split(":", 1)[1], "w") as f:
            f.write(str(child.pid))
        while True:
            pass
    if response == "modules":
        return 0.0 if {"torch", "numpy"} & set(sys.modules) else 1.0
    return length(response, problem)


def raises(response: str, problem) -> float:
    raise KeyError("no such field\nsecond line")


def returns(response: str, problem) -> object:
    """Returns the response evaluated as a Python literal: '1.5', '"abc"', 'None', 'True'."""
    import ast

    return ast.literal_eval(response)
