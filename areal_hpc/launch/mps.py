"""A CUDA MPS daemon for the job when its ranks share a GPU.

Without MPS, processes on one GPU run in time slices: while the rollout decodes, the trainer's
kernels wait, and the other way round. Under MPS their kernels run side by side: the trainer's step
with a rollout beside it came close to its time alone (docs/dev/optimizing.md), and the rollout then
bounds the async loop.

Three ways in: ``areal-hpc train`` wraps its mpiexec (``job_mps``), ``slurm/*.sbatch`` wrap their srun
(``python -m areal_hpc.launch.mps N -- srun ...``), and submitit's script, which cannot be wrapped,
evals ``--shell`` lines in its setup (an exit trap stops the daemon).

The daemon is the job's own: a private pipe folder (``CUDA_MPS_PIPE_DIRECTORY``), started before
the ranks create a CUDA context and stopped when they are done, so it neither joins nor stops a
daemon someone else runs on the node. A daemon already serving this process (a site's Slurm
``gres/mps``, or one started by hand with the pipe folder exported) is used as it is.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"
STATE_ENV = "AREAL_CUDA_MPS"  # what the launcher did, for the ranks' summary: started, existing or off (why)


@dataclass(frozen=True)
class MpsPlan:
    start: bool
    reason: str  # why (not): goes to the log and to summary.json


def visible_gpus() -> tuple[int, list[str]]:
    """GPUs this process may use and their compute modes, from nvidia-smi (no CUDA context is made:
    a context created before the daemon starts would not be an MPS client)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0, []
    try:
        out = subprocess.run([smi, "--query-gpu=compute_mode", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0, []
    modes = [line.strip() for line in out.splitlines() if line.strip()]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:  # a scheduler's restriction: count what it leaves (indices or UUIDs)
        n = len([v for v in visible.split(",") if v.strip() and v.strip() != "-1"])
        return min(n, len(modes)) if modes else 0, modes[:n]
    return len(modes), modes


def daemon_answers(control: str, env: dict[str, str] | None = None, timeout_s: float = 5.0) -> bool:
    """Whether a control daemon answers on the pipe folder of ``env`` (this process's by default).

    Asked, not read off the folder: a daemon that quit leaves its ``control`` pipe, ``control_lock`` and
    ``control_privileged`` behind, and the client then says
    "Cannot find MPS control daemon process" and exits 1."""
    try:
        proc = subprocess.run([control], input="get_server_list\n", env={**os.environ, **(env or {})},
                              capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def existing_daemon(control: str | None = None) -> bool:
    """An MPS control daemon already serves this process's pipe folder (a folder left by one that quit
    does not count)."""
    pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    if not (pipe / "control").exists():
        return False
    return daemon_answers(control) if control is not None else True


def plan_mps(setting: str, ranks_per_node: int, n_gpus: int, modes: list[str], have_control: bool,
             already: bool) -> MpsPlan:
    """Whether the launcher should start a daemon for ``cluster.cuda_mps`` = ``setting``.

    ``on`` insists: what prevents it is an error naming the fix. ``auto`` starts one only where it
    helps (ranks sharing a GPU) and can (the control program is installed, the GPUs allow it)."""
    if setting == "off":
        return MpsPlan(False, "off (cluster.cuda_mps: off)")
    if already:
        return MpsPlan(False, "existing (a daemon already serves CUDA_MPS_PIPE_DIRECTORY)")
    problem = None
    if n_gpus == 0:
        problem = "no GPU visible (nvidia-smi lists none)"
    elif setting == "auto" and ranks_per_node <= n_gpus:
        return MpsPlan(False, f"off ({ranks_per_node} ranks on {n_gpus} GPUs: none shares a GPU)")
    elif not have_control:
        problem = f"{CONTROL} is not installed (it comes with the NVIDIA driver; load your site's CUDA module)"
    elif any(m.lower() == "prohibited" for m in modes):
        problem = "a GPU is in compute mode Prohibited"
    if problem is None:
        return MpsPlan(True, f"started ({ranks_per_node} ranks on {n_gpus} GPUs)")
    if setting == "on":
        raise RuntimeError(f"cluster.cuda_mps: on, but {problem}: fix that, or set cluster.cuda_mps: auto or off")
    return MpsPlan(False, f"off ({problem})")


class MpsDaemon:
    """Start and stop one private control daemon; ``env`` is what the ranks need to reach it."""

    def __init__(self, control: str, root: Path | None = None) -> None:
        self.control = control
        # short: the pipe is a unix socket path
        self.root = root if root is not None else Path(tempfile.mkdtemp(prefix="areal_mps_"))
        self.env = {"CUDA_MPS_PIPE_DIRECTORY": str(self.root / "pipe"),
                    "CUDA_MPS_LOG_DIRECTORY": str(self.root / "log")}

    def start(self, timeout_s: float = 20.0) -> None:
        for d in self.env.values():
            Path(d).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **self.env}
        proc = subprocess.run([self.control, "-d"], env=env, capture_output=True, text=True, timeout=timeout_s)
        control = Path(self.env["CUDA_MPS_PIPE_DIRECTORY"]) / "control"
        deadline = time.monotonic() + timeout_s
        while proc.returncode == 0 and not control.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.returncode != 0 or not control.exists():
            shutil.rmtree(self.root, ignore_errors=True)
            raise RuntimeError(f"{self.control} -d failed (exit {proc.returncode}): "
                               f"{(proc.stderr or proc.stdout).strip()[-300:] or 'no control pipe appeared'}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the daemon to quit (it stops its server once the clients are gone), then tidy up.

        Gone is when it no longer answers: its pipe files stay behind after it exits, so waiting for
        them to vanish would cost every run the whole timeout."""
        try:
            subprocess.run([self.control], input="quit\n", env={**os.environ, **self.env}, capture_output=True,
                           text=True, timeout=timeout_s)
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("CUDA MPS daemon in %s did not stop cleanly: %s", self.root, e)
            return
        deadline = time.monotonic() + timeout_s
        while (alive := daemon_answers(self.control, self.env)) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not alive:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            log.warning("CUDA MPS daemon in %s still running %.0f s after quit; its logs are in %s", self.root,
                        timeout_s, self.env["CUDA_MPS_LOG_DIRECTORY"])


def start_for_job(setting: str, ranks_per_node: int) -> tuple[MpsDaemon | None, dict[str, str]]:
    """Start the job's daemon if ``setting`` asks for one here; returns it (None if not started) and the
    environment variables the ranks get (the daemon's pipe folder, and ``AREAL_CUDA_MPS`` saying what
    was done). Raises RuntimeError, naming the cause, only for ``on``."""
    n_gpus, modes = visible_gpus()
    control = shutil.which(CONTROL)
    plan = plan_mps(setting, ranks_per_node, n_gpus, modes, control is not None, existing_daemon(control))
    if not plan.start:
        return None, {STATE_ENV: plan.reason}
    daemon = MpsDaemon(control)
    try:
        daemon.start()
    except (OSError, subprocess.SubprocessError, RuntimeError) as e:
        if setting == "on":
            raise RuntimeError(f"cluster.cuda_mps: on, but the daemon did not start: {e}") from e
        print(f"areal-hpc: CUDA MPS not started, the ranks share the GPU in time slices: {e}", file=sys.stderr)
        return None, {STATE_ENV: f"off (start failed: {e})"}
    print(f"areal-hpc: CUDA MPS daemon for this job in {daemon.root} ({plan.reason})", file=sys.stderr)
    return daemon, {**daemon.env, STATE_ENV: plan.reason}


@contextmanager
def job_mps(setting: str, ranks_per_node: int) -> Iterator[dict[str, str]]:
    """Around a job's ranks: yields the environment variables they get; stops the daemon after."""
    daemon, env = start_for_job(setting, ranks_per_node)
    try:
        yield env
    finally:
        if daemon is not None:
            daemon.stop()


def shell_lines(setting: str, ranks_per_node: int, python: str) -> list[str]:
    """Lines for a batch script that cannot wrap its srun (submitit's ``setup``): start the daemon,
    export what the ranks need, and stop it when the script exits."""
    if setting == "off":
        return [f"export {STATE_ENV}={shlex.quote('off (cluster.cuda_mps: off)')}"]
    py = shlex.quote(python)
    return [f'eval "$({py} -m areal_hpc.launch.mps --shell {setting} {int(ranks_per_node)})"']


def _one_node(setting: str) -> str:
    """The batch script runs on a job's first node only: a job of several gets no daemon from it."""
    nodes = int(os.environ.get("SLURM_JOB_NUM_NODES", "1") or 1)
    if nodes > 1 and setting != "off":
        print(f"areal-hpc: CUDA MPS not started: the job has {nodes} nodes and this starts a daemon on one; "
              "ask your site for gres/mps", file=sys.stderr)
        return "off"
    return setting


def _shell(setting: str, ranks_per_node: int) -> int:
    """``--shell``: start as ``setting`` says and print the exports (and the exit trap) for ``eval``."""
    setting = _one_node(setting)
    try:
        daemon, env = start_for_job(setting, ranks_per_node)
    except RuntimeError as e:
        print(f"echo {shlex.quote(f'areal-hpc: {e}')} >&2; exit 2")
        return 0
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    if daemon is not None:
        stop = f"{shlex.quote(sys.executable)} -m areal_hpc.launch.mps --stop {shlex.quote(str(daemon.root))}"
        lines.append(f"trap {shlex.quote(stop)} EXIT")
    print("\n".join(lines))
    return 0


def setting_of_command(cmd: list[str]) -> str:
    """``cluster.cuda_mps`` of the run that ``cmd`` (``... areal-hpc train CONFIG key=value ...``) starts."""
    from areal_hpc.config import load_config

    if "train" not in cmd or cmd.index("train") + 1 >= len(cmd):
        raise ValueError(f"no 'train CONFIG' in the command {' '.join(cmd)!r}")
    i = cmd.index("train")
    overrides = [a for a in cmd[i + 2:] if "=" in a and not a.startswith("-")]
    return load_config(cmd[i + 1], overrides).cluster.cuda_mps


def main(argv: list[str] | None = None) -> int:
    """``python -m areal_hpc.launch.mps RANKS_PER_NODE -- COMMAND...``: run COMMAND (the batch script's
    ``srun ... areal-hpc train CONFIG overrides``) with a daemon for its node, as that run's
    ``cluster.cuda_mps`` says. For a job of one node: on more nodes each node needs its own daemon (a
    site's ``gres/mps``), so this runs COMMAND without one and says so."""
    from areal_hpc.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--shell"] and len(argv) == 3 and argv[1] in ("auto", "on", "off") and argv[2].isdigit():
        return _shell(argv[1], int(argv[2]))
    if argv[:1] == ["--stop"] and len(argv) == 2:
        control = shutil.which(CONTROL)
        if control is not None:
            MpsDaemon(control, Path(argv[1])).stop()
        return 0
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: python -m areal_hpc.launch.mps RANKS_PER_NODE -- srun ... areal-hpc train CONFIG [k=v ...]\n"
              "       python -m areal_hpc.launch.mps --shell auto|on|off RANKS_PER_NODE   (prints lines to eval)\n"
              "       python -m areal_hpc.launch.mps --stop DAEMON_FOLDER", file=sys.stderr)
        return 2
    per_node, cmd = int(argv[0]), argv[2:]
    try:
        setting = setting_of_command(cmd)
    except (ValueError, ConfigError, OSError) as e:
        print(f"areal_hpc.launch.mps: {e}", file=sys.stderr)
        return 2
    setting = _one_node(setting)
    try:
        with job_mps(setting, per_node) as env:
            return subprocess.run(cmd, env={**os.environ, **env}).returncode
    except RuntimeError as e:
        print(f"areal-hpc: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
