"""A run's HDF5 log as pandas tables and numpy arrays: the API behind notebooks and ``areal-hpc analyze``.

:class:`RunLog` is a snapshot of the shards finished when it was made, so it works on a run that is
still going (a writer's ``.partial`` is reported, never read) and on a crashed one. A damaged shard
is skipped with a warning unless ``strict=True``: one bad file should not hide a whole run. Nothing
here writes to the run folder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from areal_hpc.storage.schema import EVAL_FIELDS, LOG_DIRS, RAGGED_FIELDS, ROLLOUT, ROW_FIELDS, STRING, TRAINER
from areal_hpc.storage.shards import Shard, ShardError, classify_log_dir, is_final, read_shard, read_shard_attrs

log = logging.getLogger(__name__)

#: Columns :meth:`RunLog.samples` derives from the per-token ``versions``.
VERSION_COLUMNS = ("min_version", "max_version", "n_versions")
FATES = ("used", "rejected")
#: Columns of :meth:`RunLog.evals`, one per dataset of the shards' eval table (``EVAL_FIELDS``, in order).
EVAL_COLUMNS = ("step", "metric", "value")


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    kind: str
    index: int
    seq: int
    n_rows: int
    attrs: dict[str, Any]


def version_stats(offsets: np.ndarray, versions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: min, max and number of distinct versions (-1, -1, 0 for a row without tokens).

    Vectorised over all rows; versions normally never decrease inside a row, which makes the
    distinct count one pass over the differences. Anything else falls back to a sort.
    """
    offsets = np.asarray(offsets, np.int64)
    lengths = np.diff(offsets)
    n = len(lengths)
    lo = np.full(n, -1, np.int64)
    hi = np.full(n, -1, np.int64)
    distinct = np.zeros(n, np.int64)
    nonempty = lengths > 0
    if not nonempty.any():
        return lo, hi, distinct
    starts, ends = offsets[:-1][nonempty], offsets[1:][nonempty]
    # reduceat over the starts of non-empty rows only: an empty row would yield a wrong value or index past the end.
    lo[nonempty] = np.minimum.reduceat(versions, starts)
    hi[nonempty] = np.maximum.reduceat(versions, starts)
    step = np.diff(versions)
    within = np.ones(len(step), bool)  # step[j] compares tokens j and j+1 of one row
    within[starts[1:] - 1] = False
    if not np.any(step[within] < 0):
        changes = np.zeros(len(versions), np.int64)
        np.cumsum((step != 0) & within, out=changes[1:])
        distinct[nonempty] = 1 + changes[ends - 1] - changes[starts]
        return lo, hi, distinct
    row = np.repeat(np.arange(n), lengths)
    order = np.lexsort((versions, row))
    sv, sr = versions[order], row[order]
    new = np.ones(len(sv), bool)
    new[1:] = (sv[1:] != sv[:-1]) | (sr[1:] != sr[:-1])
    distinct = np.bincount(sr[new], minlength=n).astype(np.int64)
    return lo, hi, distinct


def _empty(dtype: str) -> np.ndarray:
    return np.zeros(0, dtype=object if dtype == STRING else dtype)


def _concat(parts: list[np.ndarray], dtype: str) -> np.ndarray:
    return np.concatenate(parts) if parts else _empty(dtype)


