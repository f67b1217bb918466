"""The one sample type, from the rollout worker through the ring, the HDF5 log and the trainer; typed stats.

A trajectory is defined once here: the ring codec (``transport/codec.py``), the HDF5 schema
(``storage/schema.py``, docs/rollout-log.md) and the trainer all take its fields from this class, so a
new field is added in one place and a missing one fails loudly instead of reading a default.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

#: How a generation ended: its stop token, its length limit, or aborted by the rollout (a stale group the
#: trainer must reject, delivered as it stood).
Fate = Literal["stop", "length", "aborted"]
FATES: tuple[str, ...] = ("stop", "length", "aborted")


def _array(value: Any, dtype: type) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"trajectory arrays must be 1-D, got shape {arr.shape}")
    if arr.dtype == dtype:
        return arr
    out = arr.astype(dtype)
    if arr.size and dtype is np.int32 and not np.array_equal(out, arr):
        raise ValueError("trajectory token/version arrays must fit in int32")
    return out


@dataclass
class Trajectory:
    """One sampled response to one prompt; the per-token arrays are aligned to ``response_tokens``.

    ``versions[j]`` is the policy version that sampled token j, so a sequence interrupted by new
    weights carries both versions, and staleness is judged by its oldest token.
    """

    sample_id: int
    group_id: int
    prompt_tokens: np.ndarray  # int32 [P], P >= 1
    response_tokens: np.ndarray  # int32 [R]
    behav_logprobs: np.ndarray  # float32 [R], log-prob of each token under the distribution it was sampled from
    versions: np.ndarray  # int32 [R]
    reward: float
    prompt_id: int = -1  # -1: the group's id (one prompt per group)
    rank: int = -1  # the MPI rank that generated it (-1: made outside a run, e.g. by a test or bench)
    answer_ok: bool = False
    t_start: float = 0.0
    t_end: float = 0.0
    interruptions: int = 0  # weight updates that landed while it was being generated
    fate: Fate | None = None  # None: not known (the HDF5 log does not record it)
    text: str = ""  # the decoded response, for the log and the verifier
    answer: str = ""  # the reference answer, for the log
    # Seconds the verifier (math-verify, the code sandbox or a user's function) spent on this sample, in the
    # reward worker pool off the decode loop; NaN where not measured (a schema-1 log).
    reward_seconds: float = 0.0
    reward_timed_out: bool = False  # a time limit cut scoring short: the reward is 0 and says nothing of the answer
    worker: int = -1  # the attached worker that generated it (elastic/; -1: an in-job rollout rank)

    def __post_init__(self) -> None:
        self.prompt_tokens = _array(self.prompt_tokens, np.int32)
        self.response_tokens = _array(self.response_tokens, np.int32)
        self.behav_logprobs = _array(self.behav_logprobs, np.float32)
        self.versions = _array(self.versions, np.int32)
        if self.prompt_id < 0:
            self.prompt_id = self.group_id
        if self.fate is not None and self.fate not in FATES:
            raise ValueError(f"trajectory {self.sample_id}: fate {self.fate!r} is not one of {FATES}")
        if not len(self.response_tokens) == len(self.behav_logprobs) == len(self.versions):
            raise ValueError(
                f"trajectory {self.sample_id}: {len(self.response_tokens)} response tokens but "
                f"{len(self.behav_logprobs)} behaviour log-probs and {len(self.versions)} versions")

    @property
    def n_prompt(self) -> int:
        return len(self.prompt_tokens)

    @property
    def n_response(self) -> int:
        return len(self.response_tokens)

    @property
    def oldest_version(self) -> int:
        """Version of the oldest token (what staleness is judged by); -1 for an empty response."""
        return int(self.versions.min()) if len(self.versions) else -1


@dataclass
class RolloutStats:
    """What one rollout rank did over a run; trainer 0 gathers them into ``summary.json``."""

    pushed: int = 0  # samples delivered to the trainer
    abandoned: int = 0  # sequences in flight at stop (never delivered, never trained)
    abandoned_prompts: list[int] = field(default_factory=list)
    idle_seconds: float = 0.0  # held by the staleness gate with nothing to decode
    aborted_groups: int = 0  # groups stopped as certain to be rejected (rollout.abort_stale)
    aborted_tokens: int = 0
    tokens_generated: int = 0
    versions_applied: int = 0
    ring_full_waits: int = 0
    ring_wait_seconds: float = 0.0
    shards_written: int = 0
    reward_seconds: float = 0.0  # verifier time summed over the samples scored (in the reward pool, off the loop)
    reward_timeouts: int = 0  # samples whose scoring hit a time limit (scored 0)
    engine: dict[str, Any] = field(default_factory=dict)  # the engine's own figures (``InferenceEngine.stats``)
    phases: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StepStats:
    """One trainer rank's share of one training step (``combine`` merges the ranks')."""

    n: int  # samples trained
    reward_sum: float
    correct: int
    tokens: int  # response tokens trained
    stale_sum: int
    stale_max: int
    rejected: int
    downweighted: int
    ring_full_waits: int
    interrupted: int  # samples whose generation saw a weight update
    multi_version: int  # samples whose tokens span more than one version
    t_data: float  # seconds waiting for complete groups
    t_step: float  # seconds of the whole step
    train: TrainStats  # the train engine's (global over data-parallel ranks)
    workers: dict[str, float] = field(default_factory=dict)  # attached workers' figures (elastic/planner.py)


@dataclass
class TrainStats:
    """What a train engine's ``train_batch`` reports for one optimizer step.

    ``loss`` and ``loss_stats`` are token means over the global batch (identical on every data-parallel
    rank); ``loss_stats`` are named by the loss function (decoupled PPO: clip_frac, cap_frac, ratio,
    approx_kl, importance_weight). The token counts are this rank's, except ``n_tokens_global``.
    """

    loss: float
    grad_norm: float
    n_tokens: int  # response tokens trained on this rank
    n_tokens_global: int
    n_microbatches: int
    stream_tokens: int  # tokens the forwards ran on (prompts and padding included): what compute scales with
    loss_stats: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        return {"loss": self.loss, **self.loss_stats, "grad_norm": self.grad_norm, "n_tokens": float(self.n_tokens),
                "n_tokens_global": float(self.n_tokens_global), "n_microbatches": float(self.n_microbatches),
                "stream_tokens": float(self.stream_tokens)}


def combine(parts: list[StepStats]) -> dict[str, float]:
    """One metrics row from every trainer's share: sums for counts, max for maxima; the engine's train
    stats are already global (reduced over the data-parallel group), so their mean is the value itself."""
    n = sum(p.n for p in parts)
    row: dict[str, float] = {
        "samples": n, "reward": sum(p.reward_sum for p in parts) / max(n, 1),
        "accuracy": sum(p.correct for p in parts) / max(n, 1), "tokens": sum(p.tokens for p in parts),
        "staleness_mean": sum(p.stale_sum for p in parts) / max(n, 1),
        "staleness_max": max(p.stale_max for p in parts), "rejected": sum(p.rejected for p in parts),
        "downweighted": sum(p.downweighted for p in parts),
        "ring_full_waits": sum(p.ring_full_waits for p in parts),
        "interrupted": sum(p.interrupted for p in parts), "multi_version": sum(p.multi_version for p in parts),
        "t_data": max(p.t_data for p in parts), "t_step": max(p.t_step for p in parts),
    }
    for p in parts:  # each trainer plans for its own attached workers: their keys do not overlap but the totals'
        for k, v in p.workers.items():
            row[k] = row.get(k, 0.0) + v
    trains = [p.train.as_dict() for p in parts]
    for k in trains[0]:
        row[f"train/{k}"] = sum(t[k] for t in trains) / len(trains)
    return row
