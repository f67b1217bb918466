"""Elastic rollout on the local Slurm: two workers attached to a running run as a job array; one is killed with
SIGKILL while it generates, the other preempted with SIGTERM. The run finishes, and its HDF5 log accounts for
every granted prompt: trained once, at its step, by whoever held its grant last."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.elastic_checks import check_elastic_records
from tests.warmup import shared_warmup_cache

from .conftest import REPO

pytestmark = pytest.mark.slurm
ETA = 4


def _wait(what: str, ok, timeout: float, main: subprocess.Popen, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = ok()
        if value:
            return value
        if main.poll() is not None:
            pytest.fail(f"the run ended (rc {main.returncode}) while waiting for {what}:\n{main.stdout.read()[-3000:]}")
        time.sleep(poll_s)
    main.kill()
    pytest.fail(f"timed out waiting for {what}")


def _leases(run_dir: Path) -> dict[int, dict]:
    out = {}
    for p in (run_dir / "elastic" / "workers").glob("w*/lease.json"):
        try:
            out[int(p.parent.name[1:])] = json.loads(p.read_text())
        except ValueError:
            pass
    return out


def _shards(run_dir: Path, wid: int) -> int:
    return len(list((run_dir / "rollout_log").glob(f"rollout-r{1000 + wid:03d}-*.h5")))


def test_attached_array_workers_killed_and_preempted_lose_and_repeat_nothing(slurm_env, tmp_path, tmp_path_factory):
    run_dir = tmp_path / "elastic"
    main = subprocess.Popen(
        [sys.executable, "-m", "areal_hpc.cli", "train", "configs/quickstart.yaml", "cluster.n_rollout=1",
         "run.steps=200", f"run.output_dir={tmp_path}", "run.name=elastic", "run.progress=false",
         f"run.cache_dir={shared_warmup_cache(tmp_path_factory)}", "run.timeout_s=300", f"rollout.eta={ETA}",
         "elastic.lease_s=5", "elastic.heartbeat_s=0.5", "elastic.poll_s=0.2", "log.flush_s=0.5"],
        cwd=REPO, env=slurm_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait("the run to start", lambda: (run_dir / "elastic" / "run.json").exists(), 120, main)
        proc = subprocess.run([sys.executable, "-m", "areal_hpc.cli", "attach", str(run_dir), "--array", "0-1",
                               "--time", "10", "--cpus-per-task", "1"],
                              cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        leases = _wait("both workers to deliver samples",
                       lambda: (ls := _leases(run_dir)) and len(ls) == 2 and all(
                           lease["state"] == "ready" and _shards(run_dir, w) for w, lease in ls.items()) and ls,
                       180, main)
        killed, preempted = sorted(leases)
        # To the job step (submitit's srun): scancel --signal=KILL to a job is a cancel (TERM first, KILL later).
        for wid, sig in ((killed, "KILL"), (preempted, "TERM")):
            subprocess.run(["scancel", f"--signal={sig}", f"{leases[wid]['job']}.0"], env=slurm_env, check=True,
                           timeout=30)
        out, _ = main.communicate(timeout=400)
    finally:
        if main.poll() is None:
            main.kill()
    assert main.returncode == 0, out[-3000:]
    rec = check_elastic_records(run_dir, eta=ETA)
    by_worker = rec["used"].groupby("worker").size()
    assert by_worker.get(killed, 0) > 0 and by_worker.get(preempted, 0) > 0, by_worker.to_dict()
    assert (rec["samples"].loc[rec["samples"]["worker"] >= 0, "rank"] == -1).all()
    assert rec["leases"][f"w{preempted:04d}"]["state"] == "left"
    assert "SIGTERM" in rec["leases"][f"w{preempted:04d}"]["reason"]
    assert rec["leases"][f"w{killed:04d}"]["state"] == "ready"  # SIGKILL: no goodbye, its lease just expired
    moved_from = {r["from"] for r in rec["reissued"]}
    assert killed in moved_from, rec["reissued"]  # it held grants when it died: they went to other producers
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get(f"worker/{killed}/samples", 0) > 0 for m in metrics)
    status = subprocess.run([sys.executable, "-m", "areal_hpc.cli", "status", str(run_dir)], cwd=REPO,
                            env=slurm_env, capture_output=True, text=True, timeout=60).stdout
    assert "left" in status and "expired" in status, status
