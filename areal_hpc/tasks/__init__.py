"""Tasks: prompts with verifiable answers."""

from __future__ import annotations

from areal_hpc.tasks.arithmetic import ArithmeticTask
from areal_hpc.tasks.base import Problem
from areal_hpc.tasks.jsonl import JsonlTask

__all__ = ["ArithmeticTask", "JsonlTask", "Problem", "build_task"]


def build_task(cfg) -> ArithmeticTask | JsonlTask:
    """The task a :class:`~areal_hpc.config.schema.TaskConfig` describes (eval size from ``n_eval``)."""
    if cfg.kind == "arithmetic":
        return ArithmeticTask(cfg.digits, cfg.ops, cfg.seed, cfg.n_eval)
    return JsonlTask(cfg.train_path, cfg.eval_path, cfg.n_eval)
