"""Resumable checkpoints: policy, optimizer, version, data position, staleness counters.

A checkpoint is a directory ``RUN/checkpoints/step-VVVVVV/`` written under a temporary name and
renamed when complete; ``RUN/checkpoints/latest.json`` is replaced atomically to point at it, so a
job killed mid-checkpoint resumes from the previous one.

Data position: prompts are per-rollout-rank streams (prompt = k·n_rollout + index). The checkpoint
keeps every prompt the trainers *consumed* (trained or rejected); a resumed rank regenerates the
unconsumed ones below its highest consumed k first (left in rings, in flight, or rejected-and-
credited), then continues after it. Nothing is skipped, nothing trained twice. The staleness gate
restarts with admitted = version·share, as if the rank had produced exactly its share of every
step so far (the fix for AReaL's issue #1388, where staleness grew past η after recovery).

Both roles read ``ResumeState`` (the rollouts their data position, the trainers their version), so it lives
here, below them. The policy inside a checkpoint is written by a function the caller passes in: how a
policy is saved is the training backend's business (HF format for the torch engine; another backend
converts its own sharded weights), while the layout around it (state, data position, the ``latest``
pointer) is this module's.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from areal_hpc.storage.records import ATTACHED_PROMPT_BASE

LATEST = "latest.json"


@dataclass
class ResumeState:
    version: int
    attempt: int
    consumed_prompts: np.ndarray  # int64, every prompt id consumed so far (sorted, unique)
    accuracy_before: float
    path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def rollout_plan(self, index: int, n_rollout: int) -> tuple[list[int], int]:
        """(local prompt numbers to regenerate first, next new local number) for rollout ``index``."""
        injob = self.consumed_prompts[self.consumed_prompts < ATTACHED_PROMPT_BASE]
        mine = injob[injob % n_rollout == index] // n_rollout
        if mine.size == 0:
            return [], 0
        next_k = int(mine.max()) + 1
        holes = np.setdiff1d(np.arange(next_k), mine)
        return holes.tolist(), next_k


def save_checkpoint(ckpt_root: Path, *, write_policy: Callable[[Path], Path], trainer_state: dict, version: int,
                    attempt: int, consumed_prompts: np.ndarray, accuracy_before: float,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write ``step-VVVVVV`` and only then point ``latest.json`` at it.

    ``write_policy(path)`` must create the policy directory at ``path`` atomically (write aside, rename) and
    return it, e.g. ``functools.partial(model.build.save_policy, model, tokenizer)``; it must leave a
    ``config.json`` there, which ``load_latest`` checks for.
    """
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{version:06d}"
    policy = write_policy(final)
    tmp = policy / "trainer_state.pt.tmp"
    torch.save(trainer_state, tmp)
    os.replace(tmp, policy / "trainer_state.pt")
    np.save(policy / "consumed_prompts.npy", np.unique(consumed_prompts.astype(np.int64)))
    state = {"version": version, "attempt": attempt, "accuracy_before": accuracy_before, **(extra or {})}
    (policy / "state.json").write_text(json.dumps(state))
    pointer = ckpt_root / (LATEST + ".tmp")
    pointer.write_text(json.dumps({"path": final.name, "version": version}))
    os.replace(pointer, ckpt_root / LATEST)  # only now does a restart see the new checkpoint
    return final


def load_latest(ckpt_root: Path) -> ResumeState | None:
    pointer = ckpt_root / LATEST
    if not pointer.exists():
        return None
    path = ckpt_root / json.loads(pointer.read_text())["path"]
    needed = ["config.json", "trainer_state.pt", "consumed_prompts.npy", "state.json"]
    missing = [n for n in needed if not (path / n).exists()]
    if missing:
        raise FileNotFoundError(
            f"checkpoint {path} named by {pointer} lacks {', '.join(missing)}; restore it or start fresh with "
            f"run.resume=never (the run's log is kept either way)"
        )
    state = json.loads((path / "state.json").read_text())
    return ResumeState(version=int(state.pop("version")), attempt=int(state.pop("attempt")),
                       consumed_prompts=np.load(path / "consumed_prompts.npy"),
                       accuracy_before=float(state.pop("accuracy_before")), path=path, extra=state)


def prune(ckpt_root: Path, keep: int = 2) -> None:
    """Keep the newest ``keep`` step checkpoints (the one ``latest`` names is always among them)."""
    steps = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and not p.name.count(".tmp"))
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
