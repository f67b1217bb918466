"""Typed configuration schema: one dataclass per component.

Every field carries a default and a ``help`` string so a bare ``Config()`` is a
runnable quickstart and the CLI can describe each key. Fields restricted to a
fixed set of values list them under ``choices``; ``loader.validate`` checks them
(and every other constraint) in one place. YAML keys equal the field names except
where ``yaml_key`` says otherwise (``async`` is a Python keyword).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def _f(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """Declare a scalar field with its help text (and allowed values, if any)."""
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Identity, length and bookkeeping of one job."""

    name: str = _f("quickstart", "run name; the run folder is output_dir/name")
    output_dir: str = _f("runs", "parent folder of run folders")
    seed: int = _f(1, "global random seed (model init, sampling, data order)")
    steps: int = _f(40, "number of RL training steps")
    cache_dir: str = _f(
        "runs/.cache", "where warm-up checkpoints are cached across runs"
    )
    log_level: str = _f(
        "INFO", "logging level", ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    )
    progress: bool = _f(True, "show a progress line per training step")
    timeout_s: float = _f(
        1800.0, "whole-job watchdog in seconds; the job aborts after this"
    )
    resume: str = _f(
        "auto",
        "auto: continue from RUN/checkpoints/latest when it exists (a requeued job); never: always start fresh",
        ("auto", "never"),
    )
    final_checkpoint: str = _f(
        "full",
        "what the run saves at its end in RUN/checkpoints/final: full (policy in HF format and the trainer's "
        "optimizer state), policy (the HF policy only; the optimizer state of a 0.5B model is ~6 GB), none",
        ("full", "policy", "none"),
    )
    checkpoint_every: int = _f(0, "write a resumable checkpoint every N steps (0: only on preemption signals)")
    requeue: bool = _f(True, "after a preemption checkpoint under Slurm, requeue the job (scontrol requeue)")


@dataclass
class ClusterConfig:
    """How many ranks of each role to start, and how."""

    n_trainer: int = _f(1, "number of trainer ranks (data parallel)")
    n_rollout: int = _f(2, "number of rollout (generation) ranks")
    launcher: str = _f(
        "auto",
        "how ranks are started: auto (detect Slurm/MPI), mpiexec, or none (already inside MPI)",
        ("auto", "mpiexec", "none"),
    )
    mpiexec: str = _f(
        "mpiexec", "program used to start ranks when launching with mpiexec"
    )
    cuda_mps: str = _f(
        "auto",
        "CUDA MPS daemon for the job, so ranks sharing a GPU run their kernels side by side instead of in "
        "time slices: auto = when ranks share a GPU and nvidia-cuda-mps-control is installed; on = always "
        "(an error if it cannot start); off = never. Started by `areal-hpc train` and slurm/run.sbatch (one node)",
        ("auto", "on", "off"),
    )
    mps_trainer_sm_percent: int = _f(
        100,
        "under CUDA MPS, the percentage of the GPU's SMs a trainer rank's kernels may occupy "
        "(CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, set before its CUDA context): below 100 the rollout's small, "
        "latency-bound decode kernels always find free SMs beside the trainer's GEMMs, for a loop bound by "
        "generation; 100 = no limit. Ignored without MPS",
    )
    mps_trainer_priority: str = _f(
        "normal",
        "under CUDA MPS, the scheduling priority of a trainer rank's kernels (CUDA_MPS_CLIENT_PRIORITY, set "
        "before its CUDA context): below_normal lets the rollout's decode kernels take SMs first as the "
        "trainer's GEMM blocks finish, for a loop bound by generation. Ignored without MPS",
        ("normal", "below_normal"),
    )


@dataclass
class ModelConfig:
    """Which policy model to train."""

    kind: str = _f(
        "tiny",
        "tiny: built-in small transformer; hf: local HF checkpoint; "
        "random: a real architecture's shape (model.preset) with random weights, for throughput work",
        ("tiny", "hf", "random"),
    )
    preset: str = _f(
        "qwen2-0.5b", "shape used when kind=random (vocab, layers, heads as the released model)",
        ("qwen2-0.5b", "qwen2-1.5b"),
    )
    path: str | None = _f(None, "local HF checkpoint directory (required when kind=hf)")
    hidden_size: int = _f(128, "tiny model hidden size")
    n_layers: int = _f(2, "tiny model number of transformer layers")
    n_heads: int = _f(4, "tiny model attention heads (must divide hidden_size)")
    intermediate_size: int = _f(512, "tiny model MLP width")
    max_seq_len: int = _f(64, "maximum prompt + completion length in tokens")
    dtype: str = _f("float32", "parameter dtype", ("float32", "bfloat16", "float16"))
    device: str = _f(
        "auto", "auto picks cuda when available, else cpu", ("auto", "cpu", "cuda")
    )


