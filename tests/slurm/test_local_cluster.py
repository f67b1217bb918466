"""slurm/local-cluster.sh itself: `stop` leaves no job running behind the daemons it stops."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid

import pytest

from .conftest import SCRIPT, STATE_DIR, job_records, sbatch

pytestmark = pytest.mark.slurm


def _running(marker: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True)
    return out.stdout.split()


def test_stop_cancels_running_jobs_then_start_serves_again(slurm_env, tmp_path):
    """slurmstepd outlives slurmd by design, so stopping only the daemons left a test's job running on
    (a hung job went on holding CPU and GPU after the tests). `stop` cancels the queue first."""
    marker = f"areal-stop-test-{uuid.uuid4().hex[:8]}"
    job = sbatch(slurm_env, f"--output={tmp_path / 'sleep-%j.out'}",
                 f"--wrap={sys.executable} -c 'import time; time.sleep(600)' {marker}")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not _running(marker):
        time.sleep(0.5)
    assert _running(marker), f"job {job} never started: {job_records(slurm_env, job)}"

    env = dict(slurm_env)
    stop = subprocess.run(["bash", str(SCRIPT), "stop", str(STATE_DIR)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert stop.returncode == 0, stop.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _running(marker):
        time.sleep(0.5)
    left = _running(marker)
    if left:
        subprocess.run(["kill", "-9", *left], capture_output=True)
    assert not left, f"job {job}'s process outlived `local-cluster.sh stop`:\n{stop.stderr}"
    assert "cancelling jobs still in the queue" in stop.stderr

    # The session's cluster comes back at the same SLURM_CONF for the tests after this one.
    start = subprocess.run(["bash", str(SCRIPT), "start", str(STATE_DIR)], env=env, capture_output=True, text=True,
                           timeout=300)
    assert start.returncode == 0, start.stderr[-3000:]
    assert f"export SLURM_CONF={slurm_env['SLURM_CONF']}" in start.stdout
    sinfo = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30)
    assert sinfo.returncode == 0 and sinfo.stdout.strip() in ("idle", "mixed"), sinfo.stdout + sinfo.stderr
