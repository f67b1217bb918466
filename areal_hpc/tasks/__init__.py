"""Tasks: prompts with verifiable answers."""

from __future__ import annotations

from areal_hpc.tasks.arithmetic import ArithmeticTask
from areal_hpc.tasks.base import Problem
from areal_hpc.tasks.dataset import DatasetTask, Fields, read_dataset
from areal_hpc.tasks.packaged import load_champ, load_humaneval
from areal_hpc.tasks.synthetic import ALPHABET as SYNTHETIC_ALPHABET
from areal_hpc.tasks.synthetic import SyntheticTask
from areal_hpc.tasks.wordproblems import WordProblemTask

__all__ = ["ArithmeticTask", "DatasetTask", "Fields", "Problem", "SyntheticTask", "WordProblemTask",
           "build_task", "read_dataset"]


def build_task(cfg) -> ArithmeticTask | DatasetTask | SyntheticTask | WordProblemTask:
    """The task a config describes (eval size from ``task.n_eval``).

    Takes the whole :class:`~areal_hpc.config.schema.Config` (or only its ``task`` section for text
    tasks): the synthetic task also needs the policy's vocabulary (``model``) and the longest response
    (``rollout.max_new_tokens``) to draw prompt ids and clip target lengths.
    """
    t = getattr(cfg, "task", cfg)
    if t.kind == "arithmetic":
        return ArithmeticTask(t.digits, t.ops, t.seed, t.n_eval)
    if t.kind in ("jsonl", "dataset"):
        fields = Fields(prompt_key=t.prompt_key, answer_key=t.answer_key, verifier=t.verifier, tests_key=t.tests_key,
                        entry_point_key=t.entry_point_key, code_prefix_key=t.code_prefix_key)
        return DatasetTask.from_files(t.train_path, t.eval_path, fields, n_eval=t.n_eval, seed=t.seed,
                                      shuffle=t.shuffle)
    if t.kind in ("champ", "humaneval"):
        rows = load_champ() if t.kind == "champ" else load_humaneval()
        return DatasetTask(rows, None, n_eval=t.n_eval, seed=t.seed, shuffle=t.shuffle, source=f"task.kind={t.kind}")
    if t.kind == "wordproblems":
        return WordProblemTask(t.max_value, t.max_steps, t.word_ops, t.seed, t.n_eval)
    if not hasattr(cfg, "task"):
        raise TypeError("build_task(cfg.task) cannot build task.kind=synthetic: pass the whole config, "
                        "whose model and rollout sections fix its vocabulary and lengths")
    from areal_hpc.model.tokenizer import initial_tokenizer

    tok = initial_tokenizer(cfg.model, SYNTHETIC_ALPHABET)
    specials = [i for i in (tok.pad_id, tok.eos_id, tok.bos_id) if i is not None]
    return SyntheticTask(prompt_len=t.prompt_len, len_median=t.len_median, len_sigma=t.len_sigma,
                         max_len=cfg.rollout.max_new_tokens, vocab_size=tok.vocab_size, special_ids=specials,
                         seed=t.seed, n_eval=t.n_eval)
