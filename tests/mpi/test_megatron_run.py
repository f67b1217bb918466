"""A whole job with the megatron backend: 1 trainer (megatron-core GPTModel) + 1 fast rollout rank on one GPU."""

from __future__ import annotations

import pytest
import torch

from .conftest import run_train
from .test_async_loop import assert_learned, check_records, preempt_and_resume

pytest.importorskip("megatron.core", reason="needs megatron-core: pip install -e '.[megatron]'")
pytestmark = [pytest.mark.mpi, pytest.mark.skipif(not torch.cuda.is_available(), reason="the megatron backend "
                                                  "needs CUDA")]

STEPS = 60


def test_quickstart_with_the_megatron_backend_learns(job_root):
    job = run_train(job_root, "megatron_1x1", "model.device=cuda", "trainer.backend=megatron", "cluster.n_rollout=1",
                    "rollout.engine=fast", f"run.steps={STEPS}", "run.final_checkpoint=policy")
    assert job.rc == 0, job.output[-3000:]
    rec = check_records(job.run_dir, eta=4, steps=STEPS)
    assert_learned(rec["summary"])
    assert "megatron-core GPTModel" in (job.run_dir / "logs" / "rank0.log").read_text()
    assert (job.run_dir / "checkpoints" / "final" / "config.json").exists()


def test_preempted_megatron_run_resumes_without_losing_or_repeating_prompts(job_root):
    """The torch backend's preemption guarantees with the megatron backend: its trainer state (Megatron's weights
    and the optimizer's) in the checkpoint, every prompt consumed once over both attempts, eta held. On a GPU the
    quickstart's steps take a fraction of a second: the run must be long enough to be still going at the signal."""
    preempt_and_resume(job_root, "megatron_preempt", "model.device=cuda", "trainer.backend=megatron",
                       "rollout.engine=fast", steps=1000)
