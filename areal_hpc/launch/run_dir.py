"""The run folder as the launch commands see it: where a run lives, whether to resume it, a fresh start.

``train`` (on this machine or as a rank of an MPI job) and ``submit`` both prepare run folders, and
``status`` reads the records ``submit`` leaves in them; these names live here, below all three commands,
so none of them imports another's command module.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from areal_hpc.config import Config

SWEEP_FILE = "sweep.json"  # a sweep's points, job ids and run folders, read by `areal-hpc status SWEEP_DIR`
SUBMIT_FILE = "submit.json"  # a single run's job record, read by `areal-hpc status RUN_DIR`


def run_dir_of(cfg: Config) -> Path:
    """``run.output_dir/run.name``: every file of the run goes under it."""
    return Path(cfg.run.output_dir) / cfg.run.name


def resumable(cfg: Config, run_dir: Path) -> bool:
    """A checkpoint exists and the run did not finish: a requeued or restarted job continues it."""
    if cfg.run.resume != "auto" or not (run_dir / "checkpoints" / "latest.json").exists():
        return False
    summary = run_dir / "summary.json"
    return not summary.exists() or bool(json.loads(summary.read_text()).get("preempted"))


def fresh_run_dir(run_dir: Path) -> None:
    """Start a run in an empty folder; an earlier run of the same name is moved aside, never deleted."""
    if run_dir.exists() and any(run_dir.iterdir()):
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while aside.exists():
            aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
            n += 1
        run_dir.rename(aside)
        print(f"areal-hpc: {run_dir} held an earlier run; moved it to {aside}", file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
