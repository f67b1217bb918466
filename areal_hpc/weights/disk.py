"""Weights through the run folder, for rollout workers that attach from other Slurm jobs.

An attached worker shares no communicator with the trainer, only the run folder on a shared
filesystem, so trainer rank 0 writes each version there as one safetensors file and a pointer to the
newest complete one:

    weights/v00000012.safetensors   one version (metadata: version, parameter names in order)
    weights/latest.json             {"version": 12, "file": "v00000012.safetensors", "bytes": ..., "time": ...}

What a reader can rely on:

- a ``v*.safetensors`` file is complete: it is written under a hidden temporary name, fsynced, renamed,
  and the folder fsynced; only then is ``latest.json`` replaced (same steps), so the pointer never names a
  file that is not all there, on a local disk or over NFS/Lustre (close-to-open consistency);
- the file ``latest.json`` names is never deleted; older ones go only once no worker reports holding them
  (``prune``), and a worker that loses the race (the pointer it read went stale and its file was pruned)
  re-reads the pointer and loads the newer file instead.

The trainer must not wait on the disk: ``publish`` only copies the parameters into CPU buffers
(allocated once; pinned, and the copy asynchronous, when they are on a GPU) and a background thread
writes. Two buffer sets: one being written, one pending. A publish while one is pending overwrites the
pending one, so when the disk is slower than the training step versions are skipped on disk, never
queued without bound and never written twice.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open

log = logging.getLogger(__name__)

POINTER = "latest.json"
_TMP = ".tmp-"  # hidden: nothing that lists versions or follows the pointer ever sees a temporary
_VERSION_RE = re.compile(r"^v(\d{8,})\.safetensors$")
_MISSING_RETRIES = 20  # re-reads of the pointer when the file it names is missing (a stale attribute cache)

# Module-level so a test can slow down or break the write without a parameter in the interface.
_save = safetensors.torch.save_file


def file_name(version: int) -> str:
    return f"v{version:08d}.safetensors"


def versions_on_disk(directory: Path) -> list[int]:
    """Complete version files in ``directory``, oldest first."""
    out = []
    for name in os.listdir(directory):
        m = _VERSION_RE.match(name)
        if m:
            out.append(int(m.group(1)))
    return sorted(out)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def _corrupt(path: Path, why: str) -> RuntimeError:
    return RuntimeError(f"disk weights: {path} cannot be read ({why}); the writer's run folder may be corrupt: "
                        f"delete {path.parent}'s v*.safetensors and {POINTER} and let the trainer publish again")


def read_latest(directory: Path) -> dict[str, Any] | None:
    """The pointer to the newest complete version, or None before the first one is written."""
    path = Path(directory) / POINTER
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        pointer = json.loads(text)
        pointer["version"], pointer["file"] = int(pointer["version"]), str(pointer["file"])
    except (ValueError, KeyError, TypeError) as e:
        raise _corrupt(path, _first_line(e)) from None
    return pointer


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:  # a filesystem that cannot fsync a folder orders renames itself
            raise
    finally:
        os.close(fd)


def _replace_durably(tmp: Path, final: Path) -> None:
    """fsync the finished temporary, rename it into place, fsync the folder that holds the new name."""
    _fsync_path(tmp)
    os.replace(tmp, final)
    _fsync_path(final.parent)


class DiskWeightWriter:
    """Trainer rank 0's end: ``publish`` a version every step, ``prune`` what no worker holds.

    ``dtype``: the rollout's weight dtype when it differs from the trainer's (fp32 masters written as
    bf16 halve the file); None keeps each parameter's own.
    """

    def __init__(self, directory: Path, *, keep_extra: int = 0, dtype: torch.dtype | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_extra, self.dtype = keep_extra, dtype
        for leftover in self.directory.glob(_TMP + "*"):  # a crashed writer's half-written files
            leftover.unlink(missing_ok=True)
            log.info("disk weights: removed the leftover temporary %s", leftover)
        pointer = read_latest(self.directory)
        self._latest: int | None = pointer["version"] if pointer else None  # what readers are sent to
        self._names: list[str] = []
        self._shapes: list[tuple[int, ...]] = []
        self._buffers: list[list[torch.Tensor]] = []  # two sets, allocated by the first publish
        self._events: list[Any] = [None, None]  # CUDA events that complete each set's snapshot
        self._cond = threading.Condition()
        self._pending: tuple[int, int] | None = None  # (version, buffer set) waiting for the thread
        self._writing: int | None = None  # the buffer set the thread is writing
        self._last_published: int | None = None
        self._error: RuntimeError | None = None
        self._stop = self._closed = False
        self.written = self.skipped = 0
        self.seconds_writing = self.seconds_snapshot = 0.0
        self.bytes_written = 0
        self._thread = threading.Thread(target=self._run, name="disk-weights-writer", daemon=True)
        self._thread.start()

    # -- the training thread ----------------------------------------------------------------------
    def publish(self, version: int, params: list[tuple[str, torch.Tensor]]) -> None:
        """Snapshot ``params`` as ``version`` and return; the file is written in the background."""
        self._raise_error()
        if self._closed:
            raise RuntimeError(f"disk weights: publish of version {version} after close() ({self.directory})")
        if self._last_published is not None and version <= self._last_published:
            raise ValueError(f"disk weights: version {version} published after version {self._last_published} "
                             f"({self.directory}); versions must increase")
        t0 = time.perf_counter()
        with self._cond:
            if not self._buffers:
                self._allocate(params)
            else:
                self._check(params)
            if self._pending is not None:  # not started yet: the newer version takes its place
                slot = self._pending[1]
                self.skipped += 1
            else:
                slot = 0 if self._writing != 0 else 1
            try:
                with torch.no_grad():
                    for dst, (_, src) in zip(self._buffers[slot], params):
                        dst.copy_(src.detach(), non_blocking=dst.is_pinned())
            except BaseException:
                self._pending = None  # half overwritten: it must not be written under its old version
                raise
            src_device = params[0][1].device
            event = None
            if src_device.type == "cuda":  # the thread waits for the copy; this thread does not
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(src_device))
            self._events[slot] = event
            self._pending = (version, slot)
            self._last_published = version
            self._cond.notify_all()
        self.seconds_snapshot += time.perf_counter() - t0

    def _allocate(self, params: list[tuple[str, torch.Tensor]]) -> None:
        if not params:
            raise ValueError(f"disk weights: publish with no parameters ({self.directory})")
        self._names = [n for n, _ in params]
        self._shapes = [tuple(p.shape) for _, p in params]
        pin = params[0][1].device.type == "cuda"  # pinned memory lets the device copy run asynchronously

        def buffer(p: torch.Tensor) -> torch.Tensor:
            dtype = self.dtype if self.dtype is not None and p.is_floating_point() else p.dtype
            return torch.empty(p.shape, dtype=dtype, pin_memory=pin)  # one storage each: safetensors wants that

        self._buffers = [[buffer(p) for _, p in params] for _ in (0, 1)]

    def _check(self, params: list[tuple[str, torch.Tensor]]) -> None:
        names = [n for n, _ in params]
        if names != self._names:
            i = next((i for i, (a, b) in enumerate(zip(names, self._names)) if a != b), min(len(names),
                                                                                          len(self._names)))
            raise ValueError(f"disk weights: parameter list differs from the first published one at index {i} "
                             f"({len(names)} vs {len(self._names)} parameters); publish the same model every time")
        for (name, p), shape in zip(params, self._shapes):
            if tuple(p.shape) != shape:
                raise ValueError(f"disk weights: parameter {name} has shape {tuple(p.shape)}, first published "
                                 f"as {shape}")

    def prune(self, held: Iterable[int]) -> None:
        """Delete versions older than the pointer's that no live worker holds (keeping ``keep_extra`` more), so
        a worker that lags holds one old file, not every one since.

        ``held``: the versions live workers report loading or using. The pointer's version is read under
        the lock and only ever grows, so a file renamed in but not yet pointed to is newer than it and
        stays, and a file the pointer names is never deleted. A reader that read the pointer but has not
        reported the version yet finds its file gone and reads the pointer again.
        """
        self._raise_error()
        with self._cond:
            latest = self._latest
        if latest is None:
            return
        keep = set(held)
        old = [v for v in versions_on_disk(self.directory) if v < latest and v not in keep]
        for v in old[:max(len(old) - self.keep_extra, 0)]:
            (self.directory / file_name(v)).unlink(missing_ok=True)

    def wait(self) -> None:
        """Until every published version is on disk or skipped (before exit, and in tests)."""
        with self._cond:
            while (self._pending is not None or self._writing is not None) and self._error is None:
                self._cond.wait()
        self._raise_error()

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.wait()
        finally:
            with self._cond:
                self._stop = True
                self._cond.notify_all()
            self._thread.join()
            self._closed = True
            self._buffers = []

    @property
    def latest(self) -> int | None:
        """The version ``latest.json`` names (None before the first write)."""
        return self._latest

    def _raise_error(self) -> None:
        with self._cond:
            error, self._error = self._error, None
        if error is not None:
            raise error

    # -- the writer thread ------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stop:
                    self._cond.wait()
                if self._pending is None:
                    return
                (version, slot), self._pending = self._pending, None
                self._writing, event = slot, self._events[slot]
            path = self.directory / file_name(version)
            t0 = time.perf_counter()
            error, nbytes = None, 0
            try:
                if event is not None:
                    event.synchronize()
                nbytes = self._write(version, self._buffers[slot], path)
            except Exception as e:
                error = RuntimeError(f"disk weights: writing {path} failed ({_first_line(e)}); check that "
                                     f"{self.directory} is writable and has room for another version")
            with self._cond:
                self._writing = None
                if error is None:
                    self.written += 1
                    self.bytes_written += nbytes
                    self.seconds_writing += time.perf_counter() - t0
                    self._latest = version
                else:
                    self._error = error
                self._cond.notify_all()

    def _write(self, version: int, tensors: list[torch.Tensor], path: Path) -> int:
        tmp = self.directory / f"{_TMP}{path.name}.{os.getpid()}"
        try:
            _save(dict(zip(self._names, tensors)), tmp,
                  {"format": "pt", "version": str(version), "names": json.dumps(self._names)})
            _replace_durably(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        nbytes = path.stat().st_size
        pointer = {"version": version, "file": path.name, "bytes": nbytes, "time": time.time()}
        tmp = self.directory / f"{_TMP}{POINTER}.{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump(pointer, f)
            _replace_durably(tmp, self.directory / POINTER)
        finally:
            tmp.unlink(missing_ok=True)
        return nbytes


def _load_file(path: Path, pointer: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """The version file ``pointer`` names as CPU tensors in the writer's order; FileNotFoundError when gone."""
    try:
        size = os.stat(path).st_size
        if "bytes" in pointer and size != int(pointer["bytes"]):
            raise _corrupt(path, f"{size} bytes, {POINTER} says {pointer['bytes']}")
        # pread, not mmap: the bytes are read here, in the loading thread, not page by page later
        # while the engine copies them, and the tensors outlive the file once it is pruned.
        with safe_open(path, framework="pt", device="cpu", backend="pread") as f:
            meta = f.metadata() or {}
            if "names" not in meta or "version" not in meta:
                raise _corrupt(path, "no version or parameter names in its metadata")
            names = json.loads(meta["names"])
            if int(meta["version"]) != pointer["version"]:
                raise _corrupt(path, f"holds version {meta['version']}, {POINTER} says {pointer['version']}")
            if sorted(names) != sorted(f.keys()):
                raise _corrupt(path, "its metadata names other tensors than it holds")
            return [(n, f.get_tensor(n)) for n in names]
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ESTALE:  # deleted by another NFS client while open: pruned under us
            raise FileNotFoundError(errno.ENOENT, str(e), str(path)) from None
        raise _corrupt(path, _first_line(e)) from None
    except RuntimeError as e:
        if str(e).startswith("disk weights:"):
            raise
        raise _corrupt(path, _first_line(e)) from None
    except Exception as e:  # a safetensors header error, bad metadata
        raise _corrupt(path, _first_line(e)) from None