def _segment_stats(offsets: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row mean (NaN if empty) and max (-1 if empty) of a ragged integer field."""
    lengths = np.diff(offsets)
    mean = np.full(len(lengths), np.nan)
    top = np.full(len(lengths), -1, np.int64)
    nonempty = lengths > 0
    if nonempty.any():
        starts = offsets[:-1][nonempty]
        mean[nonempty] = np.add.reduceat(values.astype(np.float64), starts) / lengths[nonempty]
        top[nonempty] = np.maximum.reduceat(values, starts)
    return mean, top


class RunLog:
    """The finished shards of ``RUN/rollout_log/`` and ``RUN/trainer_log/`` at construction time.

    Attributes: ``skipped`` (path, reason) of damaged shards left out; ``partials``: ``.partial``
    files of a writer that crashed or is writing now; ``set_aside``: leftovers a resumed writer
    renamed to ``.partial.bad``; ``ignored``: files in the log folders that are not shards.
    """

    def __init__(self, run_dir: str | Path, *, strict: bool = False) -> None:
        self.root = Path(run_dir)
        self.strict = strict
        if not self.root.exists():
            raise FileNotFoundError(f"run folder {self.root} does not exist; pass the folder that holds config.yaml")
        if not self.root.is_dir():
            raise NotADirectoryError(f"{self.root} is a file, not a run folder; pass the folder that holds "
                                     "config.yaml")
        dirs = {kind: self.root / name for kind, name in LOG_DIRS.items()}
        if not any(d.is_dir() for d in dirs.values()):
            raise ShardError(f"{self.root} is not an areal_hpc run folder: no rollout_log/ or trainer_log/; pass "
                             "the folder that holds config.yaml")
        self.skipped: list[tuple[Path, str]] = []
        self.partials: list[Path] = []
        self.set_aside: list[Path] = []
        self.ignored: list[Path] = []
        self._shards: dict[str, list[ShardInfo]] = {ROLLOUT: [], TRAINER: []}
        self._trainer_cache: list[tuple[ShardInfo, Shard]] | None = None
        for kind, directory in dirs.items():
            if not directory.is_dir():
                continue
            finished, leftovers, others = classify_log_dir(directory)
            for path in leftovers:
                (self.partials if path.name.endswith(".partial") else self.set_aside).append(path)
            self.ignored.extend(others)
            for path in finished:
                info = self._info(path)
                if info is None:
                    continue
                if info.kind != kind:
                    self.ignored.append(path)  # a shard in the other kind's folder: not this log's
                    continue
                self._shards[kind].append(info)
        if self.ignored:
            log.warning("%s: %d file(s) in the log folders are not shards of that folder and are ignored: %s",
                        self.root, len(self.ignored), ", ".join(str(p.relative_to(self.root)) for p in self.ignored))
        if self.partials:
            log.warning("%s: %d unfinished shard(s) (a writer crashed mid-write or is writing now), not read: %s",
                        self.root, len(self.partials), ", ".join(p.name for p in self.partials))

    def __repr__(self) -> str:
        return (f"RunLog({str(self.root)!r}: {len(self._shards[ROLLOUT])} rollout shards, "
                f"{len(self._shards[TRAINER])} trainer shards, {len(self.skipped)} skipped, "
                f"{len(self.partials)} partial, finished={self.finished})")

    # -- shards -------------------------------------------------------------------------------------

    @property
    def rollout_shards(self) -> list[Path]:
        return [s.path for s in self._shards[ROLLOUT]]

    @property
    def trainer_shards(self) -> list[Path]:
        return [s.path for s in self._shards[TRAINER]]

    def _damaged(self, path: Path, err: ShardError) -> None:
        if self.strict:
            raise err
        if any(p == path for p, _ in self.skipped):
            return  # warned when first found
        self.skipped.append((path, str(err)))
        log.warning("skipping damaged shard (%d skipped so far): %s", len(self.skipped), err)

    def _info(self, path: Path) -> ShardInfo | None:
        try:
            attrs = read_shard_attrs(path)
        except ShardError as e:
            self._damaged(path, e)
            return None
        return ShardInfo(path, attrs["kind"], int(attrs["index"]), int(attrs["seq"]), int(attrs["n_rows"]), attrs)

    def _read(self, kind: str, fields: Iterable[str] | None = None) -> list[tuple[ShardInfo, Shard]]:
        out = []
        for info in self._shards[kind]:
            try:
                out.append((info, read_shard(info.path, fields)))
            except ShardError as e:
                self._damaged(info.path, e)
        return out

    def _trainer(self) -> list[tuple[ShardInfo, Shard]]:
        """Trainer shards are small (one row per step): read whole once and keep."""
        if self._trainer_cache is None:
            self._trainer_cache = self._read(TRAINER)
        return self._trainer_cache

    # -- rollout ------------------------------------------------------------------------------------

    def samples(self, fields: Iterable[str] | None = None) -> pd.DataFrame:
        """One row per generated sample: the row fields (or ``fields``), ``min_version``, ``max_version``,
        ``n_versions`` (-1, -1, 0 for an empty response) and ``shard`` (file name). ``sample_id`` is always there.
        """
        spec = ROW_FIELDS[ROLLOUT]
        if fields is None:
            rows, derived = list(spec), list(VERSION_COLUMNS)
        else:
            fields = list(dict.fromkeys(fields))
            unknown = [f for f in fields if f not in spec and f not in VERSION_COLUMNS and f != "shard"]
            if unknown:
                raise ValueError(f"samples(): unknown column(s) {unknown}; columns are {[*spec, *VERSION_COLUMNS]}")
            rows = ["sample_id", *(f for f in fields if f in spec and f != "sample_id")]
            derived = [f for f in VERSION_COLUMNS if f in fields]
        parts: dict[str, list[np.ndarray]] = {name: [] for name in [*rows, *derived]}
        names, counts = [], []
        for info, shard in self._read(ROLLOUT, [*rows, *(["versions"] if derived else [])]):
            for name in rows:
                parts[name].append(shard.rows[name])
            if derived:
                offsets, values = shard.ragged["response"]
                stats = dict(zip(VERSION_COLUMNS, version_stats(offsets, values["versions"])))
                for name in derived:
                    parts[name].append(stats[name])
            names.append(info.path.name)
            counts.append(shard.n_rows)
        data: dict[str, Any] = {name: _concat(parts[name], spec[name]) for name in rows}
        data.update({name: _concat(parts[name], "int64") for name in derived})
        codes = np.repeat(np.arange(len(names), dtype=np.int32), counts)
        data["shard"] = pd.Categorical.from_codes(codes, categories=pd.Index(names, dtype=object))
        return pd.DataFrame(data)

    def tokens(self, group: str = "response",
               fields: Iterable[str] | None = None) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Token-level arrays over all rollout shards: (sample_ids, offsets, {field: values}); sample i's
        values are ``values[offsets[i]:offsets[i+1]]`` (the same order as :meth:`samples`).
        """
        spec = RAGGED_FIELDS[ROLLOUT]
        if group not in spec:
            raise ValueError(f"tokens(): unknown group {group!r}; rollout groups are {list(spec)}")
        names = list(spec[group]) if fields is None else list(dict.fromkeys(fields))
        unknown = [f for f in names if f not in spec[group]]
        if unknown:
            raise ValueError(f"tokens(): group {group!r} has no field(s) {unknown}; it has {list(spec[group])}")
        ids, offs, vals = [], [np.zeros(1, np.int64)], {name: [] for name in names}
        base = 0
        for _, shard in self._read(ROLLOUT, ["sample_id", *names] if names else ["sample_id", *spec[group]]):
            offsets, values = shard.ragged[group]
            ids.append(shard.rows["sample_id"])
            offs.append(offsets[1:] + base)
            base += int(offsets[-1])
            for name in names:
                vals[name].append(values[name])
        return (_concat(ids, "int64"), np.concatenate(offs),
                {name: _concat(vals[name], spec[group][name]) for name in names})

    def sample_versions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample_ids, offsets, versions): the policy version of every response token."""
        ids, offsets, fields = self.tokens("response", ["versions"])
        return ids, offsets, fields["versions"]

    # -- trainer ------------------------------------------------------------------------------------

    def steps(self) -> pd.DataFrame:
        """One row per (trainer rank, step): the row fields plus ``rank``, ``n_used``, ``n_rejected`` and the
        staleness of the trained samples (``staleness_mean`` NaN and ``staleness_max`` -1 when none).
        """
        spec = ROW_FIELDS[TRAINER]
        parts: dict[str, list[np.ndarray]] = {name: [] for name in [*spec, "rank", "n_used", "n_rejected",
                                                                     "staleness_mean", "staleness_max"]}
        for info, shard in self._trainer():
            for name in spec:
                parts[name].append(shard.rows[name])
            used_off, used = shard.ragged["used"]
            rej_off, _ = shard.ragged["rejected"]
            parts["rank"].append(np.full(shard.n_rows, info.index, np.int64))
            parts["n_used"].append(np.diff(used_off))
            parts["n_rejected"].append(np.diff(rej_off))
            mean, top = _segment_stats(used_off, used["used_staleness"])
            parts["staleness_mean"].append(mean)
            parts["staleness_max"].append(top)
        dtypes = {**spec, "rank": "int64", "n_used": "int64", "n_rejected": "int64", "staleness_mean": "float64",
                  "staleness_max": "int64"}
        df = pd.DataFrame({name: _concat(p, dtypes[name]) for name, p in parts.items()})
        return df.sort_values(["rank", "step"], kind="stable").reset_index(drop=True)

    def step_samples(self) -> pd.DataFrame:
        """Long format, one row per (step, sample) the trainer saw: step, trained_version, rank, sample_id,
        staleness, weight (NaN for rejected), fate ('used' | 'rejected').
        """
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("step", "trained_version", "rank", "sample_id",
                                                             "staleness", "weight", "fate")}
        for info, shard in self._trainer():
            for code, group in enumerate(FATES):
                offsets, values = shard.ragged[group]
                counts = np.diff(offsets)
                cols["step"].append(np.repeat(shard.rows["step"], counts))
                cols["trained_version"].append(np.repeat(shard.rows["trained_version"], counts))
                cols["rank"].append(np.full(int(offsets[-1]), info.index, np.int64))
                cols["sample_id"].append(values[f"{group}_sample_id"].astype(np.int64, copy=False))
                cols["staleness"].append(values[f"{group}_staleness"].astype(np.int64))
                cols["weight"].append(values["used_weight"] if group == "used"
                                      else np.full(int(offsets[-1]), np.nan, np.float32))
                cols["fate"].append(np.full(int(offsets[-1]), code, np.int8))
        dtypes = {"step": "int64", "trained_version": "int64", "rank": "int64", "sample_id": "int64",
                  "staleness": "int64", "weight": "float32", "fate": "int8"}
        data: dict[str, Any] = {k: _concat(v, dtypes[k]) for k, v in cols.items()}
        data["fate"] = pd.Categorical.from_codes(data["fate"], categories=list(FATES))
        df = pd.DataFrame(data)
        return df.sort_values(["rank", "step"], kind="stable").reset_index(drop=True)

    def evals(self) -> pd.DataFrame:
        """Held-out evaluations, long format: step, metric, value (one row per metric), sorted by step.

        Step 0 is before training; the run's last evaluation comes from an eval-only shard written after the
        final one (docs/rollout-log.md). Empty (with those columns) when the run logged none.
        """
        cols: dict[str, list[np.ndarray]] = {name: [] for name in EVAL_FIELDS}
        for _, shard in self._trainer():
            if EVAL_FIELDS.keys() <= shard.extra.keys():
                for name in EVAL_FIELDS:
                    cols[name].append(shard.extra[name])
        data = {out: _concat(cols[name], dtype) for out, (name, dtype) in zip(EVAL_COLUMNS, EVAL_FIELDS.items())}
        df = pd.DataFrame(data)
        df["metric"] = df["metric"].astype(object)
        return df.sort_values("step", kind="stable").reset_index(drop=True)

    def leftover(self) -> np.ndarray:
        """Sample ids received but never trained when the run stopped normally (empty otherwise)."""
        parts = [s.extra["leftover_sample_id"] for i, s in self._trainer()
                 if is_final(i.attrs) and "leftover_sample_id" in s.extra]
        return _concat(parts, "int64")

    @property
    def finished(self) -> bool:
        """Whether every trainer rank's last readable shard is the final shard of a normal stop."""
        last: dict[int, ShardInfo] = {}
        for info in self._shards[TRAINER]:
            if all(info.path != p for p, _ in self.skipped) and (info.index not in last
                                                                  or info.seq > last[info.index].seq):
                last[info.index] = info
        return bool(last) and all(is_final(i.attrs) for i in last.values())

    def config(self) -> dict[str, Any]:
        """The run's resolved config: ``RUN/config.yaml``, else the copy every shard carries."""
        path = self.root / "config.yaml"
        if path.is_file():
            text = path.read_text(encoding="utf-8")
        else:
            text = next((s.attrs.get("config_yaml") for k in (TRAINER, ROLLOUT) for s in self._shards[k]
                         if s.attrs.get("config_yaml")), None)
            if text is None:
                raise FileNotFoundError(f"{self.root}: no config.yaml and no shard carries a config_yaml attribute")
        return yaml.safe_load(text) or {}
