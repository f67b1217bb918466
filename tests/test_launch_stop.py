"""The launcher's stop and output paths (``launch.local._run_job``) on a tiny mpiexec job of plain MPI ranks:
seconds instead of a training job's minutes (tests/mpi/test_stopping.py runs the real one)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.processes import wait_gone

REPO = Path(__file__).resolve().parents[1]
MPIEXEC = Path(sys.executable).parent / "mpiexec"

pytestmark = [pytest.mark.mpi,
              pytest.mark.skipif(not MPIEXEC.exists() or not os.path.isdir("/proc"), reason="needs mpiexec, /proc")]

# A rank that reports itself like ours (ranks/rankN.json), takes SIGINT as a flag as ours do, prints a line
# every 0.1 s and stops after LINES lines or at the flag.
RANK = textwrap.dedent("""
    import json, os, signal, sys, time
    from mpi4py import MPI
    run, lines = sys.argv[1], int(sys.argv[2])
    stop = []
    signal.signal(signal.SIGINT, lambda s, f: stop.append(s))
    rank = MPI.COMM_WORLD.rank
    os.makedirs(f"{run}/ranks", exist_ok=True)
    with open(f"{run}/ranks/rank{rank}.json", "w") as f:
        json.dump({"pid": os.getpid()}, f)
    for i in range(lines):
        if stop and lines < 10**6:
            break
        print(f"rank {rank} line {i}", flush=True)
        time.sleep(0.1)
    MPI.COMM_WORLD.Barrier()
    open(f"{run}/done{rank}", "w").close()
""")

LAUNCHER = textwrap.dedent("""
    import os, sys, types
    from pathlib import Path
    from areal_hpc.launch.local import _run_job
    cfg = types.SimpleNamespace(run=types.SimpleNamespace(timeout_s=120))
    run, lines = sys.argv[1], sys.argv[2]
    cmd = [sys.argv[3], "-n", "2", sys.executable, f"{run}/rank.py", run, lines]
    sys.exit(_run_job(cfg, cmd, dict(os.environ), Path(run)))
""")


def _launch(run: Path, lines: int) -> subprocess.Popen:
    run.mkdir(parents=True, exist_ok=True)
    (run / "rank.py").write_text(RANK)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, str(run), str(lines), str(MPIEXEC)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _rank_pids(run: Path, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        files = list((run / "ranks").glob("rank*.json"))
        if len(files) == 2:
            try:
                return [json.loads(p.read_text())["pid"] for p in files]
            except ValueError:  # being written
                pass
        time.sleep(0.05)
    pytest.fail("the ranks did not start")


def _segments_of(pids: list[int]) -> set[str]:
    """The /dev/shm files the ranks map (MPICH's own segments here)."""
    found = set()
    for pid in pids:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            if "/dev/shm/" in line:
                found.add(line[line.index("/dev/shm/"):].removesuffix(" (deleted)"))
    return found


def test_closed_output_pipe_does_not_kill_the_job(tmp_path):
    proc = _launch(tmp_path / "run", lines=30)
    try:
        assert proc.stdout.readline()
        proc.stdout.close()  # `| head -1` exits
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0
    assert (tmp_path / "run" / "done0").exists() and (tmp_path / "run" / "done1").exists()


def test_closed_terminal_does_not_kill_the_job(tmp_path):
    proc = _launch(tmp_path / "run", lines=30)
    try:
        _rank_pids(tmp_path / "run")
        proc.send_signal(signal.SIGHUP)  # the terminal window was closed
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0
    assert (tmp_path / "run" / "done0").exists() and (tmp_path / "run" / "done1").exists()


def test_ctrl_c_is_forwarded_once_and_a_second_kills_every_rank(tmp_path):
    run = tmp_path / "run"
    proc = _launch(run, lines=10**6)  # ranks that ignore the stop flag: only a kill ends them
    try:
        pids = _rank_pids(run)
        segments = _segments_of(pids)
        os.kill(proc.pid, signal.SIGINT)
        time.sleep(1.0)
        assert proc.poll() is None and all(os.path.exists(f"/proc/{p}") for p in pids)  # waiting for the step
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-2000:]
    assert "Traceback" not in out and "the ranks were killed (a second Ctrl-C)" in out, out[-2000:]
    assert wait_gone(pids), "a rank outlived the launcher"
    assert segments and not [s for s in segments if os.path.exists(s)], "the killed job's segments were left"
