"""Causal LMs through HF transformers: a tiny one built from scratch, or a real checkpoint from disk.

Every policy the system trains or serves is an ``AutoModelForCausalLM`` loaded from a directory, so
the tiny quickstart model travels the same loading path as Qwen2.5-1.5B on a cluster.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from areal_hpc.model.source import check_checkpoint
from areal_hpc.model.tokenizer import CharTokenizer, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``model.device`` as a torch device; ``cuda`` where there is none is an error now, not at the first
    tensor moved (a torch assertion deep in model loading, after the warm-up)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"model.device={name} but this machine has no usable CUDA GPU (torch {torch.__version__}, "
            f"torch.cuda.is_available() is False); use model.device=auto (CUDA where present, else CPU) or cpu"
        )
    return torch.device(name)


def build_tiny_model(hidden_size: int, n_layers: int, n_heads: int, intermediate_size: int,
                     max_seq_len: int, vocab_size: int, seed: int) -> torch.nn.Module:
    """A Qwen2-architecture model small enough to train on a laptop CPU in minutes."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_heads,
        max_position_embeddings=max(max_seq_len, 64),
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    return model


def quiet_transformers() -> None:
    """Per-rank progress bars from transformers would interleave with the run's own progress line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_policy(path: str | Path, dtype: str = "float32", device: str = "cpu") -> tuple[torch.nn.Module, Tokenizer]:
    """Load a causal LM and its tokenizer from a local checkpoint directory (a GGUF file is converted first:
    ``model/source.py``; the ranks get the converted folder)."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    p = check_checkpoint(path)
    model = AutoModelForCausalLM.from_pretrained(str(p), dtype=DTYPES[dtype], attn_implementation="sdpa")
    model.to(resolve_device(device))
    return model, load_tokenizer(p)


def save_policy(model: torch.nn.Module, tokenizer: Tokenizer, path: str | Path, replace: bool = True) -> Path:
    """Write model + tokenizer atomically: a half-written checkpoint never appears under ``path``.

    ``replace=False`` (shared caches): if another process finished the same checkpoint first, keep
    theirs and drop ours, so a reader never sees the directory vanish.
    """
    quiet_transformers()
    final = Path(path)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if isinstance(tokenizer, CharTokenizer) or hasattr(tokenizer, "save"):
        tokenizer.save(tmp)  # type: ignore[attr-defined]
    if final.exists():
        if not replace:
            shutil.rmtree(tmp)
            return final
        shutil.rmtree(final)
    try:
        os.replace(tmp, final)
    except OSError:  # another writer renamed its copy in between
        if replace or not (final / "config.json").exists():
            raise
        shutil.rmtree(tmp)
    return final
