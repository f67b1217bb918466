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


def vllm_engine(cfg: Config, model: torch.nn.Module, tok: Tokenizer, seed: int) -> InferenceEngine:
    from areal_hpc.rollout.vllm_engine import VLLMEngine

    r, common = cfg.rollout, _common(cfg, seed)
    device = next(model.parameters()).device
    emb = model.get_input_embeddings().weight
    tied = getattr(model.config, "tie_word_embeddings", False)
    tied_name = next((n for n, p in model.named_parameters() if p is emb), None) if tied else None
    engine = VLLMEngine(model.name_or_path, tok.stop_ids, params=list(model.named_parameters()),
                        tied_embedding=tied_name, device=device, dtype=rollout_dtype(cfg, device),
                        max_model_len=cfg.model.max_seq_len, opts=cfg.vllm, timeout_s=cfg.run.timeout_s, **common)
    # vLLM holds the weights now; the rank's HF copy keeps only its names and shapes (the receiver's layout).
    model.to("meta")
    model.tie_weights()  # moving breaks the tie; the layout must list the shared tensor once, as the trainer's does
    log.info("rollout engine: vllm %s (%s, batch %d, interrupt=%s)", engine.vllm_version, model.dtype,
             common["max_batch"], r.interrupt)
    return engine
