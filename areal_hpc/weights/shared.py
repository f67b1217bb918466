"""Zero-copy weight sync when the trainer and its rollout ranks share a node (and, on GPU, a device).

The broadcast path copies every version through a gloo/NCCL collective. When trainer rank 0 and every
rollout rank sit on one node, the trainer can instead own two flat buffers (double buffering) that the
rollout ranks map directly: GPU memory exported by CUDA IPC on a shared GPU, a /dev/shm file on CPU.
One version is one pass of device copies on each side, nothing crosses the network or the host.

Protocol, per version (``seq`` = 1, 2, ... counts sends; slot = seq % 2):

1. The trainer waits until every reader has released the version last written to the slot (it never
   overwrites a buffer a rollout may still be reading), marks the slot WRITING(seq), copies the
   parameters in (converting to the rollout's dtype), synchronizes its stream, marks it DONE(seq), and
   then the trainer worker announces the version over the MPI control channel as before.
2. A reader pairs its n-th announcement with seq n (control messages from one source arrive in order).
   ``ready()`` sees DONE(seq); ``tensors()`` checks DONE(seq) before, yields views for the engine to copy
   from, synchronizes, and checks DONE(seq) again after the copy, raising before the engine could mark
   the version applied if the slot changed; ``post_next()`` writes the reader's release word.

The header (slot states, one release word per reader and slot, each reader on its own cache line) is
always a small /dev/shm file, read and written with aligned 8-byte stores like the shm ring (x86-64
TSO ordering; see areal_hpc/transport/shm_ring.py). It starts with the ring's magic and owner pid so
the start-up ``cleanup_stale`` keeps a live owner's file and removes a crashed run's; the owner also
unlinks it at exit.
"""

from __future__ import annotations

import atexit
import logging
import mmap
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from areal_hpc.transport import shm_ring

log = logging.getLogger(__name__)

_ALIGN = 256  # byte alignment of every parameter inside a slot
_PAGE = 4096
_LAYOUT_TAG = 0x5745_4947_0000_0001  # "WEIG" | layout 1, tells this file from a ring's header
# Header words (uint64). Words 0 and 3 match the shm ring (magic, owner pid) for cleanup_stale.
_W_MAGIC, _W_LAYOUT, _W_SLOT_BYTES, _W_OWNER_PID, _W_READERS = 0, 1, 2, 3, 4
_W_STATE = 8  # slot states at words 8, 9 (own cache line)
_W_RELEASE = 16  # reader i's release words at 16 + 8 * i + slot
_SPIN_S = 50e-6


def writing(seq: int) -> int:
    return 2 * seq + 1


def done(seq: int) -> int:
    return 2 * seq + 2


