"""What ``analyze`` was pointed at: run folders, sweep folders, or a shell glob over a sweep's contents.

``areal-hpc submit --sweep`` leaves ``SWEEP_DIR/sweep.json`` (the points and their run folders), one run folder
per point and, under Slurm, ``SWEEP_DIR/submitit/``. A user types ``analyze SWEEP_DIR`` or
``analyze SWEEP_DIR/*``; both must mean "the sweep's runs", labelled by their swept values. So a sweep folder
and its ``sweep.json`` expand to the sweep's runs, the sweep's own non-run entries (its job-log folder) are
left out, and a run named twice (by the sweep and by the glob) is read once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from areal_hpc.storage.schema import LOG_DIRS

# The record ``areal-hpc submit --sweep`` writes (``launch.run_dir.SWEEP_FILE``; launch sits above analysis, so
# the name is repeated here and a test keeps the two equal).
SWEEP_FILE = "sweep.json"


class SweepFileError(Exception):
    """A ``sweep.json`` that cannot be read; the message names the file and what to do."""


@dataclass(frozen=True)
class Target:
    """One run folder to analyse; ``point`` and ``sweep_dir`` are set when it is a point of a sweep.

    ``by_sweep``: named through a sweep (its folder or sweep.json) rather than on its own, so a point without a
    log yet is left out instead of failing the whole analysis.
    """

    run_dir: Path
    point: tuple[tuple[str, str], ...] | None = None
    sweep_dir: Path | None = None
    by_sweep: bool = False


def _read_sweep(sweep_dir: Path) -> list[Target]:
    path = sweep_dir / SWEEP_FILE
    try:
        record: Any = json.loads(path.read_text(encoding="utf-8"))
        rows = record["runs"]
        out = []
        for r in rows:
            recorded = Path(r["run_dir"])
            # A moved or copied sweep keeps its run folders next to sweep.json: trust the folder, not the path.
            run_dir = recorded if recorded.is_dir() and not (sweep_dir / recorded.name).is_dir() \
                else sweep_dir / recorded.name
            point = tuple((str(k), str(v)) for k, v in (r.get("point") or {}).items())
            out.append(Target(run_dir, point, sweep_dir, by_sweep=True))
        return out
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SweepFileError(f"{path}: not a sweep record written by `areal-hpc submit --sweep` ({e}); "
                             f"pass the run folders themselves instead") from None


def _is_run_like(path: Path) -> bool:
    return any((path / d).is_dir() for d in LOG_DIRS.values()) or (path / "config.yaml").is_file()


def expand(paths: list[Path]) -> list[Target]:
    """The runs named by ``paths``, in order, each once.

    A sweep folder or its ``sweep.json`` gives the sweep's runs; an entry of a sweep folder that is not one of
    its runs (``submitit/``, ``analysis/``) is skipped when that sweep is analysed too; a run folder inside a
    sweep keeps its swept values; anything else is a run folder, left for ``load_run`` to accept or refuse.
    """
    sweeps: dict[Path, list[Target]] = {}
    for p in paths:
        if p.name == SWEEP_FILE and p.is_file():
            sweeps.setdefault(p.parent.resolve(), _read_sweep(p.parent))
        elif p.is_dir() and (p / SWEEP_FILE).is_file():
            sweeps.setdefault(p.resolve(), _read_sweep(p))
    sweep_runs = {t.run_dir.resolve(): t for ts in sweeps.values() for t in ts}
    out: list[Target] = []
    seen: set[Path] = set()

    def add(t: Target) -> None:
        key = t.run_dir.resolve()
        if key not in seen:
            seen.add(key)
            out.append(t)

    for p in paths:
        if p.name == SWEEP_FILE and p.is_file():
            for t in sweeps[p.parent.resolve()]:
                add(t)
        elif p.is_dir() and (p / SWEEP_FILE).is_file():
            for t in sweeps[p.resolve()]:
                add(t)
        elif p.exists() and p.resolve() in sweep_runs:
            add(sweep_runs[p.resolve()])
        elif p.exists() and p.resolve().parent in sweeps and not _is_run_like(p):
            continue  # the sweep's job logs, its analysis/ or notes: not a run
        elif p.is_dir() and (p.parent / SWEEP_FILE).is_file():
            add(_as_point(p))
        else:
            add(Target(p))
    return out


def _as_point(run_dir: Path) -> Target:
    """A run folder named alone that is a point of a sweep still gets its swept values as its label."""
    try:
        found = [t for t in _read_sweep(run_dir.parent) if t.run_dir.resolve() == run_dir.resolve()]
    except SweepFileError:
        found = []  # the run itself may still be readable: analyse it unlabelled
    return Target(run_dir, found[0].point, found[0].sweep_dir) if found else Target(run_dir)


def common_sweep(targets: list[Target]) -> Path | None:
    """The sweep folder when the targets are exactly one sweep's runs: its ``analysis/`` is then the default
    output (a subset of its runs writes elsewhere, so that it does not replace the whole sweep's figures)."""
    dirs = {t.sweep_dir.resolve() if t.sweep_dir else None for t in targets}
    if len(dirs) != 1 or None in dirs or targets[0].sweep_dir is None:
        return None
    whole = {t.run_dir.resolve() for t in _read_sweep(targets[0].sweep_dir)}
    return targets[0].sweep_dir if whole == {t.run_dir.resolve() for t in targets} else None
