"""Released architectures' shapes, for runs and benchmarks with random weights (``model.kind=random``).

Throughput depends on the shape (vocab, widths, heads), not on the weights, so a benchmark can use
the real Qwen2 shapes without downloading a checkpoint; a random model never says EOS, so lengths
come from the task (``task.kind=synthetic``).
"""

from __future__ import annotations

import copy
import importlib
from contextlib import AbstractContextManager, nullcontext

import torch

PRESETS: dict[str, dict] = {
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6),
    "qwen2-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6),
}


def preset_config(name: str, max_positions: int = 32768):
    from transformers import Qwen2Config

    if name not in PRESETS:
        raise ValueError(f"unknown model.preset {name!r}; choose one of {sorted(PRESETS)}")
    kw = dict(PRESETS[name])
    theta = kw.pop("rope_theta")
    cfg = Qwen2Config(max_position_embeddings=max_positions, rms_norm_eps=1e-6, **kw)
    cfg.rope_parameters = {"rope_theta": theta, "rope_type": "default"}
    return cfg


def _skip_library_init() -> AbstractContextManager:
    """transformers' own weight init, skipped: every parameter is drawn again below, and for the 0.5B shape
    the library's pass takes about three times as long as ours on a CPU."""
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return importlib.import_module(module).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return nullcontext()


def _buffers_as_library_makes(model: torch.nn.Module, cfg) -> bool:
    """Whether ``model``'s buffers (the RoPE frequencies) equal those of a one-layer model of the same config built
    with the library's init: skipping the init must only skip drawing parameters."""
    from transformers import Qwen2ForCausalLM

    small = copy.deepcopy(cfg)
    small.num_hidden_layers, small.vocab_size, small.intermediate_size = 1, 16, 16
    with torch.device("cpu"):
        ref = dict(Qwen2ForCausalLM(small).named_buffers())
    got = dict(model.named_buffers())
    return set(ref) <= set(got) and all(torch.equal(got[k].cpu().to(ref[k].dtype), ref[k]) for k in ref)


def build_random(name: str, *, seed: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 max_positions: int = 32768, std: float = 0.02, shrink: dict | None = None) -> torch.nn.Module:
    """A preset-shaped Qwen2ForCausalLM with N(0, std) weights (built on ``device`` directly).

    ``shrink`` replaces config fields (e.g. fewer layers, a smaller vocab) for CPU smoke runs that must go
    through the preset's head shapes without paying for its size."""
    from transformers import Qwen2ForCausalLM

    cfg = preset_config(name, max_positions)
    for key, value in (shrink or {}).items():
        if not hasattr(cfg, key):
            raise ValueError(f"build_random: {key!r} is not a Qwen2Config field")
        setattr(cfg, key, value)
    torch.manual_seed(seed)
    with torch.device(device), _skip_library_init():
        model = Qwen2ForCausalLM(cfg).to(dtype)
    if not _buffers_as_library_makes(model, cfg):  # a version that sets buffers in its init: build it whole
        torch.manual_seed(seed)
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std)
    return model.eval()
