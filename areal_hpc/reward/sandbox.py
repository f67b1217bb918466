"""Run untrusted Python in a sandbox: limits, a fresh directory, no network, a wall clock that kills it all.

Each sandboxed process is ``python -I -S sandbox_exec.py`` (isolated mode: no PYTHONPATH, no user site, no
site-packages, so the standard library only) started in a new session, in a fresh directory under a
per-run temporary folder (removed afterwards), with a scrubbed environment (a fixed PATH, HOME and TMPDIR
pointing at its directory, the caller's LD_LIBRARY_PATH alone inherited: no tokens or secrets) and stdin
from /dev/null.
``sandbox_exec.py`` confines it (rlimits; network, PID, IPC and mount namespaces with a size-capped tmpfs as
its directory; a per-run uid as root; Landlock; a seccomp filter against unix sockets: its docstring says
what each gives). Its stdout and stderr go to files the file-size limit bounds, of which the first
``output_kb`` are read back, so a huge print never reaches the caller's memory. At the wall clock, or once
the caller has what it waited for, every process group of the run is killed (with a PID namespace, that
kills every process the code started, including ones that left the group).

Where a mechanism is missing (a cluster without user namespaces or Landlock) the run still happens with
what is there; ``isolation_report`` says once what is not isolated.
"""

from __future__ import annotations

import functools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

EXEC_SCRIPT = Path(__file__).with_name("sandbox_exec.py")
_SYSTEM_READ_ONLY = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/etc/ld.so.cache", "/etc/localtime",
                     "/dev/urandom", "/dev/zero")
_DEVICES_READ_WRITE = ("/dev/null",)


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 10.0  # wall clock of the whole run; on expiry the whole process group is killed
    memory_mb: int = 1024  # address space
    cpu_s: int = 10
    processes: int = 32
    open_files: int = 64
    file_size_mb: int = 16  # per file; the working directory holds 4x this in all (a tmpfs, where allowed)
    output_kb: int = 64  # stdout/stderr kept, the rest dropped (never buffered unbounded)


@dataclass(frozen=True)
class SandboxRun:
    """How one sandboxed process ended: ``returncode`` (negative: killed by that signal; 128+N: killed by
    signal N inside its PID namespace), its first ``output_kb`` of stdout and stderr, and whether the wall
    clock ran out."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float


def _read_only_paths() -> list[str]:
    """System libraries, the interpreter's own tree (its standard library and extension modules) and the
    folders of LD_LIBRARY_PATH (an interpreter from a cluster's module system may need them to start)."""
    paths = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, *_library_path())}
    paths.add(os.path.dirname(os.path.realpath(sys.executable)))
    return sorted(p for p in paths if os.path.exists(p)) + [p for p in _SYSTEM_READ_ONLY if os.path.exists(p)]


def _library_path() -> list[str]:
    return [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(":") if os.path.isabs(p)]


class RunDir:
    """A run's temporary folder: one working directory per process, output files, and the processes.

    Use as a context manager: on exit every process group still there is killed and the folder removed."""

    def __init__(self, limits: SandboxLimits, skip: Sequence[str] = ()) -> None:
        self.limits, self.skip = limits, list(skip)  # skip: mechanisms to leave out, to test the fallbacks
        self.root = Path(tempfile.mkdtemp(prefix="areal-sandbox-"))
        self.root.chmod(0o711)  # without Landlock, a fresh uid reaches its own directory (and lists none)
        self.procs: list[subprocess.Popen] = []
        self.deadline = time.monotonic() + limits.timeout_s

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        shutil.rmtree(self.root, onerror=_force_remove)

    def workdir(self, name: str) -> Path:
        path = self.root / name
        path.mkdir(mode=0o700)
        return path

    def start(self, script: Path, argv: Sequence[str], workdir: Path, fds: Sequence[int] = (),
              report: bool = False) -> subprocess.Popen:
        """Start ``script`` confined, in ``workdir``; ``fds`` arrive there as 3, 4, ..."""
        spec = {"limits": asdict(self.limits), "script": str(script), "argv": list(argv), "fds": list(fds),
                "read_only": _read_only_paths(), "read_write": [str(workdir), *_DEVICES_READ_WRITE],
                "workdir": str(workdir), "report": report, "skip": self.skip}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        if _library_path():
            env["LD_LIBRARY_PATH"] = ":".join(_library_path())
        name = workdir.name
        with open(self.root / f"{name}.out", "wb") as out, open(self.root / f"{name}.err", "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-S", str(EXEC_SCRIPT), json.dumps(spec)],
                                    cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    pass_fds=tuple(fds), start_new_session=True)
        self.procs.append(proc)
        return proc

    def wait(self, proc: subprocess.Popen) -> bool:
        """Wait for ``proc`` until the run's wall clock; False when it ran out. The process is not reaped, so
        its process group id stays its own until ``kill``."""
        try:
            pidfd = os.pidfd_open(proc.pid)
        except OSError:  # ended and reaped already, or a kernel without pidfds
            try:
                proc.wait(max(self.deadline - time.monotonic(), 0))
                return True
            except subprocess.TimeoutExpired:
                return False
        try:
            poller = select.poll()  # not select(): a busy caller's fd numbers pass 1024
            poller.register(pidfd, select.POLLIN)
            while (left := self.deadline - time.monotonic()) > 0:
                if poller.poll(left * 1000 + 1):
                    return True
            return False
        finally:
            os.close(pidfd)

    def kill(self) -> None:
        """Kill every process group of the run, then reap the leaders."""
        for proc in self.procs:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in self.procs:
            proc.wait()

    def output(self, name: str) -> tuple[str, str]:
        """The first ``output_kb`` of a process's stdout and stderr."""
        n = self.limits.output_kb * 1024
        texts = []
        for ext in ("out", "err"):
            with open(self.root / f"{name}.{ext}", "rb") as f:
                texts.append(f.read(n).decode("utf-8", "replace"))
        return texts[0], texts[1]


