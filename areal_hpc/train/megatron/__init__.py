"""The Megatron-core training backend (``trainer.backend: megatron``): the model built from an HF config
(``build``), HF <-> Megatron weights per tensor-parallel rank and pipeline stage (``convert``), and what
can be converted (``shapes``). Importing this package does not import megatron-core."""

from areal_hpc.train.megatron.convert import hf_to_megatron, megatron_to_hf
from areal_hpc.train.megatron.shapes import MegatronShape, check_supported, layer_range, padded_vocab_size

__all__ = ["MegatronShape", "check_supported", "hf_to_megatron", "layer_range", "megatron_to_hf",
           "padded_vocab_size"]
