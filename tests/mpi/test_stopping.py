"""Stopping a real ``areal-hpc train`` job the ways a person does: Ctrl-C (once: stop at the end of the step,
checkpoint, say how to resume; twice: at once), and closing the pipe its output goes to (``| head``).

Whatever the way, no traceback, no rank left, and nothing of the job in /dev/shm, MPICH's segments included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from areal_hpc.launch import status
from areal_hpc.launch.clean import run_id_of
from tests.mpi.conftest import REPO, train_args
from tests.processes import wait_for_steps, wait_gone

pytestmark = pytest.mark.mpi

SHM = "/dev/shm/"


def _strict(text: str):
    def refuse(token: str):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def _start(job_root: Path, name: str, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(train_args(job_root, name, *overrides), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def _ranks(run_dir: Path) -> list[int]:
    pids = [json.loads(p.read_text())["pid"] for p in (run_dir / "ranks").glob("rank*.json")]
    assert len(pids) == 3, pids
    return pids


def _segments_of(pids: list[int]) -> set[str]:
    """The /dev/shm files the ranks map: the run's rings and weights, and MPICH's own."""
    found = set()
    for pid in pids:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            if SHM in line:
                found.add(line[line.index(SHM):].removesuffix(" (deleted)"))
    return found


def _running(job_root: Path, name: str, *overrides: str) -> tuple[subprocess.Popen, Path, list[int], set[str]]:
    proc = _start(job_root, name, "run.steps=100000", "eval.enabled=false", *overrides)
    run_dir = job_root / name
    wait_for_steps(proc, run_dir, 3)
    pids = _ranks(run_dir)
    segments = _segments_of(pids)
    assert any("mpich_shm_" in s for s in segments) and any(f"areal_{run_id_of(run_dir)}_" in s for s in segments), \
        segments
    return proc, run_dir, pids, segments


def _assert_clean_stop(out: str, pids: list[int], segments: set[str]) -> None:
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert wait_gone(pids), "ranks outlived the job"
    left = sorted(s for s in segments if os.path.exists(s))
    assert not left, f"left in /dev/shm: {left}"


def test_ctrl_c_checkpoints_at_the_end_of_the_step_and_says_how_to_resume(job_root):
    proc, run_dir, pids, segments = _running(job_root, "ctrl_c")
    try:
        os.kill(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends (mpiexec runs in its own session)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    _assert_clean_stop(out, pids, segments)
    assert (run_dir / "checkpoints" / "latest.json").exists(), out[-3000:]
    summary = _strict((run_dir / "summary.json").read_text())
    assert summary["preempted"] and summary["accuracy_after"] is None
    command = f"resume with: areal-hpc train {run_dir}/config.yaml"
    assert command in out, out[-3000:]
    state = status.folder_state(run_dir)
    assert state.state == "PREEMPTED" and command in state.detail, state


def test_second_ctrl_c_stops_at_once(job_root):
    proc, run_dir, pids, segments = _running(job_root, "ctrl_c_twice")
    try:
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(0.5)
        stopped = time.monotonic()
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        took = time.monotonic() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert took < 20, f"the second Ctrl-C took {took:.0f} s"
    assert "the ranks were killed (a second Ctrl-C)" in out, out[-3000:]
    _assert_clean_stop(out, pids, segments)


def test_closed_output_pipe_does_not_lose_the_run(job_root):
    """``areal-hpc train … 2>&1 | head``: once ``head`` has its lines and exits, the job must go on."""
    name = "closed_pipe"
    proc = _start(job_root, name, "run.steps=6", "eval.enabled=false")
    try:
        assert proc.stdout.readline()  # `head -1` read its line and went away
        proc.stdout.close()
        rc = proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    run_dir = job_root / name
    assert rc == 0, (run_dir / "logs" / "rank0.log").read_text()[-3000:]
    summary = _strict((run_dir / "summary.json").read_text())
    assert summary["final_version"] == 6 and not summary["preempted"]
    prefix = f"areal_{run_id_of(run_dir)}_"
    assert not [n for n in os.listdir(SHM) if n.startswith(prefix)]
    assert status.file_state(run_dir) == "DONE"
