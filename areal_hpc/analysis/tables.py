"""Load one run folder (read-only) and reduce its HDF5 rollout log to the tables of ``areal-hpc analyze``.

Everything is computed from the log itself (``rollout_log/``, ``trainer_log/``) so a crashed or still
running job can be studied; ``config.yaml``, ``metrics.jsonl`` and ``summary.json`` only add context
when they exist.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from areal_hpc.config.elastic import ElasticConfig
from areal_hpc.storage.records import read_jsonl
from areal_hpc.storage.schema import LOG_DIRS, ROLLOUT, TRAINER, parse_leftover_name, parse_shard_name

log = logging.getLogger(__name__)

# Columns read from the rollout shards: the text columns are left on disk (they dominate the log's size).
SAMPLE_FIELDS = ["sample_id", "prompt_id", "rank", "worker", "reward", "answer_ok", "t_start", "t_end", "interruptions",
                 "response_len", "reward_seconds", "reward_timed_out", "n_versions", "shard"]
# More staleness columns than this make the step table unreadable; larger values share one "gt" column.
MAX_STALE_COLUMNS = 8
# evals: only when the log has evaluations; producers and elastic_timeline: only when workers attached to the run
TABLES = ("step_ranges", "throughput", "rollout_ranks", "producers", "elastic_timeline", "evals")
# What attached rollout workers (``areal-hpc attach``) leave in the run folder besides their shards; the layout
# is areal_hpc/elastic/layout.py's, named here so that reading a finished run does not import the roles.
ELASTIC_DIR = "elastic"
LEASE_FILE = "lease.json"
REISSUED_FILE = "reissued.jsonl"
# Columns kept for machines (JSON/CSV) but not worth terminal width.
_HIDDEN = {"step_first", "step_last", "version_first", "version_last"}


class RunFolderError(Exception):
    """The path is not something ``analyze`` can read (missing, empty, not a run, or nothing written yet)."""


@dataclass
class RunData:
    """Everything the tables and plots need from one run, loaded once."""

    path: Path
    config: dict[str, Any]
    samples: pd.DataFrame
    steps: pd.DataFrame
    step_samples: pd.DataFrame
    finished: bool
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    partials: list[Path] = field(default_factory=list)
    leftover: int = 0
    metrics: pd.DataFrame | None = None
    summary: dict[str, Any] | None = None
    n_rollout_shards: int = 0
    n_trainer_shards: int = 0
    set_aside: list[Path] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    point: tuple[tuple[str, str], ...] | None = None  # (key, value) pairs of a sweep point
    evals: pd.DataFrame | None = None  # RunLog.evals(): step, metric, value
    leftover_ids: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    leases: dict[int, dict[str, Any]] = field(default_factory=dict)  # attached worker id -> its last lease.json
    reissued: pd.DataFrame | None = None  # elastic/reissued.jsonl: prompt, step, from, to, time
    ended_at: float | None = None  # elastic/run.json's time once the run ended: when leases stopped mattering
    _trained: pd.DataFrame | None = field(default=None, repr=False)  # cache of trained_samples()

    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def eta(self) -> int | None:
        v = _get(self.config, "rollout", "eta")
        if v is None and self.summary:
            v = self.summary.get("eta")
        return None if v is None else int(v)

    @property
    def is_async(self) -> bool | None:
        v = self.config.get("async")
        if v is None and self.summary:
            v = self.summary.get("async")
        return None if v is None else bool(v)

    @property
    def label(self) -> str:
        """Legend text: a sweep's point by its swept values, any other run by its name and staleness bound."""
        if self.point:
            return ", ".join(f"{k}={v}" for k, v in self.point)
        mode = "" if self.is_async is not False else ", sync"
        return f"{self.name} (η={self.eta if self.eta is not None else '?'}{mode})"

    def essentials(self) -> dict[str, Any]:
        """The config keys that decide how to read the numbers."""
        s = self.summary or {}
        out = {
            "async": self.is_async,
            "eta": self.eta,
            "n_trainer": _get(self.config, "cluster", "n_trainer", default=s.get("n_trainer")),
            "n_rollout": _get(self.config, "cluster", "n_rollout", default=s.get("n_rollout")),
            "steps_planned": _get(self.config, "run", "steps", default=s.get("steps")),
            "batch_size": _get(self.config, "trainer", "batch_size"),
            "stale_policy": _get(self.config, "trainer", "stale_policy"),
            "transport": _get(self.config, "transport", "kind"),
        }
        return {k: v for k, v in out.items() if v is not None}

    def info(self) -> dict[str, Any]:
        """Header facts of the report, JSON-ready."""
        used = self.step_samples[self.step_samples["fate"] == "used"] if len(self.step_samples) else self.step_samples
        out: dict[str, Any] = {
            "run_dir": str(self.path),
            "name": self.name,
            "config": self.essentials(),
            "finished": self.finished,
            "steps_done": int(self.steps["step"].max()) if len(self.steps) else 0,
            "steps_logged": int(self.steps["step"].nunique()) if len(self.steps) else 0,
            "samples_generated": len(self.samples),
            "samples_trained": len(used),
            "samples_rejected": int((self.step_samples["fate"] == "rejected").sum()) if len(self.step_samples) else 0,
            "leftover": self.leftover,
            "rollout_shards": self.n_rollout_shards,
            "trainer_shards": self.n_trainer_shards,
            "skipped": [{"path": str(p), "reason": r} for p, r in self.skipped],
            "partials": [str(p) for p in self.partials],
            "missing": coverage(self).as_dict(),
            "reward_time": reward_time(self),
            "warnings": self.problems(),
        }
        if self.point:
            out["sweep_point"] = dict(self.point)
        if has_workers(self):
            out["elastic"] = elastic_summary(self)
        if self.summary:
            for k in ("accuracy_before", "accuracy_after", "train_seconds", "samples_per_s", "tokens_per_s"):
                if k in self.summary:
                    out[k] = self.summary[k]
        return out


    def problems(self) -> list[str]:
        """Each file the log reader left out, one line each: the report's only mention of them."""
        return ([f"skipped damaged shard {r if str(p) in r else f'{p}: {r}'}" for p, r in self.skipped]
                + [f"partial file (writer running or crashed), not read: {p}" for p in self.partials]
                + [f"leftover of a crashed writer set aside by a resume, not read: {p}" for p in self.set_aside]
                + [f"not a shard of its log folder, ignored: {p}" for p in self.ignored])


def _get(cfg: dict[str, Any], section: str, key: str, default: Any = None) -> Any:
    sub = cfg.get(section)
    return sub.get(key, default) if isinstance(sub, dict) else default