@dataclass
class WarmupConfig:
    """Supervised pass before RL, so a tiny model starts with non-zero reward."""

    enabled: bool = _f(True, "run the supervised warm-up before RL")
    steps: int = _f(300, "warm-up optimizer steps")
    batch_size: int = _f(64, "warm-up examples per step")
    lr: float = _f(1e-3, "warm-up learning rate")
    flaw: float = _f(
        0.0,
        "fraction of warm-up answers taken from a flawed teacher (arithmetic: forgotten carries); "
        "RL must then fix what the imperfect SFT data taught",
    )


@dataclass
class TaskConfig:
    """Prompts and rewards."""

    kind: str = _f(
        "arithmetic",
        "arithmetic: generated sums; jsonl: prompt/answer files; "
        "synthetic: random token prompts with long-tailed response lengths (throughput work)",
        ("arithmetic", "jsonl", "synthetic"),
    )
    train_path: str | None = _f(None, "training JSONL file (required when kind=jsonl)")
    eval_path: str | None = _f(None, "held-out JSONL file (required when kind=jsonl)")
    digits: int = _f(2, "arithmetic: digits per operand")
    ops: str = _f("+", "arithmetic: operator characters to sample from, e.g. '+-'")
    n_eval: int = _f(200, "arithmetic: size of the generated held-out set")
    seed: int = _f(1234, "seed of the task generator (independent of run.seed)")
    prompt_len: int = _f(128, "synthetic: prompt length in tokens")
    len_median: float = _f(48.0, "synthetic: median response length in tokens (log-normal)")
    len_sigma: float = _f(1.0, "synthetic: log-normal sigma of response lengths; a few reach max_new_tokens")


@dataclass
class RolloutConfig:
    """Generation side of the asynchronous loop."""

    eta: int = _f(
        4,
        "staleness bound: max policy versions a sample may lag the trainer (0 = on-policy)",
    )
    group_size: int = _f(8, "samples per prompt; rewards are normalised within a group")
    max_new_tokens: int = _f(8, "maximum completion length in tokens")
    temperature: float = _f(1.0, "sampling temperature")
    top_p: float = _f(1.0, "nucleus sampling mass")
    max_concurrent_groups: int = _f(8, "groups in flight per rollout rank")
    interrupt: str = _f(
        "recompute",
        "on new weights, recompute the KV cache of in-flight sequences or keep the stale one",
        ("recompute", "keep"),
    )
    engine: str = _f(
        "auto",
        "hf: HF forward with a dynamic cache; fast: continuous batching over a preallocated per-slot KV "
        "cache (CUDA graphs on GPU); auto: fast on CUDA, hf on CPU",
        ("auto", "hf", "fast"),
    )
    cuda_graphs: bool = _f(True, "fast engine: capture the decode step in a CUDA graph")
    batch_bucket_step: int = _f(
        64,
        "fast engine: decode batch sizes (one CUDA graph each) are max_batch and its halves, and above 128 "
        "slots every this many too: a decode GEMM of more than ~128 rows is compute-bound, so padding rows "
        "are not free (320 live of 512: 2.00 ms per step against 2.17 on an H200); 0: halves only (a multiple "
        "of 16)",
    )
    stream_priority: str = _f(
        "normal",
        "on CUDA: the priority of the stream the rollout rank runs its work on; high = the device's highest, "
        "so a decode step's kernels are scheduled ahead of a trainer's sharing the GPU (its priority counts "
        "against theirs under MPS)",
        ("normal", "high"),
    )
    compile: bool = _f(True, "fast engine on CUDA: torch.compile the decode layer (fewer, fused kernels)")
    decode_attention: str = _f(
        "auto",
        "fast engine on CUDA: keys per program x warps [x keys per pipelined loop tile] of the split-K decode "
        "attention kernel, h = a slot's KV heads in neighbouring programs, p = one program per pair of KV heads; "
        "auto times "
        "each at engine start and keeps the fastest (a fixed one makes generation reproducible across runs, "
        "since the split changes the floating-point summation order)",
        ("auto", "64x4", "32x2", "128x4", "128x8", "256x8", "256x4x64", "512x4x64", "1024x4x64", "512x8x128",
         "128x4h", "256x4x64h", "512x4x64h", "1024x4x64h", "256x4x32p", "512x4x32p", "512x8x64p", "1024x4x32p"),
    )
    decode_layer: str = _f(
        "folded",
        "fast engine on CUDA: how the decode layer runs its GEMMs. inplace: cuBLAS, each residual add done by "
        "the GEMM into the residual stream, norms and activation compiled; folded: as inplace with both norms "
        "folded into the projections (a second copy of the q/k/v and gate/up weights; the row scales applied "
        "by the attention and SiLU-mul kernels, 48 fewer launches per step); fused: norm+projections and the "
        "MLP block compiled whole (the residual adds then cost a copy each)",
        ("inplace", "folded", "fused"),
    )
    dtype: str = _f(
        "auto",
        "dtype of the rollout's copy of the weights (the trainer keeps model.dtype as master weights); "
        "auto: bfloat16 on CUDA, model.dtype on CPU",
        ("auto", "float32", "bfloat16", "float16"),
    )
    abort_stale: bool = _f(
        True,
        "with trainer.stale_policy=reject: stop decoding a group once its oldest token is more than eta versions "
        "behind the rollout's weights (the trainer must reject it) and deliver it as it stands, rejected and "
        "logged like any other, so its slots serve fresh groups",
    )
    gated_yield_ms: float = _f(
        0.0,
        "rollout sharing its GPU with a trainer: sleep this long after each decode step while the staleness "
        "gate admits nothing, the trainer already holds its next batch and under a quarter of the slots are "
        "live, so a thin tail does not take GPU time slices from the trainer (0 = never; a dedicated GPU wants 0)",
    )


