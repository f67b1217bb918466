"""The sandbox: each mechanism in force (not only its call succeeding), and escape attempts that end in
reward 0 with the machine unharmed and the caller still running.

Each escape's candidate defines ``answer()`` so that the escape *succeeding* would make the test pass
(reward 1): reward 0 then shows the containment, not merely a wrong answer. ``test_benign_control`` shows
the same problem scores 1 when nothing is attempted.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from areal_hpc.reward.code import code_reward, run_tests
from areal_hpc.reward.sandbox import (
    EXEC_SCRIPT,
    SandboxLimits,
    isolation_report,
    mechanisms,
    report_lines,
    run_python,
)
from areal_hpc.tasks.base import Problem

FAST = SandboxLimits(timeout_s=5, cpu_s=5)
PROBLEM = Problem(1, "escape", "", verifier="code", tests=("assert answer() == 'ok'",), entry_point="answer")


def _missing(prefix: str) -> None:
    lines = [line for line in isolation_report() if line.startswith(prefix)]
    if lines:
        pytest.skip(f"not isolated on this machine: {lines[0]}")


def _sandbox_processes(grace_s: float = 5.0) -> list[str]:
    """Command lines of sandbox processes still alive after ``grace_s`` (SIGKILL is delivered
    asynchronously: the kernel tears a PID namespace down as its processes get scheduled)."""
    deadline = time.monotonic() + grace_s
    while True:
        found = []
        for pid in os.listdir("/proc"):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if str(EXEC_SCRIPT) in cmd:
                found.append(cmd)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def _escape(code: str, limits: SandboxLimits = FAST, reward_too: bool = True):
    """Run the attack as the response (the reward) and through ``run_tests`` (its output)."""
    run = run_tests(PROBLEM, code, limits)
    reward = code_reward(PROBLEM, f"```python\n{code}\n```", limits) if reward_too else None
    assert run.passed == 0 and (reward is None or reward.reward == 0.0), (reward, run)
    assert not _sandbox_processes()
    assert subprocess.run(["true"]).returncode == 0  # the caller can still start processes
    return run, reward


def test_benign_control() -> None:
    assert code_reward(PROBLEM, "def answer():\n    return 'ok'\n", FAST).reward == 1.0


# -- mechanisms ----------------------------------------------------------------------------------------
def test_isolation_report_lines_match_mechanisms() -> None:
    m, lines = mechanisms(), isolation_report()
    assert any(line.startswith("network") for line in lines) == (not m["netns"])
    assert any(line.startswith("filesystem") for line in lines) == (not m["landlock"])
    assert all(isinstance(line, str) and "\n" not in line for line in lines)


def test_mechanisms_in_force() -> None:
    """From inside: uids, capabilities, interfaces, Landlock's TCP rule, rlimits and the environment."""
    m = mechanisms()
    probe = r"""
import errno, json, os, resource, socket
out = {"uids": os.getresuid(), "env": dict(os.environ), "cwd": os.getcwd()}
for name, f in {"setuid0": lambda: os.setresuid(0, 0, 0), "chown": lambda: os.chown("main.py", 1, 1)}.items():
    try:
        f(); out[name] = "allowed"
    except OSError as e:
        out[name] = e.errno
out["ifaces"] = [n for _, n in socket.if_nameindex()]
try:
    socket.socket(socket.AF_UNIX); out["unix"] = "allowed"
except OSError as e:
    out["unix"] = e.errno
s = socket.socket()
try:
    s.bind(("127.0.0.1", 0)); out["bind"] = "allowed"
except OSError as e:
    out["bind"] = e.errno
out["limits"] = {r: resource.getrlimit(getattr(resource, r))[0]
                 for r in ("RLIMIT_AS", "RLIMIT_CPU", "RLIMIT_NOFILE", "RLIMIT_FSIZE", "RLIMIT_NPROC")}
print(json.dumps(out))
"""
    limits = SandboxLimits(memory_mb=700, cpu_s=7, open_files=50, file_size_mb=3, processes=20)
    run = run_python(probe, limits)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["limits"] == {"RLIMIT_AS": 700 << 20, "RLIMIT_CPU": 7, "RLIMIT_NOFILE": 50,
                             "RLIMIT_FSIZE": 3 << 20, "RLIMIT_NPROC": 20}
    assert out["env"]["HOME"] == out["cwd"] and Path(out["cwd"]).name == "main"
    assert not {k for k in out["env"] if k.startswith("PYTHON") or "TOKEN" in k or "SECRET" in k}
    assert not Path(out["cwd"]).exists()  # the run's folder is removed
    if os.geteuid() == 0:
        assert 0 not in out["uids"] and out["setuid0"] == 1 and out["chown"] == 1  # EPERM: no way back to root
    if m["netns"]:
        assert out["ifaces"] == ["lo"]
    if m["seccomp"]:
        assert out["unix"] == 13  # EACCES from the seccomp filter
    if m["landlock_net"]:
        assert out["bind"] == 13  # EACCES: Landlock's TCP rule, before the namespace is even asked