def check_run_dir(run_dir: str | Path) -> Path:
    """Refuse early, with one clear sentence, what cannot be a run folder."""
    path = Path(run_dir)
    if not path.exists():
        raise RunFolderError(f"{path}: no such folder")
    if not path.is_dir():
        raise RunFolderError(f"{path}: not a folder")
    if not any(path.iterdir()):
        raise RunFolderError(f"{path}: empty folder, not a run folder")
    logs = [path / LOG_DIRS[ROLLOUT], path / LOG_DIRS[TRAINER]]
    if not any(d.is_dir() for d in logs):
        raise RunFolderError(f"{path}: not a run folder (no {logs[0].name}/ or {logs[1].name}/ inside)")
    if not any(_count_shards(d) for d in logs):
        n_partial = sum(1 for d in logs if d.is_dir() for f in d.iterdir() if parse_leftover_name(f.name))
        raise RunFolderError(f"{path}: no finished shards in {logs[0].name}/ or {logs[1].name}/ yet"
                             + (f" ({n_partial} partial file(s): being written or crashed)" if n_partial else ""))
    return path


def _count_shards(log_dir: Path) -> int:
    if not log_dir.is_dir():
        return 0
    return sum(1 for f in log_dir.iterdir() if parse_shard_name(f.name) and f.is_file())


