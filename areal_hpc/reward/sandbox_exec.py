"""Confine this process, then run a Python script in it: the sandbox's one way in.

``sandbox.py`` starts ``python -I -S sandbox_exec.py SPEC`` (a JSON object) in a new session. The script is
never imported by the package: it starts as a fresh, single-threaded interpreter holding nothing of the
caller (which could be a rollout worker with a model in memory; forking that would copy its page tables and
its threads' locks), and single-threaded is what ``unshare(CLONE_NEWUSER)`` requires. It reads the script
to run, then confines itself in this order, each step kept only where the machine allows it:

1. rlimits: address space, CPU time, open files, file size, no core files.
2. Namespaces: network, PID, IPC and mount, with a size-capped tmpfs as the working directory and an
   empty /dev/shm. As root, directly (root may); then every uid (real, effective, saved) is set to a fresh
   uid per run with every capability dropped; only the filesystem uid stays 0 where Landlock fences files,
   so that an interpreter under a root-only home stays readable, and no uid the process holds lets it
   return to 0. RLIMIT_NPROC is not enforced for uid 0 and counts per real uid, so a per-run real uid is
   what makes the process limit per run. As a user: inside a new user namespace, capabilities dropped
   there; RLIMIT_NPROC then counts per namespace.
3. ``no_new_privs`` and Landlock: files read-only under the system and Python paths, read-write in the
   work directory, nothing else; TCP bind/connect denied (ABI 4); signals and abstract unix sockets
   scoped to the sandbox (ABI 6). Landlock also forbids ptrace of any process outside the sandbox.
4. A seccomp filter: no AF_UNIX sockets (Landlock does not cover connecting to one by path).
5. With a PID namespace, two forks: the child is the namespace's init, which only reaps, and its child
   runs the script (an init ignores signals it has no handler for: the script's own CPU-limit signal or a
   crash would be lost on it). When the script ends, the init ends with it; when the init ends, or its
   parent (this launcher) is killed, the kernel kills every process left in the namespace.

What was applied is written as JSON to fd 3 when ``report`` is set (``sandbox.isolation_report`` reads it).
``skip`` (``namespaces``, ``landlock``, ``seccomp``) leaves a mechanism out as a machine without it would:
the tests use it to run the fallbacks a cluster may get.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import sys

CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
CLONE_NEWNS, CLONE_NEWIPC = 0x00020000, 0x08000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 0x4000, 1 << 18
DISK_FILES = 4  # the working directory holds this many full-size files in all
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_GET_SECUREBITS, PR_SET_SECUREBITS = 1, 4, 24, 27, 28
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
# NOROOT, NO_SETUID_FIXUP, NO_CAP_AMBIENT_RAISE, each with its lock, and KEEP_CAPS_LOCKED: uid 0 never
# regains capabilities, whatever the script does.
SECUREBITS_LOCKED_DOWN = 0xEF
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR, LL_TRUNCATE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 14
LL_FILE_ONLY = LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | (1 << 15)
LL_NET_TCP = 1 | 2  # BIND_TCP | CONNECT_TCP
LL_SCOPE_ALL = 1 | 2  # ABSTRACT_UNIX_SOCKET | SIGNAL
FIRST_FD = 3

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _prctl(option: int, arg: int = 0) -> None:
    _check(libc.prctl(option, ctypes.c_ulong(arg), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)),
           f"prctl({option})")


def _drop_capabilities() -> None:
    """Empty bounding, ambient, effective, permitted and inheritable sets (needs CAP_SETPCAP, held now)."""
    if libc.prctl(PR_GET_SECUREBITS, 0, 0, 0, 0) != SECUREBITS_LOCKED_DOWN:
        _prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_DOWN)
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        _prctl(PR_CAPBSET_DROP, cap)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (_CapData * 2)()
    _check(libc.capset(ctypes.byref(header), data), "capset")


def _unshare(flags: int) -> None:
    _check(libc.unshare(ctypes.c_int(flags)), "unshare")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    def enc(value: str | None) -> bytes | None:
        return value.encode() if value is not None else None

    _check(libc.mount(enc(source), target.encode(), enc(fstype), flags, enc(data)), f"mount {target}")


def _private_tmpfs(workdir: str, size_mb: int) -> None:
    """In the new mount namespace: the working directory becomes a tmpfs of ``size_mb`` (the caller's files
    copied in) and /dev/shm an empty one, so the code cannot fill the disk (RLIMIT_FSIZE bounds one file,
    not how many) nor open the caller's shared-memory segments."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE, None)  # nothing mounted here shows outside
    files = {}
    for entry in os.scandir(workdir):
        if entry.is_file(follow_symlinks=False):
            with open(entry.path, "rb") as f:
                files[entry.name] = f.read()
    _mount("tmpfs", workdir, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size_mb}m,mode=0700")
    for name, data in files.items():
        with open(os.path.join(workdir, name), "wb") as f:
            f.write(data)
    os.chdir(workdir)  # the old cwd is the directory underneath
    if os.path.isdir("/dev/shm"):
        _mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=1777")