def header_bytes(n_readers: int) -> int:
    return -(-8 * (_W_RELEASE + 8 * n_readers) // _PAGE) * _PAGE


@dataclass(frozen=True)
class Layout:
    """Where each parameter lives inside one slot: same names and order on both sides, one dtype."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    dtype: torch.dtype
    slot_bytes: int

    @classmethod
    def of(cls, params: list[tuple[str, torch.Tensor]], dtype: torch.dtype) -> Layout:
        size = torch.empty((), dtype=dtype).element_size()
        offsets, off = [], 0
        for _, p in params:
            offsets.append(off)
            off += -(-p.numel() * size // _ALIGN) * _ALIGN
        return cls(tuple(n for n, _ in params), tuple(tuple(p.shape) for _, p in params), tuple(offsets), dtype,
                   max(off, _ALIGN))

    def views(self, slot: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """``(name, tensor)`` views of a flat uint8 slot buffer."""
        size = torch.empty((), dtype=self.dtype).element_size()
        out = []
        for name, shape, off in zip(self.names, self.shapes, self.offsets):
            n = int(torch.Size(shape).numel())
            out.append((name, slot[off: off + n * size].view(self.dtype).view(shape)))
        return out

    def check_matches(self, params: list[tuple[str, torch.Tensor]], who: str) -> None:
        names = tuple(n for n, _ in params)
        if names != self.names:
            diff = next((i for i, (a, b) in enumerate(zip(names, self.names)) if a != b), min(len(names),
                                                                                              len(self.names)))
            raise RuntimeError(f"{who}: parameter list differs from the trainer's shared-weights layout at index "
                               f"{diff} ({len(names)} vs {len(self.names)} parameters); trainer and rollout must "
                               "load the same model (model.* keys), or use weights.kind=broadcast")
        for (name, p), shape in zip(params, self.shapes):
            if tuple(p.shape) != shape:
                raise RuntimeError(f"{who}: parameter {name} has shape {tuple(p.shape)}, the trainer's {shape}")


class _Header:
    """The mapped /dev/shm file: header words, and on CPU the two data slots after them."""

    def __init__(self, path: str, fd: int, mm: mmap.mmap, hdr_bytes: int) -> None:
        self.path, self._fd, self._mm = path, fd, mm
        self.words = memoryview(mm)[:hdr_bytes].cast("Q")
        self.hdr_bytes = hdr_bytes

    @classmethod
    def create(cls, path: str, n_readers: int, slot_bytes: int, with_data: bool) -> _Header:
        hdr = header_bytes(n_readers)
        size = hdr + (2 * slot_bytes if with_data else 0)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, size)  # an undersized /dev/shm fails here, not with SIGBUS later
            except OSError as e:
                raise OSError(e.errno, f"cannot reserve {size} bytes at {path} for shared weights; enlarge "
                                       "/dev/shm or use weights.kind=broadcast") from e
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        h = cls(path, fd, mm, hdr)
        h.words[_W_LAYOUT] = _LAYOUT_TAG
        h.words[_W_SLOT_BYTES] = slot_bytes
        h.words[_W_OWNER_PID] = os.getpid()
        h.words[_W_READERS] = n_readers
        h.words[_W_MAGIC] = shm_ring._MAGIC  # published last
        return h

    @classmethod
    def attach(cls, path: str) -> _Header:
        fd = os.open(path, os.O_RDWR)
        size = os.fstat(fd).st_size
        mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        first = memoryview(mm)[:8 * (_W_READERS + 1)].cast("Q")
        ok = first[_W_MAGIC] == shm_ring._MAGIC and first[_W_LAYOUT] == _LAYOUT_TAG
        n = int(first[_W_READERS])
        first.release()
        if not ok:
            mm.close()
            os.close(fd)
            raise RuntimeError(f"{path} is not a shared-weights file of this version (stale or foreign); delete it")
        return cls(path, fd, mm, header_bytes(n))

    def data(self) -> torch.Tensor:
        return torch.frombuffer(self._mm, dtype=torch.uint8, offset=self.hdr_bytes)

    def state(self, slot: int) -> int:
        return int(self.words[_W_STATE + slot])

    def set_state(self, slot: int, value: int) -> None:
        self.words[_W_STATE + slot] = value

    def released(self, reader: int, slot: int) -> int:
        return int(self.words[_W_RELEASE + 8 * reader + slot])

    def release(self, reader: int, slot: int, seq: int) -> None:
        self.words[_W_RELEASE + 8 * reader + slot] = seq

    def close(self) -> None:
        self.words.release()
        try:
            self._mm.close()
        except BufferError:  # a tensor still maps the data; the mapping goes with the process
            pass
        os.close(self._fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class SharedWeightSender:
    """Trainer rank 0's side; same ``send``/``wait``/``seconds_waiting`` as the broadcast sender."""

    def __init__(self, params: list[tuple[str, torch.Tensor]], *, path: str, n_readers: int, dtype: torch.dtype,
                 device: torch.device, timeout_s: float = 600.0) -> None:
        self.layout = Layout.of(params, dtype)
        self.device, self.timeout_s, self.n_readers = device, timeout_s, n_readers
        self.header = _Header.create(path, n_readers, self.layout.slot_bytes, with_data=device.type != "cuda")
        self._pid = os.getpid()
        atexit.register(self._atexit_unlink)
        if device.type == "cuda":
            self._data = torch.zeros(2 * self.layout.slot_bytes, dtype=torch.uint8, device=device)
        else:
            self._data = self.header.data()
        sb = self.layout.slot_bytes
        self._slots = [self.layout.views(self._data[s * sb: (s + 1) * sb]) for s in (0, 1)]
        self._written = [0, 0]  # seq last written to each slot
        self.seq = 0
        self.seconds_waiting = 0.0
        self.nbytes = 2 * sb

    def handle(self) -> dict[str, Any]:
        """What a reader needs to map the buffers: picklable, sent once over the control channel."""
        cuda = None
        if self.device.type == "cuda":
            from torch.multiprocessing.reductions import reduce_tensor

            cuda = reduce_tensor(self._data)
        return {"path": self.header.path, "layout": self.layout, "cuda": cuda}

    def _wait_released(self, slots: tuple[int, ...]) -> None:
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        for s in slots:
            for r in range(self.n_readers):
                while self.header.released(r, s) < self._written[s]:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"shared weights: rollout reader {r} has not released seq {self._written[s]} "
                            f"within {self.timeout_s:.0f}s (run.timeout_s); check that rollout's log")
                    time.sleep(_SPIN_S)
        self.seconds_waiting += time.perf_counter() - t0

    def send(self, params: list[tuple[str, torch.Tensor]]) -> None:
        """Write the next version into the free slot; returns once it is complete and visible."""
        seq = self.seq + 1
        s = seq % 2
        self._wait_released((s,))
        if len(params) != len(self._slots[s]):
            raise RuntimeError(f"shared weights: send got {len(params)} parameters, layout has {len(self._slots[s])}")
        self.header.set_state(s, writing(seq))
        with torch.no_grad():
            for (_, dst), (_, src) in zip(self._slots[s], params):
                dst.copy_(src.detach())  # converts to the rollout dtype
        _sync(self.device)
        self.header.set_state(s, done(seq))
        self._written[s] = seq
        self.seq = seq

    def wait(self) -> None:
        """Until every reader has released everything sent (used at stop)."""
        self._wait_released((0, 1))

    def close(self) -> None:
        atexit.unregister(self._atexit_unlink)
        self._slots = []
        self._data = None  # type: ignore[assignment]
        _unlink(self.header.path)
        self.header.close()

    def _atexit_unlink(self) -> None:
        if os.getpid() == self._pid:
            _unlink(self.header.path)


