"""cluster.cuda_mps: when the launcher starts a CUDA MPS daemon, and that it starts and stops it cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from areal_hpc.config import ConfigError, load_config
from areal_hpc.launch import mps
from tests import mps_fakes

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_plan_starts_only_where_ranks_share_a_gpu():
    shared = dict(ranks_per_node=2, n_gpus=1, modes=["Default"], have_control=True, already=False)
    assert mps.plan_mps("auto", **shared).start
    assert mps.plan_mps("on", **shared).start
    assert not mps.plan_mps("off", **shared).start
    plan = mps.plan_mps("auto", **{**shared, "n_gpus": 2, "modes": ["Default"] * 2})
    assert not plan.start and "none shares a GPU" in plan.reason
    assert mps.plan_mps("on", **{**shared, "n_gpus": 2, "modes": ["Default"] * 2}).start  # on insists
    plan = mps.plan_mps("auto", **{**shared, "already": True})
    assert not plan.start and plan.reason.startswith("existing")


@pytest.mark.parametrize("change, words", [
    ({"n_gpus": 0, "modes": []}, "no GPU visible"),
    ({"have_control": False}, "nvidia-cuda-mps-control is not installed"),
    ({"modes": ["Prohibited"]}, "Prohibited"),
])
def test_plan_auto_says_why_not_and_on_raises_with_the_fix(change, words):
    args = {**dict(ranks_per_node=2, n_gpus=1, modes=["Default"], have_control=True, already=False), **change}
    plan = mps.plan_mps("auto", **args)
    assert not plan.start and words in plan.reason
    with pytest.raises(RuntimeError, match=words) as e:
        mps.plan_mps("on", **args)
    assert "cluster.cuda_mps: auto or off" in str(e.value)


def test_config_rejects_an_unknown_setting():
    assert load_config(QUICKSTART).cluster.cuda_mps == "auto"
    with pytest.raises(ConfigError, match="cuda_mps"):
        load_config(QUICKSTART, ["cluster.cuda_mps=sometimes"])


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    env = mps_fakes.install(tmp_path / "bin", n_gpus=1)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr(mps, "existing_daemon", lambda control=None: False)  # a real one on this machine is not ours
    return tmp_path / "bin" / "calls"


def test_job_daemon_runs_while_the_ranks_do_and_is_gone_after(fakes):
    with mps.job_mps("auto", 2) as env:
        pipe = Path(env["CUDA_MPS_PIPE_DIRECTORY"])
        assert (pipe / "control").exists() and Path(env["CUDA_MPS_LOG_DIRECTORY"]).is_dir()
        assert env[mps.STATE_ENV].startswith("started")
    assert not pipe.parent.exists(), "the daemon's private folder was left behind"
    assert fakes.read_text().split() == ["start", str(pipe), "quit", str(pipe)]


def test_stop_waits_for_the_daemon_not_for_its_pipe_files(fakes, monkeypatch):
    """A daemon that quit leaves its pipe files behind (as the real one does): stop() asks it
    whether it is gone, instead of waiting out its timeout for files that stay."""
    monkeypatch.setenv("FAKE_MPS_QUIT_DELAY", "0.5")  # still answering half a second after its quit
    daemon, env = mps.start_for_job("auto", 2)
    pipe = Path(env["CUDA_MPS_PIPE_DIRECTORY"])
    assert mps.daemon_answers(daemon.control, daemon.env)
    t = time.monotonic()
    daemon.stop(timeout_s=20)
    took = time.monotonic() - t
    assert 0.5 <= took < 5, took
    assert not mps.daemon_answers(daemon.control, daemon.env) and not pipe.parent.exists()


def test_pipe_files_of_a_daemon_that_quit_are_not_an_existing_daemon(tmp_path, monkeypatch):
    for k, v in mps_fakes.install(tmp_path / "bin").items():
        monkeypatch.setenv(k, v)
    control = str(tmp_path / "bin" / mps.CONTROL)
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(pipe))
    assert not mps.existing_daemon(control)  # no pipe at all
    subprocess.run([control, "-d"], check=True, env=os.environ)
    assert mps.existing_daemon(control)
    subprocess.run([control], input="quit\n", text=True, check=True, env=os.environ)
    assert (pipe / "control").exists() and not mps.existing_daemon(control)


def test_no_daemon_when_each_rank_has_a_gpu(fakes, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    mps_fakes.install(tmp_path / "bin", n_gpus=2)
    with mps.job_mps("auto", 2) as env:
        assert "CUDA_MPS_PIPE_DIRECTORY" not in env and "none shares a GPU" in env[mps.STATE_ENV]
    assert not fakes.exists()


def test_failed_start_auto_goes_on_without_and_on_stops(fakes, monkeypatch, capsys):
    monkeypatch.setenv("FAKE_MPS_FAIL", "1")
    with mps.job_mps("auto", 2) as env:
        assert "CUDA_MPS_PIPE_DIRECTORY" not in env and "start failed" in env[mps.STATE_ENV]
    assert "already running" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="daemon did not start.*already running"):
        with mps.job_mps("on", 2):
            pass


def _wrapper(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "areal_hpc.launch.mps", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **env})


CHILD = [sys.executable, "-c", "import os; print(os.environ.get('AREAL_CUDA_MPS'), "
         "os.environ.get('CUDA_MPS_PIPE_DIRECTORY'), sep='|')", "train", str(QUICKSTART)]


def test_batch_script_wrapper_reads_the_setting_from_the_run_config(tmp_path):
    env = {k: v for k, v in mps_fakes.install(tmp_path / "bin").items()}
    env["CUDA_MPS_PIPE_DIRECTORY"] = str(tmp_path / "none")  # no daemon serves this folder
    proc = _wrapper(["3", "--", *CHILD], env)
    assert proc.returncode == 0, proc.stderr
    state, pipe = proc.stdout.strip().split("|")
    assert state == "started (3 ranks on 1 GPUs)" and pipe.endswith("/pipe")
    assert (tmp_path / "bin" / "calls").read_text().count("quit") == 1
    proc = _wrapper(["3", "--", *CHILD, "cluster.cuda_mps=off"], env)
    assert proc.returncode == 0 and proc.stdout.startswith("off")
    proc = _wrapper(["3", "--", *CHILD], {**env, "SLURM_JOB_NUM_NODES": "2"})
    assert proc.returncode == 0 and proc.stdout.startswith("off") and "gres/mps" in proc.stderr
    proc = _wrapper(["3", "--", *CHILD, "cluster.cuda_mps=maybe"], env)
    assert proc.returncode == 2 and "cuda_mps" in proc.stderr
    proc = _wrapper(["3", "--", sys.executable, "-c", "pass"], env)
    assert proc.returncode == 2 and "train CONFIG" in proc.stderr


def test_yaml_on_and_off_are_the_settings_not_booleans():
    """YAML 1.1 reads a bare on/off as true/false, in a file as in an override."""
    assert load_config(QUICKSTART, ["cluster.cuda_mps=off"]).cluster.cuda_mps == "off"
    assert load_config(QUICKSTART, ["cluster.cuda_mps=on"]).cluster.cuda_mps == "on"


def test_shell_lines_start_the_daemon_for_a_batch_script_and_its_exit_stops_it(tmp_path):
    """submitit's sbatch script cannot wrap its srun: ``setup`` lines start the daemon and a trap stops it."""
    env = {**os.environ, **mps_fakes.install(tmp_path / "bin", n_gpus=1)}
    env.pop("CUDA_MPS_PIPE_DIRECTORY", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    (line,) = mps.shell_lines("auto", 2, sys.executable)
    show = "import os; print(os.environ['AREAL_CUDA_MPS'], os.environ['CUDA_MPS_PIPE_DIRECTORY'], sep='|')"
    child = f'{sys.executable} -c "{show}"'
    proc = subprocess.run(["bash", "-c", f"set -e; {line}; {child}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    state, pipe = proc.stdout.strip().split("|")
    assert state == "started (2 ranks on 1 GPUs)"
    assert (tmp_path / "bin" / "calls").read_text().split() == ["start", pipe, "quit", pipe]
    assert not Path(pipe).parent.exists(), "the daemon's folder outlived the script"

    off = mps_fakes.install(tmp_path / "nogpu", n_gpus=0)
    (line,) = mps.shell_lines("on", 2, sys.executable)
    proc = subprocess.run(["bash", "-c", f"{line}; echo ran"], cwd=REPO, env={**env, **off}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "ran" not in proc.stdout and "no GPU visible" in proc.stderr
    assert mps.shell_lines("off", 2, sys.executable) == ["export AREAL_CUDA_MPS='off (cluster.cuda_mps: off)'"]
