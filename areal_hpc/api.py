"""The interfaces between the parts: everything a role's loop calls on an engine, a backend or a transport.

The loops (``rollout/worker.py``, ``train/worker.py``, ``train/loop.py``) call only what is declared here,
so a new engine or backend (vLLM, Megatron-core) is a module that implements a protocol and a name in
``registry.py``, not a branch in a loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor

from areal_hpc.trajectory import Fate, TrainStats, Trajectory

# -- rollout --------------------------------------------------------------------------------------


@dataclass
class GenRequest:
    sample_id: int
    prompt_id: int
    group_id: int
    prompt_tokens: list[int]
    # Finish after this many tokens even without a stop token (0: the engine's max_new_tokens). Synthetic
    # throughput workloads draw it from a long-tailed distribution, since a random model never stops.
    max_tokens: int = 0


@dataclass
class Generation:
    """One sequence, in flight or finished; every response token carries the version that sampled it."""

    request: GenRequest
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    t_start: float = field(default_factory=time.time)
    t_end: float = 0.0
    finished: bool = False
    interruptions: int = 0
    aborted: bool = False  # stopped by ``abort`` before its stop token or its length limit

    def fate(self, stop_ids: Iterable[int]) -> Fate:
        if self.aborted:
            return "aborted"
        return "stop" if self.tokens and self.tokens[-1] in set(stop_ids) else "length"


class InferenceEngine(Protocol):
    """Batched sampling, driven one decode step at a time by the rollout loop.

    ``step`` is the point where new weights can be swapped in (``update_weights``) without dropping the
    sequences in flight: later tokens record the new version. ``generator`` seeds the sampling (a resumed
    rank reseeds it so a regenerated prompt does not repeat its first attempt).
    """

    version: int
    device: torch.device
    generator: torch.Generator
    max_batch: int  # sequences in flight at most (the capacity the loop admits groups into)
    tokens_generated: int

    def submit(self, requests: Iterable[GenRequest]) -> None: ...

    def step(self) -> list[Generation]:
        """One decode step for every live sequence; returns the sequences that finished in it."""
        ...

    def num_active(self) -> int:
        """Sequences queued or in flight."""
        ...

    def free_slots(self) -> int: ...

    def active_groups(self) -> set[int]: ...

    def first_versions(self) -> dict[int, int | None]:
        """Per group in flight: the version of its oldest token, None while a member has none yet."""
        ...

    def abort(self, group_ids: set[int]) -> list[Generation]:
        """Stop every sequence of ``group_ids`` as it stands and return them (``aborted``)."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None: ...

    def generate(self, requests: list[GenRequest], greedy: bool = False) -> list[Generation]:
        """Run ``requests`` to completion on an idle engine (evaluation); sample-id order."""
        ...

    def warm_up(self) -> float:
        """Do the engine's one-time work (graph capture, compiling) now, before the first step, instead of
        inside the first rollout steps; returns its seconds."""
        ...

    def stats(self) -> dict[str, Any]:
        """The engine's own figures for ``summary.json`` (build and warm-up time, kernel choices)."""
        ...


# -- training -------------------------------------------------------------------------------------


class TokenInputs(NamedTuple):
    """Per response token of one micro-batch (all ``[n]``, same order): what a loss function sees."""

    logp: Tensor  # current policy, with grad
    prox_logp: Tensor  # proximal policy (detached)
    behav_logp: Tensor  # behaviour policy, recorded by the rollout
    advantages: Tensor
    sample_weight: Tensor  # per-token copy of the sample's loss weight (staleness down-weighting)


#: ``{name: (sum, count)}`` of a micro-batch; the engine sums both over micro-batches and data-parallel ranks,
#: and reports ``sum / count``, so a stat can be a mean over any subset of tokens.
LossStats = dict[str, tuple[Tensor, Tensor]]


class LossFn(Protocol):
    def __call__(self, t: TokenInputs) -> tuple[Tensor, LossStats]:
        """(loss as a mean over this micro-batch's tokens, stats). The engine scales the loss by the
        micro-batch's share of the global batch's tokens, so the accumulated gradient is that of one
        token mean over the whole batch."""
        ...


