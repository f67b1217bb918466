"""The test session's one warm-up cache."""

from __future__ import annotations

from pathlib import Path

import pytest


def shared_warmup_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One ``run.cache_dir`` for every job of the test session (MPI, Slurm and submitit jobs alike).

    Why: the quickstart's supervised warm-up (600 steps, ~45 s on two cores) is keyed by its config, so
    every suite that ran jobs with a cache of its own trained the same model again.
    """
    return Path(tmp_path_factory.getbasetemp()) / "warmup-cache"
