"""Whole-file HDF5 shards of the rollout log: atomic writes, validated reads (docs/rollout-log.md).

A shard is written under a hidden ``.NAME.partial`` name, flushed, fsynced and only then renamed to
its final name, so any ``*.h5`` a reader sees is complete: a writer killed mid-write leaves only a
``.partial`` behind, and every finished shard stays readable. Readers open files read-only and turn
every kind of damage into a :class:`ShardError` that names the file, so one bad file in a run of
thousands is reported, not a mystery traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from areal_hpc.storage.schema import (
    ADDED_ROW_FIELDS,
    COMPRESSIONS,
    EVAL_FIELDS,
    FINAL_ATTR,
    GZIP_LEVEL,
    KINDS,
    OFFSETS_DTYPE,
    OPTIONAL_DATASETS,
    RAGGED_CHUNK,
    RAGGED_FIELDS,
    READABLE_VERSIONS,
    ROW_CHUNK,
    ROW_FIELDS,
    SCHEMA_VERSION,
    STRING,
    WRITER_ATTRS,
    field_group,
    offsets_name,
    parse_leftover_name,
    parse_shard_name,
    partial_file_name,
    shard_file_name,
)

log = logging.getLogger(__name__)

#: Root attributes the caller must give a writer (the writer adds the others).
REQUIRED_ATTRS = ("run_id", "config_yaml", "rank")


class ShardError(Exception):
    """A shard that cannot be read or written as the contract says; the message names the file and the fix."""


@dataclass
class Shard:
    """One shard in memory. ``ragged[group] = (offsets, {field: concatenated values})``."""

    path: Path
    attrs: dict[str, Any]
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    ragged: dict[str, tuple[np.ndarray, dict[str, np.ndarray]]] = field(default_factory=dict)
    extra: dict[str, np.ndarray] = field(default_factory=dict)  # optional datasets: leftover_sample_id, eval_*

    @property
    def kind(self) -> str:
        return self.attrs["kind"]

    @property
    def n_rows(self) -> int:
        return int(self.attrs["n_rows"])


# -- writing ----------------------------------------------------------------------------------------


class ShardWriter:
    """Writes numbered shards of one (kind, index); a new writer continues a resumed run's numbering.

    ``compression`` defaults to lzf: tools/bench/shard_io.py measured it writing about twice as fast as
    gzip level 1 for files only ~8% larger (docs/performance.md).
    Construction sets aside (renames, never deletes) ``.partial`` files an earlier, crashed writer of
    the same (kind, index) left behind; their new paths are in :attr:`recovered_partials`.
    """

    def __init__(self, directory: str | Path, kind: str, index: int, *, attrs: dict[str, Any],
                 compression: str = "lzf") -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown shard kind {kind!r}; expected one of {KINDS}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}; expected one of {COMPRESSIONS}")
        if index < 0:
            raise ValueError(f"shard index must be >= 0, got {index}")
        missing = [k for k in REQUIRED_ATTRS if k not in attrs]
        if missing:
            raise ValueError(f"ShardWriter attrs lack {missing}: every shard carries {REQUIRED_ATTRS}")
        reserved = [k for k in attrs if k in WRITER_ATTRS]
        if reserved:
            raise ValueError(f"ShardWriter attrs {reserved} are set by the writer itself; drop them")
        self.directory = Path(directory)
        self.kind, self.index, self.compression = kind, int(index), compression
        self.attrs = dict(attrs)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._seq = 0
        leftovers: list[Path] = []
        for entry in os.scandir(self.directory):
            parsed = parse_shard_name(entry.name)
            if parsed is not None and parsed[:2] == (kind, self.index):
                self._seq = max(self._seq, parsed[2] + 1)
            elif entry.name.endswith(".partial"):
                parsed = parse_leftover_name(entry.name)
                if parsed is not None and parsed[:2] == (kind, self.index):
                    leftovers.append(Path(entry.path))
        self.recovered_partials: list[Path] = [_set_aside(p) for p in sorted(leftovers)]
        if leftovers:
            log.warning("%s: %d unfinished shard(s) of %s index %d from a crashed writer moved aside (kept, not "
                        "read): %s; numbering continues at seq %d", self.directory, len(leftovers), kind, self.index,
                        ", ".join(f"{a.name} -> {b.name}" for a, b in zip(leftovers, self.recovered_partials)),
                        self._seq)

    @property
    def next_seq(self) -> int:
        """Sequence number the next :meth:`write` gets."""
        return self._seq

    def write(self, rows: Mapping[str, np.ndarray | list[str]], ragged: Mapping[str, Mapping[str, list[np.ndarray]]],
              extra_attrs: Mapping[str, Any] | None = None,
              extra_datasets: Mapping[str, np.ndarray] | None = None) -> Path:
        """Write one shard atomically and return its final path.

        ``rows[name]`` has one value per row; ``ragged[group][field]`` one array per row. Field names
        must be exactly the schema's for this kind (a missing or extra one is a ValueError).
        """
        row_data, n = _prepare_rows(self.kind, rows)
        ragged_data = _prepare_ragged(self.kind, ragged, n)
        extras = _prepare_extras(self.kind, extra_datasets or {})
        extra_attrs = dict(extra_attrs or {})
        clash = [k for k in extra_attrs if k in WRITER_ATTRS]
        if clash:
            raise ValueError(f"extra_attrs {clash} are set by the writer itself; drop them")
        seq = self._seq
        final = self.directory / shard_file_name(self.kind, self.index, seq)
        partial = self.directory / partial_file_name(self.kind, self.index, seq)
        if final.exists():
            raise ShardError(f"{final}: already exists; is a second writer for {self.kind} index {self.index} "
                             "running on this folder? Give each writer its own index")
        attrs = {**self.attrs, **extra_attrs, "schema_version": SCHEMA_VERSION, "kind": self.kind,
                 "index": self.index, "seq": seq, "created": time.time(), "n_rows": n}
        try:
            with h5py.File(partial, "w", locking=False) as f:
                for k, v in attrs.items():
                    f.attrs[k] = v
                for name, data in row_data.items():
                    _create(f, name, data, ROW_CHUNK, self.compression)
                for group, (offsets, fields) in ragged_data.items():
                    _create(f, offsets_name(group), offsets, RAGGED_CHUNK, self.compression)
                    for name, data in fields.items():
                        _create(f, name, data, RAGGED_CHUNK, self.compression)
                for name, data in extras.items():
                    _create(f, name, data, RAGGED_CHUNK, self.compression)
                f.flush()
            _fsync_path(partial)
            os.replace(partial, final)
        except BaseException:
            partial.unlink(missing_ok=True)  # our own half-written file, never someone's data
            raise
        _fsync_dir(self.directory)
        self._seq = seq + 1
        return final


def set_aside_partials(directory: Path, kind: str, index: int) -> list[Path]:
    """Set aside the ``.partial`` files of a writer that is gone for good (an attached rollout worker killed
    mid-shard: no later writer of its index will do it on start); returns their new paths."""
    prefix = "." + shard_file_name(kind, index, 0).rsplit("-", 1)[0] + "-"
    leftovers = sorted(p for p in Path(directory).glob(f"{prefix}*.h5.partial"))
    return [_set_aside(p) for p in leftovers]


def _set_aside(path: Path) -> Path:
    """Rename a leftover to ``NAME.bad`` (or ``NAME.bad.k`` if taken): keep the bytes, out of the way."""
    target = path.with_name(path.name + ".bad")
    k = 0
    while target.exists():
        k += 1
        target = path.with_name(f"{path.name}.bad.{k}")
    os.rename(path, target)
    return target


def _cast(name: str, values: Any, dtype: str) -> np.ndarray:
    """Values as a 1-D array of the schema dtype; a lossy kind change (float -> int) is a caller bug."""
    if dtype == STRING:
        arr = np.asarray(values, dtype=object)
        if arr.ndim != 1:
            raise ValueError(f"field {name!r} must be 1-D, got shape {arr.shape}")
        if not all(isinstance(s, str) for s in arr):
            bad = next(s for s in arr if not isinstance(s, str))
            raise ValueError(f"field {name!r} must hold str values, got {type(bad).__name__}")
        return arr
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"field {name!r} must be 1-D, got shape {arr.shape}")
    target = np.dtype(dtype)
    if arr.size and not (np.can_cast(arr.dtype, target, "same_kind") or (arr.dtype.kind in "biu"
                                                                          and target.kind in "biu")):
        raise ValueError(f"field {name!r} has dtype {arr.dtype}, which does not convert to {target}")
    return arr.astype(target, copy=False)


def _check_names(what: str, given: Iterable[str], expected: Iterable[str]) -> None:
    given, expected = set(given), set(expected)
    if missing := sorted(expected - given):
        raise ValueError(f"{what}: missing field(s) {missing}")
    if extra := sorted(given - expected):
        raise ValueError(f"{what}: unknown field(s) {extra}; the schema has {sorted(expected)}")


def _prepare_rows(kind: str, rows: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    spec = ROW_FIELDS[kind]
    _check_names(f"{kind} shard rows", rows, spec)
    out = {name: _cast(name, rows[name], dtype) for name, dtype in spec.items()}
    lengths = {name: len(a) for name, a in out.items()}
    n = next(iter(lengths.values()))
    if any(v != n for v in lengths.values()):
        raise ValueError(f"{kind} shard row fields differ in length: {lengths}")
    return out, n


def _prepare_ragged(kind: str, ragged: Mapping[str, Mapping[str, Any]],
                    n: int) -> dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Per group: offsets (one cumsum) and each field concatenated (one np.concatenate per field)."""
    spec = RAGGED_FIELDS[kind]
    _check_names(f"{kind} shard ragged groups", ragged, spec)
    out = {}
    for group, fields in spec.items():
        given = ragged[group]
        _check_names(f"{kind} shard ragged group {group!r}", given, fields)
        lengths = None
        arrays = {}
        for name, dtype in fields.items():
            per_row = given[name]
            if len(per_row) != n:
                raise ValueError(f"ragged field {name!r} has {len(per_row)} rows, the row fields have {n}")
            lens = np.fromiter((len(a) for a in per_row), dtype=np.int64, count=n)
            if lengths is None:
                lengths = lens
            elif not np.array_equal(lens, lengths):
                row = int(np.flatnonzero(lens != lengths)[0])
                raise ValueError(f"ragged group {group!r}: row {row} has {lens[row]} values of {name!r} but "
                                 f"{lengths[row]} of {next(iter(fields))!r}; fields of a group share offsets")
            if n == 0 or int(lens.sum()) == 0:
                arrays[name] = np.zeros(0, dtype)
            else:
                try:
                    arrays[name] = np.concatenate(per_row, dtype=dtype, casting="same_kind")
                except (TypeError, ValueError) as e:
                    raise ValueError(f"ragged field {name!r} does not convert to {dtype}: {e}") from e
                if arrays[name].ndim != 1:
                    raise ValueError(f"ragged field {name!r}: each row must be a 1-D array")
        offsets = np.zeros(n + 1, dtype=OFFSETS_DTYPE)
        np.cumsum(lengths, out=offsets[1:])
        out[group] = (offsets, arrays)
    return out


