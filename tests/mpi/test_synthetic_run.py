"""A whole job on the synthetic workload: responses stop at their drawn target lengths, rewards verify."""

from __future__ import annotations

import json

import numpy as np
import pytest

from areal_hpc.config import load_config
from areal_hpc.storage.runlog import RunLog
from areal_hpc.tasks import build_task

from .conftest import QUICKSTART, run_train

pytestmark = pytest.mark.mpi

SYNTHETIC = ["task.kind=synthetic", "task.prompt_len=6", "task.len_median=4", "task.len_sigma=1.0",
             "rollout.max_new_tokens=12", "model.max_seq_len=24", "cluster.n_rollout=1", "trainer.batch_size=32",
             "eval.n=16", "run.steps=10", "warmup.enabled=false", "warmup.flaw=0"]


def test_synthetic_task_lengths_follow_targets(job_root):
    # Packed micro-batches padded to 64-token buckets: the GPU configs' trainer path, here uncompiled.
    # rollout.abort_stale off: an aborted group's responses end short of their targets by design (tested below)
    job = run_train(job_root, "synthetic", *SYNTHETIC, "trainer.packing=packed", "trainer.token_bucket=64",
                    "rollout.abort_stale=false", timeout=120)
    assert job.rc == 0, job.output[-3000:]
    summary = json.loads((job.run_dir / "summary.json").read_text())
    assert summary["final_version"] == 10
    assert 0.0 <= summary["accuracy_before"] <= 1.0 and 0.0 <= summary["accuracy_after"] <= 1.0

    log = RunLog(job.run_dir, strict=True)
    samples = log.samples().set_index("sample_id")
    sample_ids, offsets, fields = log.tokens("response", ["response_tokens"])
    tokens = fields["response_tokens"]
    task = build_task(load_config(QUICKSTART, [f"run.output_dir={job_root}", *SYNTHETIC]))
    eos = 2  # the tiny char tokenizer's eos
    equal = 0
    for k, sid in enumerate(sample_ids):
        row = samples.loc[sid]
        problem = task.train_problem(int(row["prompt_id"]))
        resp = tokens[offsets[k]:offsets[k + 1]].tolist()
        assert row["answer"] == f"len={problem.max_tokens}"  # the log carries the target it was given
        assert 1 <= len(resp) <= problem.max_tokens
        if len(resp) < problem.max_tokens:
            assert resp[-1] == eos, "a response stopped short of its target without EOS"
        equal += len(resp) == problem.max_tokens
        out = [t for t in resp if t != eos]
        assert row["reward"] == pytest.approx(sum(t % 2 == 0 for t in out) / len(out) if out else 0.0)
    assert equal >= 0.6 * len(sample_ids), f"only {equal}/{len(sample_ids)} responses reached their target"
    rewards = samples["reward"].to_numpy()
    assert ((rewards >= 0) & (rewards <= 1)).all() and 0.1 < rewards.mean() < 0.9
    assert len(np.unique(samples["response_len"])) > 3  # lengths vary: the long-tailed targets


def test_doomed_groups_are_aborted_in_the_rollout_and_rejected(job_root):
    """Long-tailed lengths at eta=1 with ``stale_policy: reject``: a group that falls more than eta
    versions behind is stopped in the rollout and delivered as it stands, and the trainer rejects it.
    Every sample is still trained, rejected or left over exactly once (``check_records``)."""
    from .test_async_loop import check_records

    over = [*SYNTHETIC, "task.len_median=8", "task.len_sigma=1.5", "rollout.max_new_tokens=48", "model.max_seq_len=60",
            "rollout.eta=1", "rollout.engine=fast", "rollout.max_concurrent_groups=8", "run.steps=16"]
    job = run_train(job_root, "abort", *over, timeout=240)
    assert job.rc == 0, job.output[-3000:]
    rec = check_records(job.run_dir, eta=1, steps=16)
    assert rec["summary"]["aborted_stale_groups"] >= 1, rec["summary"]
    samples = rec["samples"].set_index("sample_id")
    sample_ids, offsets, fields = rec["log"].tokens("response", ["response_tokens"])
    tokens = fields["response_tokens"]
    eos = 2
    stopped = []  # responses that ended short of their target without EOS: only an abort does that
    for k, sid in enumerate(sample_ids):
        resp = tokens[offsets[k]:offsets[k + 1]]
        target = int(samples.loc[sid, "answer"].removeprefix("len="))
        if len(resp) < target and resp[-1] != eos:
            stopped.append(int(sid))
    assert stopped and set(stopped) <= set(rec["rejected"])
    # the aborted sequences are exactly those: each was delivered the moment it was stopped
    assert rec["summary"]["aborted_stale_tokens"] == sum(int(samples.loc[s, "response_len"]) for s in stopped)
