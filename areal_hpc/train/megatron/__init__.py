"""The Megatron-core training backend (``trainer.backend: megatron``): the model built from an HF config
(``build``), HF <-> Megatron weights per tensor-parallel rank and pipeline stage (``convert``), and what
can be converted (``shapes``). Importing this package does not import megatron-core."""
