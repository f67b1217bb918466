"""``task``: prompts and rewards."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from areal_hpc.config.fields import ConfigError, need, setting


@dataclass
class TaskConfig:
    """Prompts and rewards."""

    kind: str = setting(
        "arithmetic",
        "arithmetic: generated sums; jsonl: prompt/answer files; "
        "synthetic: random token prompts with long-tailed response lengths (throughput work)",
        ("arithmetic", "jsonl", "synthetic"),
    )
    train_path: str | None = setting(None, "training JSONL file (required when kind=jsonl)")
    eval_path: str | None = setting(None, "held-out JSONL file (required when kind=jsonl)")
    digits: int = setting(2, "arithmetic: digits per operand")
    ops: str = setting("+", "arithmetic: operator characters to sample from, e.g. '+-'")
    n_eval: int = setting(200, "arithmetic: size of the generated held-out set")
    seed: int = setting(1234, "seed of the task generator (independent of run.seed)")
    prompt_len: int = setting(128, "synthetic: prompt length in tokens")
    len_median: float = setting(48.0, "synthetic: median response length in tokens (log-normal)")
    len_sigma: float = setting(1.0, "synthetic: log-normal sigma of response lengths; a few reach max_new_tokens")

    def validate(self) -> None:
        need(self.digits >= 1, "task.digits", self.digits, "must be >= 1", "set task.digits=2")
        need(bool(self.ops), "task.ops", self.ops, "must list at least one operator", "set task.ops='+'")
        need(self.n_eval >= 1, "task.n_eval", self.n_eval, "must be >= 1", "set task.n_eval=200")
        need(self.seed >= 0, "task.seed", self.seed, "must be >= 0", "use a non-negative seed")
        if self.kind == "jsonl":
            _existing_jsonl("task.train_path", self.train_path)
            _existing_jsonl("task.eval_path", self.eval_path)
        if self.kind == "synthetic":
            need(self.prompt_len >= 1, "task.prompt_len", self.prompt_len, "must be >= 1", "set task.prompt_len=128")
            need(self.len_median >= 1, "task.len_median", self.len_median, "must be >= 1", "set task.len_median=48")
            need(self.len_sigma >= 0, "task.len_sigma", self.len_sigma,
                 "must be >= 0 (0: every response has the median length)", "set task.len_sigma=1.0")


def _existing_jsonl(key: str, value: str | None) -> None:
    need(value is not None, key, value, "is required when task.kind=jsonl",
         f"set {key} to a local JSONL file or use task.kind=arithmetic")
    if value is not None and not Path(value).expanduser().is_file():
        raise ConfigError(f"{key} '{value}' does not exist; point it at a local JSONL file or use task.kind=arithmetic")
