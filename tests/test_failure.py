"""A failed job explained in one line: the ranks' error files (``comm.mpi.report_failure``) and the launcher's
reading of them (``launch.failure``), without starting MPI."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import pytest

from areal_hpc.comm import mpi
from areal_hpc.config import Config
from areal_hpc.launch import local
from areal_hpc.launch.failure import errors_aside, failure_line, first_failure


def _fail(rank: int, error_dir: Path, message: str = "bad row") -> None:
    try:
        raise ValueError(f"{message}\nsecond line of the message")
    except ValueError as e:
        mpi.report_failure(e, rank, str(error_dir))


def test_empty_error_file_and_failing_job_do_not_crash_the_launcher(tmp_path, capsys):
    """A rank killed between creating and writing its error file leaves it empty; the launcher explains the
    failure instead of dying on it."""
    errors = tmp_path / "errors"
    errors.mkdir()
    (errors / "rank0.txt").write_text("")
    rc = local._run_job(Config(), [sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), tmp_path)
    assert rc == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "exit code 3" in lines[0] and "rank0.txt" in lines[0] and "empty" in lines[0]


def test_rank_failure_prints_one_line_once_and_keeps_the_traceback(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(mpi.LAUNCHER_REPORTS_ENV, raising=False)
    log_file = tmp_path / "rank1.log"
    root = logging.getLogger()
    file_handler, console = logging.FileHandler(log_file), logging.StreamHandler(sys.stderr)
    root.addHandler(file_handler)
    root.addHandler(console)
    try:
        _fail(1, tmp_path / "errors")
        _fail(2, tmp_path / "errors")  # the same cause on another rank: not printed again
    finally:
        root.removeHandler(file_handler)
        root.removeHandler(console)
        file_handler.close()
    err = capsys.readouterr().err
    assert err.splitlines() == [f"areal-hpc: rank 1 failed: ValueError: bad row; full traceback in "
                                f"{tmp_path / 'errors' / 'rank1.txt'}"]
    text = (tmp_path / "errors" / "rank1.txt").read_text()
    assert text.startswith("rank 1 failed: ValueError: bad row\n\n") and "Traceback" in text
    assert "Traceback" in log_file.read_text()
    assert sorted(p.name for p in (tmp_path / "errors").iterdir()) == ["first", "rank1.txt", "rank2.txt"]


def test_ranks_under_the_launcher_leave_the_console_to_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(mpi.LAUNCHER_REPORTS_ENV, "1")
    _fail(0, tmp_path / "errors")
    assert capsys.readouterr().err == ""
    line = failure_line(1, tmp_path)
    assert line == f"areal-hpc: rank 0 failed: ValueError: bad row; full traceback in {tmp_path}/errors/rank0.txt"


def test_the_first_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv(mpi.LAUNCHER_REPORTS_ENV, "1")
    errors = tmp_path / "errors"
    _fail(2, errors, "the cause")
    _fail(0, errors, "a peer died")
    assert first_failure(tmp_path).summary == "rank 2 failed: ValueError: the cause"
    # Without the claim (a rank killed just before it): the oldest non-empty file.
    (errors / "first").unlink()
    (errors / "rank1.txt").write_text("")
    past = time.time() - 60
    os.utime(errors / "rank0.txt", (past, past))
    assert first_failure(tmp_path).summary == "rank 0 failed: ValueError: a peer died"
    assert first_failure(tmp_path / "nowhere") is None


@pytest.mark.parametrize("exc, summary", [
    (RuntimeError(""), "rank 3 failed: RuntimeError"),
    (KeyError("model.path"), "rank 3 failed: KeyError: 'model.path'"),
    (RuntimeError("\n  CUDA error: out of memory\nmore"), "rank 3 failed: RuntimeError: CUDA error: out of memory"),
])
def test_summary_is_one_line(exc, summary):
    assert mpi.failure_summary(3, exc) == summary


def test_a_resumed_attempt_reports_its_own_failure(tmp_path, monkeypatch):
    """The earlier attempt's claim would otherwise name its cause for this attempt's failure."""
    monkeypatch.setenv(mpi.LAUNCHER_REPORTS_ENV, "1")
    _fail(1, tmp_path / "errors", "the earlier attempt")
    errors_aside(tmp_path)
    assert first_failure(tmp_path) is None
    _fail(0, tmp_path / "errors", "this attempt")
    assert first_failure(tmp_path).summary == "rank 0 failed: ValueError: this attempt"
    assert len(list(tmp_path.glob("errors.earlier-*"))) == 1
