"""Phase timing: where a job's wall time goes outside its training steps."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from areal_hpc.launch.phases import EXEC_TIME_ENV, LAUNCH_TIME_ENV, process_age_s, since_launch_s
from areal_hpc.phases import Phases, outside_steps


def test_phases_sum_repeats_and_keep_first_order():
    ph = Phases()
    with ph.time("build"):
        time.sleep(0.02)
    ph.add("steps", 1.5)
    ph.add("build", 0.5)
    ph.add("save_final", -1.0)  # a clock step backwards is not negative time
    d = ph.as_dict()
    assert list(d) == ["build", "steps", "save_final"]
    assert 0.52 <= d["build"] < 1.0 and d["steps"] == 1.5 and d["save_final"] == 0.0


def test_outside_steps_splits_setup_from_teardown():
    setup, teardown = outside_steps({"launch": 1.0, "startup": 2.0, "build": 3.0, "compile": 4.0, "steps": 100.0,
                                     "stop_rollouts": 0.5, "save_final": 6.0, "unknown": 9.0})
    assert (setup, teardown) == (10.0, 6.5)


def test_process_age_counts_from_the_process_start():
    code = "import time; time.sleep(0.6); from areal_hpc.launch.phases import process_age_s; print(process_age_s())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    age = float(out.stdout)
    assert 0.6 <= age < 20.0, age  # the sleep, plus the interpreter's start and imports
    assert process_age_s() > age  # this test process started before that child


def test_since_launch_reads_the_launchers_stamp():
    assert since_launch_s({}) is None
    assert since_launch_s({LAUNCH_TIME_ENV: "not a time"}) is None
    assert 4.9 <= since_launch_s({LAUNCH_TIME_ENV: str(time.time() - 5.0)}) < 6.0


def test_process_age_counts_from_a_wrappers_exec_stamp_of_this_pid_only():
    assert 4.9 <= process_age_s({EXEC_TIME_ENV: f"{os.getpid()}:{time.time() - 5.0}"}) < 6.0
    own = process_age_s({})
    assert process_age_s({EXEC_TIME_ENV: f"{os.getpid() + 1}:{time.time()}"}) >= own  # another process's stamp
    assert process_age_s({EXEC_TIME_ENV: f"{os.getpid()}:1733000000.N"}) >= own  # `date` without %N


def test_quickstart_launch_clock_starts_after_the_install(tmp_path):
    """scripts/quickstart.sh installs, then execs the launcher (same pid, same start time): the launch the
    closing table reports must not include the install."""
    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "scripts").mkdir()
    shutil.copy(repo / "scripts" / "quickstart.sh", tmp_path / "scripts" / "quickstart.sh")
    (tmp_path / "scripts" / "install.sh").write_text("sleep 1.5\ndate +%s.%N > installed_at\n")
    launcher = tmp_path / ".venv" / "bin" / "areal-hpc"
    launcher.parent.mkdir(parents=True)
    launcher.write_text(f"#!{sys.executable}\nimport time\nfrom areal_hpc.launch.phases import process_age_s\n"
                        f"print(time.time() - process_age_s())\n")
    launcher.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(repo)}
    env.pop(EXEC_TIME_ENV, None)
    out = subprocess.run(["bash", str(tmp_path / "scripts" / "quickstart.sh")], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    installed_at = float((tmp_path / "installed_at").read_text())
    assert float(out.stdout) >= installed_at - 0.01, (float(out.stdout), installed_at)