@dataclass
class TrainerConfig:
    """Decoupled PPO objective and optimizer."""

    backend: str = _f("torch", "training backend (areal_hpc/registry.py): torch, data parallel over the trainer ranks",
                      ("torch",))
    lr: float = _f(1e-4, "learning rate")
    batch_size: int = _f(64, "samples per step; a multiple of rollout.group_size")
    eps_clip: float = _f(0.2, "PPO clip range")
    behav_imp_weight_cap: float = _f(
        5.0, "cap on the behaviour importance weight (must be > 1)"
    )
    stale_policy: str = _f(
        "reject",
        "samples older than eta: reject them, or downweight them by stale_weight",
        ("reject", "downweight"),
    )
    stale_weight: float = _f(
        0.5,
        "loss weight factor for samples older than eta when downweighting, in (0, 1]",
    )
    token_budget: int = _f(2048, "micro-batch token budget")
    proximal_logp: str = _f(
        "forward",
        "the proximal policy's log-probs: forward = the training forward's own, detached (exact: each batch "
        "takes one optimizer step, so the weights before it are the weights of that forward; saves a "
        "forward pass); recompute = a separate no-grad pass before the step (AReaL's way)",
        ("forward", "recompute"),
    )
    grad_clip: float = _f(1.0, "max global gradient norm")
    packing: str = _f(
        "auto",
        "packed: variable-length sequences concatenated without padding (varlen attention); "
        "padded: right-padded rows; auto: packed on CUDA, padded on CPU",
        ("auto", "packed", "padded"),
    )
    compute_dtype: str = _f(
        "auto",
        "matmul precision; bfloat16 keeps fp32 master weights and optimizer state (autocast); "
        "auto: bfloat16 on CUDA, float32 on CPU",
        ("auto", "float32", "bfloat16"),
    )
    activation_checkpointing: bool = _f(False, "recompute each layer's activations in backward (less memory)")
    compile: bool = _f(False, "torch.compile each transformer layer of the packed path (CUDA)")
    share_prompts: bool = _f(
        True,
        "packed micro-batches: a group's samples share one copy of their prompt in the stream (its responses "
        "attend to it; same log-probs and gradients), so a prompt is not computed once per sample; false: "
        "every sample carries its own prompt",
    )
    token_bucket: int = _f(
        0,
        "pad each packed micro-batch to a multiple of this many tokens (0: no padding); with compile, "
        "the layers then compile once per bucket with static shapes (faster kernels), all before step 1",
    )
    weight_decay: float = _f(0.0, "AdamW weight decay")
    adam_betas: list[float] = field(
        default_factory=lambda: [0.9, 0.999],
        metadata={"help": "AdamW betas [beta1, beta2]"},
    )
    adam_eps: float = _f(1e-8, "AdamW epsilon")
    adv_eps: float = _f(
        1e-6, "epsilon added to the group std when normalising advantages"
    )


