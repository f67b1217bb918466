"""The policy a run starts from: a local HF checkpoint, the tiny model after a cached warm-up, or a
released architecture's shape with random weights (cached too: building 1.5B parameters takes a while)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from areal_hpc.model.build import DTYPES, build_tiny_model, quiet_transformers, save_policy
from areal_hpc.model.source import check_checkpoint, gguf_cache_name, is_gguf, resolve_model_path
from areal_hpc.model.tokenizer import CharTokenizer, HFTokenizer, initial_tokenizer
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

    ``model.kind=hf`` uses ``model.path`` as it is (a real checkpoint is already past SFT; a GGUF file is
    converted once to a safetensors folder in ``run.cache_dir``: ``model/source.py``). The tiny
    model is built, warmed up and cached under ``run.cache_dir`` keyed by the settings it depends on,
    so repeated runs and test cases skip the warm-up. A random preset is built once per
    (preset, seed, dtype, max_seq_len) and cached the same way, without warm-up: its weights only
    stand in for a real checkpoint's shape.
    """
    if cfg.model.kind == "hf":
        if is_gguf(cfg.model.path):
            return str(_convert_gguf(cfg.model.path, cfg.run.cache_dir, console=cfg.run.progress))
        return str(resolve_model_path(cfg.model.path))
    if cfg.model.kind == "random":
        return _random_policy(cfg, task)
    target = Path(cfg.run.cache_dir) / f"tiny-{warmup_key(cfg)}"
    if (target / "config.json").exists():
        log.info("initial policy from cache %s", target)
        return str(target)
    tok = CharTokenizer(task.alphabet)
    _check_fits(cfg, task)
    model = build_tiny_model(cfg.model.hidden_size, cfg.model.n_layers, cfg.model.n_heads, cfg.model.intermediate_size,
                             cfg.model.max_seq_len, tok.vocab_size, cfg.run.seed)
    losses: list[float] = []
    if cfg.warmup.enabled and cfg.task.kind == "synthetic":
        log.info("no warm-up for task.kind=synthetic: its prompts have no answer format to teach")
    elif cfg.warmup.enabled:
        log.info("supervised warm-up: %d steps (cached afterwards in %s)", cfg.warmup.steps, target)
        # The ranks' console shows warnings only; this one-time wait (minutes on CPU) is said there too.
        console = sys.stderr if cfg.run.progress else None
        if console is not None:
            console.write(f"warm-up: {cfg.warmup.steps} supervised steps on the answer format before RL "
                          f"(once: cached in {target})\n")
            console.flush()
        losses = supervised_warmup(model, tok, task, steps=cfg.warmup.steps, batch_size=cfg.warmup.batch_size,
                                   lr=cfg.warmup.lr, seed=cfg.run.seed, flaw=cfg.warmup.flaw, console=console)
    model.to(torch.float32)
    save_policy(model, tok, target, replace=False)  # concurrent jobs may share the cache
    (target / "warmup.json").write_text(json.dumps({"losses": losses}))
    return str(target)


def _check_fits(cfg, task) -> None:
    need = task.max_prompt_chars() + cfg.rollout.max_new_tokens
    if need > cfg.model.max_seq_len:
        raise ValueError(
            f"model.max_seq_len={cfg.model.max_seq_len} is shorter than the longest prompt plus "
            f"rollout.max_new_tokens ({need}); raise model.max_seq_len"
        )


def _random_policy(cfg, task) -> str:
    from areal_hpc.model.presets import build_random

    m = cfg.model
    _check_fits(cfg, task)
    target = Path(cfg.run.cache_dir) / f"random-{m.preset}-seed{cfg.run.seed}-{m.dtype}-pos{m.max_seq_len}"
    if (target / "config.json").exists():
        log.info("initial policy from cache %s", target)
        return str(target)
    log.info("building random-weight %s (cached afterwards in %s)", m.preset, target)
    if cfg.run.progress:  # a billion-parameter build takes a while: say so where the user looks
        print(f"initial policy: building random-weight {m.preset} (once: cached in {target})", file=sys.stderr,
              flush=True)
    model = build_random(m.preset, seed=cfg.run.seed, dtype=DTYPES[m.dtype], device="cpu", max_positions=m.max_seq_len)
    save_policy(model, initial_tokenizer(m, task.alphabet), target, replace=False)  # concurrent jobs share it
    return str(target)


def _convert_gguf(path: str | Path, cache_dir: str | Path, *, console: bool = False) -> Path:
    """The safetensors checkpoint of a GGUF file, converted on first use and cached under ``cache_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = check_checkpoint(path, "model.path")
    target = Path(cache_dir) / gguf_cache_name(p)
    if (target / "config.json").exists():
        log.info("GGUF checkpoint from cache %s", target)
        return target
    if console:  # dequantizing takes a while: say so where the user looks
        print(f"initial policy: converting {p.name} to safetensors (once: cached in {target})", file=sys.stderr,
              flush=True)
    quiet_transformers()
    with contextlib.redirect_stderr(io.StringIO()):  # the gguf reader's own progress bars, not the run's
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        model = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name)
    # transformers marks a GGUF-loaded model as quantized and refuses to save it, but its tensors are already
    # dequantized to fp32: drop the mark so it saves (and later loads) as the plain checkpoint it now is.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    save_policy(model, HFTokenizer.wrap(tok), target, replace=False)  # concurrent jobs may share the cache
    log.info("converted %s to %s", p, target)
    return target
