"""The HDF5 rollout log's format contract, schema version 1 (docs/rollout-log.md), as constants.

Writer, reader and docs all take names and dtypes from here, so the format is defined once. The
tables are read-only mappings: the contract is not something a caller can change at run time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

SCHEMA_VERSION = 1

ROLLOUT = "rollout"
TRAINER = "trainer"
KINDS: tuple[str, ...] = (ROLLOUT, TRAINER)

#: dtype marker of variable-length UTF-8 string datasets (``h5py.string_dtype()`` on disk).
STRING = "str"

#: Folder of each kind inside a run folder.
LOG_DIRS: Mapping[str, str] = MappingProxyType({ROLLOUT: "rollout_log", TRAINER: "trainer_log"})

#: One-letter tag of the index in file names: ``rollout-r000-…``, ``trainer-t000-…``.
NAME_TAGS: Mapping[str, str] = MappingProxyType({ROLLOUT: "r", TRAINER: "t"})

#: Largest chunk (elements) of row datasets and of ragged datasets (offsets count as ragged).
ROW_CHUNK = 65536
RAGGED_CHUNK = 262144

#: gzip level used for ``compression="gzip"``: level 1 costs far less CPU than the default 4 for nearly the same size.
GZIP_LEVEL = 1
COMPRESSIONS: tuple[str, ...] = ("gzip", "lzf", "none")


def _ro(d: dict) -> Mapping:
    return MappingProxyType({k: _ro(v) if isinstance(v, dict) else v for k, v in d.items()})


#: Row datasets (1-D, length ``n_rows``): kind -> {name: dtype}.
ROW_FIELDS: Mapping[str, Mapping[str, str]] = _ro({
    ROLLOUT: {
        "sample_id": "int64", "prompt_id": "int64", "group_id": "int64", "rank": "int32", "reward": "float32",
        "answer_ok": "uint8", "t_start": "float64", "t_end": "float64", "interruptions": "int32",
        "prompt_len": "int32", "response_len": "int32", "response_text": STRING, "answer": STRING,
    },
    TRAINER: {
        "step": "int64", "trained_version": "int64", "time": "float64", "loss": "float32", "grad_norm": "float32",
        "clip_frac": "float32", "cap_frac": "float32", "importance_weight": "float32", "ratio": "float32",
        "approx_kl": "float32",
    },
})

#: Ragged groups: kind -> {group: {field: dtype}}; each group has one ``{group}_offsets`` int64 dataset.
RAGGED_FIELDS: Mapping[str, Mapping[str, Mapping[str, str]]] = _ro({
    ROLLOUT: {
        "prompt": {"prompt_tokens": "int32"},
        "response": {"response_tokens": "int32", "behav_logprobs": "float32", "versions": "int32"},
    },
    TRAINER: {
        "used": {"used_sample_id": "int64", "used_staleness": "int32", "used_weight": "float32"},
        "rejected": {"rejected_sample_id": "int64", "rejected_staleness": "int32"},
    },
})

OFFSETS_DTYPE = "int64"

#: Datasets only some shards have (any length): kind -> {name: dtype}. The trainer's final shard has the leftovers.
OPTIONAL_DATASETS: Mapping[str, Mapping[str, str]] = _ro({
    ROLLOUT: {},
    TRAINER: {"leftover_sample_id": "int64"},
})

#: Root attributes every shard has; the writer sets the last six itself.
ROOT_ATTRS: tuple[str, ...] = ("run_id", "config_yaml", "rank", "schema_version", "kind", "index", "seq", "created",
                               "n_rows")
WRITER_ATTRS: tuple[str, ...] = ("schema_version", "kind", "index", "seq", "created", "n_rows")
#: Root attribute of trainer shards: 1 on the last shard of a normal stop, else 0.
FINAL_ATTR = "final"


def offsets_name(group: str) -> str:
    """Dataset holding a ragged group's row boundaries."""
    return f"{group}_offsets"


def field_group(kind: str, field: str) -> str | None:
    """The ragged group a field belongs to, or None for a row/optional dataset."""
    for group, fields in RAGGED_FIELDS[kind].items():
        if field in fields:
            return group
    return None


def shard_file_name(kind: str, index: int, seq: int) -> str:
    """Final name of a shard: ``rollout-r003-000012.h5``."""
    if kind not in KINDS:
        raise ValueError(f"unknown shard kind {kind!r}; expected one of {KINDS}")
    return f"{kind}-{NAME_TAGS[kind]}{index:03d}-{seq:06d}.h5"


def partial_file_name(kind: str, index: int, seq: int) -> str:
    """Name while being written: hidden, so globs for ``*.h5`` never see a half-written shard."""
    return f".{shard_file_name(kind, index, seq)}.partial"


_SHARD_RE = re.compile(r"(?P<kind>rollout|trainer)-(?P<tag>[rt])(?P<index>\d{3,})-(?P<seq>\d{6,})\.h5")
_LEFTOVER_RE = re.compile(r"\.(?P<name>[^/]+\.h5)\.partial(?:\.bad(?:\.\d+)?)?")


def parse_shard_name(name: str) -> tuple[str, int, int] | None:
    """(kind, index, seq) of a finished shard's file name, or None if it is not one."""
    m = _SHARD_RE.fullmatch(name)
    if m is None or NAME_TAGS[m["kind"]] != m["tag"]:
        return None
    return m["kind"], int(m["index"]), int(m["seq"])


def parse_leftover_name(name: str) -> tuple[str, int, int] | None:
    """(kind, index, seq) of a crashed writer's leftover (``.NAME.partial`` or ``.NAME.partial.bad[.k]``)."""
    m = _LEFTOVER_RE.fullmatch(name)
    return parse_shard_name(m["name"]) if m else None