def _prepare_extras(kind: str, extras: Mapping[str, Any]) -> dict[str, np.ndarray]:
    taken = {*ROW_FIELDS[kind], *(f for g in RAGGED_FIELDS[kind].values() for f in g),
             *(offsets_name(g) for g in RAGGED_FIELDS[kind])}
    out = {}
    for name, values in extras.items():
        if name in taken:
            raise ValueError(f"extra dataset {name!r} clashes with a schema dataset of kind {kind}")
        dtype = OPTIONAL_DATASETS[kind].get(name)
        out[name] = _cast(name, values, dtype) if dtype else np.ascontiguousarray(values).reshape(-1)
    return out


def _create(f: h5py.File, name: str, data: np.ndarray, chunk_max: int, compression: str) -> None:
    n = len(data)
    # Equal chunks no larger than chunk_max: HDF5 stores a partial last chunk at full size (wasted when uncompressed).
    n_chunks = max(1, -(-n // chunk_max))
    kw: dict[str, Any] = {"chunks": (max(1, -(-n // n_chunks)),)}
    if n == 0:
        kw["maxshape"] = (None,)  # HDF5 wants a chunk no larger than the data unless the dataset can grow
    if compression == "gzip":
        kw.update(compression="gzip", compression_opts=GZIP_LEVEL, shuffle=True)
    elif compression == "lzf":
        kw.update(compression="lzf", shuffle=True)
    dtype = h5py.string_dtype("utf-8") if data.dtype == object else data.dtype
    f.create_dataset(name, data=data, dtype=dtype, **kw)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable; some network filesystems cannot fsync a directory, which is fine there."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as e:
        log.debug("cannot open %s to fsync it: %s", directory, e)
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


# -- listing ----------------------------------------------------------------------------------------


def classify_log_dir(directory: str | Path, kind: str | None = None) -> tuple[list[Path], list[Path], list[Path]]:
    """(finished shards by (kind, index, seq), crash leftovers, entries that are not shards at all).

    Shards and leftovers of another kind than ``kind`` are in neither of the first two lists nor the third.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such shard folder")
    finished: list[tuple[tuple[str, int, int], Path]] = []
    leftovers: list[Path] = []
    others: list[Path] = []
    for entry in os.scandir(directory):
        parsed = parse_shard_name(entry.name)
        if parsed is not None:
            if kind is None or parsed[0] == kind:
                finished.append((parsed, Path(entry.path)))
            continue
        parsed = parse_leftover_name(entry.name)
        if parsed is not None:
            if kind is None or parsed[0] == kind:
                leftovers.append(Path(entry.path))
            continue
        others.append(Path(entry.path))
    finished.sort(key=lambda t: t[0])
    return [p for _, p in finished], sorted(leftovers), sorted(others)


def list_shards(directory: str | Path, kind: str | None = None) -> tuple[list[Path], list[Path]]:
    """(finished shards sorted by (kind, index, seq), ``.partial``/``.partial.bad`` leftovers); other files ignored."""
    finished, leftovers, _ = classify_log_dir(directory, kind)
    return finished, leftovers


# -- reading ----------------------------------------------------------------------------------------


def _py(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r", locking=False)
    except FileNotFoundError as e:
        raise ShardError(f"{path}: no such file (deleted after it was listed? with transport.retain_shards=false "
                         "the trainer removes shards it consumed)") from e
    except OSError as e:
        raise ShardError(f"{path}: not a readable HDF5 file ({e}); it is truncated or not a shard (a crash during "
                         "a copy, or a foreign file with a shard's name): copy it again, or move it out of the "
                         "log folder") from e


def _header(f: h5py.File, path: Path) -> dict[str, Any]:
    try:
        attrs = {k: _py(v) for k, v in f.attrs.items()}
    except (OSError, RuntimeError, KeyError, TypeError) as e:
        raise ShardError(f"{path}: root attributes unreadable ({e}); the file is damaged: copy it again or move "
                         "it out of the log folder") from e
    version = attrs.get("schema_version")
    if version is None:
        raise ShardError(f"{path}: no schema_version attribute, so it is not an areal_hpc log shard (this code "
                         f"reads schema versions {_versions()}); move it out of the log folder")
    if version not in READABLE_VERSIONS:
        raise ShardError(f"{path}: schema_version {version}, but this areal_hpc reads schema versions "
                         f"{_versions()}; read it with the areal_hpc version that wrote it (or upgrade)")
    kind = attrs.get("kind")
    if kind not in KINDS:
        raise ShardError(f"{path}: kind attribute {kind!r} is not one of {KINDS}; the file is damaged or foreign")
    n = attrs.get("n_rows")
    if not isinstance(n, int) or n < 0:
        raise ShardError(f"{path}: n_rows attribute {n!r} is not a row count; the file is damaged")
    parsed = parse_shard_name(path.name)
    if parsed is not None and (parsed[0], parsed[1], parsed[2]) != (kind, attrs.get("index"), attrs.get("seq")):
        raise ShardError(f"{path}: its name says {parsed} but its attributes say kind={kind!r} "
                         f"index={attrs.get('index')!r} seq={attrs.get('seq')!r}; was it renamed or copied over "
                         "another shard? Give it back its own name")
    return attrs


def _versions() -> str:
    return ", ".join(map(str, READABLE_VERSIONS))


def read_shard_attrs(path: str | Path) -> dict[str, Any]:
    """Root attributes of a shard, validated (version, kind, n_rows, name) without reading any dataset."""
    path = Path(path)
    with _open(path) as f:
        return _header(f, path)


def _dataset(f: h5py.File, path: Path, name: str, dtype: str, shape: tuple[int, ...] | None,
             why: str) -> h5py.Dataset:
    ds = f.get(name)
    if not isinstance(ds, h5py.Dataset):
        version = _py(f.attrs.get("schema_version"))
        raise ShardError(f"{path}: dataset {name!r} is missing; schema version {version} requires it "
                         "— the file is damaged or was written by other code: move it out of the log folder")
    if dtype == STRING:
        ok = h5py.check_string_dtype(ds.dtype) is not None
    else:
        ok = ds.dtype == np.dtype(dtype)
    if not ok:
        raise ShardError(f"{path}: dataset {name!r} has dtype {ds.dtype}, the schema says {dtype}; the file "
                         "was written by other code")
    if shape is not None and ds.shape != shape:
        raise ShardError(f"{path}: dataset {name!r} has shape {ds.shape} but {why} says {shape}; the file is "
                         "damaged: move it out of the log folder")
    return ds


def _values(ds: h5py.Dataset) -> np.ndarray:
    if h5py.check_string_dtype(ds.dtype) is not None:
        return ds.asstr()[()] if ds.shape[0] else np.zeros(0, dtype=object)
    return ds[()]


def read_shard(path: str | Path, fields: Iterable[str] | None = None) -> Shard:
    """Read (and validate) a shard, or with ``fields`` only those datasets (a ragged field brings its offsets).

    Opens the file read-only; any damage raises :class:`ShardError` naming the file.
    """
    path = Path(path)
    with _open(path) as f:
        attrs = _header(f, path)
        kind, n = attrs["kind"], attrs["n_rows"]
        row_spec, ragged_spec, optional = ROW_FIELDS[kind], RAGGED_FIELDS[kind], OPTIONAL_DATASETS[kind]
        if fields is None:
            want_rows = list(row_spec)
            want_ragged = {g: list(fs) for g, fs in ragged_spec.items()}
            want_extra = list(optional)
        else:
            fields = list(dict.fromkeys([fields] if isinstance(fields, str) else fields))
            want_rows, want_ragged, want_extra = [], {}, []
            for name in fields:
                group = field_group(kind, name)
                if name in row_spec:
                    want_rows.append(name)
                elif group is not None:
                    want_ragged.setdefault(group, []).append(name)
                elif name in optional:
                    want_extra.append(name)
                else:
                    known = [*row_spec, *(f for g in ragged_spec.values() for f in g), *optional]
                    raise ValueError(f"{path}: no field {name!r} in a {kind} shard; fields are {known}")
        shard = Shard(path=path, attrs=attrs)
        added = ADDED_ROW_FIELDS[kind]
        try:
            for name in want_rows:
                if name in added and attrs["schema_version"] < added[name][0]:
                    shard.rows[name] = np.full(n, added[name][1], np.dtype(row_spec[name]))
                    continue
                ds = _dataset(f, path, name, row_spec[name], (n,), "n_rows")
                shard.rows[name] = _values(ds)
            for group, names in want_ragged.items():
                oname = offsets_name(group)
                offsets = _dataset(f, path, oname, OFFSETS_DTYPE, (n + 1,), "n_rows + 1")[()]
                if offsets[0] != 0 or (n and np.any(offsets[1:] < offsets[:-1])):
                    raise ShardError(f"{path}: {oname} does not start at 0 and never decrease; the file is "
                                     "damaged: move it out of the log folder")
                total = int(offsets[-1])
                values = {}
                for name in names:
                    ds = _dataset(f, path, name, ragged_spec[group][name], (total,), f"{oname}[-1]")
                    values[name] = _values(ds)
                shard.ragged[group] = (offsets, values)
            for name in want_extra:
                if name in f:
                    shard.extra[name] = _values(_dataset(f, path, name, optional[name], None, ""))
            _check_eval_table(path, f, shard.extra)
        except ShardError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
            raise ShardError(f"{path}: data unreadable ({type(e).__name__}: {e}); the file is truncated or "
                             "damaged: copy it again, or move it out of the log folder") from e
    return shard


def _check_eval_table(path: Path, f: h5py.File, extra: Mapping[str, np.ndarray]) -> None:
    """The eval datasets are one table, written together: all three or none, of equal lengths."""
    present = [name for name in EVAL_FIELDS if name in f]
    lengths = {name: len(extra[name]) for name in present if name in extra}
    if (present and len(present) != len(EVAL_FIELDS)) or len(set(lengths.values())) > 1:
        raise ShardError(f"{path}: eval datasets {present} of {list(EVAL_FIELDS)} present, lengths {lengths}; the "
                         "file is damaged: move it out of the log folder")


def iter_rows(shard: Shard, group: str | None = None) -> Iterator[dict[str, Any]]:
    """Rows as dicts (row fields plus each read ragged field's slice), for small shards and debugging."""
    groups = list(shard.ragged) if group is None else [group]
    for g in groups:
        if g not in shard.ragged:
            raise KeyError(f"{shard.path}: ragged group {g!r} was not read; read it with fields=")
    for i in range(shard.n_rows):
        row: dict[str, Any] = {name: values[i] for name, values in shard.rows.items()}
        for g in groups:
            offsets, values = shard.ragged[g]
            a, b = offsets[i], offsets[i + 1]
            row.update({name: v[a:b] for name, v in values.items()})
        yield row


def is_final(attrs: Mapping[str, Any]) -> bool:
    """Whether a trainer shard is the last one of a normal stop."""
    return int(attrs.get(FINAL_ATTR, 0)) == 1
