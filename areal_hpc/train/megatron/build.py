"""A Megatron-core ``GPTModel`` in the shape of an HF Qwen2 or Llama-family checkpoint.

Every setting that changes the function the model computes is taken from the HF config or fixed to what
HF does (no dropout in the hidden states, RoPE in HF's rotate-half layout, softmax scale 1/sqrt(head_dim),
RMSNorm without zero-centred gamma); the rest (parallel sizes, fusions, recomputation) is the caller's,
through ``overrides``. The weights come from ``convert.hf_to_megatron``.

Facts of megatron-core 0.16.1 this relies on:

* ``TransformerConfig.kv_channels`` sets the head size independently of hidden/heads, so a checkpoint with
  an explicit ``head_dim`` maps exactly.
* Its RoPE takes the positions 0..s-1 of each row (or of each packed sequence through
  ``packed_seq_params``), not ``position_ids``: sequences must start at position 0, as ours do.
* The local spec's norm is ``torch.nn.RMSNorm`` (without Apex): built in fp32 whatever ``params_dtype``
  says, and it refuses sequence parallelism.
* Building needs ``torch.distributed`` and either ``parallel_state.initialize_model_parallel`` or a
  ``pg_collection``, even for one rank; on CPU also ``use_cpu_initialization=True`` (the default here when
  CUDA is absent). With a tied head and more than one pipeline stage the build itself wants CUDA (it
  all-reduces the last stage's copy of the embedding on the GPU). A forward needs CUDA
  and, on GPU, ``tensor_parallel.model_parallel_cuda_manual_seed`` (its RNG tracker wraps the attention
  dropout even at p=0).
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

from areal_hpc.train.megatron.shapes import MegatronShape


def require_megatron() -> None:
    """One line naming the fix, where megatron-core's own error would be a ModuleNotFoundError deep in a
    backend factory."""
    if importlib.util.find_spec("megatron") is None or importlib.util.find_spec("megatron.core") is None:
        raise ImportError("trainer.backend=megatron needs megatron-core: pip install 'areal_hpc[megatron]' "
                          "(megatron-core==0.16.1), or set trainer.backend=torch")


@functools.cache
def te_available() -> bool:
    """Transformer Engine imports: build with its layer spec (fused norm+linear, its attention) and convert
    with ``te=True`` (both default to this answer)."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # noqa: BLE001 - an installed TE without its CUDA libraries fails with other errors too
        return False
    return True


def layer_spec(te: bool | None = None) -> Any:
    """The decoder layer spec: Transformer Engine's where it is installed (``te=None``), megatron's local
    modules otherwise (the state dict names differ: ``convert``'s ``te`` follows the same default)."""
    require_megatron()
    te = te_available() if te is None else te
    from megatron.core.models.gpt import gpt_layer_specs

    return (gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec() if te
            else gpt_layer_specs.get_gpt_layer_local_spec())


def model_config(hf_config: Any, *, params_dtype: torch.dtype, tp_size: int = 1, pp_size: int = 1,
                 **overrides: Any) -> Any:
    """The ``TransformerConfig`` of ``hf_config``'s decoder. ``overrides`` are further TransformerConfig
    fields (recompute, fusions, ``sequence_parallel``...); ones that would change the model's function are
    refused."""
    require_megatron()
    from megatron.core.transformer.transformer_config import TransformerConfig

    s = MegatronShape.of(hf_config)
    s.check_parallel(tp_size, pp_size)
    exact = dict(
        num_layers=s.n_layers, hidden_size=s.hidden, ffn_hidden_size=s.ffn,
        num_attention_heads=s.n_heads, num_query_groups=s.n_groups, kv_channels=s.head_dim,
        normalization="RMSNorm", layernorm_epsilon=s.eps, layernorm_zero_centered_gamma=False,
        gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=s.qkv_bias, qk_layernorm=False,
        hidden_dropout=0.0, attention_dropout=s.attention_dropout,
        rotary_interleaved=False, apply_query_key_layer_scaling=False, softmax_scale=None,
    )
    clash = sorted(set(overrides) & set(exact))
    if clash:
        raise ValueError(f"model_config: {clash[0]} comes from the checkpoint's config.json; leave it out of the "
                         "overrides")
    settings: dict[str, Any] = dict(
        tensor_model_parallel_size=tp_size, pipeline_model_parallel_size=pp_size,
        params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16, fp16=params_dtype == torch.float16,
        # a pipeline sends activations between stages in this dtype; megatron refuses None with pp > 1
        pipeline_dtype=params_dtype if pp_size > 1 else None,
        use_cpu_initialization=not torch.cuda.is_available(),
        # the weights are overwritten from the checkpoint right after the build: random init is wasted time
        perform_initialization=False,
    )
    settings.update(overrides)
    return TransformerConfig(**exact, **settings)


def gpt_kwargs(hf_config: Any, *, tp_size: int = 1, max_sequence_length: int | None = None) -> dict[str, Any]:
    """``GPTModel``'s arguments besides config, spec and process groups. The vocabulary is padded for the
    tensor-parallel split (``shapes.padded_vocab_size``: logits past the HF vocabulary must be dropped).
    ``max_sequence_length`` (the checkpoint's max_position_embeddings by default) sizes only learned
    position embeddings, which RoPE models have none of."""
    s = MegatronShape.of(hf_config)
    return dict(
        vocab_size=s.padded_vocab(tp_size), max_sequence_length=max_sequence_length or s.max_positions,
        share_embeddings_and_output_weights=s.tied, position_embedding_type="rope", rotary_percent=1.0,
        rotary_base=s.rope_theta, rope_scaling=s.rope_scaling_factor is not None,
        rope_scaling_factor=s.rope_scaling_factor or 8.0,
    )


def build_gpt_model(hf_config: Any, *, params_dtype: torch.dtype, tp_size: int = 1, pp_size: int = 1,
                    pp_rank: int = 0, te: bool | None = None, **overrides: Any) -> Any:
    """Pipeline stage ``pp_rank``'s ``GPTModel`` (embedding on the first stage, final norm and output layer on
    the last), on the current CUDA device or on CPU. Megatron's parallel_state must already be initialised
    with the same sizes, and ``pp_rank`` must be this process's pipeline rank."""
    from megatron.core.models.gpt import GPTModel

    config = model_config(hf_config, params_dtype=params_dtype, tp_size=tp_size, pp_size=pp_size, **overrides)
    model = GPTModel(config=config, transformer_layer_spec=layer_spec(te), pre_process=pp_rank == 0,
                     post_process=pp_rank == pp_size - 1, **gpt_kwargs(hf_config, tp_size=tp_size))
    # the local spec's torch.nn.RMSNorm is built without params_dtype (fp32 in a bf16 model); megatron's
    # training wrapper (Float16Module) casts the whole module, do it here so the model is one dtype as HF's is
    return model.to(dtype=params_dtype)
