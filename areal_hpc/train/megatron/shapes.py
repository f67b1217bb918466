"""What a Megatron-core model of an HF checkpoint looks like, and which checkpoints can become one exactly.

No megatron import here: the converter and these checks run (and are tested) wherever torch does, and a
config error surfaces before megatron-core's slow import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SUPPORTED = ("qwen2", "llama")  # HF model_type values whose block the converter maps exactly

# Megatron's RotaryEmbedding implements Llama 3's frequency scaling with these constants fixed (only the
# factor is an argument); a checkpoint with other values would get other frequencies.
_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope(config: Any) -> dict[str, Any]:
    """RoPE settings: ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling`` (4.x)."""
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type", rope.get("type")) or "default"
    return rope


def check_supported(config: Any) -> None:
    """Qwen2/Qwen2.5 and Llama-family (Llama 2/3, SmolLM2) checkpoints map onto Megatron's GPT block exactly:
    RMSNorm, SwiGLU, GQA, q/k/v biases for Qwen2 only, RoPE plain or with Llama 3's scaling. Anything else
    (another architecture, other RoPE scaling, o_proj/MLP biases, sliding-window layers) is named here, so
    a checkpoint never trains silently as a different model."""
    kind = getattr(config, "model_type", "?")
    if kind not in SUPPORTED:
        raise ValueError(f"trainer.backend=megatron converts the {' and '.join(SUPPORTED)} architectures, this "
                         f"checkpoint is {kind!r}; use trainer.backend=torch for it")
    unsupported = []
    rope = _rope(config)
    if rope["rope_type"] == "llama3":
        off = {k: rope.get(k) for k, v in _LLAMA3_FIXED.items() if float(rope.get(k, -1)) != v}
        if off:
            unsupported.append(f"llama3 RoPE scaling with {off} (Megatron fixes {_LLAMA3_FIXED})")
    elif rope["rope_type"] != "default":
        unsupported.append(f"RoPE scaling {rope['rope_type']!r}")
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        unsupported.append(f"partial_rotary_factor={config.partial_rotary_factor}")
    if getattr(config, "hidden_act", "silu") != "silu":
        unsupported.append(f"activation {config.hidden_act!r}")
    if getattr(config, "mlp_bias", False):
        unsupported.append("MLP biases (mlp_bias=True)")
    if kind == "llama" and getattr(config, "attention_bias", False):
        unsupported.append("attention biases (attention_bias=True)")
    layer_types = getattr(config, "layer_types", None) or []
    if getattr(config, "use_sliding_window", False) or any(t != "full_attention" for t in layer_types):
        unsupported.append("sliding-window attention layers")
    if unsupported:
        raise ValueError(f"trainer.backend=megatron cannot reproduce this {kind} checkpoint's "
                         f"{', '.join(unsupported)}; use trainer.backend=torch for it")


@dataclass(frozen=True)
class MegatronShape:
    """The numbers both the model builder and the converter need, read once from an HF config."""

    kind: str
    n_layers: int
    hidden: int
    n_heads: int
    n_groups: int  # key/value heads: Megatron's num_query_groups
    head_dim: int  # Megatron's kv_channels; may differ from hidden / n_heads
    ffn: int
    vocab: int
    eps: float
    rope_theta: float
    rope_scaling_factor: float | None  # Llama 3 scaling's factor, None for plain RoPE
    qkv_bias: bool
    tied: bool
    max_positions: int
    attention_dropout: float

    @classmethod
    def of(cls, config: Any) -> MegatronShape:
        check_supported(config)
        heads = config.num_attention_heads
        rope = _rope(config)
        return cls(
            kind=config.model_type, n_layers=config.num_hidden_layers, hidden=config.hidden_size,
            n_heads=heads, n_groups=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            ffn=config.intermediate_size, vocab=config.vocab_size, eps=float(config.rms_norm_eps),
            rope_theta=float(rope["rope_theta"]),
            rope_scaling_factor=float(rope["factor"]) if rope["rope_type"] == "llama3" else None,
            # Qwen2 always has q/k/v biases; a Llama has them only with attention_bias (refused above)
            qkv_bias=config.model_type == "qwen2",
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            max_positions=config.max_position_embeddings,
            attention_dropout=float(getattr(config, "attention_dropout", 0.0) or 0.0),
        )

    @property
    def heads_per_group(self) -> int:
        return self.n_heads // self.n_groups

    def padded_vocab(self, tp_size: int) -> int:
        return padded_vocab_size(self.vocab, tp_size)

    def check_parallel(self, tp_size: int, pp_size: int) -> None:
        """Megatron splits attention by query groups and the MLP by columns across tensor-parallel ranks and
        layers evenly across pipeline stages; say which sizes this checkpoint allows instead of failing
        inside megatron with an assertion."""
        for what, n in (("num_key_value_heads", self.n_groups), ("num_attention_heads", self.n_heads),
                        ("intermediate_size", self.ffn)):
            if tp_size < 1 or n % tp_size:
                ok = [d for d in range(1, self.n_groups + 1) if not (self.n_groups % d or self.ffn % d)]
                raise ValueError(f"tensor parallel size {tp_size} does not divide this checkpoint's {what}={n}; "
                                 f"use one of {ok}")
        if pp_size < 1 or self.n_layers % pp_size:
            ok = [d for d in range(1, self.n_layers + 1) if not self.n_layers % d]
            raise ValueError(f"pipeline parallel size {pp_size} does not divide this checkpoint's "
                             f"num_hidden_layers={self.n_layers}; use one of {ok}")


def padded_vocab_size(vocab: int, tp_size: int) -> int:
    """Rows of Megatron's embedding and output layer: the vocabulary rounded up to a multiple of the
    tensor-parallel size, since its vocab-parallel layers assert an even split. The least padding that
    works: padded rows are zero, so their logits are 0, not -inf, and the caller must leave logits past
    ``vocab`` out of any softmax (HF checkpoints of these families already have a vocabulary divisible by
    every usual tensor-parallel size, so the padding is usually none)."""
    return -(-vocab // tp_size) * tp_size


def layer_range(n_layers: int, pp_size: int, pp_rank: int) -> range:
    """Global indices of the decoder layers on pipeline stage ``pp_rank``: Megatron's default even split
    (no uneven first/last stage, no virtual stages), where stage r holds layers r*n/p .. (r+1)*n/p - 1 and
    names them 0 .. n/p - 1 in its state dict."""
    if pp_size < 1 or n_layers % pp_size:
        raise ValueError(f"pipeline parallel size {pp_size} does not divide num_hidden_layers={n_layers}; "
                         "use a size that divides it")
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} is outside 0..{pp_size - 1}")
    per = n_layers // pp_size
    return range(pp_rank * per, (pp_rank + 1) * per)
