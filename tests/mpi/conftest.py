"""Helpers for tests that start real MPI jobs through the ``areal-hpc`` command line."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


@dataclass
class Job:
    rc: int
    output: str
    run_dir: Path


@pytest.fixture(scope="session")
def job_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("jobs")


def cache_of(root: Path) -> Path:
    """The session's warm-up cache (``tests/warmup.py``): ``root`` is a folder of the session's base temp."""
    return root.parent / "warmup-cache"


def train_args(root: Path, name: str, *overrides: str) -> list[str]:
    # The warm-up cache is shared by every job of the session: it is trained once.
    return [sys.executable, "-m", "areal_hpc.cli", "train", str(QUICKSTART), f"run.output_dir={root}",
            f"run.name={name}", f"run.cache_dir={cache_of(root)}", "run.timeout_s=300", *overrides]


def run_train(root: Path, name: str, *overrides: str, timeout: float = 420) -> Job:
    proc = subprocess.run(train_args(root, name, *overrides), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return Job(proc.returncode, proc.stdout + proc.stderr, root / name)
