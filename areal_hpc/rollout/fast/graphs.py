"""The graph runner: the decode step captured once per batch bucket in a CUDA graph, then replayed.

Why: an eager decode step is hundreds of small launches; a replay is one. A graph has fixed shapes,
so the step runs on the slots ``[0, n)`` for ``n`` the smallest bucket that holds every live slot
(``decode_buckets``), and every bucket is captured at once before the first replay: a capture (and
the recompile it may trigger) in the middle of a run would stall it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)

FINE_ABOVE = 128  # decode rows above which a GEMM stops being bound by reading the weights (Hopper-class GPUs)


def capture(body: Callable[[], object], pool: object | None = None) -> torch.cuda.CUDAGraph:
    """Run ``body`` once on a side stream, then capture it into a graph (optionally in memory ``pool``).

    The side-stream run keeps first-call work (lazy allocations, library handles, Triton compiles)
    out of the capture, where it would fail or be recorded.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        body()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        body()
    return graph


def decode_buckets(max_batch: int, step: int = 64) -> list[int]:
    """Batch sizes that get a decode graph, ascending: ``max_batch`` and its halves down to 16, and every
    ``step`` slots above ``FINE_ABOVE``.

    Why both: up to ~128 rows a decode GEMM's time is reading the weights, so a padded row is almost free
    and halves suffice. Above it the GEMMs are compute-bound, so padded rows cost: with halves only, an
    asynchronous rollout held near 281 live slots by the staleness gate ran in the 512 bucket, and 320 live
    slots decode about 8% faster in a 320 bucket than in the 512 one.
    """
    sizes = {max_batch}
    b = max_batch
    while b > 16 and b % 2 == 0:
        b //= 2
        sizes.add(b)
    if step > 0:
        sizes.update(range(step * (FINE_ABOVE // step + 1), max_batch, step))
    return sorted(sizes)


class DecodeGraphs:
    """One CUDA graph of ``step(n)`` per bucket ``n``.

    ``step`` is the decode step over the slots ``[0, n)``; ``first(n)`` its first run (which may
    compile, and fall back to an eager layer). Warm-up and capture advance the decode inputs
    ``inputs``, so they are restored afterwards. The KV cache is not: those runs only write
    keys/values at or after each slot's position, which real decoding overwrites before reading (a
    copy would cost as much memory again as the cache itself).
    """

    def __init__(self, buckets: list[int], step: Callable[[int], None], first: Callable[[int], None],
                 inputs: tuple[Tensor, ...], pool: object | None, cache_len: int) -> None:
        self.buckets = buckets  # ascending
        self.step, self.first, self.inputs, self.pool = step, first, inputs, pool
        self.cache_len = cache_len
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.capture_s = 0.0  # host seconds spent capturing (and compiling inside the captures)

    def capture_all(self) -> None:
        """Capture every bucket not captured yet, the largest first."""
        t = time.perf_counter()
        for b in reversed(self.buckets):
            if b not in self.graphs:
                self.capture(b)
        self.capture_s += time.perf_counter() - t

    def capture(self, n: int) -> torch.cuda.CUDAGraph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        saved = [t.clone() for t in self.inputs]
        with torch.cuda.stream(s):
            self.first(n)
            for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks kernels, outside the capture
                self.step(n)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.step(n)
        for dst, src in zip(self.inputs, saved):
            dst.copy_(src)
        del saved
        self.graphs[n] = graph
        log.info("decode step captured in a CUDA graph (batch %d of %d, cache length %d)", n, self.buckets[-1],
                 self.cache_len)
        return graph
