"""`areal-hpc attach RUN --array 0-1` against the local Slurm: two workers register; one preempted (SIGTERM)
leaves with a goodbye, one killed (SIGKILL to its process) just stops renewing its lease; neither is requeued.

The worker loop is a stand-in (``--entry tests.attach_fakes:lease_until_signal``): this checks the launch side,
that Slurm's signals reach the worker through submitit, not the worker's sampling.
"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from areal_hpc.elastic.layout import ElasticFiles
from areal_hpc.elastic.lease import Lease, read_leases
from tests.attach_fakes import HEARTBEAT_S
from tests.test_attach import running_run

from .conftest import REPO, wait_job

pytestmark = pytest.mark.slurm


def _leases(files: ElasticFiles, ok, timeout: float, what: str) -> dict[int, Lease]:
    deadline = time.monotonic() + timeout
    leases = read_leases(files)
    while not ok(leases):
        if time.monotonic() > deadline:
            logs = "".join(f"\n--- {p}:\n{p.read_text(errors='replace')[-1500:]}"
                           for p in sorted((files.root / "slurm").rglob("*.err")))
            pytest.fail(f"{what}: not within {timeout:.0f}s; leases {leases}{logs}", pytrace=False)
        time.sleep(0.2)
        leases = read_leases(files)
    return leases


def _signal_step(env: dict, sig: str, job: str) -> None:
    """Send ``sig`` to the worker's process: its job step ``JOB.0``. (``scancel --signal=KILL JOB`` would cancel
    the job, which is SIGTERM first and SIGKILL only after KillWait; and a first array task's own job id is also
    the array's, which scancel takes as every task.)"""
    subprocess.run(["scancel", f"--signal={sig}", f"{job}.0"], env=env, check=True, capture_output=True, timeout=30)


def test_array_workers_leave_on_term_and_expire_on_kill(slurm_env, tmp_path):
    run = running_run(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "areal_hpc.cli", "attach", str(run), "--array", "0-1", "--time", "5",
                           "--entry", "tests.attach_fakes:lease_until_signal"],
                          cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    array = proc.stdout.strip().splitlines()[-1].split("(job ")[1].split(")")[0]
    files = ElasticFiles(run)

    leases = _leases(files, lambda ls: len(ls) == 2 and all(v.state == "ready" for v in ls.values()), 30,
                     "both workers ready")
    term, kill = leases[0], leases[1]
    assert term.job != kill.job and "local" not in (term.job, kill.job)  # each its own Slurm job
    _signal_step(slurm_env, "TERM", term.job)
    _signal_step(slurm_env, "KILL", kill.job)

    leases = _leases(files, lambda ls: ls[0].state == "left", 10, "the TERM'd worker leaves")
    assert leases[0].reason == "SIGTERM"
    records = {name: r for r in wait_job(slurm_env, array, timeout=20, n_tasks=2)  # by job id and by array name
               for name in (r["JobId"], f"{r.get('ArrayJobId')}_{r.get('ArrayTaskId')}")}
    assert all(r.get("Restarts") == "0" for r in records.values()), records  # neither requeued
    assert records[term.job]["JobState"] == "COMPLETED" and records[kill.job]["JobState"] != "COMPLETED", records
    killed = read_leases(files)[1]
    time.sleep(3 * HEARTBEAT_S)
    assert killed.state == "ready" and read_leases(files)[1].time == killed.time  # no goodbye, no more heartbeats