class DiskWeightReader:
    """An attached rollout worker's end: ``poll`` between decode steps, apply what ``ready`` returns.

    Loading runs in a background thread, so a poll costs one small file read at most every ``poll_s``.
    Report ``loading_version`` (while not None) and the version in use to the trainer: the writer keeps
    those files until they are no longer reported.
    """

    def __init__(self, directory: Path, *, poll_s: float = 0.5) -> None:
        self.directory, self.poll_s = Path(directory), poll_s
        self._lock = threading.Lock()
        self._t_poll = -float("inf")
        self._latest: int | None = None
        self._held: int | None = None  # newest version loaded (ready or taken)
        self._loading: int | None = None
        self._ready: tuple[int, list[tuple[str, torch.Tensor]]] | None = None
        self._error: RuntimeError | None = None
        self._thread: threading.Thread | None = None
        self.loads = self.skipped = 0
        self.seconds_loading = 0.0

    def poll(self) -> None:
        """Read the pointer (at most every ``poll_s``); start loading a newer version if none is loading."""
        self._raise_error()
        now = time.monotonic()
        if now - self._t_poll < self.poll_s:
            return
        self._t_poll = now
        pointer = read_latest(self.directory)
        if pointer is None:
            return
        self._latest = pointer["version"]
        with self._lock:
            if self._loading is not None or (self._held is not None and pointer["version"] <= self._held):
                return
            self._loading = pointer["version"]
        self._thread = threading.Thread(target=self._load, args=(pointer,), name="disk-weights-reader", daemon=True)
        self._thread.start()

    def ready(self) -> tuple[int, list[tuple[str, torch.Tensor]]] | None:
        """The newest loaded version not yet taken, as ``(version, named tensors)``; taking it clears it."""
        self._raise_error()
        with self._lock:
            out, self._ready = self._ready, None
        return out

    def latest_version(self) -> int | None:
        """The newest version the pointer named when last read (None before any)."""
        return self._latest

    @property
    def loading_version(self) -> int | None:
        """The version whose file is being read now: the writer must keep it until it is loaded."""
        return self._loading

    def wait_for(self, version: int, timeout: float) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        """Block until a version >= ``version`` is loaded and return it (taken), e.g. at a worker's start."""
        deadline = time.monotonic() + timeout
        while True:
            self.poll()
            got = self.ready()
            if got is not None and got[0] >= version:
                return got
            if time.monotonic() > deadline:
                raise TimeoutError(f"disk weights: no version >= {version} in {self.directory} within "
                                   f"{timeout:.0f}s (newest there: {self._latest}); check that the run's trainer "
                                   "is running and writes its weights there")
            time.sleep(min(self.poll_s, 0.02))

    def close(self) -> None:
        if self._thread is not None:
            self._thread.join()

    def _raise_error(self) -> None:
        with self._lock:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def _load(self, pointer: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        try:
            version, named = self._load_newest(pointer)
        except Exception as e:
            path = self.directory / pointer["file"]
            error = e if isinstance(e, RuntimeError) and str(e).startswith("disk weights:") else RuntimeError(
                f"disk weights: loading {path} failed ({_first_line(e)})")
            with self._lock:
                self._error, self._loading = error, None
            return
        with self._lock:
            if self._ready is not None:  # a newer one arrived before the engine took the last
                self.skipped += 1
            self._ready, self._held, self._loading = (version, named), version, None
            self.loads += 1
            self.seconds_loading += time.perf_counter() - t0

    def _load_newest(self, pointer: dict[str, Any]) -> tuple[int, list[tuple[str, torch.Tensor]]]:
        for _ in range(_MISSING_RETRIES):
            path = self.directory / pointer["file"]
            try:
                return pointer["version"], _load_file(path, pointer)
            except FileNotFoundError:
                newer = read_latest(self.directory)
                if newer is not None and newer["version"] > pointer["version"]:
                    pointer = newer  # pruned after a newer one was written: load that one
                    with self._lock:
                        self._loading = pointer["version"]
                    self._latest = pointer["version"]
                else:  # the pointer read may predate the rename on a client with cached attributes
                    time.sleep(min(self.poll_s, 0.1))
        raise _corrupt(self.directory / pointer["file"], f"{POINTER} names it but it stays missing")
