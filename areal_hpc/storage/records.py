"""Append-only JSONL records of a run: per-sample (rollout ranks) and per-step (trainer ranks).

Each line is flushed as it is written so a crash loses at most the line in progress. The fields are
the ones the HDF5 rollout log will carry as columns; readers here let tests and tools check a run's
staleness and accounting from its own files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class JsonlWriter:
    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", buffering=1, encoding="utf-8")  # line-buffered

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Records of a file; a torn last line (crash mid-write) is skipped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                yield json.loads(line)


class RunFiles:
    """Where everything of one run lives."""

    def __init__(self, run_dir: str | Path) -> None:
        self.root = Path(run_dir)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    def samples(self, rollout_rank: int) -> Path:
        return self.root / "samples" / f"rollout{rollout_rank}.jsonl"

    def steps(self, trainer_rank: int) -> Path:
        return self.root / "steps" / f"trainer{trainer_rank}.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def errors(self) -> Path:
        return self.root / "errors"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def all_samples(self) -> list[dict[str, Any]]:
        return [r for p in sorted((self.root / "samples").glob("*.jsonl")) for r in read_jsonl(p)]

    def all_steps(self) -> list[dict[str, Any]]:
        return [r for p in sorted((self.root / "steps").glob("*.jsonl")) for r in read_jsonl(p)]
