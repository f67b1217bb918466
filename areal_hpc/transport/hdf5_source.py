"""Cross-node hand-off: a trainer consumes one rollout rank's finished HDF5 shards, in order.

Shards of a rank are numbered without gaps and appear only when complete (atomic rename), so the
consumer waits for exactly the next number: no shard is read twice or skipped, while the rollout
keeps writing. It yields the trajectories the shared-memory ring would have carried.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from areal_hpc.storage.schema import (
    DERIVED_ROLLOUT_ROWS,
    ROLLOUT,
    ROLLOUT_ROW_ATTRS,
    ROW_FIELDS,
    shard_file_name,
)
from areal_hpc.storage.shards import read_shard
from areal_hpc.trajectory import Trajectory

log = logging.getLogger(__name__)

#: Python type of a row value by its schema dtype (strings: ``str``).
_SCALAR = {"int64": int, "int32": int, "uint8": bool, "float32": float, "float64": float}


class ShardSource:
    """A ``SampleSource`` over one rollout rank's shards; looks for new ones at most every ``poll_s``."""

    full_waits = 0  # a shard writer never waits on its consumer

    def __init__(self, directory: Path, rollout_index: int, *, retain: bool, poll_s: float = 0.0) -> None:
        self.directory, self.index, self.retain, self.poll_s = Path(directory), rollout_index, retain, poll_s
        self.next_seq = 0
        self.shards_read = 0
        self._next_look = 0.0

    def poll(self) -> list[Trajectory]:
        """Trajectories of every shard that has appeared since the last look (possibly none)."""
        out: list[Trajectory] = []
        if self.poll_s and time.monotonic() < self._next_look:
            return out
        self._next_look = time.monotonic() + self.poll_s
        while True:
            path = self.directory / shard_file_name("rollout", self.index, self.next_seq)
            if not path.exists():
                return out
            out.extend(shard_trajectories(path))
            self.next_seq += 1
            self.shards_read += 1
            if not self.retain:
                path.unlink()

    def close(self) -> None:
        pass


def shard_trajectories(path: Path) -> list[Trajectory]:
    """A rollout shard as trajectories (``fate`` is not in the log: None).

    The row fields come from the schema (``storage/schema.py``), each as the ``Trajectory`` attribute the
    writer took it from, so a field added to the log travels here without a change.
    """
    shard = read_shard(path)
    rows = shard.rows
    scalars = {ROLLOUT_ROW_ATTRS.get(name, name): list(map(_SCALAR.get(dtype, str), rows[name].tolist()))
               for name, dtype in ROW_FIELDS[ROLLOUT].items() if name not in DERIVED_ROLLOUT_ROWS}
    out = []
    for i in range(shard.n_rows):
        fields: dict[str, object] = {attr: col[i] for attr, col in scalars.items()}
        for offsets, arrays in shard.ragged.values():
            a, b = offsets[i], offsets[i + 1]
            fields.update({name: v[a:b] for name, v in arrays.items()})
        out.append(Trajectory(**fields))
    return out
