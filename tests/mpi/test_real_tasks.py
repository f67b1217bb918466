"""Whole jobs on real-format tasks: a chat checkpoint (SmolLM2's tokenizer and template over a tiny random
Llama) on GSM8K-style word problems scored by math-verify, and on HumanEval scored in the code sandbox.

The weights are random, so these runs do not learn; they check what a real task adds to the loop: chat
prompts through the template, stop ids, rewards computed in the reward pool off the decode loop (their
time and timeouts in the HDF5 log), evaluation at start, mid-run and end, and the same accounting and
staleness invariants as every other run, read from the HDF5 log.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from areal_hpc.storage.records import read_jsonl

from .conftest import run_train
from .test_async_loop import check_records

pytestmark = pytest.mark.mpi

STEPS = 4
COMMON = ("warmup.enabled=false", "cluster.n_rollout=1", f"run.steps={STEPS}", "trainer.batch_size=8",
          "rollout.group_size=4", "rollout.max_concurrent_groups=2", "rollout.eta=1", "trainer.token_budget=4096",
          "reward.workers=1", "eval.every=2", "run.final_checkpoint=none")


@pytest.fixture(scope="module")
def smol(smol_checkpoint: Path) -> Path:
    return smol_checkpoint


def _check(job, smol_run: Path, n_eval: int, k: int, eta: int = 1) -> dict:
    assert job.rc == 0, job.output[-3000:]
    rec = check_records(smol_run, eta=eta, steps=STEPS, group_size=4)
    samples = rec["samples"]
    # Every sample went through the reward pool: a measured time, within its limit.
    assert (samples["reward_seconds"] > 0).all()
    assert samples["reward"].between(0, 1).all()
    evals = rec["log"].evals()
    assert sorted(set(evals["step"])) == [0, 2, STEPS]
    assert {"pass@1", "n"} | ({f"avg@{k}", f"pass@{k}"} if k > 1 else set()) <= set(evals["metric"])
    lines = list(read_jsonl(smol_run / "eval.jsonl"))
    assert [e["step"] for e in lines] == [0, 2, STEPS] and all(e["n"] == n_eval for e in lines)
    summary = json.loads((smol_run / "summary.json").read_text())
    assert summary["eval_final"]["pass@1"] == summary["accuracy_after"]
    assert summary["reward_seconds_per_sample"] > 0 and summary["reward_timeouts"] == 0
    return rec


def test_chat_model_on_word_problems_with_math_verify(job_root: Path, smol: Path) -> None:
    job = run_train(job_root, "smol_math", *COMMON, "model.kind=hf", f"model.path={smol}", "task.kind=wordproblems",
                    "task.n_eval=6", "eval.n=6", "eval.k=2", "rollout.max_new_tokens=24", "model.max_seq_len=256",
                    "prompt.template={problem}\nGive the final answer after ####.")
    rec = _check(job, job_root / "smol_math", n_eval=6, k=2)
    text = rec["samples"]["response_text"].tolist()
    assert not any("<|im_end|>" in t for t in text), "responses are decoded without special tokens"


def test_chat_model_on_humaneval_in_the_sandbox(job_root: Path, smol: Path) -> None:
    job = run_train(job_root, "smol_code", *COMMON, "model.kind=hf", f"model.path={smol}", "task.kind=humaneval",
                    "task.n_eval=6", "eval.n=3", "rollout.max_new_tokens=16", "model.max_seq_len=1024",
                    "reward.code_timeout_s=5")
    rec = _check(job, job_root / "smol_code", n_eval=3, k=1)
    # Random tokens are no solution: every sample ran in the sandbox and failed there, none timed out.
    assert (rec["samples"]["reward"] == 0).all()
    assert not rec["samples"]["reward_timed_out"].any()
