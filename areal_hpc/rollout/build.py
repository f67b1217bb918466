"""Pick and build the rollout engine a config asks for (``registry.py``), in the rollout's own weight dtype."""

from __future__ import annotations

import logging

import torch

from areal_hpc.api import InferenceEngine
from areal_hpc.config import Config
from areal_hpc.model.build import DTYPES
from areal_hpc.model.qwen2 import check_supported
from areal_hpc.model.tokenizer import Tokenizer
from areal_hpc.registry import rollout_engine_factory

log = logging.getLogger(__name__)


def rollout_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    """bf16 on CUDA unless told otherwise: generation is memory-bound, half the bytes is twice the speed."""
    name = cfg.rollout.dtype
    if name == "auto":
        name = "bfloat16" if device.type == "cuda" else cfg.model.dtype
    return DTYPES[name]


def engine_kind(cfg: Config, device: torch.device, model: torch.nn.Module) -> str:
    """auto: fast on CUDA for the architectures the packed forward implements, hf otherwise."""
    kind = cfg.rollout.engine
    if kind != "auto":
        return kind
    if device.type != "cuda":
        return "hf"
    try:
        check_supported(model)
    except ValueError as e:
        log.warning("rollout.engine=auto: using hf (%s)", e)
        return "hf"
    return "fast"


def build_engine(cfg: Config, model: torch.nn.Module, tok: Tokenizer, seed: int) -> InferenceEngine:
    device = next(model.parameters()).device
    model.to(rollout_dtype(cfg, device))
    return rollout_engine_factory(engine_kind(cfg, device, model))(cfg, model, tok, seed)


def _common(cfg: Config, seed: int) -> dict:
    r = cfg.rollout
    return dict(max_batch=r.max_concurrent_groups * r.group_size, max_new_tokens=r.max_new_tokens,
                temperature=r.temperature, top_p=r.top_p, interrupt=r.interrupt, seed=seed)


def hf_engine(cfg: Config, model: torch.nn.Module, tok: Tokenizer, seed: int) -> InferenceEngine:
    from areal_hpc.rollout.engine import TorchEngine

    return TorchEngine(model, tok, **_common(cfg, seed))


def fast_engine(cfg: Config, model: torch.nn.Module, tok: Tokenizer, seed: int) -> InferenceEngine:
    from areal_hpc.rollout.fast import FastEngine

    r, common = cfg.rollout, _common(cfg, seed)
    log.info("rollout engine: fast (%s, batch %d, cache %d tokens)", model.dtype, common["max_batch"],
             cfg.model.max_seq_len)
    return FastEngine(model, tok, max_seq_len=cfg.model.max_seq_len, bucket_step=r.batch_bucket_step, **common)
