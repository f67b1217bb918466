"""Versioned weight broadcast in flat buckets, asynchronous on both ends.

The trainer copies parameters into flat send buckets and posts non-blocking broadcasts, then goes
back to training; a rollout rank posts the matching receives into staging buckets and keeps
decoding. A version becomes visible to the engine only once every bucket has arrived, so a
half-received update is never used.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def plan_buckets(params: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> list[list[int]]:
    """Group parameter indices into buckets of at most ``bucket_bytes`` (one dtype per bucket)."""
    buckets: list[list[int]] = []
    cur: list[int] = []
    size, dtype = 0, None
    for i, (_, p) in enumerate(params):
        nbytes = p.numel() * p.element_size()
        if cur and (size + nbytes > bucket_bytes or p.dtype != dtype):
            buckets.append(cur)
            cur, size = [], 0
        cur.append(i)
        size += nbytes
        dtype = p.dtype
    if cur:
        buckets.append(cur)
    return buckets


class _Buckets:
    """Flat buffers laid out like the parameter list; views give each parameter's slice."""

    def __init__(self, params: list[tuple[str, torch.Tensor]], bucket_bytes: int, device: torch.device,
                 dtype: torch.dtype | None = None) -> None:
        if dtype is not None:  # lay out in the receiver's dtype (fp32 master weights -> bf16 rollout copy)
            params = [(n, torch.empty(p.shape, dtype=dtype if p.is_floating_point() else p.dtype, device="meta"))
                      for n, p in params]
        self.names = [n for n, _ in params]
        self.shapes = [p.shape for _, p in params]
        self.plan = plan_buckets(params, bucket_bytes)
        self.flat = [
            torch.empty(sum(params[i][1].numel() for i in b), dtype=params[b[0]][1].dtype, device=device)
            for b in self.plan
        ]
        self.nbytes = sum(f.numel() * f.element_size() for f in self.flat)

    def views(self) -> Iterator[tuple[str, torch.Tensor]]:
        for b, flat in zip(self.plan, self.flat):
            off = 0
            for i in b:
                n = self.shapes[i].numel()
                yield self.names[i], flat[off: off + n].view(self.shapes[i])
                off += n

    def fill_from(self, params: list[tuple[str, torch.Tensor]]) -> None:
        for (_, dst), (_, src) in zip(self.views(), params):
            dst.copy_(src.detach())


class WeightSender:
    """Trainer rank 0's side: one pending broadcast at a time, overlapped with the next step.

    ``dtype``: the rollout's weight dtype, when it differs from the trainer's (the copy converts).
    """

    def __init__(self, params: list[tuple[str, torch.Tensor]], group, bucket_mb: int, device: torch.device,
                 dtype: torch.dtype | None = None) -> None:
        self.group = group
        self.buckets = _Buckets(params, bucket_mb << 20, device, dtype)
        self._works: list = []
        self.seconds_waiting = 0.0

    def wait(self) -> None:
        t = time.perf_counter()
        for w in self._works:
            w.wait()
        self._works = []
        self.seconds_waiting += time.perf_counter() - t

    def send(self, params: list[tuple[str, torch.Tensor]]) -> None:
        """Snapshot ``params`` and start broadcasting; returns before the transfer completes."""
        self.wait()  # the previous version must be out before its buffers are reused
        with torch.no_grad():
            self.buckets.fill_from(params)
        self._works = [dist.broadcast(f, src=0, group=self.group, async_op=True) for f in self.buckets.flat]

    def close(self) -> None:
        self.wait()  # the staging buffers are torch tensors: nothing else to hand back


class WeightReceiver:
    """Rollout side: post receives for a version, poll for completion between decode steps."""

    def __init__(self, params: list[tuple[str, torch.Tensor]], group, bucket_mb: int, device: torch.device) -> None:
        self.group = group
        self.buckets = _Buckets(params, bucket_mb << 20, device)
        self._works: list = []
        self.pending_version: int | None = None
        self._queued: list[int] = []
        self._t_post = 0.0
        self.receive_seconds = 0.0

    def announce(self, version: int) -> None:
        """The trainer said version ``version`` is on its way; post receives (or queue behind the current)."""
        if self.pending_version is None:
            self._post(version)
        else:
            self._queued.append(version)

    def _post(self, version: int) -> None:
        self.pending_version = version
        self._t_post = time.perf_counter()
        self._works = [dist.broadcast(f, src=0, group=self.group, async_op=True) for f in self.buckets.flat]

    def ready(self, block: bool = False) -> int | None:
        """The version whose buckets have all arrived (then call ``tensors()``), else None."""
        if self.pending_version is None:
            return None
        if block:
            for w in self._works:
                w.wait()
        elif not all(w.is_completed() for w in self._works):
            return None
        for w in self._works:
            w.wait()  # surfaces errors of completed work
        self.receive_seconds += time.perf_counter() - self._t_post
        v = self.pending_version
        self.pending_version, self._works = None, []
        return v

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self.buckets.views()

    def post_next(self) -> None:
        """After the engine has copied a finished version out of the staging buffers."""
        if self._queued and self.pending_version is None:
            self._post(self._queued.pop(0))

    @property
    def superseded(self) -> bool:
        """A newer version is already announced: the one just received need not be applied."""
        return bool(self._queued)

    @property
    def busy(self) -> bool:
        return self.pending_version is not None or bool(self._queued)

    def close(self) -> None:
        pass  # the staging buffers are torch tensors: nothing to hand back
