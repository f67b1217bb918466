"""A single-node Slurm on localhost (slurm/local-cluster.sh) for tests that submit the sbatch templates."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "local-cluster.sh"
# Own state folder and ports: a local cluster a developer started by hand (default folder, ports
# 6817/6818) is left alone, and a cluster left over by a killed test session is stopped on start.
STATE_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / f"areal-slurm-tests-{os.environ.get('USER', os.getuid())}"
PORTS = {"SLURM_LOCAL_CTLD_PORT": "6827", "SLURM_LOCAL_SLURMD_PORT": "6828"}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"}


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: submits jobs to a local single-node Slurm (slurm/local-cluster.sh)")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def slurm_env():
    """Environment with SLURM_CONF pointing at a running local cluster; stopped after the session.

    Skips (outside CI) where Slurm cannot be started here: not root, or no Slurm and no apt-get.
    In CI (CI=true) any failure to start fails the tests instead of skipping them.
    """

    def unavailable(reason: str):
        if _in_ci():
            pytest.fail(f"CI=true but the local Slurm cluster cannot run: {reason}", pytrace=False)
        pytest.skip(reason)

    if os.geteuid() != 0:
        unavailable("Slurm tests need root (slurmd runs as root); run as root or start slurm/local-cluster.sh yourself")
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        unavailable("Slurm (slurm-wlm, munge) is not installed and apt-get is unavailable to install it")
    env = dict(os.environ, **PORTS)
    t0 = time.monotonic()
    try:
        proc = subprocess.run(["bash", str(SCRIPT), "start", str(STATE_DIR)], env=env, capture_output=True,
                              text=True, timeout=900)
    except subprocess.TimeoutExpired:
        unavailable("slurm/local-cluster.sh start did not finish in 900 s")
    if proc.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", str(STATE_DIR)], env=env, capture_output=True, timeout=60)
        unavailable(f"slurm/local-cluster.sh start failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    m = re.search(r"^export SLURM_CONF=(\S+)$", proc.stdout, re.M)
    assert m, f"local-cluster.sh printed no SLURM_CONF line:\n{proc.stdout}"
    env["SLURM_CONF"] = m.group(1)
    env["PYTHONUNBUFFERED"] = "1"
    env["VENV"] = sys.prefix  # the templates' VENV: the environment running these tests
    print(f"local Slurm up in {time.monotonic() - t0:.1f}s ({env['SLURM_CONF']})")
    try:
        yield env
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(STATE_DIR)], env=env, capture_output=True, timeout=120)


def sbatch(env: dict, *args: str) -> str:
    """Submit from the repository root; returns the job id."""
    proc = subprocess.run(["sbatch", "--parsable", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, f"sbatch failed: {proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def job_records(env: dict, job_id: str) -> list[dict]:
    """`scontrol show job` records of a job (one per array task once the array is split)."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                          timeout=30)
    if proc.returncode != 0:
        return []
    records = []
    for line in proc.stdout.splitlines():
        if line.strip():
            records.append(dict(re.findall(r"(\w+)=(\S*)", line)))
    return records


def wait_job(env: dict, job_id: str, timeout: float, n_tasks: int = 1) -> list[dict]:
    """Poll until every (array) task of the job reached a terminal state; cancel and fail on timeout."""
    deadline = time.monotonic() + timeout
    records: list[dict] = []
    while time.monotonic() < deadline:
        records = job_records(env, job_id)
        states = [r.get("JobState", "") for r in records]
        if len(records) >= n_tasks and all(s in TERMINAL for s in states):
            return records
        time.sleep(1.0)
    subprocess.run(["scancel", job_id], env=env, capture_output=True, timeout=30)
    outputs = "".join(f"\n--- {p}:\n{Path(p).read_text(errors='replace')[-1500:]}" for p in
                      sorted({r.get("StdOut", "") for r in records}) if p and Path(p).exists())
    slurmd_log = STATE_DIR / "log" / "slurmd.log"
    tail = "\n".join(slurmd_log.read_text(errors="replace").splitlines()[-20:]) if slurmd_log.exists() else ""
    pytest.fail(f"job {job_id} not finished after {timeout:.0f}s: "
                f"{[(r.get('JobId'), r.get('JobState'), r.get('Reason')) for r in records]}{outputs}"
                f"\n--- slurmd.log:\n{tail}", pytrace=False)
