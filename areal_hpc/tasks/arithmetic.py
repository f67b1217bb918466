"""Synthetic arithmetic: a verifiable reasoning task generated from a seed, with a held-out split.

Problem ``i`` of the training stream is a pure function of (seed, i), so any rank can produce its
share of prompts without coordination and a resumed run regenerates exactly the same ones. Held-out
pairs are drawn first and excluded from the training stream, so evaluation never sees trained prompts.
"""

from __future__ import annotations

import random

from areal_hpc.tasks.base import Problem

ALPHABET = "0123456789+-*= "


class ArithmeticTask:
    def __init__(self, digits: int, ops: str, seed: int, n_eval: int) -> None:
        if digits < 1:
            raise ValueError(f"task.digits must be >= 1, got {digits}")
        bad = set(ops) - set("+-*")
        if not ops or bad:
            raise ValueError(f"task.ops {ops!r} may only contain '+', '-', '*'")
        self.digits, self.ops, self.seed = digits, ops, seed
        self._hi = 10**digits - 1
        rng = random.Random(f"{seed}-eval")
        space = (self._hi + 1) ** 2 * len(ops)
        n_eval = min(n_eval, space // 2)
        held: list[tuple[int, int, str]] = []
        seen: set[tuple[int, int, str]] = set()
        while len(held) < n_eval:
            key = self._draw(rng)
            if key not in seen:
                seen.add(key)
                held.append(key)
        self._held = seen
        self.eval_problems = [self._problem(-(i + 1), *k) for i, k in enumerate(held)]

    def _draw(self, rng: random.Random) -> tuple[int, int, str]:
        return rng.randint(0, self._hi), rng.randint(0, self._hi), rng.choice(self.ops)

    @staticmethod
    def _problem(pid: int, a: int, b: int, op: str) -> Problem:
        value = {"+": a + b, "-": a - b, "*": a * b}[op]
        return Problem(prompt_id=pid, prompt=f"{a}{op}{b}=", answer=str(value))

    def train_problem(self, index: int) -> Problem:
        """Training problem number ``index`` (deterministic, never a held-out pair)."""
        rng = random.Random(f"{self.seed}-train-{index}")
        while True:
            key = self._draw(rng)
            if key not in self._held:
                return self._problem(index, *key)

    def epoch_of(self, index: int) -> int:
        """0: a generated stream draws fresh problems, it never completes a pass over a fixed set."""
        return 0

    def flawed_answer(self, problem: Problem) -> str:
        """The answer of a teacher who forgets carries: the warm-up's systematic flaw.

        Digit-wise sums modulo 10 for ``+``; ``-`` and ``*`` problems keep their correct answer.
        RL with the verifier then has something real to fix: the policy must learn to carry.
        """
        a_s, op, rest = problem.prompt.partition("+") if "+" in problem.prompt[1:] else (None, None, None)
        if a_s is None:
            return problem.answer
        a, b = int(a_s), int(rest.rstrip("="))
        width = max(len(str(a)), len(str(b)))
        digits = [(int(x) + int(y)) % 10 for x, y in zip(str(a).zfill(width), str(b).zfill(width))]
        return str(int("".join(map(str, digits))))

    @property
    def alphabet(self) -> str:
        return ALPHABET

    def max_prompt_chars(self) -> int:
        return 2 * (self.digits + 1) + 1

    def max_answer_chars(self) -> int:
        return 2 * self.digits + 1