def _read_config(path: Path, runlog: Any) -> dict[str, Any]:
    """config.yaml of the run folder, else the resolved config every shard carries."""
    for source in (lambda: yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")), runlog.config):
        try:
            cfg = source()
        except Exception as e:  # noqa: BLE001 - a missing or odd config only loses header context
            log.debug("%s: config not readable: %s", path, e)
            continue
        if isinstance(cfg, dict) and cfg:
            return cfg
    return {}


def _read_extras(path: Path) -> tuple[pd.DataFrame | None, dict[str, Any] | None]:
    metrics = summary = None
    if (path / "metrics.jsonl").is_file():
        try:
            metrics = pd.DataFrame(list(read_jsonl(path / "metrics.jsonl")))
        except (OSError, ValueError) as e:
            log.warning("%s: metrics.jsonl not readable, ignored: %s", path, e)
    if (path / "summary.json").is_file():
        try:
            summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            log.warning("%s: summary.json not readable, ignored: %s", path, e)
    return metrics, summary


def _read_elastic(path: Path) -> tuple[dict[int, dict[str, Any]], pd.DataFrame | None, float | None]:
    """The attached workers' last leases, the grants taken back from them, and when the run ended (its
    ``elastic/run.json`` in state ``ended``); each is context for the producers table, so an unreadable file only
    loses its part, with a warning."""
    root = path / ELASTIC_DIR
    leases: dict[int, dict[str, Any]] = {}
    workers = root / "workers"
    if workers.is_dir():
        for d in sorted(workers.iterdir()):
            if not (d.name.startswith("w") and d.name[1:].isdigit() and (d / LEASE_FILE).is_file()):
                continue  # a worker registering right now has its folder before its lease
            try:
                leases[int(d.name[1:])] = json.loads((d / LEASE_FILE).read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                log.warning("%s: not readable, worker %s left without lease state: %s", d / LEASE_FILE, d.name, e)
    reissued = None
    if (root / REISSUED_FILE).is_file():
        try:
            reissued = pd.DataFrame(list(read_jsonl(root / REISSUED_FILE)), columns=["prompt", "step", "from", "to",
                                                                                    "time"])
        except (OSError, ValueError) as e:
            log.warning("%s: not readable, re-issued grants not counted: %s", root / REISSUED_FILE, e)
    ended_at = None
    try:
        rec = json.loads((root / "run.json").read_text(encoding="utf-8"))
        if rec.get("state") == "ended" and isinstance(rec.get("time"), int | float):
            ended_at = float(rec["time"])
    except (OSError, ValueError, AttributeError):
        pass  # a run without attached workers, or one still going: the trainer log says when it stopped
    return leases, reissued, ended_at


@contextmanager
def _reader_quiet() -> Iterator[None]:
    """Silence the log reader's own warnings while loading.

    Every file it leaves out is kept in ``RunLog.skipped``/``partials``/``set_aside``/``ignored``, and the report
    lists them (``RunData.problems``): the reader's warning as well would show each one twice.
    """
    from areal_hpc.storage import runlog

    logger = logging.getLogger(runlog.__name__)
    saved = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(saved)


def load_run(run_dir: str | Path, *, strict: bool = False,
             point: tuple[tuple[str, str], ...] | None = None) -> RunData:
    """Read a run folder without changing it; damaged shards are skipped (raised with ``strict``) and listed in
    ``RunData.problems()``. ``point``: the swept values when the run is a point of a sweep."""
    from areal_hpc.storage.runlog import RunLog

    path = check_run_dir(run_dir)
    with _reader_quiet():
        rl = RunLog(path, strict=strict)
        samples = rl.samples(fields=SAMPLE_FIELDS)
        steps = rl.steps()
        step_samples = rl.step_samples()
        evals = rl.evals()
    if len(samples) == 0 and len(steps) == 0:
        raise RunFolderError(f"{path}: no readable shards ({len(rl.skipped)} damaged shard(s) skipped)")
    if "shard" in samples.columns:
        samples["rollout_index"] = samples["shard"].astype(str).map(_rollout_index).astype(float)
    metrics, summary = _read_extras(path)
    try:
        leftover_ids = np.asarray(rl.leftover(), np.int64)
    except Exception as e:  # noqa: BLE001 - leftover is a header detail, a running run has none
        log.debug("%s: no leftover: %s", path, e)
        leftover_ids = np.empty(0, np.int64)
    leases, reissued, ended_at = _read_elastic(path)
    return RunData(
        path=path, config=_read_config(path, rl), samples=samples, steps=steps, step_samples=step_samples,
        finished=bool(rl.finished), skipped=list(rl.skipped), partials=list(rl.partials),
        leftover=len(leftover_ids), leftover_ids=leftover_ids, metrics=metrics, summary=summary,
        set_aside=list(rl.set_aside), ignored=list(rl.ignored), point=point, evals=evals, leases=leases,
        reissued=reissued, ended_at=ended_at,
        n_rollout_shards=_count_shards(path / LOG_DIRS[ROLLOUT]),
        n_trainer_shards=_count_shards(path / LOG_DIRS[TRAINER]),
    )


def _rollout_index(shard: Any) -> float:
    parsed = parse_shard_name(Path(str(shard)).name)
    return float(parsed[1]) if parsed and parsed[0] == ROLLOUT else math.nan


def trained_samples(run: RunData) -> pd.DataFrame:
    """The trainer's view of each sample (step, staleness, fate) joined with what the rollout logged about it."""
    if run._trained is not None:
        return run._trained
    ss = run.step_samples
    cols = ["sample_id", "reward", "answer_ok", "response_len"]
    if len(ss) == 0:
        out = pd.DataFrame(columns=[*ss.columns, *cols[1:]])
    else:
        s = run.samples[[c for c in cols if c in run.samples.columns]].drop_duplicates("sample_id")
        out = ss.merge(s, on="sample_id", how="left")
    run._trained = out
    return out


def _ranges(values: list[int]) -> list[tuple[int, int]]:
    """Sorted integers as runs of consecutive values: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    out: list[tuple[int, int]] = []
    for v in sorted(values):
        if out and v == out[-1][1] + 1:
            out[-1] = (out[-1][0], v)
        else:
            out.append((v, v))
    return out


def _ranges_text(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"{a}-{b}" if b != a else str(a) for a, b in ranges)


@dataclass
class Coverage:
    """What the log lacks, so the report never shows counts that contradict each other.

    ``steps_reached``: the last step any record of the run shows (trainer log, metrics.jsonl, summary.json);
    the trainer log should hold every step up to it. ``unmatched``: samples the trainer log names (trained or
    rejected) that no rollout shard holds, whose reward and length are therefore unknown.
    """

    steps_planned: int | None
    steps_reached: int
    steps_logged: int
    missing_steps: list[tuple[int, int]]
    trainer_damaged: int
    trainer_absent: list[str]
    rollout_damaged: int
    rollout_absent: list[str]
    rollout_deleted: bool
    seen_by_trainer: int
    unmatched: int
    finished: bool = True
    pending_steps: tuple[int, int] | None = None  # after the last logged step of an unfinished run
    partial_ranks: list[str] = field(default_factory=list)  # 'rank 1: steps 1-15': steps other ranks did log


    @property
    def n_missing_steps(self) -> int:
        return sum(b - a + 1 for a, b in self.missing_steps)

    def lines(self) -> list[str]:
        """One sentence per log that lacks something, naming what and why (empty when the log is whole)."""
        out = []
        if self.missing_steps:
            of = self.steps_planned or self.steps_reached
            out.append(f"trainer log: step{'s' if self.n_missing_steps > 1 else ''} "
                       f"{_ranges_text(self.missing_steps)} of {of} missing ("
                       + _causes(self.trainer_damaged, self.trainer_absent, "trainer") + ")")
        if self.partial_ranks:
            out.append(f"trainer log: {'; '.join(self.partial_ranks)} missing for that trainer rank only, so those "
                       f"steps lack its share of samples ("
                       + _causes(self.trainer_damaged, self.trainer_absent, "trainer") + ")")
        if self.pending_steps:
            out.append(f"trainer log: steps {_ranges_text([self.pending_steps])} not written yet (the trainer writes "
                       f"a shard's worth of steps at a time; the run is going, or crashed before writing them)")
        if self.unmatched:
            if self.rollout_deleted:
                cause = "rollout shards are deleted once read (transport.retain_shards=false)"
            elif self.rollout_damaged or self.rollout_absent or self.finished:
                cause = _causes(self.rollout_damaged, self.rollout_absent, "rollout")
            else:
                cause = "not written yet: a rollout writer keeps a shard's worth of samples in memory while it runs"
            out.append(f"rollout log: {self.unmatched} of the {self.seen_by_trainer} samples the trainer received "
                       f"have no rollout record ({cause}); reward, accuracy and length cover the other "
                       f"{self.seen_by_trainer - self.unmatched}")
        return out

    def short(self) -> str:
        """A table cell: '' for a whole log, else what lacks, e.g. 'steps 1-15; 120 samples without record'."""
        parts = []
        if self.missing_steps:
            parts.append(f"steps {_ranges_text(self.missing_steps)}")
        if self.partial_ranks:
            parts.append("trainer " + "; ".join(self.partial_ranks))
        if self.pending_steps:
            parts.append(f"steps {_ranges_text([self.pending_steps])} not written yet")
        if self.unmatched:
            parts.append(f"{self.unmatched} samples without record")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {"trainer_steps": _ranges_text(self.missing_steps), "trainer_steps_count": self.n_missing_steps,
                "trainer_steps_pending": _ranges_text([self.pending_steps]) if self.pending_steps else "",
                "steps_reached": self.steps_reached, "steps_logged": self.steps_logged,
                "trainer_ranks_partial": self.partial_ranks, "trainer_shards_damaged": self.trainer_damaged,
                "trainer_shards_absent": self.trainer_absent,
                "rollout_samples_without_record": self.unmatched, "rollout_shards_damaged": self.rollout_damaged,
                "rollout_shards_absent": self.rollout_absent, "rollout_shards_deleted": self.rollout_deleted,
                "lines": self.lines()}


def _causes(damaged: int, absent: list[str], kind: str) -> str:
    parts = []
    if damaged:
        parts.append(f"{damaged} damaged {kind} shard{'s' if damaged > 1 else ''} skipped")
    if absent:
        parts.append("absent: " + "; ".join(absent))
    return ", ".join(parts) or f"no damaged or absent {kind} shard found: the shards were removed or never written"


def _absent_shards(log_dir: Path) -> list[str]:
    """Gaps in each writer's shard numbers (``seq`` counts from 0 without gaps), e.g. 'trainer rank 0: shards 0-1'.

    Damaged and partial files keep their names, so they count as present here: a gap is a file that is gone.
    """
    if not log_dir.is_dir():
        return []
    seqs: dict[tuple[str, int], set[int]] = {}
    for f in log_dir.iterdir():
        parsed = parse_shard_name(f.name) or parse_leftover_name(f.name)
        if parsed:
            seqs.setdefault((parsed[0], parsed[1]), set()).add(parsed[2])
    out = []
    for (kind, index), have in sorted(seqs.items()):
        gone = sorted(set(range(max(have) + 1)) - have)
        if gone:
            who = "trainer rank" if kind == TRAINER else "rollout index"
            out.append(f"{who} {index}: shard{'s' if len(gone) > 1 else ''} {_ranges_text(_ranges(gone))}")
    return out


def coverage(run: RunData) -> Coverage:
    """Compare the log with the other records of the run (metrics.jsonl, summary.json) and with itself."""
    logged = sorted(int(x) for x in run.steps["step"].unique()) if len(run.steps) else []
    reached = [logged[-1] if logged else 0]
    if run.metrics is not None and "step" in run.metrics.columns and len(run.metrics):
        top = pd.to_numeric(run.metrics["step"], errors="coerce").max()
        reached.append(0 if pd.isna(top) else int(top))
    if run.summary and isinstance(run.summary.get("final_version"), int | float):
        reached.append(int(run.summary["final_version"]))
    steps_reached = max(reached)
    planned = _get(run.config, "run", "steps", default=(run.summary or {}).get("steps"))
    if run.finished and planned and not (run.summary or {}).get("preempted"):
        steps_reached = max(steps_reached, int(planned))  # a normal stop ran every planned step
    expected = set(range(1, steps_reached + 1))
    missing = _ranges(sorted(expected - set(logged)))
    kinds = [parse_shard_name(p.name) for p, _ in run.skipped]
    trainer_damaged = sum(1 for k in kinds if k and k[0] == TRAINER)
    trainer_absent = _absent_shards(run.path / LOG_DIRS[TRAINER])
    # the tail of an unfinished run with nothing damaged or gone is in the trainer's memory, not lost
    quiet_tail = not run.finished and not trainer_damaged and not trainer_absent
    pending = missing.pop() if missing and quiet_tail and missing[-1][0] > (logged[-1] if logged else 0) else None
    # with several trainer ranks, one rank's lost shard leaves the step in the log with part of its samples
    ranks = {int(r) for r in run.steps["rank"].unique()} if len(run.steps) else set()
    ranks |= {k[1] for k in kinds if k and k[0] == TRAINER}
    partial_ranks = []
    if len(ranks) > 1:
        for r in sorted(ranks):
            mine = set(run.steps.loc[run.steps["rank"] == r, "step"].astype(int))
            lacks = _ranges(sorted((expected - mine) & set(logged)))
            if lacks:
                partial_ranks.append(f"rank {r}: steps {_ranges_text(lacks)}")
    ss = run.step_samples
    seen = int(ss["sample_id"].nunique()) if len(ss) else 0
    unmatched = 0
    if seen:
        have = run.samples["sample_id"] if len(run.samples) else pd.Series(dtype=np.int64)
        unmatched = int((~pd.Series(ss["sample_id"].unique()).isin(have)).sum())
    retain = _get(run.config, "transport", "retain_shards")
    return Coverage(
        steps_planned=int(planned) if planned else None, steps_reached=steps_reached, steps_logged=len(logged),
        missing_steps=missing,
        trainer_damaged=trainer_damaged, trainer_absent=trainer_absent, partial_ranks=partial_ranks,
        rollout_damaged=sum(1 for k in kinds if k and k[0] == ROLLOUT),
        rollout_absent=[] if retain is False else _absent_shards(run.path / LOG_DIRS[ROLLOUT]),
        rollout_deleted=retain is False, seen_by_trainer=seen, unmatched=unmatched, finished=run.finished,
        pending_steps=pending)


def _stale_cap(run: RunData, staleness: pd.Series) -> int:
    eta = run.eta
    if eta is None:
        eta = int(staleness.max()) if len(staleness) else 0
    return max(0, min(eta, MAX_STALE_COLUMNS))


def split_steps(steps: np.ndarray, n: int) -> list[tuple[int, int]]:
    """About ``n`` contiguous ranges of roughly equal numbers of steps, as (first, last)."""
    u = np.unique(steps)
    if len(u) == 0:
        return []
    return [(int(c[0]), int(c[-1])) for c in np.array_split(u, min(max(1, n), len(u)))]


def step_range_table(run: RunData, bins: int = 10) -> pd.DataFrame:
    """What was trained, how well, and how stale, per range of training steps."""
    ts = trained_samples(run)
    stale_cap = _stale_cap(run, ts["staleness"] if len(ts) else pd.Series(dtype=int))
    stale_cols = [f"stale_{k}" for k in range(stale_cap + 1)] + [f"stale_gt{stale_cap}"]
    all_steps = np.concatenate([run.steps["step"].to_numpy() if len(run.steps) else np.empty(0, np.int64),
                                ts["step"].to_numpy() if len(ts) else np.empty(0, np.int64)])
    rows = []
    for lo, hi in split_steps(all_steps.astype(np.int64), bins):
        part = ts[(ts["step"] >= lo) & (ts["step"] <= hi)] if len(ts) else ts
        used = part[part["fate"] == "used"] if len(part) else part
        st = run.steps[(run.steps["step"] >= lo) & (run.steps["step"] <= hi)] if len(run.steps) else run.steps
        stale = used["staleness"].to_numpy(dtype=float) if len(used) else np.empty(0)
        v_lo = int(st["trained_version"].min()) if len(st) else None
        v_hi = int(st["trained_version"].max()) if len(st) else None
        row: dict[str, Any] = {
            "steps": f"{lo}-{hi}" if hi != lo else str(lo), "step_first": lo, "step_last": hi,
            "versions": "" if v_lo is None else (f"{v_lo}-{v_hi}" if v_hi != v_lo else str(v_lo)),
            "version_first": v_lo, "version_last": v_hi,
            "trained": len(used),
            "rejected": int((part["fate"] == "rejected").sum()) if len(part) else 0,
            "reward": _mean(used, "reward"),
            "accuracy": _mean(used, "answer_ok"),
            "resp_len": _mean(used, "response_len"),
            "stale_mean": float(stale.mean()) if len(stale) else math.nan,
            "stale_p50": float(np.percentile(stale, 50)) if len(stale) else math.nan,
            "stale_p90": float(np.percentile(stale, 90)) if len(stale) else math.nan,
            "stale_max": int(stale.max()) if len(stale) else None,
        }
        for k in range(stale_cap + 1):
            row[f"stale_{k}"] = int((stale == k).sum())
        row[f"stale_gt{stale_cap}"] = int((stale > stale_cap).sum())
        rows.append(row)
    cols = ["steps", "step_first", "step_last", "versions", "version_first", "version_last", "trained", "rejected",
            "reward", "accuracy", "resp_len", "stale_mean", "stale_p50", "stale_p90", "stale_max", *stale_cols]
    return pd.DataFrame(rows, columns=cols)


def _mean(df: pd.DataFrame, col: str) -> float:
    if len(df) == 0 or col not in df.columns:
        return math.nan
    v = pd.to_numeric(df[col], errors="coerce").astype(float)
    return float(v.mean()) if v.notna().any() else math.nan


def time_origin(run: RunData) -> float:
    """Unix time of the first recorded event: elapsed times of all tables and plots count from here."""
    ts = [run.samples["t_start"].min() if len(run.samples) else math.nan,
          run.steps["time"].min() if len(run.steps) else math.nan]
    ts = [t for t in ts if not math.isnan(t)]
    return float(min(ts)) if ts else 0.0


def _time_bins(run: RunData, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Samples' t_end and steps' times since the time origin, and ``bins`` equal buckets over the span of both
    (None when the log has neither): the buckets every table over time shares."""
    t0 = time_origin(run)
    t_end = run.samples["t_end"].to_numpy(float) - t0 if len(run.samples) else np.empty(0)
    t_step = run.steps["time"].to_numpy(float) - t0 if len(run.steps) else np.empty(0)
    both = np.concatenate([t_end, t_step])
    if len(both) == 0:
        return t_end, t_step, None
    span = float(both.max())
    return t_end, t_step, np.linspace(0.0, span if span > 0 else 1.0, max(1, bins) + 1)


def _bin_of(edges: np.ndarray, t: np.ndarray) -> np.ndarray:
    return np.clip(np.searchsorted(edges, t, side="right") - 1, 0, len(edges) - 2)


def throughput_table(run: RunData, bins: int = 10) -> pd.DataFrame:
    """Generation (by t_end) and training (by step time) per equal time bucket, to see stalls and ramp-up."""
    cols = ["t_from_s", "t_to_s", "generated", "gen_tokens", "samples_per_s", "tokens_per_s", "reward",
            "steps", "trained", "trained_per_s"]
    t_end, t_step, edges = _time_bins(run, bins)
    if edges is None:
        return pd.DataFrame(columns=cols)
    width = edges[1] - edges[0]
    b_gen, b_step = _bin_of(edges, t_end), _bin_of(edges, t_step)
    resp = run.samples["response_len"].to_numpy(float) if len(run.samples) else np.empty(0)
    reward = run.samples["reward"].to_numpy(float) if len(run.samples) else np.empty(0)
    n_used = run.steps["n_used"].to_numpy(float) if len(run.steps) and "n_used" in run.steps else np.zeros(len(t_step))
    step_no = run.steps["step"].to_numpy() if len(run.steps) else np.empty(0)
    rows = []
    for b in range(len(edges) - 1):
        g, s = b_gen == b, b_step == b
        n, tok = int(g.sum()), float(resp[g].sum())
        rows.append({
            "t_from_s": float(edges[b]), "t_to_s": float(edges[b + 1]), "generated": n, "gen_tokens": int(tok),
            "samples_per_s": n / width, "tokens_per_s": tok / width,
            "reward": float(reward[g].mean()) if n else math.nan,
            "steps": len(np.unique(step_no[s])), "trained": int(n_used[s].sum()),
            "trained_per_s": float(n_used[s].sum()) / width,
        })
    return pd.DataFrame(rows, columns=cols)


def rollout_rank_table(run: RunData) -> pd.DataFrame:
    """Per generating rank: balance, speed, and how often weight updates hit samples in flight.

    An attached worker's samples carry rank -1 (it is no rank of the run's MPI world): each worker is a row of its
    own, after the ranks, told apart by its shards' index (1000 + its id).
    """
    cols = ["rank", "index", "generated", "share", "gen_s_mean", "gen_s_p90", "resp_len", "reward", "interrupted",
            "interruptions", "multi_version", "samples_per_s"]
    s = run.samples
    if len(s) == 0:
        return pd.DataFrame(columns=cols)
    rows = []
    worker = _workers_of(s)
    for (_, rank, _), g in s.groupby([worker >= 0, s["rank"], worker], sort=True):
        dur = (g["t_end"] - g["t_start"]).to_numpy(float)
        span = float(g["t_end"].max() - g["t_start"].min())
        idx = g["rollout_index"].dropna() if "rollout_index" in g else pd.Series(dtype=float)
        rows.append({
            "rank": int(rank), "index": int(idx.iloc[0]) if len(idx) and idx.nunique() == 1 else None,
            "generated": len(g), "share": len(g) / len(s),
            "gen_s_mean": float(dur.mean()), "gen_s_p90": float(np.percentile(dur, 90)),
            "resp_len": _mean(g, "response_len"), "reward": _mean(g, "reward"),
            "interrupted": int((g["interruptions"] > 0).sum()), "interruptions": int(g["interruptions"].sum()),
            "multi_version": int((g["n_versions"] > 1).sum()) if "n_versions" in g else None,
            "samples_per_s": len(g) / span if span > 0 else math.nan,
        })
    return pd.DataFrame(rows, columns=cols)


def _workers_of(samples: pd.DataFrame) -> pd.Series:
    """Each sample's attached worker, -1 for the job's own rollout ranks (and for logs older than schema 3)."""
    if "worker" not in samples.columns:
        return pd.Series(-1, index=samples.index, dtype=np.int64)
    return samples["worker"].fillna(-1).astype(np.int64)


def has_workers(run: RunData) -> bool:
    """Whether rollout workers attached to the run: a sample of one in the log, or a lease in the run folder."""
    return bool(run.leases) or bool(len(run.samples) and (_workers_of(run.samples) >= 0).any())


def _producer_codes(samples: pd.DataFrame) -> np.ndarray:
    """One integer per sample naming its producer: an attached worker's id (>= 0), or -1 - rank for the job's
    own rollout rank of that MPI rank."""
    w = _workers_of(samples).to_numpy()
    return np.where(w >= 0, w, -1 - samples["rank"].to_numpy(np.int64)) if len(samples) else np.empty(0, np.int64)


def _producer_name(code: int) -> str:
    """A producer's name as the trainer's messages and ``elastic/reissued.jsonl`` write it."""
    return f"worker {code}" if code >= 0 else f"rank {-1 - code}"


def _lease_state(run: RunData, lease: dict[str, Any], end: float) -> tuple[str, str]:
    """(state, reason) of a worker's last lease at ``end``; a lease not renewed within ``elastic.lease_s`` of it
    reads ``expired``, as the trainer took it: the worker was killed (SIGKILL writes no goodbye) or lost its node."""
    state, reason = str(lease.get("state", "?")), str(lease.get("reason", "") or "")
    lease_s = _float(_get(run.config, "elastic", "lease_s", default=ElasticConfig().lease_s))
    beat = _float(lease.get("time"))
    if state != "left" and math.isfinite(beat) and end - beat > lease_s:
        return "expired", (f"no heartbeat after {beat - time_origin(run):.1f} s (elastic.lease_s={lease_s:g}): "
                           "killed or node lost")
    return state, reason


def _run_end(run: RunData) -> float:
    """When the run stopped (its ``elastic/run.json`` once ended, else its last step), or now while it runs."""
    if run.ended_at is not None:
        return run.ended_at
    if run.finished and len(run.steps):
        return float(run.steps["time"].max())
    return time.time()


def producer_table(run: RunData) -> pd.DataFrame:
    """One row per producer of samples, the job's rollout ranks first, then each attached worker: what it
    generated and what became of it, when it was active and how fast, and (workers) how it left.

    ``not_trained`` = generated - trained - rejected; of those, ``leftover``: held by the trainer when it stopped;
    ``duplicates``: of a prompt whose grant was re-issued away from this producer (``elastic/reissued.jsonl``) or
    trained from another producer's samples, dropped by the trainer; ``after_stop``: written after the trainer's
    last step of a finished run and never read. ``joined_s``/``left_s``: first t_start and last t_end, in seconds
    since the run's first event; ``samples_per_s``: generated over that span.
    """
    cols = ["producer", "generated", "trained", "rejected", "not_trained", "leftover", "duplicates", "after_stop",
            "stale_mean", "joined_s", "left_s", "samples_per_s", "reissued", "lease", "reason"]
    s = run.samples
    t0, ss = time_origin(run), run.step_samples
    by_id = (ss.drop_duplicates("sample_id").set_index("sample_id") if len(ss)
             else pd.DataFrame({"fate": pd.Series(dtype=str), "staleness": pd.Series(dtype=float)}))
    ids = s["sample_id"] if len(s) else pd.Series(dtype=np.int64)
    fate = ids.map(by_id["fate"].astype(str))
    fate = fate.where(fate.notna(), "")
    fate[ids.isin(run.leftover_ids) & (fate == "")] = "leftover"
    seen = (fate != "").to_numpy()
    code = _producer_codes(s)
    prompt = (s["prompt_id"] if "prompt_id" in s.columns else pd.Series(-1, index=s.index)).to_numpy(np.int64)
    pairs = pd.MultiIndex.from_arrays([prompt, code])
    # a prompt the trainer took from one producer: the same prompt from any other one was a duplicate
    taken = pairs[seen].unique()
    n_holders = pd.Series(prompt).map(pd.Series(taken.get_level_values(0)).value_counts()).fillna(0).to_numpy()
    by_other = n_holders > pairs.isin(taken)
    back = pd.Series(dtype=np.int64)
    moved_away = np.zeros(len(s), bool)
    if run.reissued is not None and len(run.reissued):
        frm = pd.to_numeric(run.reissued["from"], errors="coerce")
        ok = frm.notna().to_numpy()
        frm = frm[ok].astype(np.int64)
        back = frm.value_counts()
        moved_away = pairs.isin(pd.MultiIndex.from_arrays([run.reissued["prompt"][ok].astype(np.int64), frm]))
    dup = ~seen & (by_other | moved_away)
    last_step = float(run.steps["time"].max()) if len(run.steps) else math.nan
    after = ~seen & ~dup & run.finished & (s["t_end"].to_numpy(float) > last_step) if len(s) else np.zeros(0, bool)
    end = _run_end(run)
    ranks = sorted(-1 - int(c) for c in np.unique(code[code < 0]))
    workers = sorted({int(c) for c in np.unique(code[code >= 0])} | set(run.leases))
    rows = []
    for c in [-1 - r for r in ranks] + workers:
        m = code == c
        g, f = s[m], fate[m]
        n, used, rej = len(g), int((f == "used").sum()), int((f == "rejected").sum())
        st = g["sample_id"].map(by_id["staleness"])[f == "used"] if n else pd.Series(dtype=float)
        t_in = float(g["t_start"].min()) - t0 if n else math.nan
        t_out = float(g["t_end"].max()) - t0 if n else math.nan
        lease = run.leases.get(c) if c >= 0 else None
        state, reason = _lease_state(run, lease, end) if lease is not None else (None, None)
        rows.append({
            "producer": _producer_name(c), "generated": n, "trained": used, "rejected": rej,
            "not_trained": n - used - rej, "leftover": int((f == "leftover").sum()), "duplicates": int(dup[m].sum()),
            "after_stop": int(after[m].sum()), "stale_mean": float(st.mean()) if len(st) else math.nan,
            "joined_s": t_in, "left_s": t_out, "samples_per_s": n / (t_out - t_in) if n and t_out > t_in else math.nan,
            "reissued": int(back.get(c, 0)) if c >= 0 else None, "lease": state, "reason": reason,
        })
    out = pd.DataFrame(rows, columns=cols)
    out["reissued"] = pd.Series([r["reissued"] for r in rows], index=out.index, dtype=object)  # ranks: none
    return out


def elastic_timeline(run: RunData, bins: int = 10) -> pd.DataFrame:
    """Training throughput per equal time bucket (by the trainer's step times) against the attached workers
    active in it (a worker is active from its first sample's t_start to its last one's t_end), the trained samples
    they generated, the grants taken back from gone workers (``elastic/reissued.jsonl``), and who joined (+wN) or
    left (-wN) in the bucket."""
    cols = ["t_from_s", "t_to_s", "steps", "trained", "trained_per_s", "workers", "from_workers", "reissued",
            "events"]
    _, t_step, edges = _time_bins(run, bins)
    if edges is None:
        return pd.DataFrame(columns=cols)
    t0, width = time_origin(run), edges[1] - edges[0]
    b_step = _bin_of(edges, t_step)
    n_used = run.steps["n_used"].to_numpy(float) if len(run.steps) and "n_used" in run.steps else np.zeros(len(t_step))
    step_no = run.steps["step"].to_numpy() if len(run.steps) else np.empty(0)
    s = run.samples
    worker = _workers_of(s)
    spans = [(int(w), float(g["t_start"].min()) - t0, float(g["t_end"].max()) - t0)
             for w, g in s[worker >= 0].groupby(worker[worker >= 0], sort=True)]
    wid = np.array([w for w, _, _ in spans], np.int64)
    joined_s, left_s = np.array([a for _, a, _ in spans]), np.array([z for _, _, z in spans])
    b_join, b_leave = _bin_of(edges, joined_s), _bin_of(edges, left_s)
    # trained samples that workers generated, at the time of the step that trained them
    ss = run.step_samples
    from_w = np.empty(0)
    if len(ss) and len(run.steps):
        used = ss[ss["fate"] == "used"]
        ids = set(s.loc[worker >= 0, "sample_id"])
        step_time = run.steps.groupby("step")["time"].max()
        from_w = used.loc[used["sample_id"].isin(ids), "step"].map(step_time).to_numpy(float) - t0
    b_from = _bin_of(edges, from_w)
    back = run.reissued["time"].to_numpy(float) - t0 if run.reissued is not None else np.empty(0)
    b_back = _bin_of(edges, back[np.isfinite(back)])
    rows = []
    for b in range(len(edges) - 1):
        lo, hi = float(edges[b]), float(edges[b + 1])
        s_in = b_step == b
        rows.append({
            "t_from_s": lo, "t_to_s": hi, "steps": len(np.unique(step_no[s_in])), "trained": int(n_used[s_in].sum()),
            "trained_per_s": float(n_used[s_in].sum()) / width,
            # active in [lo, hi): joined before it ends, left at or after it starts (the buckets of _bin_of)
            "workers": int(((b_join <= b) & (b_leave >= b)).sum()),
            "from_workers": int((b_from == b).sum()), "reissued": int((b_back == b).sum()),
            "events": " ".join([f"+w{w}" for w in wid[b_join == b]] + [f"-w{w}" for w in wid[b_leave == b]]),
        })
    return pd.DataFrame(rows, columns=cols)


def per_step(run: RunData) -> pd.DataFrame:
    """Reward and accuracy of the samples each step trained on, from the log; steps the log lacks (a damaged
    or lost trainer shard) come from metrics.jsonl, which trainer 0 writes at every step, when it has them."""
    cols = ["step", "reward", "accuracy", "trained"]
    ts = trained_samples(run)
    used = ts[ts["fate"] == "used"] if len(ts) else ts
    out = pd.DataFrame(columns=cols)
    if len(used):
        g = used.assign(answer_ok=used["answer_ok"].astype(float)).groupby("step")
        out = pd.DataFrame({"reward": g["reward"].mean(), "accuracy": g["answer_ok"].mean(),
                            "trained": g.size()}).reset_index()
    m = run.metrics
    if m is not None and len(m) and {"step", "reward"} <= set(m.columns):
        extra = m[~m["step"].isin(out["step"])]
        if len(extra):
            fill = pd.DataFrame({"step": extra["step"], "reward": extra["reward"],
                                 "accuracy": extra["accuracy"] if "accuracy" in extra.columns else math.nan,
                                 "trained": extra["samples"] if "samples" in extra.columns else math.nan})
            out = fill if len(out) == 0 else pd.concat([out, fill], ignore_index=True)
    return out.sort_values("step").reset_index(drop=True)


def comparison_table(runs: list[RunData] | tuple[RunData, ...]) -> pd.DataFrame:
    """One row per run, to compare a sweep's points: how far each got, how fast, how well; ``missing`` says
    what its log lacks (the rates count only what the log holds).

    Rates come from the log for every run alike (trained samples over the span of the steps, generated ones over
    the span of the samples), so runs with and without ``summary.json`` compare fairly; the held-out accuracy
    comes from ``summary.json`` (NaN until the run has evaluated).
    """
    cols = ["run", "finished", "steps", "trained", "generated", "trained_per_s", "generated_per_s",
            "reward_first", "reward_last", "accuracy_before", "accuracy_after", "missing"]
    rows = []
    for run in runs:
        t0 = time_origin(run)
        ps = per_step(run).sort_values("step")
        tenth = max(1, len(ps) // 10)
        n_used = float(run.steps["n_used"].sum()) if len(run.steps) and "n_used" in run.steps else math.nan
        t_steps = float(run.steps["time"].max()) - t0 if len(run.steps) else math.nan
        t_gen = float(run.samples["t_end"].max()) - t0 if len(run.samples) else math.nan
        s = run.summary or {}
        cov = coverage(run)
        rows.append({
            "run": run.label, "finished": run.finished,
            "steps": int(run.steps["step"].max()) if len(run.steps) else 0,
            "trained": int(n_used) if not math.isnan(n_used) else 0, "generated": len(run.samples),
            "trained_per_s": n_used / t_steps if t_steps and t_steps > 0 else math.nan,
            "generated_per_s": len(run.samples) / t_gen if t_gen and t_gen > 0 else math.nan,
            "reward_first": _mean(ps.head(tenth), "reward"), "reward_last": _mean(ps.tail(tenth), "reward"),
            "accuracy_before": _float(s.get("accuracy_before")), "accuracy_after": _float(s.get("accuracy_after")),
            "missing": cov.short() or "none",
        })
    return pd.DataFrame(rows, columns=cols)


def _float(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan


def reward_time(run: RunData) -> dict[str, Any] | None:
    """Seconds the verifier took per sample (mean, p50, p99) and how many samples its time limit cut short;
    None when the log does not record it (a schema-1 log reads the time as NaN)."""
    s = run.samples
    if "reward_seconds" not in s.columns:
        return None
    sec = s["reward_seconds"].to_numpy(float)
    sec = sec[np.isfinite(sec)]
    if len(sec) == 0:
        return None
    timeouts = int(s["reward_timed_out"].astype(bool).sum())
    return {"samples": len(sec), "mean_s": float(sec.mean()), "p50_s": float(np.percentile(sec, 50)),
            "p99_s": float(np.percentile(sec, 99)), "timeouts": timeouts, "timeout_fraction": timeouts / len(s)}


def eval_table(run: RunData) -> pd.DataFrame:
    """One row per evaluation step, one column per metric (in the order the run logged them)."""
    ev = run.evals
    if ev is None or len(ev) == 0:
        return pd.DataFrame(columns=["step"])
    wide = ev.pivot_table(index="step", columns="metric", values="value", aggfunc="last", sort=False)
    wide = wide[list(dict.fromkeys(ev["metric"]))].sort_index()
    wide.columns.name = None
    for c in wide.columns:  # counts (n, k) read as counts, not as 200.0; a step without the metric stays NaN
        v = wide[c].to_numpy(float)
        known = np.isfinite(v)
        if known.any() and (v[known] == np.round(v[known])).all():
            wide[c] = pd.Series([int(x) if ok else math.nan for x, ok in zip(v, known)], index=wide.index,
                                dtype=object)
    return wide.reset_index()


def tables_of(run: RunData, bins: int = 10) -> dict[str, pd.DataFrame]:
    out = {"step_ranges": step_range_table(run, bins), "throughput": throughput_table(run, bins),
           "rollout_ranks": rollout_rank_table(run)}
    if has_workers(run):
        out["producers"] = producer_table(run)
        out["elastic_timeline"] = elastic_timeline(run, bins)
    if run.evals is not None and len(run.evals):
        out["evals"] = eval_table(run)
    return out


def summarize(run_dir: str | Path, *, bins: int = 10, strict: bool = False) -> dict[str, pd.DataFrame]:
    """The report's tables of one run: ``step_ranges``, ``throughput``, ``rollout_ranks``; ``producers`` and
    ``elastic_timeline`` when rollout workers attached to it; ``evals`` when it logged evaluations."""
    return tables_of(load_run(run_dir, strict=strict), bins)


# ---- terminal rendering -------------------------------------------------------------------------------------------


def _decimals(values: pd.Series) -> int:
    """One precision per column, so a column's numbers line up: fewer decimals for larger magnitudes."""
    v = pd.to_numeric(values, errors="coerce").abs()
    top = float(v.max()) if v.notna().any() else 0.0
    return 3 if top < 10 else 1 if top < 1000 else 0


def _cell(v: Any, decimals: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, bool | np.bool_):
        return "yes" if v else "no"
    if isinstance(v, int | np.integer):
        return str(int(v))
    if isinstance(v, float | np.floating):
        return f"{v:,.{decimals}f}"
    return str(v)


def format_table(df: pd.DataFrame, title: str) -> str:
    """Aligned plain-text table: numbers right-aligned, text left-aligned, NaN as '-'."""
    cols = [c for c in df.columns if c not in _HIDDEN]
    if len(df) == 0:
        return f"{title}\n  (no data)"
    dec = [_decimals(df[c]) for c in cols]
    cells = [[_cell(v, d) for v, d in zip(row, dec)] for row in df[cols].itertuples(index=False, name=None)]
    numeric = [pd.api.types.is_numeric_dtype(df[c]) or all(_is_num(r[i]) for r in cells) for i, c in enumerate(cols)]
    widths = [max(len(str(c)), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]

    def line(vals: list[str]) -> str:
        return "  " + "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric))

    out = [title, line([str(c) for c in cols]), "  " + "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _is_num(s: str) -> bool:
    try:
        float(s.replace(",", ""))
        return True
    except ValueError:
        return s == "-"


def format_header(run: RunData) -> list[str]:
    """The run's facts in a few lines; where the log lacks something, a MISSING line says what instead of
    counts that would contradict each other (steps N/N with steps gone, more trained than generated)."""
    info = run.info()
    cfg = run.essentials()
    cov = coverage(run)
    lines = [f"== run {run.path}" + (f"  [{run.label}]" if run.point else ""),
             "config: " + (" ".join(f"{k}={v}" for k, v in cfg.items()) or "(no config.yaml or shard config)")]
    planned = cfg.get("steps_planned")
    state = "finished" if run.finished else "NOT finished (no final trainer shard: still running or crashed)"
    if cov.missing_steps:
        steps = f"{cov.steps_logged} of {planned or cov.steps_reached} steps in the trainer log"
    else:
        steps = f"{info['steps_done']}" + (f"/{planned}" if planned else "") + " steps"
    generated = f"{info['samples_generated']} samples generated" + (" (in the rollout log)" if cov.unmatched else "")
    lines.append(f"status: {state}; {steps}; {generated}, {info['samples_trained']} trained, "
                 f"{info['samples_rejected']} rejected as stale" + (f", {run.leftover} left over at stop"
                                                                    if run.finished else ""))
    lines += [f"MISSING {line}" for line in cov.lines()]
    if "accuracy_before" in info and "accuracy_after" in info:
        lines.append(f"held-out accuracy (summary.json): {_cell(info['accuracy_before'])} -> "
                     f"{_cell(info['accuracy_after'])} in {_cell(info.get('train_seconds'), 1)} s of training")
    rt = info["reward_time"]
    if rt:
        lines.append(f"reward time per sample: mean {rt['mean_s']:.3f} s, p50 {rt['p50_s']:.3f} s, p99 "
                     f"{rt['p99_s']:.3f} s; timed out: {rt['timeouts']} ({100 * rt['timeout_fraction']:.1f}%)")
    if has_workers(run):
        lines.append(elastic_line(run))
    lines.append(f"log: {run.n_rollout_shards} rollout + {run.n_trainer_shards} trainer shards; "
                 f"damaged shards skipped: {len(run.skipped)}; partial files: {len(run.partials)}")
    lines += [f"WARNING: {p}" for p in run.problems()]
    return lines


def elastic_summary(run: RunData) -> dict[str, Any]:
    """Attached workers at a glance: their ids, the samples they generated and the trainer trained, and the
    grants taken back from them (``elastic/reissued.jsonl``)."""
    w = _workers_of(run.samples)
    used = run.step_samples[run.step_samples["fate"] == "used"] if len(run.step_samples) else run.step_samples
    return {"workers": sorted({int(i) for i in w[w >= 0]} | set(run.leases)),
            "samples_generated": int((w >= 0).sum()),
            "samples_trained": int(used["sample_id"].isin(run.samples.loc[w >= 0, "sample_id"]).sum())
            if len(used) else 0,
            "grants_reissued": len(run.reissued) if run.reissued is not None else 0}


def elastic_line(run: RunData) -> str:
    """The header's one line on attached workers."""
    e = elastic_summary(run)
    n = e["samples_generated"]
    share = f" ({100 * n / len(run.samples):.1f}%)" if len(run.samples) else ""
    return (f"attached workers: {len(e['workers'])} ({', '.join(f'w{i}' for i in e['workers'])}) generated {n} "
            f"samples{share}, {e['samples_trained']} trained; {e['grants_reissued']} grants re-issued to other "
            f"producers")


_TITLES = {
    "step_ranges": "Training by step range (trained samples; staleness = versions behind the trained policy)",
    "throughput": "Throughput over time (seconds since the first sample; generation by t_end)",
    "rollout_ranks": "Rollout ranks (gen_s = t_end - t_start; interrupted = weight updates in flight)",
    "evals": "Held-out evaluation (step 0: before training)",
    "producers": "Producers: the job's rollout ranks and the attached workers (times in s since the first sample; "
                 "not_trained = leftover + duplicates + after_stop + not yet read)",
    "elastic_timeline": "Training throughput against attached workers (workers: active in the bucket; from_workers: "
                        "trained samples they generated; +wN joined, -wN left)",
}


def render_run(run: RunData, tables: dict[str, pd.DataFrame]) -> str:
    parts = ["\n".join(format_header(run))]
    parts += [format_table(df, _TITLES.get(name, name)) for name, df in tables.items()]
    return "\n\n".join(parts)


def jsonable(v: Any) -> Any:
    """Plain JSON values: numpy scalars unwrapped, NaN/inf as null (JSON has neither)."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, Path):
        return str(v)
    return v


def run_to_json(run: RunData, tables: dict[str, pd.DataFrame]) -> dict[str, Any]:
    return jsonable({"info": run.info(),
                     "tables": {k: df.astype(object).to_dict("records") for k, df in tables.items()}})
