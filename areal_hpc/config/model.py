"""``model``: which policy model to train."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from areal_hpc.config.fields import ConfigError, need, setting

logger = logging.getLogger(__name__)


@dataclass
class ModelConfig:
    """Which policy model to train."""

    kind: str = setting(
        "tiny",
        "tiny: built-in small transformer; hf: local HF checkpoint; "
        "random: a real architecture's shape (model.preset) with random weights, for throughput work",
        ("tiny", "hf", "random"),
    )
    preset: str = setting(
        "qwen2-0.5b", "shape used when kind=random (vocab, layers, heads as the released model)",
        ("qwen2-0.5b", "qwen2-1.5b"),
    )
    path: str | None = setting(None, "kind=hf: a local HF checkpoint folder (config.json, weights, tokenizer), a "
                                     ".gguf file (converted once into run.cache_dir), or pkg:package/file for one "
                                     "that ships in an installed Python package")
    hidden_size: int = setting(128, "tiny model hidden size")
    n_layers: int = setting(2, "tiny model number of transformer layers")
    n_heads: int = setting(4, "tiny model attention heads (must divide hidden_size)")
    intermediate_size: int = setting(512, "tiny model MLP width")
    max_seq_len: int = setting(64, "maximum prompt + completion length in tokens")
    dtype: str = setting("float32", "parameter dtype", ("float32", "bfloat16", "float16"))
    device: str = setting("auto", "auto picks cuda when available, else cpu", ("auto", "cpu", "cuda"))

    def validate(self) -> None:
        for key in ("hidden_size", "n_layers", "n_heads", "intermediate_size", "max_seq_len"):
            value = getattr(self, key)
            need(value >= 1, f"model.{key}", value, "must be >= 1", f"set model.{key} to a positive integer")
        need(self.hidden_size % self.n_heads == 0, "model.hidden_size", self.hidden_size,
             f"must be divisible by model.n_heads={self.n_heads}", "change model.hidden_size or model.n_heads")
        if self.kind == "hf":
            need(self.path is not None, "model.path", self.path, "is required when model.kind=hf",
                 "point model.path at a local HF checkpoint directory or use model.kind=tiny")
            # pkg: paths and the checkpoint's contents are checked before the ranks start (launch/preflight.py)
            p = Path(self.path).expanduser() if self.path is not None and not self.path.startswith("pkg:") else None
            if p is not None and not (p.is_dir() or (p.suffix.lower() == ".gguf" and p.is_file())):
                raise ConfigError(f"model.path '{self.path}' does not exist; point it at a local HF checkpoint "
                                  f"directory (config.json + weights) or a .gguf file, or use model.kind=tiny")
        elif self.path is not None:
            logger.warning("model.path=%r is ignored because model.kind=%s", self.path, self.kind)