def _fresh_uid() -> int:
    """A random uid mapped in this user namespace, away from system and ordinary users' ids."""
    ranges = []
    with open("/proc/self/uid_map") as f:
        for line in f:
            inside, _, count = (int(x) for x in line.split())
            lo, hi = max(inside, 1_000_000), min(inside + count, 2_000_000_000)
            if hi - lo >= 1_000_000:
                ranges.append((lo, hi))
            elif inside <= 65_534 < inside + count:
                ranges.append((65_534, 65_535))
    if not ranges:
        raise OSError("no uid other than our own is mapped here")
    lo, hi = max(ranges, key=lambda r: r[1] - r[0])
    return lo + int.from_bytes(os.urandom(4), "little") % (hi - lo)


def _user_threads(uid: int) -> int:
    """Threads this real uid runs now: without a user namespace, RLIMIT_NPROC counts all of them."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        if int(status.get("Uid", "-1 ").split()[0]) == uid:
            total += int(status.get("Threads", "1"))
    return total


def landlock_abi() -> int:
    ret = libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(int(ret), 0)


def _landlock(read_only: list[str], read_write: list[str], abi: int) -> dict:
    fs_all = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1}.get(abi, (1 << 16) - 1)
    attr = _RulesetAttr(fs_all, LL_NET_TCP if abi >= 4 else 0, LL_SCOPE_ALL if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    ruleset = _check(libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                                  ctypes.c_size_t(size), ctypes.c_uint32(0)), "landlock_create_ruleset")
    ro = LL_EXECUTE | LL_READ_FILE | LL_READ_DIR
    for paths, access in ((read_only, ro), (read_write, fs_all)):
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # a system path this machine lacks
            allowed = access & fs_all
            if not os.path.isdir(path):
                allowed &= LL_FILE_ONLY
            rule = _PathBeneath(allowed, fd)
            _check(libc.syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset), ctypes.c_int(1),
                                ctypes.byref(rule), ctypes.c_uint32(0)), f"landlock_add_rule {path}")
            os.close(fd)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    _check(libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)),
           "landlock_restrict_self")
    os.close(ruleset)
    return {"landlock": abi, "landlock_net": abi >= 4, "landlock_scope": abi >= 6}


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


# (audit arch, socket's syscall number) per machine; io_uring_setup is 425 on both.
_SECCOMP_ARCH = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}


def _seccomp_no_unix_sockets() -> None:
    """Deny creating AF_UNIX sockets (and io_uring, which could create them past this filter).

    Landlock does not govern connecting to a unix socket by path, and the sockets there are no place for
    code under test: munge's (Slurm credentials in this user's name), a container daemon's, the session's.
    Calls from another syscall ABI (x32, 32-bit) kill the process: the filter only knows this one."""
    arch, nr_socket = _SECCOMP_ARCH[os.uname().machine]
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    kill, allow, eacces = 0x80000000, 0x7FFF0000, 0x00050000 | 13
    prog = [(ld, 0, 0, 4),  # 0: arch
            (jeq, 1, 0, arch),  # 1: ours: go to 3
            (ret, 0, 0, kill),  # 2
            (ld, 0, 0, 0),  # 3: syscall number
            (jge, 5, 0, 0x40000000),  # 4: x32: deny (10)
            (jeq, 4, 0, 425),  # 5: io_uring_setup: deny (10)
            (jeq, 0, 2, nr_socket),  # 6: socket: look at its domain (7), else allow (9)
            (ld, 0, 0, 16),  # 7: args[0], the domain (low 32 bits)
            (jeq, 1, 0, 1),  # 8: AF_UNIX: deny (10)
            (ret, 0, 0, allow),  # 9
            (ret, 0, 0, eacces)]  # 10
    filters = (_SockFilter * len(prog))(*[_SockFilter(*f) for f in prog])
    fprog = _SockFprog(len(prog), filters)
    _check(libc.prctl(22, ctypes.c_ulong(2), ctypes.byref(fprog), ctypes.c_ulong(0), ctypes.c_ulong(0)),
           "prctl(PR_SET_SECCOMP)")


def _renumber_fds(fds: list[int]) -> None:
    """The caller's fds arrive with its numbers (maybe above the open-files limit): move them to 3, 4, ...

    Copies go above every one of them first, so that moving one down never overwrites another."""
    import fcntl
    low = max(fds, default=2) + 1
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low) for fd in fds]
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, FIRST_FD + i, inheritable=True)
        os.close(fd)


def confine(spec: dict) -> dict:
    """Apply every mechanism this machine allows; return what was applied (see the module docstring)."""
    limits = spec["limits"]
    applied: dict = {"netns": False, "pidns": False, "userns": False, "uid": "", "nproc": "", "landlock": 0,
                     "landlock_net": False, "landlock_scope": False, "seccomp": False, "tmpfs": False, "errors": []}
    mb = 1 << 20
    for res, value in ((resource.RLIMIT_AS, limits["memory_mb"] * mb), (resource.RLIMIT_CPU, limits["cpu_s"]),
                       (resource.RLIMIT_NOFILE, limits["open_files"]),
                       (resource.RLIMIT_FSIZE, limits["file_size_mb"] * mb), (resource.RLIMIT_CORE, 0)):
        hard = value + 1 if res == resource.RLIMIT_CPU else value  # CPU: SIGXCPU at soft, SIGKILL at hard
        resource.setrlimit(res, (value, hard))
    skip = set(spec.get("skip", ()))
    abi = 0 if "landlock" in skip else landlock_abi()
    real_uid, was_root = os.getuid(), os.geteuid() == 0
    disk_mb = DISK_FILES * limits["file_size_mb"]
    if was_root:
        try:
            _unshare(CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC)
            applied["netns"] = applied["pidns"] = True
            _private_tmpfs(spec["workdir"], disk_mb)
            applied["tmpfs"] = True
        except OSError as e:
            applied["errors"].append(f"namespaces as root: {e}")
        try:
            uid = _fresh_uid()
            os.setgroups([])
            _prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_DOWN)  # capabilities survive the uid change
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            if abi:  # files as root (the interpreter may live under /root), fenced by Landlock below
                libc.setfsuid(0)
                if libc.setfsuid(-1) != 0:
                    raise OSError("setfsuid(0) did not take")
            else:  # files as the fresh uid: its own directory must be its own
                os.chown(spec["workdir"], uid, uid)
            _drop_capabilities()
            applied["uid"], real_uid = f"uid {uid}" + (", file access as root" if abi else ""), uid
        except OSError as e:
            applied["errors"].append(f"dropping root: {e}")
    if not applied["netns"] and not was_root and "namespaces" not in skip:
        uid, gid = os.geteuid(), os.getegid()
        entered = False
        try:
            _unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWIPC)
            entered = True
            for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as f:
                    f.write(text)
            applied["userns"] = applied["netns"] = applied["pidns"] = True
            _private_tmpfs(spec["workdir"], disk_mb)
            applied["tmpfs"] = True
        except OSError as e:
            applied["errors"].append(f"namespaces as a user: {e}")
        if entered:
            _drop_capabilities()
    if applied["userns"] or (applied["uid"] and real_uid != 0):
        resource.setrlimit(resource.RLIMIT_NPROC, (limits["processes"], limits["processes"]))
        applied["nproc"] = "per run"
    elif real_uid != 0:  # the limit counts all of this user's threads: allow that many more
        n = _user_threads(real_uid) + limits["processes"]
        resource.setrlimit(resource.RLIMIT_NPROC, (n, n))
        applied["nproc"] = "shared with the user's other processes"
    if abi:
        try:
            applied.update(_landlock(spec["read_only"], spec["read_write"], abi))
        except OSError as e:
            applied["errors"].append(str(e))
            libc.setfsuid(real_uid)  # no fence: no file access as root either
    if not applied["landlock"]:
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if "seccomp" not in skip:
        try:
            _seccomp_no_unix_sockets()
            applied["seccomp"] = True
        except (OSError, KeyError) as e:
            applied["errors"].append(f"seccomp: {e}")
    return applied


def _relay(child: int, reap_all: bool) -> None:
    """Wait for ``child`` (reaping orphans too, as an init must, so that they do not count as processes)
    and end as it ended: its exit status, or 128 + the signal that killed it."""
    while True:
        pid, status = os.wait() if reap_all else os.waitpid(child, 0)
        if pid == child:
            os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def main() -> None:
    spec = json.loads(sys.argv[1])
    with open(spec["script"], encoding="utf-8") as f:
        source = f.read()
    _renumber_fds(spec["fds"])
    applied = confine(spec)
    if applied["pidns"]:
        child = os.fork()
        if child:  # stays outside the namespace
            _relay(child, reap_all=False)
        _prctl(PR_SET_PDEATHSIG, 9)  # the launcher killed: the namespace goes with its init
        child = os.fork()
        if child:  # the namespace's init: it ignores every signal it has no handler for, so it runs nothing
            _relay(child, reap_all=True)
    _prctl(PR_SET_DUMPABLE, 0)  # no ptrace or /proc/PID/mem of this process by anything of the same uid
    if spec.get("report"):
        os.write(FIRST_FD, json.dumps(applied).encode())
        os.close(FIRST_FD)
    sys.argv = [spec["script"], *spec["argv"]]
    code = compile(source, spec["script"], "exec")
    exec(code, {"__name__": "__main__", "__file__": spec["script"], "__builtins__": __builtins__})


if __name__ == "__main__":
    main()
