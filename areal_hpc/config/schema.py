"""The root ``Config``: one section per component, and the checks that span sections.

Every field carries a default and a ``help`` string, so a bare ``Config()`` is a runnable quickstart,
the CLI can describe each key, and docs/config.md is generated from them
(``python -m areal_hpc.config.reference``). Each section lives in its own module and checks its own
fields (``validate``); what relates keys of different sections is checked here, in ``_check_across``.
YAML keys equal the field names except where ``yaml_key`` says otherwise (``async`` is a Python keyword).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from areal_hpc.config.cluster import ClusterConfig
from areal_hpc.config.elastic import ElasticConfig
from areal_hpc.config.eval import EvalConfig
from areal_hpc.config.fields import check_choices, need
from areal_hpc.config.log import LogConfig
from areal_hpc.config.model import ModelConfig
from areal_hpc.config.prompt import PromptConfig
from areal_hpc.config.reward import RewardConfig
from areal_hpc.config.rollout import RolloutConfig
from areal_hpc.config.run import RunConfig
from areal_hpc.config.task import TaskConfig
from areal_hpc.config.trainer import TrainerConfig
from areal_hpc.config.transport import TransportConfig
from areal_hpc.config.vllm import VllmConfig
from areal_hpc.config.warmup import WarmupConfig
from areal_hpc.config.weights import WeightsConfig

__all__ = ["ClusterConfig", "Config", "ElasticConfig", "EvalConfig", "LogConfig", "ModelConfig", "PromptConfig",
           "RewardConfig", "RolloutConfig", "RunConfig", "TaskConfig", "TrainerConfig", "TransportConfig", "VllmConfig",
           "WarmupConfig", "WeightsConfig"]


def _section(cls: type, help: str) -> dataclasses.Field:
    return field(default_factory=cls, metadata={"help": help})


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
    run: RunConfig = _section(RunConfig, "run identity and length")
    cluster: ClusterConfig = _section(ClusterConfig, "ranks and launcher")
    model: ModelConfig = _section(ModelConfig, "policy model")
    warmup: WarmupConfig = _section(WarmupConfig, "supervised warm-up")
    task: TaskConfig = _section(TaskConfig, "prompts and rewards")
    prompt: PromptConfig = _section(PromptConfig, "prompt construction")
    reward: RewardConfig = _section(RewardConfig, "response scoring")
    rollout: RolloutConfig = _section(RolloutConfig, "generation")
    vllm: VllmConfig = _section(VllmConfig, "vLLM rollout engine")
    trainer: TrainerConfig = _section(TrainerConfig, "PPO trainer")
    transport: TransportConfig = _section(TransportConfig, "sample transport")
    log: LogConfig = _section(LogConfig, "HDF5 rollout log")
    weights: WeightsConfig = _section(WeightsConfig, "weight broadcast")
    elastic: ElasticConfig = _section(ElasticConfig, "attached rollout workers")
    eval: EvalConfig = _section(EvalConfig, "held-out evaluation")

    def validate(self) -> None:
        """Each section's own checks in schema order, then the checks across sections; the first
        violation raises ``ConfigError``."""
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                check_choices(f.metadata.get("yaml_key", f.name), section)
                section.validate()
        _check_across(self)


def _check_across(cfg: Config) -> None:
    """The constraints that relate keys of different sections."""
    m, t, r, tr, cl = cfg.model, cfg.task, cfg.rollout, cfg.trainer, cfg.cluster
    warms_up = cfg.warmup.enabled and m.kind == "tiny"  # a real checkpoint is past SFT: no warm-up
    need(cfg.warmup.flaw == 0.0 or t.kind == "arithmetic" or not warms_up, "warmup.flaw", cfg.warmup.flaw,
         "is only defined for task.kind=arithmetic", "set warmup.flaw=0")
    if t.kind == "synthetic":
        n = t.prompt_len + r.max_new_tokens
        need(m.max_seq_len >= n, "model.max_seq_len", m.max_seq_len,
             f"must cover task.prompt_len + rollout.max_new_tokens = {n}",
             f"set model.max_seq_len={n} or shorten task.prompt_len / rollout.max_new_tokens")
    need(m.kind != "random" or t.kind == "synthetic", "model.kind", m.kind,
         f"needs task.kind=synthetic (a random-weight model has no tokenizer for task.kind={t.kind} text)",
         "set task.kind=synthetic, or use model.kind=tiny|hf")
    need(cfg.async_ or r.eta == 0, "rollout.eta", r.eta, "must be 0 when async=false",
         "the synchronous baseline requires rollout.eta=0; set rollout.eta=0 or async=true")
    need(r.max_new_tokens < m.max_seq_len, "rollout.max_new_tokens", r.max_new_tokens,
         f"must be < model.max_seq_len={m.max_seq_len}", "leave room for the prompt or raise model.max_seq_len")
    need(tr.batch_size % r.group_size == 0, "trainer.batch_size", tr.batch_size,
         f"must be a multiple of rollout.group_size={r.group_size}",
         f"use e.g. trainer.batch_size={max(1, round(tr.batch_size / r.group_size)) * r.group_size}")
    n_groups = tr.batch_size // r.group_size
    mp = tr.tensor_parallel * tr.pipeline_parallel
    need(cl.n_trainer % mp == 0, "trainer.tensor_parallel", tr.tensor_parallel,
         f"(times trainer.pipeline_parallel={tr.pipeline_parallel}) must divide cluster.n_trainer={cl.n_trainer}: a "
         "model replica spans that many trainer ranks",
         f"set cluster.n_trainer to a multiple of {mp}, or a smaller trainer.tensor_parallel")
    need(n_groups % cl.n_trainer == 0, "trainer.batch_size", tr.batch_size,
         f"must hold a number of groups (batch_size/group_size={n_groups}) divisible by "
         f"cluster.n_trainer={cl.n_trainer}",
         f"use trainer.batch_size={cl.n_trainer * max(1, n_groups // cl.n_trainer) * r.group_size} "
         f"so each trainer rank gets whole groups")
    need(tr.token_budget >= m.max_seq_len, "trainer.token_budget", tr.token_budget,
         f"must be >= model.max_seq_len={m.max_seq_len}", "raise trainer.token_budget so one sequence fits")
