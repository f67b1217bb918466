"""Start the MPI job on this machine when ``areal-hpc train`` is not already a rank of one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from areal_hpc.comm.mpi import LAUNCHER_REPORTS_ENV
from areal_hpc.config import Config
from areal_hpc.launch.failure import failure_line
from areal_hpc.launch.mps import job_mps
from areal_hpc.launch.phases import LAUNCH_TIME_ENV, process_age_s

TERM_GRACE_S = 60.0  # after a SIGTERM, how long the ranks get to checkpoint and stop before they are killed


def find_mpiexec(name: str) -> str:
    """``cluster.mpiexec`` as given, preferring the one installed next to this Python (pip's mpich)."""
    if os.sep in name:
        if not os.access(name, os.X_OK):
            raise FileNotFoundError(f"cluster.mpiexec '{name}' is not an executable file")
        return name
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(
            f"'{name}' not found: install MPI with `pip install mpich` (no root needed), load your site's MPI "
            f"module, or set cluster.mpiexec to its path"
        )
    return found


def mpiexec_command(cfg: Config, config_path: Path) -> list[str]:
    n = cfg.cluster.n_trainer + cfg.cluster.n_rollout
    return [find_mpiexec(cfg.cluster.mpiexec), "-n", str(n), sys.executable, "-m", "areal_hpc.launch.job",
            str(config_path)]


def launch_local(cfg: Config, config_path: Path, run_dir: Path) -> int:
    """Run the job under mpiexec, forward Ctrl-C, and explain a failure in one line from the ranks' error files."""
    cmd = mpiexec_command(cfg, config_path)
    started = time.time() - (process_age_s() or 0.0)  # this command's start: the ranks count their setup from it
    with job_mps(cfg.cluster.cuda_mps, cfg.cluster.n_trainer + cfg.cluster.n_rollout) as mps_env:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **mps_env, **{LAUNCH_TIME_ENV: f"{started:.3f}"})
        env[LAUNCHER_REPORTS_ENV] = "1"  # the ranks leave the console to this launcher's one line (failure_line)
        return _run_job(cfg, cmd, env, run_dir)


class _Terminated(Exception):
    """SIGTERM reached the launcher (a timeout, a kill by a script or scheduler)."""


def _raise_terminated(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise _Terminated


def _run_job(cfg: Config, cmd: list[str], env: dict[str, str], run_dir: Path,
             term_grace_s: float = TERM_GRACE_S) -> int:
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    # The job runs in its own session, so a SIGTERM to this launcher alone would orphan the ranks (still on
    # the GPU) and skip the MPS daemon's stop: pass it on instead. The ranks take it as a preemption
    # (checkpoint, stop); whatever is left after the grace period is killed.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        rc = proc.wait(timeout=cfg.run.timeout_s + 300)
    except _Terminated:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one (schedulers repeat it) must not cut this short
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=term_grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        print("areal-hpc: terminated (SIGTERM); the ranks were stopped", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"areal-hpc: job exceeded run.timeout_s={cfg.run.timeout_s:.0f}s and was killed", file=sys.stderr)
        return 124
    finally:
        signal.signal(signal.SIGTERM, previous)
    if rc != 0:
        print(failure_line(rc, run_dir), file=sys.stderr)
    return rc
