"""Capturing a CUDA graph the way every graphed path here needs it."""

from __future__ import annotations

from collections.abc import Callable

import torch


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
