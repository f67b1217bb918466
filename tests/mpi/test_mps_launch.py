"""``areal-hpc train`` starts the job's CUDA MPS daemon before the ranks and stops it after them.

A CPU machine has no MPS, so the launcher finds stand-ins for nvidia-smi (one GPU) and the control
program on PATH (tests/mps_fakes.py): the real MPI job runs between the daemon's start and its quit,
and the ranks see the daemon's pipe folder."""

from __future__ import annotations

import json
import os
import subprocess

from tests import mps_fakes
from tests.mpi.conftest import REPO, train_args
from tests.processes import alive, wait_for_steps, wait_gone


def test_train_runs_its_ranks_under_a_job_daemon(job_root, tmp_path):
    env = {**os.environ, **mps_fakes.install(tmp_path / "bin", n_gpus=1), "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_MPS_PIPE_DIRECTORY", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(train_args(job_root, "mps", "run.steps=3", "eval.enabled=false"), cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    summary = json.loads((job_root / "mps" / "summary.json").read_text())
    assert summary["cuda_mps"] == "started (3 ranks on 1 GPUs)"
    calls = (tmp_path / "bin" / "calls").read_text().split()
    assert calls[0::2] == ["start", "quit"] and calls[1] == calls[3], calls
    assert not os.path.exists(calls[1]), "the daemon's pipe folder was left behind"
    assert "CUDA MPS daemon for this job" in proc.stderr


def test_sigterm_to_the_launcher_stops_the_ranks_and_the_daemon(job_root, tmp_path):
    """A timeout or a script's kill reaches only the launcher: it must not orphan the ranks (on a GPU,
    still computing) nor leave the MPS daemon behind. The ranks take it as a preemption: checkpoint, stop."""
    env = {**os.environ, **mps_fakes.install(tmp_path / "bin", n_gpus=1), "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_MPS_PIPE_DIRECTORY", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    name = "mps_term"
    proc = subprocess.Popen(train_args(job_root, name, "run.steps=100000", "eval.enabled=false"), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    run_dir = job_root / name
    try:
        wait_for_steps(proc, run_dir, 3)
        pids = [json.loads(p.read_text())["pid"] for p in (run_dir / "ranks").glob("*.json")]
        assert len(pids) == 3 and all(alive(p) for p in pids)
        proc.terminate()
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, out[-3000:]
    assert "terminated (SIGTERM)" in out
    assert wait_gone(pids), "ranks outlived their launcher"
    calls = (tmp_path / "bin" / "calls").read_text().split()
    assert calls[0::2] == ["start", "quit"], calls
    assert not os.path.exists(calls[1]), "the daemon's pipe folder was left behind"
    assert (run_dir / "checkpoints" / "latest.json").exists(), "the ranks did not checkpoint on the way out"
