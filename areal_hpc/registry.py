"""Rollout engines and training backends by name: the one place a new one is added.

Each entry names a factory as ``module:function``, imported only when chosen, so an engine's heavy
dependencies (vLLM, Megatron-core) are needed only by the runs that pick it. Factories take the run's
config and return an object that implements the protocol of ``api.py``:

* rollout engine: ``factory(cfg, model, tokenizer, seed) -> InferenceEngine``
* train backend: ``factory(cfg, model, tokenizer, dp_group) -> TrainEngine``

The config's choices for ``rollout.engine`` and ``trainer.backend`` are these names (a test checks).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

ROLLOUT_ENGINES: Mapping[str, str] = MappingProxyType({
    "hf": "areal_hpc.rollout.build:hf_engine",
    "fast": "areal_hpc.rollout.build:fast_engine",
    "vllm": "areal_hpc.rollout.build:vllm_engine",
})

TRAIN_BACKENDS: Mapping[str, str] = MappingProxyType({
    "torch": "areal_hpc.train.engine:from_config",
    "megatron": "areal_hpc.train.megatron.engine:from_config",
})


def _load(table: Mapping[str, str], name: str, key: str) -> Callable[..., Any]:
    if name not in table:
        raise ValueError(f"{key}={name!r} is not registered; choose one of {'|'.join(table)}")
    module, _, attr = table[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def rollout_engine_factory(name: str) -> Callable[..., Any]:
    return _load(ROLLOUT_ENGINES, name, "rollout.engine")


def train_backend_factory(name: str) -> Callable[..., Any]:
    return _load(TRAIN_BACKENDS, name, "trainer.backend")