@dataclass
class TransportConfig:
    """Rollout -> trainer sample transport."""

    kind: str = _f(
        "auto",
        "shm: shared-memory ring; hdf5: finished log shards on a shared filesystem; "
        "auto: shm for rollout/trainer pairs on one node, hdf5 across nodes",
        ("auto", "shm", "hdf5"),
    )
    ring_bytes: int = _f(8388608, "ring buffer size in bytes (>= 65536)")
    retain_shards: bool = _f(True, "keep consumed rollout shards as the log (false: delete them in hdf5 mode)")
    poll_s: float = _f(0.002, "how often a trainer looks for new shards in hdf5 mode (seconds)")


@dataclass
class LogConfig:
    """The HDF5 rollout log (docs/rollout-log.md): shard sizes and compression."""

    shard_samples: int = _f(512, "samples per rollout shard (a shard also closes when old or idle)")
    flush_s: float = _f(2.0, "close an open rollout shard after this many seconds")
    trainer_shard_steps: int = _f(20, "training steps per trainer shard")
    compression: str = _f(
        "lzf",
        "dataset compression (lzf: fast, built into h5py; gzip: smaller, readable by every HDF5 tool)",
        ("gzip", "lzf", "none"),
    )


@dataclass
class WeightsConfig:
    """Trainer -> rollout weight broadcast."""

    backend: str = _f(
        "auto", "auto: nccl on GPU, gloo on CPU", ("auto", "gloo", "nccl")
    )
    bucket_mb: int = _f(64, "broadcast bucket size in MiB")
    kind: str = _f(
        "auto",
        "broadcast: gloo/NCCL bucketed broadcast; shared: trainer and rollout on one node share buffers "
        "(CUDA IPC on a shared GPU, shared memory on CPU), no copy through the network or host; "
        "auto: shared when every rollout rank is on trainer rank 0's node and device, else broadcast",
        ("auto", "broadcast", "shared"),
    )


@dataclass
class EvalConfig:
    """Held-out evaluation with greedy decoding."""

    enabled: bool = _f(True, "evaluate before and after training")
    n: int = _f(200, "number of held-out prompts")


@dataclass
class Config:
    """Root configuration; ``async_`` is written ``async`` in YAML and overrides."""

    async_: bool = field(
        default=True,
        metadata={
            "help": "asynchronous loop; false = synchronous baseline (generate a batch, then train)",
            "yaml_key": "async",
        },
    )
    run: RunConfig = field(
        default_factory=RunConfig, metadata={"help": "run identity and length"}
    )
    cluster: ClusterConfig = field(
        default_factory=ClusterConfig, metadata={"help": "ranks and launcher"}
    )
    model: ModelConfig = field(
        default_factory=ModelConfig, metadata={"help": "policy model"}
    )
    warmup: WarmupConfig = field(
        default_factory=WarmupConfig, metadata={"help": "supervised warm-up"}
    )
    task: TaskConfig = field(
        default_factory=TaskConfig, metadata={"help": "prompts and rewards"}
    )
    rollout: RolloutConfig = field(
        default_factory=RolloutConfig, metadata={"help": "generation"}
    )
    trainer: TrainerConfig = field(
        default_factory=TrainerConfig, metadata={"help": "PPO trainer"}
    )
    transport: TransportConfig = field(
        default_factory=TransportConfig, metadata={"help": "sample transport"}
    )
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "HDF5 rollout log"})
    weights: WeightsConfig = field(
        default_factory=WeightsConfig, metadata={"help": "weight broadcast"}
    )
    eval: EvalConfig = field(
        default_factory=EvalConfig, metadata={"help": "held-out evaluation"}
    )
