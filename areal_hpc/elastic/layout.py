"""Where elastic rollout keeps its files in a run folder, and the small atomic-JSON helpers they share.

```
RUN/elastic/run.json            trainer 0: the run accepts workers (attempt, initial policy, state)
RUN/elastic/weights/            the disk weight channel (weights/disk.py)
RUN/elastic/workers/wNNNN/      one folder per attached worker, made by the worker when it registers
    lease.json                  the worker's heartbeat (lease.py)
    grants.jsonl                the trainer's grants to it, appended (grants.py)
    revoked.json                the trainer tells it to stop, and why
RUN/elastic/reissued.jsonl      grants taken back from a worker and given to another producer
```
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from areal_hpc.storage.records import ATTACHED_PROMPT_BASE

#: A worker's shards are ``rollout-r{SHARD_INDEX_BASE + worker}-…`` beside the in-job ranks' (``rollout-r000-…``).
SHARD_INDEX_BASE = 1000
#: Key of a worker's sample source in a trainer (in-job sources are keyed by MPI rank, far below this).
SOURCE_BASE = 1_000_000
#: Prompts granted to attached workers are numbered from here in the task's stream, apart from the in-job ranks'
#: per-rank streams (prompt = k·n_rollout + index), so a checkpoint's data position stays exact for both.
PROMPT_BASE = ATTACHED_PROMPT_BASE


def write_json(path: Path, record: dict[str, Any]) -> None:
    """Replace ``path`` atomically: a reader on another node sees the old record or the new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The record, or None when the file is not there (yet)."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


class ElasticFiles:
    """Paths of a run's elastic folder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "elastic"

    @property
    def run(self) -> Path:
        return self.root / "run.json"

    @property
    def weights(self) -> Path:
        return self.root / "weights"

    @property
    def workers(self) -> Path:
        return self.root / "workers"

    @property
    def reissued(self) -> Path:
        return self.root / "reissued.jsonl"

    def worker(self, wid: int) -> Path:
        return self.workers / f"w{wid:04d}"

    def lease(self, wid: int) -> Path:
        return self.worker(wid) / "lease.json"

    def grants(self, wid: int) -> Path:
        return self.worker(wid) / "grants.jsonl"

    def revoked(self, wid: int) -> Path:
        return self.worker(wid) / "revoked.json"

    def worker_ids(self) -> list[int]:
        if not self.workers.is_dir():
            return []
        out = []
        for p in self.workers.iterdir():
            if p.name.startswith("w") and p.name[1:].isdigit():
                out.append(int(p.name[1:]))
        return sorted(out)