def _force_remove(func: object, path: str, exc_info: object) -> None:
    """A sandboxed run may leave directories without permissions (chmod 0): open them up and retry."""
    parent = os.path.dirname(path)
    for p in (parent, path):
        try:
            os.chmod(p, 0o700)
        except OSError:
            pass
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except OSError:
            pass


def run_python(source: str, limits: SandboxLimits, skip: Sequence[str] = ()) -> SandboxRun:
    """Run ``source`` as a script, sandboxed, in a fresh directory; its exit and first output."""
    start = time.monotonic()
    with RunDir(limits, skip) as run:
        workdir = run.workdir("main")
        script = workdir / "main.py"
        script.write_text(source, encoding="utf-8")
        proc = run.start(script, [], workdir)
        finished = run.wait(proc)
        run.kill()
        stdout, stderr = run.output("main")
        return SandboxRun(proc.returncode, stdout, stderr, not finished, time.monotonic() - start)


@functools.cache
def mechanisms() -> dict:
    """What ``sandbox_exec.py`` manages to apply on this machine (probed once, in a sandboxed process)."""
    with RunDir(SandboxLimits(timeout_s=30)) as run:
        workdir = run.workdir("probe")
        script = workdir / "probe.py"
        script.write_text("", encoding="utf-8")
        read, write = os.pipe()
        try:
            proc = run.start(script, [], workdir, fds=[write], report=True)
            os.close(write)
            run.wait(proc)
            run.kill()
            with os.fdopen(read, "rb") as f:
                data = f.read()
        finally:
            for fd in (read, write):
                try:
                    os.close(fd)
                except OSError:
                    pass
        if not data:
            _, err = run.output("probe")
            raise RuntimeError(f"the sandbox launcher {EXEC_SCRIPT} failed: {err.strip()[-500:]}")
        return json.loads(data)


def isolation_report() -> list[str]:
    """One line per thing this machine cannot isolate (empty: all isolated); the rollout logs these once."""
    return report_lines(mechanisms())


def report_lines(m: dict) -> list[str]:
    """``isolation_report``'s lines for what ``sandbox_exec.py`` reported it applied."""
    lines = []
    if not m["netns"]:
        lines.append("network: no network namespace; " + (
            "Landlock denies TCP connect/bind, but UDP stays open" if m["landlock_net"]
            else "code under test can open network connections"))
    if not m["tmpfs"]:
        lines.append("disk: no mount namespace; code under test can fill the disk with files (each up to "
                     "file_size_mb) and open this user's /dev/shm segments")
    if not m["seccomp"]:
        lines.append("unix sockets: no seccomp filter; code under test can connect to this machine's unix "
                     "sockets by path (munge's, a container daemon's) as its user")
    if not m["landlock"] and m["uid"]:
        lines.append("filesystem: no Landlock; code under test runs as a fresh uid: it can read world-readable "
                     "files and write world-writable folders, and an interpreter only root can read fails")
    elif not m["landlock"]:
        lines.append("filesystem: no Landlock; code under test can read and write every file this user can, "
                     "other runs' folders and the tests' files included")
    if not (m["pidns"] or m["landlock_scope"]):
        lines.append("signals: no PID namespace nor Landlock scoping; code under test can signal this user's "
                     "other processes, the rollout included")
    if not m["pidns"]:
        lines.append("processes: no PID namespace; a process that leaves its process group (setsid) outlives "
                     "the wall-clock kill, until its CPU limit")
    if m["nproc"] != "per run":
        lines.append("process count: " + (m["nproc"] and f"RLIMIT_NPROC {m['nproc']}" or
                                          "not limited (RLIMIT_NPROC is not enforced for root)"))
    return lines + [f"sandbox: {e}" for e in m["errors"]]
