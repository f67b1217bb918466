"""The attention split tuner: times every split of the Triton decode attention on this GPU and keeps the fastest.

Why at engine start: the best split (keys per program, warps, loop tile, grid order) differs between
GPUs (with their memory bandwidth) and with the batch and context, and a wrong one costs up to half
the kernel. Each candidate is first checked against the plain reference, so tuning never trades
correctness for speed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from areal_hpc.rollout.fast.decode_kernel import (
    CONFIGS,
    DecodeAttention,
    check_against_reference,
    config_name,
    split_args,
)
from areal_hpc.rollout.fast.graphs import capture


def tune(attn: DecodeAttention, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, dtype: torch.dtype,
         max_context: int = 1024, reps: int = 20) -> tuple[int, ...]:
    """Time every correct config of ``CONFIGS`` on a full batch, configure ``attn`` with the fastest and
    return it; the time of each goes to ``attn.timings``.

    ``k_cache``/``v_cache`` are one layer's caches [B', L, Hkv, D] with nothing live in them: the
    timed calls write keys at random positions (contexts uniform up to ``max_context``, the
    range most decode steps see). A config whose kernel fails to build or disagrees with the
    reference is skipped.
    """
    g = torch.Generator(device="cpu").manual_seed(0)
    B = attn.max_batch
    qkv = torch.randn(B, (attn.hq + 2 * attn.hkv) * attn.d, generator=g).to(attn.device, dtype)
    hi = max(2, min(attn.cache_len - 1, max_context))
    pos = torch.randint(1, hi, (B,), generator=g).to(attn.device)
    best, best_us = attn.config, float("inf")
    for cfg in CONFIGS:
        try:
            if check_against_reference(attn.device, dtype, attn.hq, attn.hkv, attn.d, **split_args(cfg)) >= 2e-2:
                continue
            attn.configure(**split_args(cfg))
            us = graph_time(lambda: attn(qkv, cos, sin, k_cache, v_cache, pos), reps)
        except Exception:  # noqa: BLE001 - a config this GPU cannot build is simply not a candidate
            continue
        attn.timings[config_name(cfg)] = us
        if us < best_us:
            best, best_us = cfg, us
    attn.configure(**split_args(best))
    return best


def graph_time(call: Callable[[], object], reps: int) -> float:
    """Device microseconds per ``call``, replayed from a CUDA graph as the engine runs it. Timed
    from Python instead, each call costs two Triton launches of ~20-30 us of host time, more
    than the kernels themselves: the first version of this tuner ranked launch overhead."""
    call()  # compiles this split's kernels outside the capture

    def body() -> None:
        for _ in range(reps):
            call()

    graph = capture(body)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    del graph
    return 1e3 * start.elapsed_time(end) / reps
