"""``trainer``: the decoupled PPO objective and its optimizer."""

from __future__ import annotations

from dataclasses import dataclass, field

from areal_hpc.config.fields import need, setting


@dataclass
class TrainerConfig:
    """Decoupled PPO objective and optimizer."""

    backend: str = setting("torch", "training backend (areal_hpc/registry.py): torch, data parallel over the trainer "
                           "ranks; megatron: megatron-core's GPTModel (CUDA; install the megatron extra)",
                           ("torch", "megatron"))
    tensor_parallel: int = setting(
        1, "megatron backend: consecutive trainer ranks that split every weight of a pipeline stage (Megatron "
        "tensor parallelism; a model replica is tensor_parallel * pipeline_parallel ranks, each trains on the "
        "union of their batches); must divide the checkpoint's attention and key/value heads")
    pipeline_parallel: int = setting(
        1, "megatron backend: pipeline stages per model replica, the layers split evenly across them (one "
        "micro-batch in flight at a time: it saves memory, not time); tensor_parallel * pipeline_parallel must "
        "divide cluster.n_trainer and pipeline_parallel the checkpoint's layers")
    distributed_optimizer: str = setting(
        "auto", "megatron backend: Megatron's distributed optimizer (ZeRO-1: each data-parallel replica keeps 1/dp of "
        "the AdamW state; same step). auto: on CUDA with several replicas of one rank each (tensor_parallel = "
        "pipeline_parallel = 1); true: there or an error; false: every rank keeps the whole state",
        ("auto", "true", "false"))
    lr: float = setting(1e-4, "learning rate")
    batch_size: int = setting(64, "samples per step; a multiple of rollout.group_size")
    eps_clip: float = setting(0.2, "PPO clip range")
    behav_imp_weight_cap: float = setting(5.0, "cap on the behaviour importance weight (must be > 1)")
    stale_policy: str = setting(
        "reject",
        "samples older than eta: reject them, or downweight them by stale_weight",
        ("reject", "downweight"),
    )
    stale_weight: float = setting(0.5, "loss weight factor for samples older than eta when downweighting, in (0, 1]")
    token_budget: int = setting(2048, "micro-batch token budget")
    proximal_logp: str = setting(
        "forward",
        "the proximal policy's log-probs: forward = the training forward's own, detached (exact: each batch "
        "takes one optimizer step, so the weights before it are the weights of that forward; saves a "
        "forward pass); recompute = a separate no-grad pass before the step (AReaL's way)",
        ("forward", "recompute"),
    )
    grad_clip: float = setting(1.0, "max global gradient norm")
    packing: str = setting(
        "auto",
        "packed: variable-length sequences concatenated without padding (varlen attention); "
        "padded: right-padded rows; auto: packed on CUDA, padded on CPU",
        ("auto", "packed", "padded"),
    )
    compute_dtype: str = setting(
        "auto",
        "matmul precision; bfloat16 keeps fp32 master weights and optimizer state (autocast); "
        "auto: bfloat16 on CUDA, float32 on CPU",
        ("auto", "float32", "bfloat16"),
    )
    activation_checkpointing: bool = setting(False, "recompute each layer's activations in backward (less memory)")
    compile: bool = setting(False, "torch.compile each transformer layer of the packed path (CUDA)")
    share_prompts: bool = setting(
        True,
        "packed micro-batches: a group's samples share one copy of their prompt in the stream (its responses "
        "attend to it; same log-probs and gradients), so a prompt is not computed once per sample; false: "
        "every sample carries its own prompt (for benchmarks: the e2e bench's A/B of the sharing)",
    )
    token_bucket: int = setting(
        0,
        "pad each packed micro-batch to a multiple of this many tokens (0: no padding); with compile, "
        "the layers then compile once per bucket with static shapes (faster kernels), all before step 1",
    )
    weight_decay: float = setting(0.0, "AdamW weight decay")
    adam_betas: list[float] = field(
        default_factory=lambda: [0.9, 0.999],
        metadata={"help": "AdamW betas [beta1, beta2]"},
    )
    adam_eps: float = setting(1e-8, "AdamW epsilon")
    adv_eps: float = setting(1e-6, "epsilon added to the group std when normalising advantages")

    def validate(self) -> None:
        for key in ("tensor_parallel", "pipeline_parallel"):
            v = getattr(self, key)
            need(v >= 1, f"trainer.{key}", v, "must be >= 1", f"set trainer.{key}=1")
            need(v == 1 or self.backend == "megatron", f"trainer.{key}", v, "applies to trainer.backend=megatron only",
                 f"set trainer.{key}=1 or trainer.backend=megatron")
        need(self.distributed_optimizer != "true" or self.backend == "megatron", "trainer.distributed_optimizer",
             self.distributed_optimizer, "applies to trainer.backend=megatron only",
             "set trainer.distributed_optimizer=auto or trainer.backend=megatron")
        need(self.lr > 0, "trainer.lr", self.lr, "must be > 0", "use a positive learning rate like trainer.lr=1e-4")
        need(self.batch_size >= 1, "trainer.batch_size", self.batch_size, "must be >= 1", "set trainer.batch_size=64")
        need(0 < self.eps_clip < 1, "trainer.eps_clip", self.eps_clip, "must be in (0, 1)", "set trainer.eps_clip=0.2")
        need(self.behav_imp_weight_cap > 1, "trainer.behav_imp_weight_cap", self.behav_imp_weight_cap,
             "must be > 1 (uncapped is not allowed)", "set trainer.behav_imp_weight_cap=5.0")
        need(0 < self.stale_weight <= 1, "trainer.stale_weight", self.stale_weight, "must be in (0, 1]",
             "set trainer.stale_weight=0.5")
        need(self.token_bucket == 0 or 64 <= self.token_bucket <= self.token_budget, "trainer.token_bucket",
             self.token_bucket, f"must be 0 (off) or between 64 and trainer.token_budget={self.token_budget}",
             "set trainer.token_bucket=0, or e.g. token_budget/8 (2048 for a 16384 budget)")
        need(self.grad_clip > 0, "trainer.grad_clip", self.grad_clip, "must be > 0", "set trainer.grad_clip=1.0")
        need(self.weight_decay >= 0, "trainer.weight_decay", self.weight_decay, "must be >= 0",
             "set trainer.weight_decay=0.0")
        need(len(self.adam_betas) == 2 and all(0 <= b < 1 for b in self.adam_betas), "trainer.adam_betas",
             self.adam_betas, "must be two numbers in [0, 1)", "set trainer.adam_betas=[0.9,0.999]")
        need(self.adam_eps > 0, "trainer.adam_eps", self.adam_eps, "must be > 0", "set trainer.adam_eps=1e-8")
        need(self.adv_eps > 0, "trainer.adv_eps", self.adv_eps, "must be > 0", "set trainer.adv_eps=1e-6")