@dataclass
class TrainBatch:
    """One step's samples with their advantages and loss weights (one entry per sample)."""

    samples: list[Trajectory]
    advantages: np.ndarray  # float32 [n]
    sample_weight: np.ndarray  # float32 [n]
    prox_logp: list[np.ndarray] | None = None  # None: the step's own forward, detached (one update per batch)

    def __post_init__(self) -> None:
        self.advantages = np.asarray(self.advantages, dtype=np.float32).reshape(-1)
        self.sample_weight = np.asarray(self.sample_weight, dtype=np.float32).reshape(-1)
        n = len(self.samples)
        if (self.prox_logp is not None and len(self.prox_logp) != n) or len(self.advantages) != n \
                or len(self.sample_weight) != n:
            raise ValueError(f"{n} samples but {len(self.prox_logp or [])} prox_logp, {len(self.advantages)} "
                             f"advantages, {len(self.sample_weight)} sample weights")
        for s, p in zip(self.samples, self.prox_logp or [], strict=False):
            if len(p) != s.n_response:
                raise ValueError(f"sample {s.sample_id}: {len(p)} prox logprobs for {s.n_response} tokens")


class TrainEngine(Protocol):
    """A training backend: the policy, its optimizer, one step per batch with the loss it is given.

    ``model`` is the policy in HF layout (what is evaluated and saved as a checkpoint); every data-parallel
    rank must call ``train_batch`` for every step, since a step holds collectives.
    """

    model: torch.nn.Module

    def prepare(self) -> None:
        """One-off work before the first batch (compiling, allocating), so steps time only steps."""
        ...

    def compute_logp(self, samples: list[Trajectory]) -> list[np.ndarray]:
        """Response-token log-probs under the current weights (the proximal policy), no grad."""
        ...

    def train_batch(self, batch: TrainBatch, loss_fn: LossFn) -> TrainStats:
        """One optimizer step of ``loss_fn``, token mean over the global batch."""
        ...

    def parameters_for_sync(self) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` in a fixed order, HF names: what the weight sender ships to the rollouts."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# -- weights --------------------------------------------------------------------------------------


class WeightSender(Protocol):
    """Trainer rank 0's end of the weight path: ``send`` a version, overlapping the next step."""

    seconds_waiting: float

    def send(self, params: list[tuple[str, Tensor]]) -> None: ...

    def wait(self) -> None:
        """Until the last ``send`` has left (before the trainer exits or reuses its buffers)."""
        ...

    def close(self) -> None: ...


class WeightReceiver(Protocol):
    """A rollout rank's end: versions are announced, received in the background, applied between steps."""

    def announce(self, version: int) -> None: ...

    def ready(self, block: bool = False) -> int | None:
        """The version whose buffers have all arrived, or None; ``tensors`` then holds it."""
        ...

    def tensors(self) -> Iterator[tuple[str, Tensor]]: ...

    def post_next(self) -> None:
        """Release the buffers of the version just read and start receiving the next announced one."""
        ...

    @property
    def superseded(self) -> bool:
        """A newer version is already announced: the one ready may be skipped."""
        ...

    @property
    def busy(self) -> bool:
        """An announced version has not been received yet."""
        ...

    def close(self) -> None: ...


# -- samples --------------------------------------------------------------------------------------


class SampleSink(Protocol):
    """Where a rollout rank puts finished trajectories (a ring, the HDF5 log, or both)."""

    full_waits: int  # times a put found no room and waited (back-pressure from the trainer)
    wait_seconds: float
    shards_written: int

    def put(self, traj: Trajectory, wait: Callable[[], None]) -> None:
        """Deliver one trajectory; ``wait`` is called while it cannot be delivered yet (a full ring)."""
        ...

    def flush_if_due(self, idle: bool = False) -> None: ...

    def close(self) -> None: ...


class SampleSource(Protocol):
    """Where a trainer rank takes one rollout rank's trajectories from, in delivery order."""

    full_waits: int  # the producer's full-ring waits as last reported (0 where it never waits)

    def poll(self) -> list[Trajectory]:
        """Every trajectory that has arrived since the last call (possibly none)."""
        ...

    def close(self) -> None: ...
