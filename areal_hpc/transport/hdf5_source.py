"""Cross-node hand-off: a trainer consumes one rollout rank's finished HDF5 shards, in order.

Shards of a rank are numbered without gaps and appear only when complete (atomic rename), so the
consumer waits for exactly the next number: no shard is read twice or skipped, while the rollout
keeps writing. It yields the trajectories the shared-memory ring would have carried.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from areal_hpc.storage.schema import shard_file_name
from areal_hpc.storage.shards import read_shard
from areal_hpc.trajectory import Trajectory

log = logging.getLogger(__name__)


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
    """A rollout shard as trajectories (``fate`` is not in the log: None)."""
    shard = read_shard(path)
    rows = shard.rows
    p_off, p = shard.ragged["prompt"]
    r_off, r = shard.ragged["response"]
    out = []
    for i in range(len(rows["sample_id"])):
        a, b = r_off[i], r_off[i + 1]
        out.append(Trajectory(
            sample_id=int(rows["sample_id"][i]), prompt_id=int(rows["prompt_id"][i]),
            group_id=int(rows["group_id"][i]), rank=int(rows["rank"][i]),
            prompt_tokens=p["prompt_tokens"][p_off[i]:p_off[i + 1]], response_tokens=r["response_tokens"][a:b],
            behav_logprobs=r["behav_logprobs"][a:b], versions=r["versions"][a:b], reward=float(rows["reward"][i]),
            answer_ok=bool(rows["answer_ok"][i]), interruptions=int(rows["interruptions"][i]),
            t_start=float(rows["t_start"][i]), t_end=float(rows["t_end"][i]),
            text=str(rows["response_text"][i]), answer=str(rows["answer"][i])))
    return out
