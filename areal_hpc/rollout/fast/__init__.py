"""The fast rollout engine: continuous batching over a per-slot KV cache, CUDA-graph decode, Triton kernels."""

from areal_hpc.rollout.fast.engine import FastEngine
from areal_hpc.rollout.fast.graphs import decode_buckets

__all__ = ["FastEngine", "decode_buckets"]
