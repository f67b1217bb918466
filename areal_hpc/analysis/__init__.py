"""Post-hoc study of runs from their HDF5 rollout logs: ``summarize`` for tables, ``plot_runs`` for figures."""

from __future__ import annotations

from areal_hpc.analysis.plots import plot_runs
from areal_hpc.analysis.tables import RunData, RunFolderError, load_run, summarize

__all__ = ["RunData", "RunFolderError", "load_run", "plot_runs", "summarize"]