class SharedWeightReceiver:
    """Rollout side; same ``announce/ready/tensors/post_next/superseded/busy`` as the broadcast receiver."""

    def __init__(self, handle: dict[str, Any], reader: int, device: torch.device,
                 params: list[tuple[str, torch.Tensor]] | None = None, timeout_s: float = 600.0) -> None:
        self.layout: Layout = handle["layout"]
        if params is not None:
            self.layout.check_matches(params, f"rollout reader {reader}")
        self.reader, self.device, self.timeout_s = reader, device, timeout_s
        self.header = _Header.attach(handle["path"])
        if handle["cuda"] is not None:
            rebuild, args = handle["cuda"]
            if device.type != "cuda":
                raise RuntimeError(f"rollout reader {reader}: the trainer shares CUDA buffers but this rank runs on "
                                   f"{device}; use weights.kind=broadcast")
            args = list(args)
            args[6] = torch.device(device).index if device.index is not None else torch.cuda.current_device()
            self._data = rebuild(*args)
        else:
            self._data = self.header.data()
        sb = self.layout.slot_bytes
        self._slots = [self.layout.views(self._data[s * sb: (s + 1) * sb]) for s in (0, 1)]
        self._count = 0  # announcements so far = seq of the latest
        self._queued: list[tuple[int, int]] = []
        self.pending_version: int | None = None
        self._pending_seq = 0
        self._current: tuple[int, int] | None = None  # (version, seq) returned by ready(), not yet released
        self._t_post = 0.0
        self.receive_seconds = 0.0

    def announce(self, version: int) -> None:
        self._count += 1
        item = (version, self._count)
        if self.pending_version is None and self._current is None:
            self._post(item)
        else:
            self._queued.append(item)

    def _post(self, item: tuple[int, int]) -> None:
        self.pending_version, self._pending_seq = item
        self._t_post = time.perf_counter()

    def _complete(self, seq: int) -> bool:
        state = self.header.state(seq % 2)
        if state > done(seq):
            raise RuntimeError(f"shared weights: slot {seq % 2} moved past seq {seq} (state {state}) before rollout "
                               f"reader {self.reader} released it; the trainer broke the protocol")
        return state == done(seq)

    def ready(self, block: bool = False) -> int | None:
        """The announced version once its slot is complete (then call ``tensors()``), else None."""
        if self.pending_version is None:
            return None
        seq = self._pending_seq
        deadline = time.monotonic() + self.timeout_s
        while not self._complete(seq):
            if not block:
                return None
            if time.monotonic() > deadline:
                raise RuntimeError(f"shared weights: seq {seq} not complete after {self.timeout_s:.0f}s")
            time.sleep(_SPIN_S)
        self.receive_seconds += time.perf_counter() - self._t_post
        self._current = (self.pending_version, seq)
        self.pending_version = None
        return self._current[0]

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Views into the shared slot; raises after the last one if the slot changed during the copy."""
        assert self._current is not None, "tensors() before ready()"
        version, seq = self._current
        if self.header.state(seq % 2) != done(seq):
            raise RuntimeError(f"shared weights: slot of version {version} is not complete before the copy")
        yield from self._slots[seq % 2]
        _sync(self.device)  # the engine's copies have finished reading the slot
        if self.header.state(seq % 2) != done(seq):
            raise RuntimeError(f"shared weights: slot of version {version} changed during the copy; not applied")

    def post_next(self) -> None:
        """Release the version just handled (applied or superseded), then take the next announced one."""
        if self._current is not None:
            _sync(self.device)
            seq = self._current[1]
            self.header.release(self.reader, seq % 2, seq)
            self._current = None
        if self._queued and self.pending_version is None:
            self._post(self._queued.pop(0))

    @property
    def superseded(self) -> bool:
        return bool(self._queued)

    @property
    def busy(self) -> bool:
        return self.pending_version is not None or self._current is not None or bool(self._queued)

    def close(self) -> None:
        """Drop the mapping (on CUDA this returns the IPC reference before the trainer exits)."""
        self._slots = []
        self._data = None  # type: ignore[assignment]
        self.header.close()