def test_cpu_limit_kills_before_wall_clock() -> None:
    start = time.monotonic()
    run = run_python("while True:\n    pass\n", SandboxLimits(timeout_s=20, cpu_s=1))
    assert not run.timed_out and time.monotonic() - start < 10
    assert run.returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU)  # the CPU limit's signal, not a kill


LAUNCHER_SCRIPT = """
import os, socket, sys
n = 0
try:
    for _ in range(100):
        if os.fork() == 0:
            os.closerange(0, 64)  # holds no pipe of the test's open
            import time; time.sleep(10); os._exit(0)
        n += 1
except OSError:
    pass
reads = []
for path in sys.argv[1:]:
    try:
        open(path).read(); reads.append("read")
    except OSError as e:
        reads.append(str(e.errno))
with open("written", "w") as f:  # its own directory stays writable
    f.write("x")
print(os.getpid(), n, ",".join(reads), [i for _, i in socket.if_nameindex()], open("written").read())
"""


def _run_launcher(skip: list[str], as_user: bool) -> tuple[dict, list[str]]:
    """The launcher run with the system Python (readable by anyone), as an unprivileged uid (a cluster user)
    or as root: (what it applied, what the script printed: pid, forks, reads of a world-readable and a
    root-only file, interfaces)."""
    python, setpriv = Path("/usr/bin/python3"), shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None or not python.exists():
        pytest.skip("needs root, setpriv and /usr/bin/python3 to run the launcher as root and as another uid")
    root = Path(tempfile.mkdtemp(prefix="areal-sandbox-user-"))
    read, write = os.pipe()
    try:
        root.chmod(0o755)
        work, script = root / "w", root / "main.py"
        work.mkdir(mode=0o700)
        if as_user:
            shutil.chown(work, 65534, 65534)
        files = {root / "world.txt": 0o644, root / "root-only.txt": 0o600, script: 0o644}
        for path, mode in files.items():
            path.write_text(LAUNCHER_SCRIPT if path == script else "data")
            path.chmod(mode)
        shutil.copy(EXEC_SCRIPT, root / "sandbox_exec.py")
        limits = {"timeout_s": 10, "memory_mb": 512, "cpu_s": 5, "processes": 16, "open_files": 64,
                  "file_size_mb": 1, "output_kb": 64}
        spec = {"limits": limits, "script": str(script), "argv": [str(p) for p in list(files)[:2]], "fds": [write],
                "report": True, "read_only": ["/usr", "/lib", "/lib64"], "read_write": [str(work), "/dev/null"],
                "workdir": str(work), "skip": skip}
        user = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"] if as_user else []
        proc = subprocess.Popen([*user, str(python), "-I", "-S", str(root / "sandbox_exec.py"), json.dumps(spec)],
                                cwd=work, pass_fds=[write], env={"PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        os.close(write)
        out, err = proc.communicate(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the sleepers, where no PID namespace took them
        assert proc.returncode == 0, err
        assert out.endswith("] x\n")  # its own directory was writable
        with os.fdopen(read, "rb") as f:
            return json.loads(f.read()), out.rsplit(maxsplit=1)[0].split(maxsplit=3)
    finally:
        shutil.rmtree(root)


def test_unprivileged_user_path() -> None:
    """What a cluster user gets with user namespaces and Landlock: everything, no root needed."""
    applied, (pid, forks, reads, ifaces) = _run_launcher([], as_user=True)
    assert applied["userns"] and not applied["errors"] and report_lines(applied) == []
    assert pid == "2"  # its own PID namespace, under an init that only reaps
    assert 5 < int(forks) < 16  # RLIMIT_NPROC counted in its user namespace, not over the whole uid
    assert reads == "13,13"  # EACCES from Landlock, even for the world-readable file
    assert ifaces.strip() == "['lo']"


def test_fallback_without_namespaces_or_landlock() -> None:
    """A cluster without either: the run still works, and the report names each thing left open."""
    applied, (pid, forks, reads, ifaces) = _run_launcher(["namespaces", "landlock", "seccomp"], as_user=True)
    lines = report_lines(applied)
    assert [line.split(":")[0] for line in lines] == ["network", "disk", "unix sockets", "filesystem", "signals",
                                                      "processes", "process count"]
    assert "shared with the user's other processes" in lines[-1]
    assert pid != "2" and reads == "read,13" and ifaces.strip() != "['lo']"  # as the report says
    assert 5 < int(forks) < 16 + 5  # still bounded: the user's threads now plus the limit


def test_root_without_landlock() -> None:
    """Root on a kernel without Landlock: files as the fresh uid (root-only files closed, its directory its
    own), namespaces and the process limit as with Landlock."""
    applied, (pid, forks, reads, ifaces) = _run_launcher(["landlock"], as_user=False)
    assert [line.split(":")[0] for line in report_lines(applied)] == ["filesystem"]
    assert pid == "2" and 5 < int(forks) < 16 and reads == "read,13" and ifaces.strip() == "['lo']"


# -- escape attempts -----------------------------------------------------------------------------------
def test_fork_bomb() -> None:
    run, _ = _escape("""
import os, time
n = 0
try:
    for _ in range(500):
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        n += 1
except OSError:
    pass
print("forked", n)
def answer():
    return "ok" if n >= 100 else "stopped"
""")
    assert int(run.stdout.split()[1]) < FAST.processes


def test_exponential_fork_bomb_is_killed_with_its_namespace() -> None:
    _missing("processes")
    run, _ = _escape("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                     SandboxLimits(timeout_s=1.5, cpu_s=5), reward_too=False)
    assert run.timed_out


def test_infinite_loop() -> None:
    reward = code_reward(PROBLEM, "def answer():\n    while True:\n        pass\n", SandboxLimits(timeout_s=1.5))
    assert reward.reward == 0.0 and reward.timed_out and 1.5 <= reward.seconds < 5
    assert not _sandbox_processes()


def test_memory_bomb() -> None:
    run, _ = _escape("""
blocks = []
try:
    while True:
        blocks.append(bytearray(16 << 20))
except MemoryError:
    pass
got = len(blocks) * 16
blocks.clear()
print("got", got)
def answer():
    return "ok" if got > 1024 else "stopped"  # 1 GB: more than its limit
""", SandboxLimits(timeout_s=5, memory_mb=200), reward_too=False)
    assert int(run.stdout.split()[1]) < 200


def test_writing_outside_its_directory(tmp_path: Path) -> None:
    tmp_path.chmod(0o777)  # the file system's own permissions would let anyone write here
    targets = [tmp_path / "pwned", Path.cwd() / "pwned-by-sandbox", Path(tempfile.gettempdir()) / "pwned-by-sandbox"]
    run, _ = _escape(f"""
import os
done = []
for path in {[str(t) for t in targets]!r} + ["../pwned"]:
    try:
        with open(path, "w") as f:
            f.write("x")
        done.append(path)
    except OSError as e:
        print(path, e.errno)
def answer():
    return "ok" if done else "blocked"
""")
    assert not any(t.exists() for t in targets)
    assert run.stdout.count(" 13\n") == len(targets) + 1  # EACCES each time


def test_filling_the_disk() -> None:
    """Many files, each under the file-size limit: the working directory's tmpfs is full at 4 of them."""
    _missing("disk")
    run, _ = _escape("""
n = 0
try:
    for i in range(200):
        with open(f"f{i}", "wb") as f:
            f.write(bytes(1 << 20))
        n += 1
except OSError as e:
    print(n, e.errno)
def answer():
    return "ok" if n == 200 else "stopped"
""", SandboxLimits(timeout_s=5, file_size_mb=2))
    written, errno = (int(x) for x in run.stdout.split())
    assert written < 8 and errno == 28  # ENOSPC


def test_reading_another_runs_files() -> None:
    other = Path(tempfile.mkdtemp(prefix="areal-sandbox-"))
    try:
        other.chmod(0o755)
        secret = other / "candidate" / "secret.txt"
        secret.parent.mkdir()
        secret.parent.chmod(0o755)
        secret.write_text("the-other-runs-secret-4711")
        secret.chmod(0o644)  # readable by anyone as far as file permissions go
        run, _ = _escape(f"""
import glob, os
found = ""
try:
    print(os.listdir(os.path.dirname(os.getcwd()) + "/.."))
except OSError as e:
    print("list", e.errno)
for path in [{str(secret)!r}] + glob.glob("/tmp/areal-sandbox-*/candidate/*"):
    try:
        found = open(path).read()
        print(found)
    except OSError as e:
        print("read", e.errno)
def answer():
    return "ok" if found == "the-other-runs-secret-4711" else "blocked"
""")
        assert "the-other-runs-secret-4711" not in run.stdout + run.stderr
        assert "read 13" in run.stdout
    finally:
        shutil.rmtree(other)


def test_network_connection(tmp_path: Path) -> None:
    """TCP and UDP to a listener here on localhost, and unix sockets by path (a world-writable one) and in
    the abstract namespace: nothing arrives."""
    tcp = socket.create_server(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    tmp_path.chmod(0o777)
    unix = socket.socket(socket.AF_UNIX)
    unix.bind(str(tmp_path / "sock"))
    (tmp_path / "sock").chmod(0o777)
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind(f"\0areal-sandbox-test-{os.getpid()}")
    listeners = (tcp, udp, unix, abstract)
    for sock in (tcp, unix, abstract):
        sock.listen()
    try:
        for sock in listeners:
            sock.setblocking(False)
        run, _ = _escape(f"""
import socket
ok = False
targets = [(socket.AF_INET, ("127.0.0.1", {tcp.getsockname()[1]})), (socket.AF_UNIX, {str(tmp_path / "sock")!r}),
           (socket.AF_UNIX, "\\0areal-sandbox-test-{os.getpid()}")]
for family, address in targets:
    try:
        s = socket.socket(family)
        s.settimeout(2)
        s.connect(address)
        s.sendall(b"exfiltrated")
        ok = True
    except OSError as e:
        print(family, e.errno)
try:
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"exfiltrated", ("127.0.0.1", {udp.getsockname()[1]}))
except OSError as e:
    print("udp", e.errno)
def answer():
    return "ok" if ok else "blocked"
""")
        for sock in (tcp, unix, abstract):
            with pytest.raises(BlockingIOError):
                sock.accept()
        with pytest.raises(BlockingIOError):
            udp.recv(100)
        assert len(run.stdout.splitlines()) == 4  # each attempt failed with an error
    finally:
        for sock in listeners:
            sock.close()


def test_killing_its_parent() -> None:
    """SIGUSR1 first (a handler here records it: a hit shows without killing the test session), then
    SIGKILL to its parent and its parent's group."""
    _missing("signals")
    hits: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: hits.append(1))
    try:
        run, _ = _escape(f"""
import os, signal
for target in ({os.getpid()}, os.getppid(), -1):
    try:
        os.kill(target, signal.SIGUSR1)
        print(target, "sent", flush=True)
    except OSError as e:
        print(target, e.errno, flush=True)
try:
    os.killpg(os.getpgid({os.getpid()}), signal.SIGUSR1)
except OSError as e:
    print("pg", e.errno, flush=True)
try:
    os.kill(os.getppid(), signal.SIGKILL)
    os.killpg(os.getpgid(os.getppid()), signal.SIGKILL)
except OSError as e:
    print("kill", e.errno, flush=True)
def answer():
    return "ok"
""", reward_too=False)
        assert run.stdout.startswith(f"{os.getpid()} ")
        assert not run.stdout.startswith(f"{os.getpid()} sent")  # ESRCH (another PID namespace) or EPERM
        time.sleep(0.1)
        assert not hits
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_huge_print() -> None:
    limits = SandboxLimits(timeout_s=10, file_size_mb=4, output_kb=8)
    start = time.monotonic()
    run, reward = _escape("""
import sys
chunk = "x" * (1 << 20)
for _ in range(1 << 14):
    sys.stdout.write(chunk)
    sys.stderr.write(chunk)
def answer():
    return "ok"
""", limits)
    assert len(run.stdout) <= 8 * 1024 and len(run.stderr) <= 8 * 1024
    assert not reward.timed_out and time.monotonic() - start < 8  # the file-size limit ended it


def test_os_exit_before_the_tests_ran() -> None:
    _, reward = _escape("import os\ndef answer():\n    return 'ok'\nos._exit(0)\n")
    assert not reward.timed_out
    _escape("import os\ndef answer():\n    os._exit(0)\n")


def test_monkeypatching_the_test_runner() -> None:
    """Forged results on every fd but its reply channel (3 requests in, 4 replies out) and on stdout/stderr,
    the harness's functions replaced, every dict with a "passed" key rewritten, AssertionError swapped:
    all in the candidate's own process, so the trusted side's verdict stands."""
    run, reward = _escape("""
import builtins, gc, json, os, sys
forged = json.dumps({"passed": 1, "total": 1, "error": ""}).encode()
for fd in [0, 1, 2] + list(range(5, 64)):
    try:
        os.write(fd, forged)
    except OSError:
        pass
builtins.AssertionError = type("NeverRaised", (Exception,), {})
for obj in gc.get_objects():
    if isinstance(obj, dict) and "passed" in obj:
        obj["passed"] = 1
main = sys.modules["__main__"]
for name in ("trusted", "_run_tests", "recv", "send", "candidate"):
    if hasattr(main, name):
        setattr(main, name, lambda *a, **k: None)
def answer():
    return "wrong"
""")
    assert reward.error == run.error == "test 1: AssertionError: "
    assert '"passed": 1' in run.stdout


def test_os_exit_with_a_forged_verdict() -> None:
    """Its own process may end however it likes, with a forged verdict on stdout first."""
    _escape('import os\nprint(\'{"passed": 1, "total": 1, "error": ""}\', flush=True)\nos._exit(0)\n'
            'def answer():\n    return "ok"\n', reward_too=False)


def test_runs_side_by_side_keep_their_own_limits() -> None:
    """A fork bomb next to honest runs: the process limit is per run, so they still score 1."""
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    with ThreadPoolExecutor(4) as pool:
        attack = pool.submit(code_reward, PROBLEM, bomb, SandboxLimits(timeout_s=2))
        time.sleep(0.3)  # the bomb at its limit while the others start
        honest = [pool.submit(code_reward, PROBLEM, "def answer():\n    return 'ok'\n", FAST) for _ in range(3)]
        assert [f.result().reward for f in honest] == [1.0, 1.0, 1.0]
        assert attack.result().timed_out
    assert not _sandbox_processes()
