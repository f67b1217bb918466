"""Whether a worker may attach to a run, and the config it samples with.

An attached worker must sample exactly what the run's trainers expect (the same model, task, prompts,
group size, temperature, staleness bound...), so its config is the run's own ``RUN/config.yaml``; only keys
that change how fast or where a worker generates, never what, may differ per worker (``PER_WORKER``), e.g. an
older GPU type that needs ``rollout.dtype=float16``. Everything is checked here, before a Slurm job is
queued, so a mistake is one line at the command line instead of N array tasks that start and fail; the
worker checks again when its job starts (the run may have ended while it waited in the queue).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from areal_hpc.config import Config, ConfigError, load_config
from areal_hpc.config.loader import config_to_dict
from areal_hpc.elastic.layout import ElasticFiles, read_json

#: Keys a worker may set to its own value: its engine, dtype, batch shape, device, vLLM's knobs, its reward
#: processes and its log level change its speed and memory, not the samples' distribution.
PER_WORKER: frozenset[str] = frozenset({
    "rollout.engine", "rollout.dtype", "rollout.max_concurrent_groups", "rollout.batch_bucket_step",
    "model.device", "reward.workers", "run.log_level",
})
#: Sections whose every key may differ per worker.
PER_WORKER_SECTIONS: frozenset[str] = frozenset({"vllm"})

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"


class AttachError(ValueError):
    """The run cannot take a worker now, or the worker's config differs from the run's; one actionable line."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split("\n")))


def may_differ(key: str) -> bool:
    """Whether dotted ``key`` may be set per worker."""
    return key in PER_WORKER or key.partition(".")[0] in PER_WORKER_SECTIONS


def config_sha(text: str) -> str:
    """What ``run.json`` records of the run's config: the sha256 of ``config.yaml``'s text."""
    return hashlib.sha256(text.encode()).hexdigest()


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        rec = read_json(path)
    except ValueError:  # a torn copy where rename is not atomic: the same as not there yet
        return None
    return rec if isinstance(rec, dict) else None


def _check_alive(run_dir: Path, files: ElasticFiles, lease_s: float, text: str) -> None:
    """The run has not ended and its trainer 0 renewed ``run.json`` within ``lease_s``."""
    status = f"check it with: areal-hpc status {run_dir}"
    run = _load_json(files.run)
    summary = _load_json(run_dir / SUMMARY_FILE)
    if (run is not None and run.get("state") == "ended") or (summary is not None and not summary.get("preempted")):
        why = "its run.json says ended" if run is not None and run.get("state") == "ended" else "it left a summary.json"
        raise AttachError(f"the run in {run_dir} has ended ({why}); nothing to attach to: "
                          f"start a new run with `areal-hpc train`, then attach to its folder")
    if run is None:
        raise AttachError(f"the main job of {run_dir} is not running (no {files.run.relative_to(run_dir)}: not "
                          f"started yet, or started by a version without elastic rollout); start it with "
                          f"`areal-hpc train` or `areal-hpc submit` and attach once it runs; {status}")
    if run.get("state") == "requeued":
        raise AttachError(f"the main job of {run_dir} was preempted and requeued (attempt {run.get('attempt')}) "
                          f"and has not started again; attach once it runs; {status}")
    age = time.time() - float(run.get("time", 0.0))
    if age > lease_s:
        raise AttachError(f"the main job of {run_dir} is not running: its heartbeat "
                          f"{files.run.relative_to(run_dir)} is {age:.0f} s old, more than elastic.lease_s="
                          f"{lease_s:g} (killed, or its node is gone); {status}")
    if run.get("config_sha") not in (None, config_sha(text)):
        raise AttachError(f"{run_dir / CONFIG_FILE} changed since the main job started (its sha256 differs from "
                          f"the one in {files.run.relative_to(run_dir)}); attached workers must sample what the "
                          f"trainer expects: put the run's config back")


def check_attachable(run_dir: Path, overrides: list[str], *, lease_s: float | None = None) -> Config:
    """The worker's config: the run's with ``overrides``; ``AttachError`` when the run cannot take a worker.

    ``lease_s``: how old the run's heartbeat may be (default: the run's ``elastic.lease_s``).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AttachError(f"{run_dir} is not a folder; pass the run folder the main job writes "
                          f"(run.output_dir/run.name, e.g. runs/quickstart)")
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise AttachError(f"{run_dir} is not a run folder (no {CONFIG_FILE}); pass the folder of a running "
                          f"`areal-hpc train` or `submit` run (run.output_dir/run.name)")
    text = path.read_text(encoding="utf-8")
    try:
        run_cfg = load_config(path)
    except ConfigError as e:
        raise AttachError(f"the run's {path} does not load ({e}); attach with the areal_hpc version that "
                          f"started the run") from None
    try:
        cfg = load_config(path, overrides)
    except ConfigError as e:  # a typo or a bad value: the loader's own line
        raise AttachError(str(e)) from None
    _check_alive(run_dir, ElasticFiles(run_dir), run_cfg.elastic.lease_s if lease_s is None else lease_s, text)
    theirs, ours = _flat(config_to_dict(run_cfg)), _flat(config_to_dict(cfg))
    for key, value in ours.items():
        if value != theirs.get(key) and not may_differ(key):
            allowed = ", ".join([*sorted(PER_WORKER), *(f"{s}.*" for s in sorted(PER_WORKER_SECTIONS))])
            raise AttachError(f"config key '{key}' is {json.dumps(value)} for this worker but "
                              f"{json.dumps(theirs.get(key))} in the run ({path}); attached workers must sample "
                              f"what the trainer expects: drop the override (keys that may differ per worker: "
                              f"{allowed})")
    return cfg
