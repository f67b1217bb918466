"""Synthetic token workload: random prompts, long-tailed response lengths, a learnable token reward.

Throughput of the RL loop depends on prompt and response lengths, not on what the tokens mean, so a
benchmark with random-weight models (which never say EOS) takes its lengths from here: each problem
carries a target length drawn from a log-normal (median ``len_median``, sigma ``len_sigma``), clipped
to ``[1, max_len]`` so a few responses reach the maximum as in real reasoning traces. The reward, the
fraction of response ids that are even, is verifiable and learnable from random init: a policy moves
probability mass onto even ids, so the reward curve of a working RL loop rises above 0.5.

Problem ``i`` is a pure function of (seed, i), like :class:`~areal_hpc.tasks.arithmetic.ArithmeticTask`;
held-out prompts come from their own stream and are excluded from the training stream.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable

from areal_hpc.tasks.base import Problem

# The tiny model's character vocabulary for this task (16 tokens + pad/bos/eos).
ALPHABET = "abcdefghijklmnop"
VERIFIER = "even_tokens"


class SyntheticTask:
    def __init__(self, *, prompt_len: int, len_median: float, len_sigma: float, max_len: int, vocab_size: int,
                 special_ids: Iterable[int], seed: int, n_eval: int) -> None:
        if prompt_len < 1 or len_median < 1 or len_sigma < 0 or max_len < 1:
            raise ValueError(f"synthetic task needs prompt_len >= 1, len_median >= 1, len_sigma >= 0, max_len >= 1; "
                             f"got {prompt_len}, {len_median}, {len_sigma}, {max_len}")
        self.prompt_len, self.len_median, self.len_sigma, self.max_len = prompt_len, len_median, len_sigma, max_len
        self.seed = seed
        self._specials = sorted({int(s) for s in special_ids if 0 <= int(s) < vocab_size})
        self._n_ids = vocab_size - len(self._specials)
        if self._n_ids < 2:
            raise ValueError(f"a vocabulary of {vocab_size} ids leaves {self._n_ids} non-special ids for prompts")
        space = self._n_ids**prompt_len
        n_eval = min(n_eval, space // 2)  # leave most prompts to training, so its redraws terminate fast
        self._held: set[tuple[int, ...]] = set()
        self.eval_problems: list[Problem] = []
        rng = random.Random(f"{seed}-synthetic-eval")
        while len(self.eval_problems) < n_eval:
            ids = self._draw_prompt(rng)
            if ids not in self._held:
                self._held.add(ids)
                self.eval_problems.append(self._problem(-(len(self.eval_problems) + 1), ids, self._draw_len(rng)))

    def _draw_prompt(self, rng: random.Random) -> tuple[int, ...]:
        """Uniform over non-special ids: draw an index among them, then step over the specials."""
        out = []
        for _ in range(self.prompt_len):
            x = rng.randrange(self._n_ids)
            for s in self._specials:
                if x >= s:
                    x += 1
            out.append(x)
        return tuple(out)

    def _draw_len(self, rng: random.Random) -> int:
        n = round(math.exp(rng.gauss(math.log(self.len_median), self.len_sigma)))
        return max(1, min(self.max_len, n))

    @staticmethod
    def _problem(pid: int, ids: tuple[int, ...], target: int) -> Problem:
        return Problem(prompt_id=pid, prompt=" ".join(map(str, ids)), answer=f"len={target}", prompt_tokens=ids,
                       max_tokens=target, verifier=VERIFIER)

    def train_problem(self, index: int) -> Problem:
        """Training problem number ``index`` (deterministic, never a held-out prompt)."""
        rng = random.Random(f"{self.seed}-synthetic-train-{index}")
        while True:
            ids = self._draw_prompt(rng)
            if ids not in self._held:
                return self._problem(index, ids, self._draw_len(rng))

    def epoch_of(self, index: int) -> int:
        """0: a generated stream draws fresh problems, it never completes a pass over a fixed set."""
        return 0

    @property
    def alphabet(self) -> str:
        return ALPHABET

    def max_prompt_chars(self) -> int:
        return self.prompt_len

    def max_answer_chars(self) -> int:
        return self.max_len
