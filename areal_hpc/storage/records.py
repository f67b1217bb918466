"""The run folder's layout and its small JSONL files (per-step metrics).

Each JSONL line is flushed as it is written, so a crash loses at most the line in progress. Samples
and training steps live in the HDF5 rollout log (``rollout_log/``, ``trainer_log/``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: Prompts that trainers grant to attached rollout workers (elastic/) are numbered from here, apart from the
#: in-job ranks' streams (prompt = k·n_rollout + index), so both data positions come back exactly from one list
#: of consumed prompts in a checkpoint.
ATTACHED_PROMPT_BASE = 1 << 40


def strict_json(value: Any) -> Any:
    """``value`` with every NaN or infinity as None: ``json.dumps`` would write ``NaN``, which strict
    parsers (jq, JavaScript, most languages' JSON) reject. A missing accuracy is null, not a number."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


class JsonlWriter:
    def __init__(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._f = open(path, "a", buffering=1, encoding="utf-8")  # line-buffered

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(strict_json(record), separators=(",", ":"), allow_nan=False) + "\n")

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

    @property
    def rollout_log(self) -> Path:
        return self.root / "rollout_log"

    @property
    def trainer_log(self) -> Path:
        return self.root / "trainer_log"

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
