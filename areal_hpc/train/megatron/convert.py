"""HF <-> Megatron-core state dicts for Qwen2 and Llama-family checkpoints, per tensor-parallel rank and
pipeline stage, bit-exact both ways.

Only views, slices and concatenations: no tensor is cast or computed, so a round trip returns every HF
tensor equal bit for bit, and the weights a Megatron trainer sends out after a step are exactly its own.

The layout Megatron wants (``megatron/core/transformer/attention.py`` and ``mlp.py``):

* ``linear_qkv`` is one column-parallel projection whose output rows are grouped per query group: for
  each group g, its ``heads_per_group`` query heads, then its key head, then its value head. A
  tensor-parallel rank holds a contiguous run of whole groups, so the split is by query groups.
* ``linear_fc1`` is [gate; up] (Megatron's ``glu`` chunks the output in two and applies silu to the first
  half); a rank holds [gate shard; up shard], so gate and up are split separately.
* ``linear_proj`` and ``linear_fc2`` are row-parallel (split on the input dimension), the norms are
  replicated, the embedding and an untied output layer are split by vocabulary rows, padded to
  ``padded_vocab_size`` rows first.

Pipeline stages hold ``layer_range(...)`` with local layer indices; the embedding lives on the first stage,
the final norm and the output layer on the last. With tied embeddings and more than one stage, Megatron's
last stage keeps its own copy of the embedding as ``output_layer.weight`` (all-reduced with the first
stage's gradient); it is written from the HF embedding and ignored on the way back, where the first
stage's embedding is the one HF weight.

``te=True`` names the norms the way Transformer Engine's layer spec has them (fused into the following
linear as ``layer_norm_weight``, the mapping megatron's own modelopt hooks use); ``te=None`` follows
``layer_spec()``'s own choice (TE where it imports). The local spec is what runs without Transformer
Engine and what the tests load with ``strict=True``; the TE names are not loaded in any test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from areal_hpc.train.megatron.build import gpt_kwargs, layer_spec, model_config, te_available
from areal_hpc.train.megatron.shapes import MegatronShape, check_supported, layer_range

# the model side too, so that a backend finds everything about HF <-> Megatron in one module
__all__ = ["check_supported", "gpt_kwargs", "hf_to_megatron", "layer_range", "layer_spec", "megatron_to_hf",
           "model_config", "split_names"]

# how a tensor is laid out across tensor-parallel ranks
REPLICATED, QKV, FC1, ROW, VOCAB = "replicated", "qkv", "fc1", "row", "vocab"

_EXTRA = "_extra_state"
_EMBED, _NORM, _HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
_M_EMBED, _M_NORM, _M_HEAD = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", "output_layer.weight"


@dataclass(frozen=True)
class _Rule:
    megatron: str  # name in a Megatron stage's state dict
    hf: tuple[str, ...]  # the HF tensors it is made of, in order
    split: str  # REPLICATED | QKV | FC1 | ROW | VOCAB


def _layer_rules(shape: MegatronShape, te: bool) -> list[_Rule]:
    """One decoder layer's tensors, names relative to ``decoder.layers.{j}.`` and ``model.layers.{i}.``."""
    a = "self_attn."
    rules = [
        _Rule("self_attention.linear_qkv.layer_norm_weight" if te else "input_layernorm.weight",
              ("input_layernorm.weight",), REPLICATED),
        _Rule("self_attention.linear_qkv.weight", (a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"),
              QKV),
    ]
    if shape.qkv_bias:
        rules.append(_Rule("self_attention.linear_qkv.bias", (a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias"),
                           QKV))
    rules += [
        _Rule("self_attention.linear_proj.weight", (a + "o_proj.weight",), ROW),
        _Rule("mlp.linear_fc1.layer_norm_weight" if te else "pre_mlp_layernorm.weight",
              ("post_attention_layernorm.weight",), REPLICATED),
        _Rule("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), FC1),
        _Rule("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), ROW),
    ]
    return rules


def _layer_extra_state(te: bool) -> tuple[str, ...]:
    """Modules whose ``_extra_state`` (fp8 metadata; None without fp8) ``load_state_dict(strict=True)``
    expects in a layer."""
    mods = ["self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"]
    if te:
        mods.append("self_attention.core_attention")
    return tuple(f"{m}.{_EXTRA}" for m in mods)


def _stage_rules(shape: MegatronShape, pp_size: int, pp_rank: int, te: bool) -> tuple[list[_Rule], list[str]]:
    """Every tensor of one pipeline stage with its HF source, and the stage's ``_extra_state`` keys."""
    rules: list[_Rule] = []
    extra: list[str] = []
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    if first:
        rules.append(_Rule(_M_EMBED, (_EMBED,), VOCAB))
    layer = _layer_rules(shape, te)
    for j, i in enumerate(layer_range(shape.n_layers, pp_size, pp_rank)):
        rules += [_Rule(f"decoder.layers.{j}.{r.megatron}", tuple(f"model.layers.{i}.{h}" for h in r.hf), r.split)
                  for r in layer]
        extra += [f"decoder.layers.{j}.{e}" for e in _layer_extra_state(te)]
    if last:
        rules.append(_Rule(_M_NORM, (_NORM,), REPLICATED))
        if not shape.tied:
            rules.append(_Rule(_M_HEAD, (_HEAD,), VOCAB))
        elif not first:  # the last stage's copy of a tied embedding
            rules.append(_Rule(_M_HEAD, (_EMBED,), VOCAB))
        extra.append(f"output_layer.{_EXTRA}")
    return rules, extra


# -- one tensor, one direction --------------------------------------------------------------------------

def _split(rule: _Rule, hf: Sequence[Tensor], shape: MegatronShape, tp_size: int, tp_rank: int) -> Tensor:
    """Rank ``tp_rank``'s Megatron tensor from its HF tensors."""
    if rule.split == REPLICATED:
        return hf[0]
    if rule.split == ROW:
        return hf[0].chunk(tp_size, dim=1)[tp_rank].contiguous()
    if rule.split == VOCAB:
        t = hf[0]
        pad = shape.padded_vocab(tp_size) - t.shape[0]
        if pad:
            t = torch.cat([t, t.new_zeros(pad, *t.shape[1:])])
        return t.chunk(tp_size)[tp_rank]
    if rule.split == FC1:
        gate, up = (t.chunk(tp_size)[tp_rank] for t in hf)
        return torch.cat([gate, up])
    # QKV: [groups, heads_per_group * d + d + d, ...] laid out group by group, a rank's groups contiguous
    q, k, v = hf
    g, d, rest = shape.n_groups, shape.head_dim, q.shape[1:]
    fused = torch.cat([q.reshape(g, shape.heads_per_group * d, *rest), k.reshape(g, d, *rest),
                       v.reshape(g, d, *rest)], dim=1)
    return fused.chunk(tp_size)[tp_rank].reshape(-1, *rest)


def _gather(rule: _Rule, shards: Sequence[Tensor], shape: MegatronShape) -> tuple[Tensor, ...]:
    """The HF tensors of ``rule`` from every tensor-parallel rank's Megatron tensor, in rank order."""
    if rule.split == REPLICATED:
        return (shards[0],)
    if rule.split == ROW:
        return (torch.cat(list(shards), dim=1) if len(shards) > 1 else shards[0],)
    if rule.split == VOCAB:
        t = torch.cat(list(shards)) if len(shards) > 1 else shards[0]
        return (t[:shape.vocab],)
    if rule.split == FC1:
        halves = [s.chunk(2) for s in shards]
        return torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])
    fused = torch.cat(list(shards)) if len(shards) > 1 else shards[0]
    g, d, rest = shape.n_groups, shape.head_dim, fused.shape[1:]
    q, k, v = fused.reshape(g, -1, *rest).split([shape.heads_per_group * d, d, d], dim=1)
    return tuple(t.reshape(-1, *rest) for t in (q, k, v))


# -- whole stages ---------------------------------------------------------------------------------------

def _ignorable_hf(name: str, shape: MegatronShape, pp_size: int) -> bool:
    """HF tensors a stage may be given but does not take: other stages' tensors (a caller can hand every
    stage the whole checkpoint), a tied lm_head (HF's state_dict lists the embedding under both names) and
    RoPE tables some checkpoints carry."""
    if name.endswith("rotary_emb.inv_freq") or (name == _HEAD and shape.tied):
        return True
    if pp_size > 1 and name in (_EMBED, _NORM, _HEAD):
        return True
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        # a known tensor of a layer this stage does not hold; an unknown one (an o_proj bias, say) is an error
        return int(parts[2]) < shape.n_layers and parts[3] in {h for r in _layer_rules(shape, False) for h in r.hf}
    return False


def hf_to_megatron(hf_state: Mapping[str, Tensor], hf_config: Any, *, tp_size: int = 1, tp_rank: int = 0,
                   pp_size: int = 1, pp_rank: int = 0, te: bool | None = None) -> dict[str, Tensor | None]:
    """Tensor-parallel rank ``tp_rank``'s state dict of pipeline stage ``pp_rank``, for a ``GPTModel`` built
    from ``hf_config`` (``build.py``), ready for ``load_state_dict(strict=True)``.

    Tensors keep their dtype and device and may share storage with ``hf_state``'s. HF tensors the stage
    does not hold are skipped; one that has no place in the model at all is an error, so that a checkpoint
    with more parameters than the mapping knows never loads with some of them dropped."""
    shape = MegatronShape.of(hf_config)
    shape.check_parallel(tp_size, pp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tensor parallel rank {tp_rank} is outside 0..{tp_size - 1}")
    rules, extra = _stage_rules(shape, pp_size, pp_rank, te_available() if te is None else te)
    used = {h for r in rules for h in r.hf}
    for name in hf_state:
        if name not in used and not _ignorable_hf(name, shape, pp_size):
            raise ValueError(f"HF tensor {name!r} has no place in Megatron's {shape.kind} model; the checkpoint has "
                             "parameters the converter does not map: use trainer.backend=torch for it")
    out: dict[str, Tensor | None] = {}
    for r in rules:
        missing = [h for h in r.hf if h not in hf_state]
        if missing:
            raise ValueError(f"HF state has no {missing[0]!r}, which Megatron's {r.megatron!r} needs; pass the "
                             "checkpoint's full state dict (or at least this stage's tensors)")
        out[r.megatron] = _split(r, [hf_state[h] for h in r.hf], shape, tp_size, tp_rank)
    out.update(dict.fromkeys(extra))
    return out


def split_names(hf_config: Any, *, pp_size: int = 1, pp_rank: int = 0, te: bool | None = None) -> set[str]:
    """Names of the Megatron tensors of a stage that are split across tensor-parallel ranks (every one but the
    norms): what a global gradient norm must sum over the ranks. Megatron marks its parameters so only when it
    initialises them, which the trainer skips (the weights come from the checkpoint)."""
    rules, _ = _stage_rules(MegatronShape.of(hf_config), pp_size, pp_rank, te_available() if te is None else te)
    return {r.megatron for r in rules if r.split != REPLICATED}


def megatron_to_hf(shards: Sequence[Mapping[str, Any]], hf_config: Any, *, pp_size: int = 1, pp_rank: int = 0,
                   te: bool | None = None) -> dict[str, Tensor]:
    """HF tensors (global names) of pipeline stage ``pp_rank`` from its tensor-parallel ranks' state dicts,
    given in rank order: ``GPTModel.state_dict()`` or ``named_parameters()`` of each rank.

    The union over all stages is the checkpoint in the names ``named_parameters()`` of the HF model gives:
    a tied head appears once, as ``model.embed_tokens.weight``. Vocabulary padding is stripped;
    ``_extra_state`` entries are ignored. Tensors may be views of the shards' (for one rank, the same
    tensors): copy them before the shards change if they must outlive an optimizer step."""
    if not shards:
        raise ValueError("megatron_to_hf needs the state dict of at least one tensor-parallel rank")
    shape = MegatronShape.of(hf_config)
    tp_size = len(shards)
    shape.check_parallel(tp_size, pp_size)
    rules, _ = _stage_rules(shape, pp_size, pp_rank, te_available() if te is None else te)
    want = {r.megatron for r in rules}
    for rank, shard in enumerate(shards):
        for name in shard:
            if name not in want and not name.endswith(_EXTRA):
                raise ValueError(f"Megatron tensor {name!r} of tensor-parallel rank {rank} is not in pipeline "
                                 f"stage {pp_rank}/{pp_size} of the {shape.kind} mapping; pass each stage's "
                                 "own state dicts with its pp_rank and the te flag the model was built with")
        missing = want - set(shard)
        if missing:
            raise ValueError(f"Megatron state of tensor-parallel rank {rank} has no {sorted(missing)[0]!r}; pass "
                             f"the full state dict of pipeline stage {pp_rank}/{pp_size}")
    out: dict[str, Tensor] = {}
    for r in rules:
        if r.megatron == _M_HEAD and shape.tied:
            continue  # the last stage's copy of the embedding: the first stage's is the HF weight
        for name, t in zip(r.hf, _gather(r, [s[r.megatron] for s in shards], shape), strict=True):
            out[name] = t
    return out
