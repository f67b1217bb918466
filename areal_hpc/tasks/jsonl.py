"""``{"prompt": ..., "answer": ...}`` JSONL files: the original ``task.kind=jsonl`` API, now a view of
:mod:`areal_hpc.tasks.dataset` (which also reads Parquet, chat messages and code rows)."""

from __future__ import annotations

from pathlib import Path

from areal_hpc.tasks.dataset import DatasetTask, Fields, read_dataset


def read_jsonl(path: str | Path, key: str | None = None) -> list[tuple[str, str]]:
    """The file's (prompt, answer) rows; errors name the config ``key`` that points at it, and the line."""
    return [(p.prompt, p.answer) for p in read_dataset(path, Fields(), key)]


class JsonlTask(DatasetTask):
    """Training problems cycle through ``train_path`` in file order; the first ``n_eval`` rows of
    ``eval_path`` are held out. ``build_task`` builds the general :class:`DatasetTask` instead."""

    def __init__(self, train_path: str, eval_path: str, n_eval: int) -> None:
        rows = read_dataset(train_path, Fields(), "task.train_path")
        held = read_dataset(eval_path, Fields(), "task.eval_path")
        super().__init__(rows, held, n_eval=n_eval, seed=0, shuffle=False, source=f"task.train_path: {train_path}")
