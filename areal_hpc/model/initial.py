"""The policy a run starts from: a local HF checkpoint, or the tiny model after a cached warm-up."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from areal_hpc.model.build import build_tiny_model, save_policy
from areal_hpc.model.tokenizer import CharTokenizer
from areal_hpc.model.warmup import supervised_warmup

log = logging.getLogger(__name__)


def warmup_key(cfg) -> str:
    """Everything the warmed-up weights depend on; a change anywhere gives a new cache entry."""
    keyed = {"model": asdict(cfg.model), "warmup": asdict(cfg.warmup), "task": asdict(cfg.task),
             "seed": cfg.run.seed, "format": 1}
    for k in ("device", "path", "kind"):
        keyed["model"].pop(k)
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]


def prepare_initial_policy(cfg, task) -> str:
    """Path of the checkpoint every rank loads as version 0.

    ``model.kind=hf`` uses ``model.path`` as it is (a real checkpoint is already past SFT). The tiny
    model is built, warmed up and cached under ``run.cache_dir`` keyed by the settings it depends on,
    so repeated runs and test cases skip the warm-up.
    """
    if cfg.model.kind == "hf":
        return str(Path(cfg.model.path).expanduser())
    target = Path(cfg.run.cache_dir) / f"tiny-{warmup_key(cfg)}"
    if (target / "config.json").exists():
        log.info("initial policy from cache %s", target)
        return str(target)
    tok = CharTokenizer(task.alphabet)
    need = task.max_prompt_chars() + cfg.rollout.max_new_tokens
    if need > cfg.model.max_seq_len:
        raise ValueError(
            f"model.max_seq_len={cfg.model.max_seq_len} is shorter than the longest prompt plus "
            f"rollout.max_new_tokens ({need}); raise model.max_seq_len"
        )
    model = build_tiny_model(cfg.model.hidden_size, cfg.model.n_layers, cfg.model.n_heads, cfg.model.intermediate_size,
                             cfg.model.max_seq_len, tok.vocab_size, cfg.run.seed)
    losses: list[float] = []
    if cfg.warmup.enabled:
        log.info("supervised warm-up: %d steps (cached afterwards in %s)", cfg.warmup.steps, target)
        losses = supervised_warmup(model, tok, task, steps=cfg.warmup.steps, batch_size=cfg.warmup.batch_size,
                                   lr=cfg.warmup.lr, seed=cfg.run.seed, flaw=cfg.warmup.flaw)
    model.to(torch.float32)
    save_policy(model, tok, target, replace=False)  # concurrent jobs may share the cache
    (target / "warmup.json").write_text(json.dumps({"losses": losses}))
    return str(target)
