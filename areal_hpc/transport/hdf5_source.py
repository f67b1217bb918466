"""Cross-node hand-off: a trainer consumes one rollout rank's finished HDF5 shards, in order.

Shards of a rank are numbered without gaps and appear only when complete (atomic rename), so the
consumer waits for exactly the next number: no shard is read twice or skipped, while the rollout
keeps writing. The sample dicts it yields are the ones the shared-memory ring would have carried.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from areal_hpc.storage.schema import shard_file_name
from areal_hpc.storage.shards import read_shard

log = logging.getLogger(__name__)


class ShardSource:
    def __init__(self, directory: Path, rollout_index: int, *, retain: bool) -> None:
        self.directory, self.index, self.retain = Path(directory), rollout_index, retain
        self.next_seq = 0
        self.shards_read = 0

    def poll(self) -> list[dict[str, Any]]:
        """Samples of every shard that has appeared since the last call (possibly none)."""
        out: list[dict[str, Any]] = []
        while True:
            path = self.directory / shard_file_name("rollout", self.index, self.next_seq)
            if not path.exists():
                return out
            out.extend(shard_samples(path))
            self.next_seq += 1
            self.shards_read += 1
            if not self.retain:
                path.unlink()


def shard_samples(path: Path) -> list[dict[str, Any]]:
    """A rollout shard as the per-sample dicts the trainer consumes."""
    shard = read_shard(path)
    rows = shard.rows
    p_off, p = shard.ragged["prompt"]
    r_off, r = shard.ragged["response"]
    samples = []
    for i in range(len(rows["sample_id"])):
        a, b = r_off[i], r_off[i + 1]
        samples.append({
            "sample_id": int(rows["sample_id"][i]), "prompt_id": int(rows["prompt_id"][i]),
            "group_id": int(rows["group_id"][i]), "rank": int(rows["rank"][i]),
            "prompt_tokens": p["prompt_tokens"][p_off[i]:p_off[i + 1]],
            "response_tokens": r["response_tokens"][a:b], "behav_logprobs": r["behav_logprobs"][a:b],
            "versions": r["versions"][a:b], "reward": float(rows["reward"][i]),
            "answer_ok": bool(rows["answer_ok"][i]), "interruptions": int(rows["interruptions"][i]),
        })
    return samples
