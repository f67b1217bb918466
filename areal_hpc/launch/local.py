"""Start the MPI job on this machine when ``areal-hpc train`` is not already a rank of one."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from areal_hpc.comm.mpi import LAUNCHER_REPORTS_ENV
from areal_hpc.config import Config
from areal_hpc.launch.clean import remove_dead_segments
from areal_hpc.launch.failure import failure_line
from areal_hpc.launch.mps import job_mps
from areal_hpc.launch.phases import LAUNCH_TIME_ENV, process_age_s
from areal_hpc.launch.preempt import resume_command

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
    """Run the job under mpiexec, pass a stop (Ctrl-C, SIGTERM) on to it, and explain a failure from the ranks'
    error files."""
    cmd = mpiexec_command(cfg, config_path)
    started = time.time() - (process_age_s() or 0.0)  # this command's start: the ranks count their setup from it
    with job_mps(cfg.cluster.cuda_mps, cfg.cluster.n_trainer + cfg.cluster.n_rollout) as mps_env:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **mps_env, **{LAUNCH_TIME_ENV: f"{started:.3f}"})
        env[LAUNCHER_REPORTS_ENV] = "1"  # the ranks leave the console to this launcher's one line (failure_line)
        return _run_job(cfg, cmd, env, run_dir)


class _Stop(Exception):
    """SIGTERM (a timeout, a kill by a script or scheduler) or SIGINT (a person's Ctrl-C) reached the launcher."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stop(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    raise _Stop(signum)


def _run_job(cfg: Config, cmd: list[str], env: dict[str, str], run_dir: Path,
             term_grace_s: float = TERM_GRACE_S) -> int:
    # The job's output passes through this process rather than going to our stdout directly: a reader that
    # goes away (`| head`, quitting `less`) would otherwise kill mpiexec with SIGPIPE, and the run with it.
    # Here its output is dropped instead and the job goes on (the ranks' logs keep everything).
    launched = time.time()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # The job runs in its own session, so a SIGTERM or Ctrl-C reaches this launcher alone; stopping here
    # would orphan the ranks (still on the GPU) and skip the MPS daemon's stop: pass them on instead.
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    # A closed terminal (SIGHUP) ends only the output, as with nohup: the job has no terminal of its own.
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, _detach)
    relays = [_relay(proc.stdout, 1), _relay(proc.stderr, 2)]
    try:
        try:
            rc = proc.wait(timeout=cfg.run.timeout_s + 300)
        except _Stop as stop:
            return _stop_job(proc, stop.signum, run_dir, launched, term_grace_s)
        except subprocess.TimeoutExpired:
            _kill_job(proc)
            _say(f"areal-hpc: job exceeded run.timeout_s={cfg.run.timeout_s:.0f}s and was killed")
            return 124
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for r in relays:
            r.join(timeout=5.0)
        # Whatever the end, nothing of this job stays in memory (a killed rank cannot unlink its rings).
        remove_dead_segments()
    if rc != 0:
        _say(failure_line(rc, run_dir))
    return rc


def _stop_job(proc: subprocess.Popen, signum: int, run_dir: Path, launched: float, term_grace_s: float) -> int:
    """The ranks take SIGTERM or Ctrl-C as a preemption: they stop at the end of the step and checkpoint.
    A second Ctrl-C (or the grace period running out) kills them at once."""
    # A second SIGTERM (schedulers repeat it) must not cut the checkpoint short; a second Ctrl-C is a person
    # who does not want to wait.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    user = signum == signal.SIGINT
    ranks = sorted((run_dir / "ranks").glob("rank*.json"))
    started = bool(ranks) and all(p.stat().st_mtime >= launched for p in ranks)
    if not started:  # still starting up: nothing to checkpoint, and a signal now would interrupt imports
        _kill_job(proc)
        _say(f"areal-hpc: stopped ({'Ctrl-C' if user else 'SIGTERM'}) while the ranks were starting; "
             f"{_resume_hint(run_dir)}")
        return 128 + signum
    if user:
        _say("areal-hpc: Ctrl-C: the ranks stop at the end of the step and write a checkpoint "
             "(Ctrl-C again to stop at once)")
    with contextlib.suppress(ProcessLookupError):  # the job may have ended meanwhile
        os.killpg(proc.pid, signum)  # mpiexec forwards it to every rank
    try:
        proc.wait(timeout=term_grace_s)
    except (_Stop, subprocess.TimeoutExpired) as e:
        _kill_job(proc)
        why = "a second Ctrl-C" if isinstance(e, _Stop) else f"no stop within {term_grace_s:.0f} s"
        _say(f"areal-hpc: the ranks were killed ({why}); {_resume_hint(run_dir)}")
        return 128 + signum
    if not user:
        _say("areal-hpc: terminated (SIGTERM); the ranks were stopped")
    return 128 + signum


def _resume_hint(run_dir: Path) -> str:
    if (run_dir / "checkpoints" / "latest.json").exists():
        return f"resume from the last checkpoint with: {resume_command(run_dir)}"
    return "no checkpoint was written: the same command starts the run over"


def _job_processes(root: int) -> list[int]:
    """``root`` and its descendants (mpiexec, its proxies, the ranks: each rank has its own process group)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL mpiexec and every process under it, and wait until they are gone (their mappings with them)."""
    for s in (signal.SIGINT, signal.SIGTERM):  # more Ctrl-C now would only interrupt the killing
        signal.signal(s, signal.SIG_IGN)
    pids = _job_processes(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and any(_exists(p) for p in pids[1:]):
        time.sleep(0.05)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _relay(src, fd: int) -> threading.Thread:
    """Copy the job's output to our ``fd`` as it comes; once no one reads ``fd``, keep draining it unseen."""
    def copy() -> None:
        reading = True
        while chunk := os.read(src.fileno(), 1 << 16):
            view = memoryview(chunk)
            while reading and view:
                try:
                    view = view[os.write(fd, view):]
                except BrokenPipeError:
                    _silence(fd)
                    reading = False
        src.close()

    thread = threading.Thread(target=copy, name=f"relay-fd{fd}", daemon=True)
    thread.start()
    return thread


def _silence(fd: int) -> None:
    """Point ``fd``, and stdout/stderr where they are the same closed pipe, at /dev/null: the launcher's
    own last messages (and Python's flush at exit) then go nowhere instead of failing."""
    try:
        closed = os.fstat(fd)
    except OSError:
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for other in {fd, 1, 2}:
            with contextlib.suppress(OSError):
                st = os.fstat(other)
                if (st.st_dev, st.st_ino) == (closed.st_dev, closed.st_ino):
                    os.dup2(null, other)
    finally:
        os.close(null)


def _detach(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    """The terminal is gone: what the job and this launcher still print goes to /dev/null."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        os.dup2(null, fd)
    os.close(null)


def _say(message: str) -> None:
    """One line to stderr, which may be a pipe whose reader is gone."""
    try:
        print(message, file=sys.stderr, flush=True)
    except BrokenPipeError:
        _silence(2)
