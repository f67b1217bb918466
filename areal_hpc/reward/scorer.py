"""One callable that scores any response: the problem's verifier, or the user's ``reward.fn`` for every problem.

A :class:`Scorer` is what the reward pool ships to its worker processes, so it is picklable: it carries the
``reward`` config and, for ``reward.fn``, the import path (imported again on the other side, where a
function object could not travel). Verifier modules are imported when first needed, so a process that only
dispatches (the rollout rank with a pool) never loads sympy, and ``code`` works only where the sandbox does.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from areal_hpc.config.reward import RewardConfig
from areal_hpc.reward.custom import RewardFn, custom_reward, load_reward_fn
from areal_hpc.reward.result import RewardResult
from areal_hpc.tasks.base import Problem

VERIFIERS = ("math", "code", "even_tokens")


def even_token_reward(tokens: Sequence[int]) -> float:
    """Fraction of response ids that are even (0.0 for an empty response).

    About 0.5 under a random policy with per-sample spread, so group-normalised advantages carry signal
    from the first step and a policy learning to prefer even ids shows a rising curve.
    """
    if not tokens:
        return 0.0
    return sum(1 for t in tokens if int(t) % 2 == 0) / len(tokens)


class Scorer:
    """``scorer(problem, tokens, text) -> RewardResult``: ``tokens`` are the response ids (without EOS),
    ``text`` their decoded text without special tokens."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg
        self._fn: RewardFn | None = load_reward_fn(cfg.fn) if cfg.fn else None

    def __getstate__(self) -> dict[str, Any]:
        return {"cfg": self.cfg}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.cfg = state["cfg"]
        self._fn = load_reward_fn(self.cfg.fn) if self.cfg.fn else None  # imported again in this process

    def check(self, problem: Problem) -> None:
        """Raise the one-line error a problem no verifier can score deserves (a data or config mistake,
        so it stops the run instead of scoring 0 quietly)."""
        if self._fn is not None:
            return
        if problem.verifier not in VERIFIERS:
            raise ValueError(f"problem {problem.prompt_id} names verifier {problem.verifier!r}, not one of "
                             f"{'|'.join(VERIFIERS)}; fix the task's verifier or set reward.fn")
        if problem.verifier == "code" and not problem.tests:
            raise ValueError(f"code problem {problem.prompt_id} has no tests to run; give every code problem "
                             "its test snippets (the dataset's tests field)")

    def limit_s(self, problem: Problem) -> float:
        """The time this scorer may take on ``problem`` by its own limits; the pool kills a worker some
        grace after it."""
        if self._fn is None and problem.verifier == "code":
            # One sandboxed run per test snippet at most (a partial reward counts snippets one by one).
            return self.cfg.code_timeout_s * max(1, len(problem.tests))
        if self._fn is None and problem.verifier == "even_tokens":
            return 1.0
        return self.cfg.timeout_s

    def warm(self) -> None:
        """Import what scoring needs now, so a worker's first task does not pay for it within its deadline."""
        if self._fn is None:
            from areal_hpc.reward.math import math_reward  # noqa: F401  (math-verify and sympy: about 0.5 s)

    def __call__(self, problem: Problem, tokens: Sequence[int], text: str) -> RewardResult:
        self.check(problem)
        t0 = time.monotonic()
        try:
            return self._score(problem, tokens, text)
        except Exception as e:  # a verifier's own failure scores 0; it must not take the rollout down
            reason = f"{type(e).__name__}: {' '.join(str(e).split())}"
            return RewardResult(0.0, time.monotonic() - t0, error=reason[:200])

    def _score(self, problem: Problem, tokens: Sequence[int], text: str) -> RewardResult:
        if self._fn is not None:
            return custom_reward(self._fn, str(self.cfg.fn), text, problem)
        if problem.verifier == "math":
            from areal_hpc.reward.math import math_reward

            return math_reward(text, problem.answer, self.cfg.timeout_s)
        if problem.verifier == "code":
            from areal_hpc.reward.code import code_reward
            from areal_hpc.reward.sandbox import SandboxLimits

            limits = SandboxLimits(timeout_s=self.cfg.code_timeout_s, memory_mb=self.cfg.code_memory_mb)
            return code_reward(problem, text, limits, self.cfg.code_partial)
        t0 = time.monotonic()
        reward = even_token_reward(tokens)
        return RewardResult(reward, time.monotonic() - t0)


def build_scorer(cfg: RewardConfig) -> Scorer:
    """The scorer a ``reward`` config describes; a ``reward.fn`` that does not import fails here, one line."""
    return Scorer(cfg)
