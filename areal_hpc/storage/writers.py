"""Buffered writers of the HDF5 rollout log: rollout ranks write samples, trainer ranks write steps.

Both buffer rows in memory and hand complete shards to :class:`ShardWriter` (atomic rename), so a
shard on disk is always whole. Rollout shards close by size, by age, or when the rank goes idle:
in ``transport: hdf5`` mode the trainer can only see what has been closed, and a rank held by the
staleness gate must not sit on samples the trainer is waiting for.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from areal_hpc.storage.shards import ShardWriter
from areal_hpc.trajectory import TrainStats, Trajectory


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
        rows = {
            "sample_id": np.array([t.sample_id for t in rs], np.int64),
            "prompt_id": np.array([t.prompt_id for t in rs], np.int64),
            "group_id": np.array([t.group_id for t in rs], np.int64),
            "rank": np.array([t.rank for t in rs], np.int32),
            "reward": np.array([t.reward for t in rs], np.float32),
            "answer_ok": np.array([t.answer_ok for t in rs], np.uint8),
            "t_start": np.array([t.t_start for t in rs], np.float64),
            "t_end": np.array([t.t_end for t in rs], np.float64),
            "interruptions": np.array([t.interruptions for t in rs], np.int32),
            "prompt_len": np.array([t.n_prompt for t in rs], np.int32),
            "response_len": np.array([t.n_response for t in rs], np.int32),
            "response_text": [t.text for t in rs],
            "answer": [t.answer for t in rs],
        }
        ragged = {
            "prompt": {"prompt_tokens": [t.prompt_tokens for t in rs]},
            "response": {"response_tokens": [t.response_tokens for t in rs],
                         "behav_logprobs": [t.behav_logprobs for t in rs],
                         "versions": [t.versions for t in rs]},
        }
        path = self.writer.write(rows, ragged)
        self.samples_written += len(rs)
        self.shards_written += 1
        self._rows = []
        return path


class TrainerLogWriter:
    """Per-step records of one trainer rank, a shard every ``shard_steps`` steps and one at stop."""

    STATS = ("loss", "grad_norm", "clip_frac", "cap_frac", "importance_weight", "ratio", "approx_kl")

    def __init__(self, directory: Path, index: int, *, attrs: dict[str, Any], shard_steps: int,
                 compression: str) -> None:
        self.writer = ShardWriter(directory, "trainer", index, attrs=attrs, compression=compression)
        self.shard_steps = shard_steps
        self._steps: list[dict[str, Any]] = []

    def add(self, step: int, trained_version: int, stats: TrainStats, used: list[int],
            used_staleness: list[int], used_weight: list[float], rejected: list[int],
            rejected_staleness: list[int]) -> None:
        self._steps.append({"step": step, "trained_version": trained_version, "time": time.time(),
                            "stats": stats.as_dict(),
                            "used": used, "used_staleness": used_staleness, "used_weight": used_weight,
                            "rejected": rejected, "rejected_staleness": rejected_staleness})
        if len(self._steps) >= self.shard_steps:
            self.flush()

    def flush(self, leftover: list[int] | None = None) -> Path | None:
        """Write buffered steps; with ``leftover`` this is the final shard of a normal stop."""
        if not self._steps and leftover is None:
            return None
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
        final = leftover is not None
        path = self.writer.write(
            rows, ragged, extra_attrs={"final": int(final)},
            extra_datasets={"leftover_sample_id": np.asarray(leftover, np.int64)} if final else None)
        self._steps = []
        return path
