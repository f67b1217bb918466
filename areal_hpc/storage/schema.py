"""The HDF5 rollout log's format contract, schema version 3 (docs/rollout-log.md), as constants.

Writer, reader and docs all take names and dtypes from here, so the format is defined once. The
tables are read-only mappings: the contract is not something a caller can change at run time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

#: Version every writer stamps on its shards; readers also accept the older versions in ``READABLE_VERSIONS``.
SCHEMA_VERSION = 3
READABLE_VERSIONS: tuple[int, ...] = (1, 2, 3)

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
        "reward_seconds": "float32", "reward_timed_out": "uint8", "worker": "int32",
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

#: Row fields a shard of an older schema version lacks: kind -> {name: (version that added it, value read
#: in its place)}. A schema-1 rollout shard reads ``reward_seconds`` as NaN (not measured) and
#: ``reward_timed_out`` as 0.
ADDED_ROW_FIELDS: Mapping[str, Mapping[str, tuple[int, float]]] = _ro({
    ROLLOUT: {"reward_seconds": (2, float("nan")), "reward_timed_out": (2, 0), "worker": (3, -1)},
    TRAINER: {},
})

#: Rollout row field -> the ``Trajectory`` attribute it records, where the names differ (every other row
#: field has its attribute's name). The writer and the shard transport both take the mapping from here.
ROLLOUT_ROW_ATTRS: Mapping[str, str] = MappingProxyType({
    "prompt_len": "n_prompt", "response_len": "n_response", "response_text": "text"})
#: Rollout row fields derived from the ragged arrays, not given to a ``Trajectory`` when one is rebuilt.
DERIVED_ROLLOUT_ROWS: tuple[str, ...] = ("prompt_len", "response_len")

#: The evaluation table of trainer shards, long format (one value per row): held-out metrics such as
#: pass@1 at a step. Optional datasets of equal length: a shard has all three or none. Evaluations are
#: not training steps, so they are not rows of the shard (``n_rows`` counts steps only).
EVAL_FIELDS: Mapping[str, str] = MappingProxyType({"eval_step": "int64", "eval_metric": STRING,
                                                   "eval_value": "float64"})

#: Datasets only some shards have (any length): kind -> {name: dtype}. The trainer's final shard has the
#: leftovers; a trainer shard written after evaluations has the eval table.
OPTIONAL_DATASETS: Mapping[str, Mapping[str, str]] = _ro({
    ROLLOUT: {},
    TRAINER: {"leftover_sample_id": "int64", **EVAL_FIELDS},
})

#: Root attributes every shard has; the writer sets the last six itself.
ROOT_ATTRS: tuple[str, ...] = ("run_id", "config_yaml", "rank", "schema_version", "kind", "index", "seq", "created",
                               "n_rows")
WRITER_ATTRS: tuple[str, ...] = ("schema_version", "kind", "index", "seq", "created", "n_rows")
#: Root attribute of trainer shards: 1 on the last shard of a normal stop (the one with ``leftover_sample_id``)
#: and on any eval-only shard written after it, else 0.
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
