"""``areal-hpc status`` on fake run folders: RUNNING only while a rank lives, PREEMPTED with the command that
resumes it, FAILED with its cause, DONE; its JSON (and summary.json) strict, with null for a missing accuracy."""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from areal_hpc.launch import status


def _strict(text: str):
    """Parse as jq or JavaScript would: NaN and Infinity are not JSON."""
    def refuse(token: str):
        raise ValueError(f"not JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def _run_folder(root: Path, name: str = "r") -> Path:
    run = root / name
    (run / "logs").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"run": {"name": name, "output_dir": str(root),
                                                             "resume": "auto"}}))
    (run / "logs" / "rank0.log").write_text("started\n")
    return run


def _ranks(run: Path, pids: list[int], host: str | None = None) -> None:
    (run / "ranks").mkdir(exist_ok=True)
    for rank, pid in enumerate(pids):
        (run / "ranks" / f"rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "role": "trainer", "pid": pid, "host": host or socket.gethostname()}))


def _metrics(run: Path, steps: int) -> None:
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, steps + 1)))


def _checkpoint(run: Path) -> None:
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest.json").write_text("{}")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _age(run: Path, seconds: float) -> None:
    """Make every file of the run ``seconds`` old (a heartbeat that stopped)."""
    then = time.time() - seconds
    for p in run.rglob("*"):
        os.utime(p, (then, then))


def test_sigterm_preempted_run_is_preempted_with_its_resume_command(tmp_path):
    run = _run_folder(tmp_path)
    _ranks(run, [_dead_pid()])
    _metrics(run, 86)
    _checkpoint(run)
    (run / "summary.json").write_text(json.dumps({"preempted": True, "final_version": 86, "steps": 300,
                                                  "accuracy_after": None}))
    (row,) = status.collect(run)
    assert (row.state, row.step, row.accuracy) == ("PREEMPTED", 86, None), row
    assert "step 86 of 300" in row.detail and f"resume with: areal-hpc train {run}/config.yaml" in row.detail


def test_run_whose_ranks_are_gone_is_failed_not_running(tmp_path):
    run = _run_folder(tmp_path)
    _ranks(run, [_dead_pid(), 1])  # pid 1 lives, but it is not a rank of ours (a recycled pid)
    _metrics(run, 5)
    assert status.file_state(run) == "FAILED"
    assert "gone without a summary" in status.folder_state(run).detail
    _checkpoint(run)
    assert f"resume from its last checkpoint with: areal-hpc train {run}/config.yaml" in status.folder_state(run).detail


def _wait_exec(rank: subprocess.Popen) -> None:
    """Until the child has exec'd, its /proc cmdline is still this process's (not a rank's): wait for it."""
    deadline = time.monotonic() + 30
    while b"areal_hpc.launch.job" not in Path(f"/proc/{rank.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the stand-in rank did not start"
        time.sleep(0.01)


def test_live_rank_is_running(tmp_path):
    run = _run_folder(tmp_path)
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "areal_hpc.launch.job"])
    try:
        _wait_exec(rank)
        _ranks(run, [rank.pid])
        state = status.folder_state(run)
        assert state.state == "RUNNING" and str(rank.pid) in state.detail, state
    finally:
        rank.kill()
        rank.wait()
    assert status.folder_state(run).state == "FAILED"


def test_ranks_on_another_host_run_while_their_files_change(tmp_path):
    run = _run_folder(tmp_path)
    _ranks(run, [123], host="node-elsewhere")
    _metrics(run, 3)
    assert status.folder_state(run).state == "RUNNING"
    _age(run, status.HEARTBEAT_S + 60)
    assert status.folder_state(run).state == "FAILED"


def test_failed_run_names_its_cause_even_from_an_empty_error_file(tmp_path):
    run = _run_folder(tmp_path)
    _ranks(run, [_dead_pid()])
    (run / "errors").mkdir()
    (run / "errors" / "rank1.txt").write_text("rank 1 failed: ValueError: bad row 3 of data.jsonl\n\ntraceback")
    state = status.folder_state(run)
    assert state.state == "FAILED" and state.detail == "rank 1 failed: ValueError: bad row 3 of data.jsonl"
    (run / "errors" / "rank1.txt").write_text("")
    assert "rank1 failed; its error file is empty" in status.folder_state(run).detail


def test_errors_of_an_earlier_attempt_do_not_fail_a_resumed_run(tmp_path):
    run = _run_folder(tmp_path)
    (run / "errors").mkdir()
    (run / "errors" / "rank0.txt").write_text("rank 0 failed: killed")
    _age(run, 600)
    rank = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "areal_hpc.launch.job"])
    try:
        _wait_exec(rank)
        _ranks(run, [rank.pid])  # the resumed attempt, written after the error
        assert status.folder_state(run).state == "RUNNING"
    finally:
        rank.kill()
        rank.wait()


def test_done_and_strict_json(tmp_path, capsys):
    run = _run_folder(tmp_path)
    _ranks(run, [_dead_pid()])
    _metrics(run, 40)
    # An older summary.json wrote NaN for an accuracy it did not measure.
    (run / "summary.json").write_text('{"preempted": false, "accuracy_before": NaN, "accuracy_after": NaN}')
    assert status.folder_state(run).state == "DONE"
    assert status.run(argparse.Namespace(path=run, format="json")) == 0
    (row,) = _strict(capsys.readouterr().out)
    assert row["state"] == "DONE" and row["step"] == 40 and row["accuracy"] is None
    assert status.run(argparse.Namespace(path=run, format="table")) == 0
    assert "DONE" in capsys.readouterr().out


def test_summary_json_is_strict():
    pytest.importorskip("torch")
    from areal_hpc.train.loop import strict_json

    summary = {"accuracy_after": math.nan, "phases": {"x": [math.inf, 1.5]}, "steps": 3}
    assert _strict(json.dumps(strict_json(summary), allow_nan=False)) == {
        "accuracy_after": None, "phases": {"x": [None, 1.5]}, "steps": 3}


def test_resume_command_works_from_another_folder(tmp_path, monkeypatch):
    from areal_hpc.launch.preempt import resume_command

    runs = tmp_path / "runs"
    run = runs / "quick"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"run": {"name": "quick", "output_dir": "runs",
                                                             "resume": "never"}}))
    monkeypatch.chdir(tmp_path)
    assert resume_command(Path("runs/quick")) == "areal-hpc train runs/quick/config.yaml run.resume=auto"
    monkeypatch.chdir(runs)  # the relative run.output_dir would point elsewhere from here
    assert resume_command(run) == (f"areal-hpc train {run}/config.yaml run.output_dir={runs} run.name=quick "
                                   "run.resume=auto")
