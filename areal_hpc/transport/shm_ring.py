"""Single-producer / single-consumer shared-memory ring of variable-size byte records.

Moves trajectories from a rollout process to a trainer process on the same node
without going through MPI or pickling. The segment is a plain file under
``/dev/shm`` opened with ``os.open`` + ``mmap``; we deliberately avoid
``multiprocessing.shared_memory`` because on Python 3.11 its resource_tracker
registers segments on *attach* too and unlinks (and warns about) segments owned
by other processes when the attaching process exits.

Layout (all integers are native little-endian uint64, 8-byte aligned)::

    [0, 192)        header: magic/layout words, producer line, consumer line
    [192, 192+cap)  data area, ``cap`` a multiple of 8

A record is an 8-byte length word followed by the payload, padded to 8 bytes.
Both the length word and record starts are 8-byte aligned, so the length word
never straddles the end of the data area; the payload is split across the end
when needed (so any record up to ``capacity - 8`` bytes fits, whatever the
current position).

``head`` and ``tail`` are monotonically increasing byte counters (position =
counter % capacity). Only the producer stores ``head`` and the producer-side
stats; only the consumer stores ``tail`` and the consumer-side stats.

Memory-ordering assumption: the producer copies the payload and then publishes
``head`` with one aligned 8-byte store (``memoryview.cast("Q")`` item assignment
is a single ``memcpy`` of 8 bytes, compiled to one ``mov``); the consumer reads
``head`` and then the payload, and publishes ``tail`` after copying out. On x86-64
(TSO) stores become visible in program order and aligned 8-byte accesses are
atomic, so this is correct without explicit fences. On weakly ordered CPUs
(aarch64, ppc64le) the same code lacks the needed release/acquire barriers; we
log a warning there.
"""

from __future__ import annotations

import atexit
import errno
import logging
import mmap
import os
import platform
import time
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Self

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"

_MAGIC = 0x474E4952_4C414552  # b"REALRING" as a little-endian uint64
_LAYOUT_VERSION = 1
_HEADER_BYTES = 192
_LEN_BYTES = 8

# Header word indices (uint64 each). Producer and consumer words sit on
# separate 64-byte cache lines to avoid false sharing.
_W_MAGIC = 0
_W_VERSION = 1
_W_CAPACITY = 2
_W_OWNER_PID = 3
_W_HEAD = 8
_W_PUSHED_RECORDS = 9
_W_PUSHED_BYTES = 10
_W_TAIL = 16
_W_POPPED_RECORDS = 17
_W_POPPED_BYTES = 18

_BACKOFF_START_S = 50e-6
_BACKOFF_MAX_S = 2e-3

_TSO_MACHINES = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})

