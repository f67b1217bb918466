"""Datasets of ``{"prompt": ..., "answer": ...}`` lines, for real math problems on a cluster."""

from __future__ import annotations

import json
from pathlib import Path

from areal_hpc.tasks.base import Problem


def read_jsonl(path: str | Path, key: str | None = None) -> list[tuple[str, str]]:
    """The file's (prompt, answer) rows; errors name the config ``key`` that points at it, and the line."""
    where = f"{key}: {path}" if key else str(path)
    rows: list[tuple[str, str]] = []
    with open(path, "rb") as f:  # decoded line by line, so a byte that is not UTF-8 is reported with its line
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
                rows.append((str(obj["prompt"]), str(obj["answer"])))
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{where}:{lineno}: expected a JSON object with 'prompt' and 'answer' "
                    f"({type(e).__name__}: {e}); fix or remove that line"
                ) from None
    if not rows:
        raise ValueError(f"{where}: no problems found; a JSONL dataset needs one {{prompt, answer}} object per line")
    return rows


class JsonlTask:
    """Training problems cycle through the file in order; problem ``i`` is row ``i mod n``."""

    def __init__(self, train_path: str, eval_path: str, n_eval: int) -> None:
        self._train = read_jsonl(train_path, "task.train_path")
        held = read_jsonl(eval_path, "task.eval_path")[:n_eval]
        self.eval_problems = [Problem(-(i + 1), p, a) for i, (p, a) in enumerate(held)]

    def train_problem(self, index: int) -> Problem:
        p, a = self._train[index % len(self._train)]
        return Problem(index, p, a)

    @property
    def alphabet(self) -> str:
        chars = {c for p, a in self._train for c in p + a}
        chars |= {c for q in self.eval_problems for c in q.prompt + q.answer}
        return "".join(sorted(chars))

    def max_prompt_chars(self) -> int:
        return max(len(p) for p, _ in self._train)

    def max_answer_chars(self) -> int:
        return max(len(a) for _, a in self._train)
