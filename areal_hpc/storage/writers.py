"""Buffered writers of the HDF5 rollout log: rollout ranks write samples, trainer ranks write steps.

Both buffer rows in memory and hand complete shards to :class:`ShardWriter` (atomic rename), so a
shard on disk is always whole. Rollout shards close by size, by age, or when the rank goes idle:
in ``transport: hdf5`` mode the trainer can only see what has been closed, and a rank held by the
staleness gate must not sit on samples the trainer is waiting for.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from areal_hpc.storage.schema import (
    EVAL_FIELDS,
    FINAL_ATTR,
    RAGGED_FIELDS,
    ROLLOUT,
    ROLLOUT_ROW_ATTRS,
    ROW_FIELDS,
    STRING,
)
from areal_hpc.storage.shards import ShardWriter
from areal_hpc.trajectory import TrainStats, Trajectory


def _column(values: list[Any], dtype: str) -> np.ndarray | list[str]:
    return values if dtype == STRING else np.array(values, np.dtype(dtype))


class RolloutLogWriter:
    def __init__(self, directory: Path, index: int, *, attrs: dict[str, Any], shard_samples: int, flush_s: float,
                 compression: str) -> None:
        self.writer = ShardWriter(directory, "rollout", index, attrs=attrs, compression=compression)
        self.shard_samples, self.flush_s = shard_samples, flush_s
        self._rows: list[Trajectory] = []
        self._first_at = 0.0
        self.samples_written = 0
        self.shards_written = 0

    def add(self, traj: Trajectory) -> None:
        if not self._rows:
            self._first_at = time.monotonic()
        self._rows.append(traj)
        if len(self._rows) >= self.shard_samples:
            self.flush()

    def flush_if_due(self, idle: bool = False) -> None:
        """Close the open shard if it is old enough, or at once when the rank is idle."""
        if self._rows and (idle or time.monotonic() - self._first_at >= self.flush_s):
            self.flush()

    def flush(self) -> Path | None:
        if not self._rows:
            return None
        rs = self._rows
        rows = {name: _column([getattr(t, ROLLOUT_ROW_ATTRS.get(name, name)) for t in rs], dtype)
                for name, dtype in ROW_FIELDS[ROLLOUT].items()}
        ragged = {group: {name: [getattr(t, name) for t in rs] for name in fields}
                  for group, fields in RAGGED_FIELDS[ROLLOUT].items()}
        path = self.writer.write(rows, ragged)
        self.samples_written += len(rs)
        self.shards_written += 1
        self._rows = []
        return path


class TrainerLogWriter:
    """Per-step records of one trainer rank, a shard every ``shard_steps`` steps and one at stop.

    Evaluations (:meth:`add_eval`) ride in the next shard written. The run's last evaluation comes after the
    final shard (written by ``flush(leftover=...)`` when the rollouts have stopped), so from then on each
    evaluation is written at once as an eval-only shard (no step rows) that is ``final`` too: the run still
    reads as stopped normally, and ``leftover_sample_id`` stays in the one shard that counted it.
    """

    STATS = ("loss", "grad_norm", "clip_frac", "cap_frac", "importance_weight", "ratio", "approx_kl")

    def __init__(self, directory: Path, index: int, *, attrs: dict[str, Any], shard_steps: int,
                 compression: str) -> None:
        self.writer = ShardWriter(directory, "trainer", index, attrs=attrs, compression=compression)
        self.shard_steps = shard_steps
        self._steps: list[dict[str, Any]] = []
        self._evals: list[tuple[int, str, float]] = []
        self._final_written = False

    def add(self, step: int, trained_version: int, stats: TrainStats, used: list[int],
            used_staleness: list[int], used_weight: list[float], rejected: list[int],
            rejected_staleness: list[int]) -> None:
        self._steps.append({"step": step, "trained_version": trained_version, "time": time.time(),
                            "stats": stats.as_dict(),
                            "used": used, "used_staleness": used_staleness, "used_weight": used_weight,
                            "rejected": rejected, "rejected_staleness": rejected_staleness})
        if len(self._steps) >= self.shard_steps:
            self.flush()

    def add_eval(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record held-out metrics measured with the weights of version ``step`` (0: before training), e.g.
        ``{"pass@1": 0.31, "pass@4": 0.52, "n": 200, "k": 4}``; after the final shard, written at once."""
        bad = [k for k, v in metrics.items() if not isinstance(k, str) or not k
               or isinstance(v, bool) or not isinstance(v, int | float | np.integer | np.floating)]
        if bad:
            raise ValueError(f"add_eval(step={step}): metrics {bad} are not name -> number; pass e.g. "
                             "{'pass@1': 0.31, 'n': 200}")
        self._evals.extend((int(step), k, float(v)) for k, v in metrics.items())
        if self._final_written:
            self.flush()

    def flush(self, leftover: list[int] | None = None) -> Path | None:
        """Write buffered steps and evaluations; with ``leftover`` this is the final shard of a normal stop."""
        if not self._steps and not self._evals and leftover is None:
            return None
        if leftover is not None and self._final_written:
            raise RuntimeError(f"{self.writer.directory}: flush(leftover=...) called twice; the final shard of "
                               f"trainer {self.writer.index} is already written")
        ss = self._steps
        rows: dict[str, Any] = {
            "step": np.array([s["step"] for s in ss], np.int64),
            "trained_version": np.array([s["trained_version"] for s in ss], np.int64),
            "time": np.array([s["time"] for s in ss], np.float64),
        }
        for k in self.STATS:
            rows[k] = np.array([s["stats"].get(k, np.nan) for s in ss], np.float32)
        ragged = {
            "used": {"used_sample_id": [np.asarray(s["used"], np.int64) for s in ss],
                     "used_staleness": [np.asarray(s["used_staleness"], np.int32) for s in ss],
                     "used_weight": [np.asarray(s["used_weight"], np.float32) for s in ss]},
            "rejected": {"rejected_sample_id": [np.asarray(s["rejected"], np.int64) for s in ss],
                         "rejected_staleness": [np.asarray(s["rejected_staleness"], np.int32) for s in ss]},
        }
        extra: dict[str, Any] = {}
        if leftover is not None:
            extra["leftover_sample_id"] = np.asarray(leftover, np.int64)
        if self._evals:
            columns = zip(*self._evals)  # (steps, metric names, values), in EVAL_FIELDS order
            extra.update({name: _column(list(col), dtype) for (name, dtype), col in zip(EVAL_FIELDS.items(), columns)})
        final = leftover is not None or self._final_written
        path = self.writer.write(rows, ragged, extra_attrs={FINAL_ATTR: int(final)}, extra_datasets=extra or None)
        self._final_written = final
        self._steps = []
        self._evals = []
        return path