Buffer = bytes | bytearray | memoryview


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _shm_path(name: str) -> str:
    if not name or "/" in name or name in (".", "..") or len(name) > 255:
        raise ValueError(
            f"invalid shm ring name {name!r}: must be a non-empty file name without '/'"
        )
    return os.path.join(SHM_DIR, name)


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` exists on this node (zombies count as alive until reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def _as_bytes_view(record: Buffer) -> memoryview:
    view = memoryview(record)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")  # raises TypeError for non-contiguous buffers
    return view


def _read_owner_pid(path: str) -> int | None:
    """Owner pid stored in a ring header, or None if the file is not an initialised ring."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_HEADER_BYTES)
    except OSError:
        return None
    if len(raw) < _HEADER_BYTES:
        return None
    words = memoryview(raw).cast("Q")
    if words[_W_MAGIC] != _MAGIC:
        return None
    return int(words[_W_OWNER_PID])


def segments_in_use() -> set[str] | None:
    """Paths under /dev/shm that a process on this node maps or holds open; None without ``/proc``.

    Segments that carry no owner pid (MPICH's ``mpich_shm_*``) are alive exactly while a process maps
    them; a process that cannot be read (another user's) cannot map our own 0600 files either.
    """
    if not os.path.isdir("/proc/self/fd"):
        return None
    used: set[str] = set()
    shm = SHM_DIR + "/"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as f:
                for line in f:
                    i = line.find(shm)
                    if i >= 0:
                        used.add(line[i:].rstrip("\n").removesuffix(" (deleted)"))
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(shm):
                used.add(target)
    return used


def stale_segments(prefix: str | tuple[str, ...], *, skip_live_owners: bool = True) -> list[str]:
    """Names under /dev/shm starting with ``prefix`` (one or several) whose owner is gone.

    Ours (ring, shared weights) record their owner pid: alive while it lives. Others (MPICH's) record
    none: alive while any process maps or holds them open. Only files of this user are considered:
    /dev/shm is sticky, others' are not ours to remove.
    """
    prefixes = (prefix,) if isinstance(prefix, str) else tuple(prefix)
    if not prefixes or any(not p or "/" in p for p in prefixes):
        raise ValueError(f"invalid shm segment prefix {prefix!r}")
    try:
        entries = sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefixes))
    except FileNotFoundError:
        return []
    in_use: set[str] | None = set()
    if skip_live_owners and any(_read_owner_pid(os.path.join(SHM_DIR, n)) is None for n in entries):
        in_use = segments_in_use()
    stale = []
    for name in entries:
        path = os.path.join(SHM_DIR, name)
        if skip_live_owners:
            try:
                if os.stat(path).st_uid != os.getuid():
                    continue
            except FileNotFoundError:
                continue
            owner = _read_owner_pid(path)
            if owner is not None and _pid_alive(owner):
                logger.debug("keeping shm segment %s: owner pid %d is alive", name, owner)
                continue
            if owner is None and (in_use is None or path in in_use):
                continue  # no owner record: kept while mapped, and always where mappings cannot be seen
        stale.append(name)
    return stale


def cleanup_stale(prefix: str | tuple[str, ...], *, skip_live_owners: bool = True) -> list[str]:
    """Unlink leftover segments named ``prefix*`` under /dev/shm (see ``stale_segments``).

    Meant for a start after a crash (SIGKILL/OOM skips ``atexit``) and for ``areal-hpc clean``. Live
    segments are kept unless ``skip_live_owners`` is False, so concurrent runs sharing a node with a
    broad prefix are not broken. Returns the names that were removed.
    """
    removed: list[str] = []
    for name in stale_segments(prefix, skip_live_owners=skip_live_owners):
        try:
            os.unlink(os.path.join(SHM_DIR, name))
        except FileNotFoundError:
            continue
        removed.append(name)
    if removed:
        logger.info("removed %d stale shm segment(s) with prefix %r: %s", len(removed), prefix, removed)
    return removed


def ring_name(run_id: str, producer: int, consumer: int, prefix: str = "areal") -> str:
    """Canonical segment name, e.g. ``areal_<runid>_r3_t0``; ``cleanup_stale(f"{prefix}_{run_id}_")`` matches it."""
    return f"{prefix}_{run_id}_r{producer}_t{consumer}"


class ShmRing:
    """SPSC ring of byte records in POSIX shared memory.

    The owner (``create``) is normally the consumer and is responsible for
    unlinking; the other side uses ``attach``. Exactly one process may push and
    exactly one may pop; this is not enforced. ``full_waits``/``wait_seconds``
    (push side) and ``empty_waits`` (pop side) are per-process counters; the
    shared counters are in ``stats()``.
    """

    def __init__(self, name: str, fd: int, mm: mmap.mmap, *, owner: bool) -> None:
        """Wrap an already-initialised mapping; use ``create``/``attach`` instead."""
        self.name = name
        self.path = _shm_path(name)
        self.owner = owner
        self.full_waits = 0
        self.wait_seconds = 0.0
        self.empty_waits = 0
        self._fd = fd
        self._mm = mm
        self._buf = memoryview(mm)
        self._hdr = self._buf[:_HEADER_BYTES].cast("Q")
        self.capacity = int(self._hdr[_W_CAPACITY])
        self._data = self._buf[_HEADER_BYTES : _HEADER_BYTES + self.capacity]
        self._words = self._data.cast("Q")
        self._closed = False
        self._unlinked = False
        self._pid = os.getpid()
        st = os.fstat(fd)
        self._file_id = (st.st_dev, st.st_ino)
        if owner:
            atexit.register(self._atexit_unlink)

    # ------------------------------------------------------------------ setup
    @classmethod
    def create(cls, name: str, capacity: int) -> Self:
        """Create and initialise a ring with ``capacity`` data bytes (rounded up to 8).

        A leftover segment of the same name whose owner is dead is replaced;
        one with a live owner raises ``FileExistsError``. The space is reserved
        up front so an undersized /dev/shm fails here, not with SIGBUS later.
        """
        path = _shm_path(name)
        if capacity < 2 * _LEN_BYTES:
            raise ValueError(
                f"shm ring capacity must be >= {2 * _LEN_BYTES} bytes, got {capacity}"
            )
        capacity = _align8(capacity)
        if platform.machine().lower() not in _TSO_MACHINES:
            logger.warning(
                "shm ring %s relies on x86-64 (TSO) store ordering; %s is weakly ordered",
                name,
                platform.machine(),
            )
        fd = cls._open_exclusive(path, name)
        size = _HEADER_BYTES + capacity
        try:
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EFBIG):
                    raise OSError(
                        e.errno,
                        f"cannot reserve {size} bytes in {SHM_DIR} for shm ring {name!r}; "
                        "lower transport.ring_bytes or enlarge /dev/shm",
                    ) from e
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                    raise
                os.ftruncate(fd, size)
            mm = mmap.mmap(
                fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        hdr = memoryview(mm)[:_HEADER_BYTES].cast("Q")
        hdr[_W_OWNER_PID] = os.getpid()
        hdr[_W_VERSION] = _LAYOUT_VERSION
        hdr[_W_CAPACITY] = capacity
        hdr[_W_MAGIC] = _MAGIC  # published last: attach() waits for it
        hdr.release()
        logger.debug("created shm ring %s (%d data bytes)", name, capacity)
        return cls(name, fd, mm, owner=True)

    @staticmethod
    def _open_exclusive(path: str, name: str) -> int:
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL
        try:
            return os.open(path, flags, 0o600)
        except FileExistsError:
            pass
        owner = _read_owner_pid(path)
        if owner is not None and _pid_alive(owner):
            raise FileExistsError(
                errno.EEXIST,
                f"shm ring {name!r} already exists and its owner pid {owner} is alive",
                path,
            )
        logger.warning(
            "replacing stale shm ring %s (owner pid %s not alive)", name, owner
        )
        _unlink_quietly(path)
        return os.open(path, flags, 0o600)

    @classmethod
    def attach(
        cls, name: str, timeout: float = 30.0, *, require_live_owner: bool = True
    ) -> Self:
        """Attach to a ring, waiting up to ``timeout`` s for its owner to create it.

        With ``require_live_owner`` a leftover segment from a crashed owner is
        ignored (we keep waiting for the owner to replace it) instead of being
        attached to and silently fed into the void.
        """
        path = _shm_path(name)
        deadline = time.monotonic() + timeout
        delay = 1e-3
        stale_owner: int | None = None
        while True:
            ring = cls._try_attach(path, name)
            if ring is not None:
                owner = int(ring._hdr[_W_OWNER_PID])
                if not require_live_owner or _pid_alive(owner):
                    logger.debug(
                        "attached to shm ring %s (%d data bytes)", name, ring.capacity
                    )
                    return ring
                stale_owner = owner
                ring.close()
            if time.monotonic() >= deadline:
                detail = (
                    f"; found a stale segment whose owner pid {stale_owner} is dead "
                    "(crashed run? the owner should call cleanup_stale())"
                    if stale_owner is not None
                    else ""
                )
                raise TimeoutError(
                    f"shm ring {name!r} was not created by its owner within {timeout:g}s at {path}{detail}"
                )
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.05)

    @classmethod
    def _try_attach(cls, path: str, name: str) -> Self | None:
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size < _HEADER_BYTES:
                os.close(fd)
                return None
            mm = mmap.mmap(
                fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        except BaseException:
            os.close(fd)
            raise
        hdr = memoryview(mm)[:_HEADER_BYTES].cast("Q")
        ready = hdr[_W_MAGIC] == _MAGIC
        version, capacity = int(hdr[_W_VERSION]), int(hdr[_W_CAPACITY])
        hdr.release()
        if not ready or size < _HEADER_BYTES + capacity:
            mm.close()
            os.close(fd)
            return None
        if version != _LAYOUT_VERSION:
            mm.close()
            os.close(fd)
            raise RuntimeError(
                f"shm ring {name!r} has layout version {version}, expected {_LAYOUT_VERSION}"
            )
        return cls(name, fd, mm, owner=False)

    # ------------------------------------------------------------- producer
    @property
    def max_record_bytes(self) -> int:
        """Largest payload that fits (capacity minus the length word)."""
        return self.capacity - _LEN_BYTES

    def _check_size(self, n: int) -> None:
        if n > self.max_record_bytes:
            raise ValueError(
                f"record of {n} bytes does not fit in shm ring {self.name!r} "
                f"(capacity {self.capacity} bytes, max record {self.max_record_bytes} bytes); "
                "raise transport.ring_bytes"
            )

    def _write_at(self, pos: int, src: memoryview) -> int:
        """Copy ``src`` into the data area at ``pos`` (wrapping); return the next position."""
        n = len(src)
        if n == 0:
            return pos
        first = min(n, self.capacity - pos)
        self._data[pos : pos + first] = src[:first]
        if first < n:
            self._data[: n - first] = src[first:]
            return n - first
        return (pos + first) % self.capacity

    def _try_push_parts(self, views: list[memoryview], n: int) -> bool:
        need = _LEN_BYTES + _align8(n)
        hdr = self._hdr
        head = hdr[_W_HEAD]
        if self.capacity - (head - hdr[_W_TAIL]) < need:
            return False
        pos = head % self.capacity
        self._words[pos >> 3] = n
        pos = (pos + _LEN_BYTES) % self.capacity
        for v in views:
            pos = self._write_at(pos, v)
        hdr[_W_HEAD] = head + need  # publish after the payload (see module docstring)
        hdr[_W_PUSHED_RECORDS] += 1
        hdr[_W_PUSHED_BYTES] += n
        return True

    def try_push(self, record: Buffer) -> bool:
        """Push without blocking; False if the ring lacks space right now."""
        return self.try_push_parts((record,))

    def try_push_parts(self, parts: Iterable[Buffer]) -> bool:
        """Push the concatenation of ``parts`` as one record without blocking."""
        self._check_open()
        views = [_as_bytes_view(p) for p in parts]
        n = sum(len(v) for v in views)
        self._check_size(n)
        return self._try_push_parts(views, n)

    def push(
        self,
        record: Buffer,
        timeout: float | None = None,
        poll: Callable[[], None] | None = None,
    ) -> None:
        """Push one record, blocking while the ring is full (backpressure).

        While blocked, ``poll()`` is called on every retry so the caller can keep
        servicing control messages; it must not push to this ring. Raises
        ``TimeoutError`` if ``timeout`` seconds pass without space.
        """
        self.push_parts((record,), timeout=timeout, poll=poll)

    def push_parts(
        self,
        parts: Iterable[Buffer],
        timeout: float | None = None,
        poll: Callable[[], None] | None = None,
    ) -> None:
        """Like ``push`` for the concatenation of ``parts``, without joining them first."""
        self._check_open()
        views = [_as_bytes_view(p) for p in parts]
        n = sum(len(v) for v in views)
        self._check_size(n)
        if self._try_push_parts(views, n):
            return
        self.full_waits += 1
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        delay = _BACKOFF_START_S
        try:
            while True:
                if poll is not None:
                    poll()
                if self._try_push_parts(views, n):
                    return
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    raise TimeoutError(
                        f"push of {n} bytes to shm ring {self.name!r} timed out after {timeout:g}s: "
                        f"ring full ({self.used_bytes()}/{self.capacity} bytes used); is the consumer alive?"
                    )
                time.sleep(delay if deadline is None else min(delay, deadline - now))
                delay = min(delay * 2, _BACKOFF_MAX_S)
        finally:
            self.wait_seconds += time.monotonic() - start

    # ------------------------------------------------------------- consumer
    def _read_at(self, pos: int, n: int) -> bytes:
        first = min(n, self.capacity - pos)
        if first == n:
            return self._data[pos : pos + n].tobytes()
        out = bytearray(n)
        out[:first] = self._data[pos : pos + first]
        out[first:] = self._data[: n - first]
        return bytes(out)

    def _pop_batch(self, max_n: int) -> list[bytes]:
        hdr = self._hdr
        tail = hdr[_W_TAIL]
        head = hdr[_W_HEAD]
        out: list[bytes] = []
        nbytes = 0
        while tail != head and len(out) < max_n:
            pos = tail % self.capacity
            n = self._words[pos >> 3]
            if tail + _LEN_BYTES + _align8(n) > head:
                raise RuntimeError(
                    f"shm ring {self.name!r} corrupted: record length {n} at offset {pos}"
                )
            out.append(self._read_at((pos + _LEN_BYTES) % self.capacity, n))
            nbytes += n
            tail += _LEN_BYTES + _align8(n)
        if out:
            hdr[_W_TAIL] = tail  # publish after copying out: frees the space
            hdr[_W_POPPED_RECORDS] += len(out)
            hdr[_W_POPPED_BYTES] += nbytes
        return out

    def pop(
        self, timeout: float | None = 0, poll: Callable[[], None] | None = None
    ) -> bytes | None:
        """Return the next record, or None if still empty after ``timeout`` s.

        ``timeout=0`` is non-blocking, ``None`` waits forever; ``poll`` as in ``push``.
        """
        got = self.pop_many(1, timeout=timeout, poll=poll)
        return got[0] if got else None

    def pop_many(
        self,
        max_n: int,
        timeout: float | None = 0,
        poll: Callable[[], None] | None = None,
    ) -> list[bytes]:
        """Return up to ``max_n`` records (publishing ``tail`` once), waiting up to ``timeout`` for the first."""
        self._check_open()
        if max_n <= 0:
            return []
        out = self._pop_batch(max_n)
        if out or timeout == 0:
            return out
        self.empty_waits += 1
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = _BACKOFF_START_S
        while True:
            if poll is not None:
                poll()
            out = self._pop_batch(max_n)
            if out:
                return out
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return out
            time.sleep(delay if deadline is None else min(delay, deadline - now))
            delay = min(delay * 2, _BACKOFF_MAX_S)

    # ---------------------------------------------------------------- stats
    def used_bytes(self) -> int:
        """Bytes currently occupied (including length words and padding)."""
        self._check_open()
        return int(self._hdr[_W_HEAD] - self._hdr[_W_TAIL])

    def __len__(self) -> int:
        """Number of records currently in the ring."""
        self._check_open()
        return int(self._hdr[_W_PUSHED_RECORDS] - self._hdr[_W_POPPED_RECORDS])

    def stats(self) -> dict[str, int | float | str]:
        """Shared counters (either side may read) plus this process's wait counters."""
        self._check_open()
        h = self._hdr
        return {
            "name": self.name,
            "capacity": self.capacity,
            "used_bytes": int(h[_W_HEAD] - h[_W_TAIL]),
            "pushed_records": int(h[_W_PUSHED_RECORDS]),
            "pushed_bytes": int(h[_W_PUSHED_BYTES]),
            "popped_records": int(h[_W_POPPED_RECORDS]),
            "popped_bytes": int(h[_W_POPPED_BYTES]),
            "full_waits": self.full_waits,
            "wait_seconds": self.wait_seconds,
            "empty_waits": self.empty_waits,
        }

    # ------------------------------------------------------------- teardown
    @property
    def closed(self) -> bool:
        """Whether this handle has been detached."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"shm ring {self.name!r} is closed")

    def close(self) -> None:
        """Detach the mapping; the segment stays until the owner unlinks it."""
        if self._closed:
            return
        self._closed = True
        for view in (self._words, self._data, self._hdr, self._buf):
            view.release()
        self._mm.close()
        os.close(self._fd)

    def unlink(self) -> None:
        """Remove the segment name (owner side); existing mappings stay valid until closed."""
        if self.owner:
            atexit.unregister(self._atexit_unlink)
        if self._unlinked:
            return
        self._unlinked = True
        self._unlink_if_ours()

    def _unlink_if_ours(self) -> None:
        # The name may meanwhile point at a newer segment (stale one replaced); leave that alone.
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._file_id:
            _unlink_quietly(self.path)

    def _atexit_unlink(self) -> None:
        # A forked child inherits atexit hooks; only the creating process may unlink.
        if os.getpid() == self._pid and not self._unlinked:
            logger.debug("unlinking shm ring %s at exit", self.name)
            self._unlinked = True
            self._unlink_if_ours()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Detach, and unlink if this handle owns the segment."""
        self.close()
        if self.owner:
            self.unlink()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{len(self)} records"
        return f"ShmRing({self.name!r}, capacity={self.capacity}, owner={self.owner}, {state})"


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
