"""``vllm``: options of the vLLM rollout engine (``rollout.engine: vllm``); ignored by the other engines."""

from __future__ import annotations

from dataclasses import dataclass

from areal_hpc.config.fields import need, setting


@dataclass
class VllmConfig:
    """vLLM's own knobs; sampling (temperature, top-p, lengths, concurrency) stays in ``rollout``."""

    gpu_memory_utilization: float = setting(
        0.5,
        "fraction of the GPU's memory vLLM may take for its weights and KV cache (CUDA); below vLLM's own "
        "0.9 default because the trainer or other rollout ranks may share the GPU")
    cpu_kv_cache_gb: float = setting(1.0, "KV-cache size in GiB on CPU")
    enforce_eager: str = setting(
        "auto",
        "true: no torch.compile and no CUDA graphs (fast start, slower steps); auto: eager on CPU (compiling "
        "takes most of a minute there), graphs on CUDA",
        ("auto", "true", "false"))
    max_num_batched_tokens: int = setting(
        0, "tokens per engine step (prefill chunks and decodes together); 0: vLLM's default")
    prefix_caching: bool = setting(
        True, "share the KV cache of a group's common prompt between its samples (never across weight versions)")

    def validate(self) -> None:
        need(0 < self.gpu_memory_utilization <= 1, "vllm.gpu_memory_utilization", self.gpu_memory_utilization,
             "must be in (0, 1]", "set vllm.gpu_memory_utilization=0.5")
        need(self.cpu_kv_cache_gb > 0, "vllm.cpu_kv_cache_gb", self.cpu_kv_cache_gb, "must be > 0",
             "set vllm.cpu_kv_cache_gb=1")
        need(self.max_num_batched_tokens >= 0, "vllm.max_num_batched_tokens", self.max_num_batched_tokens,
             "must be >= 0", "set vllm.max_num_batched_tokens=0 for vLLM's default")
