"""The trainer role: update the policy whenever a batch is ready, then broadcast the new version.

Each trainer rank owns the rings of its rollout ranks and takes complete prompt groups from them in
arrival order. Every sample's oldest token version is checked against the version being trained:
anything staler than η is rejected (and its group's budget credited back to the rollout that made
it) or down-weighted, and counted either way.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict

import numpy as np
import torch

from areal_hpc.api import SampleSource, TrainBatch, TrainEngine
from areal_hpc.comm.dist import DistGroups
from areal_hpc.comm.mpi import MPIContext
from areal_hpc.config import Config
from areal_hpc.elastic.host import ElasticHost
from areal_hpc.elastic.layout import SHARD_INDEX_BASE, ElasticFiles
from areal_hpc.elastic.planner import ElasticPlanner, is_attached, source_of
from areal_hpc.model.build import load_policy
from areal_hpc.registry import train_backend_factory
from areal_hpc.storage.checkpoint import ResumeState
from areal_hpc.storage.records import RunFiles
from areal_hpc.storage.writers import TrainerLogWriter
from areal_hpc.train.advantages import group_normalized_advantages_flat
from areal_hpc.train.loss import ppo_loss
from areal_hpc.trajectory import StepStats, Trajectory
from areal_hpc.transport.hdf5_source import ShardSource
from areal_hpc.transport.select import log_attrs
from areal_hpc.transport.sinks import trainer_sources
from areal_hpc.weights.select import build_sender

log = logging.getLogger(__name__)


class NoDataError(RuntimeError):
    pass


def screen_group(versions: list[np.ndarray], trained_version: int, eta: int, policy: str,
                 stale_weight: float) -> tuple[list[int], list[float] | None]:
    """Staleness of each sample (trained version − its oldest token's version) and the group's fate.

    Returns per-sample loss weights, or None when the group is rejected: with ``policy='reject'`` a
    group with any sample staler than η is dropped whole (its advantages need every member); with
    ``'downweight'`` the stale samples get ``stale_weight`` and the rest 1.
    """
    stale = [trained_version - int(v.min()) for v in versions]
    if max(stale) > eta and policy == "reject":
        return stale, None
    return stale, [stale_weight if st > eta else 1.0 for st in stale]


class TrainerWorker:
    def __init__(self, cfg: Config, ctx: MPIContext, groups: DistGroups, files: RunFiles, policy_path: str,
                 run_id: str, resume: ResumeState | None = None) -> None:
        self.cfg, self.ctx, self.files = cfg, ctx, files
        topo = ctx.topo
        self.G = cfg.rollout.group_size
        self.local_groups = cfg.trainer.batch_size // self.G // topo.n_trainer
        self.model, self.tok = load_policy(policy_path, cfg.model.dtype, cfg.model.device)
        self.engine: TrainEngine = train_backend_factory(cfg.trainer.backend)(cfg, self.model, self.tok, groups.dp)
        self.loss_fn = ppo_loss(cfg.trainer)
        dropout = {k: v for k, v in vars(getattr(self.model, "config", object())).items()
                   if "dropout" in k and isinstance(v, float) and v > 0}
        if dropout and cfg.trainer.proximal_logp == "forward":
            log.warning("the model has dropout %s: proximal log-probs taken from the training forward carry its "
                        "noise; set trainer.proximal_logp=recompute (a no-grad pass) or turn dropout off", dropout)
        self.sources: dict[int, SampleSource] = trainer_sources(cfg, ctx, files, run_id)
        # Collective with the rollouts' build_receiver (after the rings exist: rollouts wait on them next).
        self.sender = build_sender(cfg.weights, ctx, groups.weights, self.engine.parameters_for_sync(),
                                   next(self.model.parameters()).device, run_id, cfg.run.timeout_s)
        self.steps_log = TrainerLogWriter(files.trainer_log, ctx.rank, attrs=log_attrs(files, run_id, ctx.rank),
                                          shard_steps=cfg.log.trainer_shard_steps, compression=cfg.log.compression)
        self.version = 0
        self._consumed: list[int] = []  # prompt (= group) ids trained or rejected here, for checkpoints
        if resume is not None:
            state = torch.load(resume.path / "trainer_state.pt", weights_only=False)
            rng = state.pop("torch_rng", None)
            self.engine.load_state_dict(state)
            if rng is not None:
                torch.set_rng_state(rng)
            self.version = resume.version
            if ctx.rank == 0:  # the cumulative record travels with trainer 0's next checkpoint
                self._consumed = resume.consumed_prompts.tolist()
        # Each step takes exactly its share of groups from each of its rollout ranks (the same split their
        # admission gates use), so a group admitted under the gate's bound is trained within eta versions
        # whatever the ranks' relative speeds (rollout/staleness.py).
        siblings = topo.rollouts_of(ctx.rank)
        self._partial: dict[tuple[int, int], list[Trajectory]] = defaultdict(list)  # (source, group) -> members
        self._ready: list[tuple[int, list[Trajectory]]] = []  # (source rank, complete group)
        # Rollout workers attached from other jobs (elastic/): their groups are granted by name for a step.
        self.elastic = ElasticFiles(files.root)
        self.attempt = resume.attempt + 1 if resume is not None else 0
        self.planner = ElasticPlanner(
            cfg, self.elastic, trainer_index=topo.role_rank, n_trainer=topo.n_trainer, injob=siblings,
            groups_per_step=self.local_groups, attempt=self.attempt, version=self.version,
            consumed=resume.consumed_prompts if resume is not None else np.zeros(0, np.int64), send=ctx.send)
        self._granted: dict[int, tuple[int, list[Trajectory]]] = {}  # prompt -> (source, group) of a grant
        self.host = ElasticHost(cfg, self.elastic, run_id=run_id, attempt=self.attempt, policy_path=policy_path,
                                config_path=files.config, version=self.version) if ctx.rank == 0 else None
        self.popped = dict.fromkeys(self.sources, 0)
        self.rejected_total = 0
        self.downweighted_total = 0
        self.wait_seconds = 0.0

    # -- data ---------------------------------------------------------------------------------------
    def _drain(self) -> int:
        n = 0
        for src, source in self.sources.items():
            for t in source.poll():
                self._add(src, t)
                n += 1
        return n

    def _drain_source(self, src: int) -> None:
        source = self.sources.get(src)
        if source is not None:
            for t in source.poll():
                self._add(src, t)

    def _add(self, src: int, t: Trajectory) -> None:
        """File a sample under its group; a group is ready once all its members are in. A granted prompt's
        group waits for its step by name; one whose grant moved to another producer is dropped."""
        self.popped[src] += 1
        key = (src, t.group_id)
        group = self._partial[key]
        group.append(t)
        if len(group) < self.G:
            return
        members = self._partial.pop(key)
        if is_attached(src) or self.planner.is_grant(t.group_id):
            if self.planner.arrived(src, t.group_id):
                self._granted[t.group_id] = (src, members)
        else:
            self._ready.append((src, members))

    def _look_for_workers(self, waiting_step: int | None = None, waited_s: float = 0.0) -> None:
        """New attached workers get a shard source; trainer 0 starts the disk channel once one registers."""
        if self.host is not None:
            self.host.look(self.version, self.engine.parameters_for_sync)
        new = self.planner.maintain(self._drain_source, waiting_step, waited_s)
        for wid in new or []:
            src = source_of(wid)
            self.sources[src] = ShardSource(self.files.rollout_log, SHARD_INDEX_BASE + wid, retain=True,
                                            poll_s=self.cfg.transport.poll_s)
            self.popped[src] = 0

    def close_elastic(self, preempted: bool) -> None:
        """The run's end (or requeue) for attached workers: they finish their open shard and leave."""
        if self.host is not None:
            self.host.close("requeued" if preempted else "ended")

    def _oldest_ready(self, taken: dict[int, int], quota: dict[int, int]) -> int | None:
        """Index of the ready group with the oldest token version (FIFO among equals) among the rollout ranks
        whose share of this step is not yet taken; None when no ready group may be taken now.

        A rank that delivers faster does not get more of the step: its extra groups wait for the next step,
        and the slower rank's groups are not pushed a version later (what the admission bound assumes).
        """
        eligible = [i for i, (src, _) in enumerate(self._ready) if taken.get(src, 0) < quota.get(src, 1 << 62)]
        if not eligible:
            return None
        return min(eligible, key=lambda i: (self._ready[i][1][0].oldest_version, i))

    def _collect(self) -> tuple[list[Trajectory], list[int], list[float], list[tuple[int, int]]]:
        """Complete groups for one step: (samples, their staleness, per-sample loss weight, rejected (id,
        staleness))."""
        eta, policy = self.cfg.rollout.eta, self.cfg.trainer.stale_policy
        accepted: list[Trajectory] = []
        staleness: list[int] = []
        weights: list[float] = []
        rejected: list[tuple[int, int]] = []
        deadline = time.monotonic() + self.cfg.run.timeout_s
        t0 = time.perf_counter()
        taken: dict[int, int] = {}  # accepted groups per rollout rank in this step
        quota = self.planner.injob_quota(self.version)
        waited_since = time.monotonic()
        while len(accepted) < self.local_groups * self.G:
            self._drain()  # everything that has arrived, so the oldest-first choice sees it all
            self._look_for_workers(self.version, time.monotonic() - waited_since)
            due = [p for p in self.planner.grants_for(self.version) if p in self._granted]
            if not due and self._oldest_ready(taken, quota) is None:
                for src, msg in self.ctx.poll():
                    raise RuntimeError(f"trainer {self.ctx.rank}: unexpected {msg} from rank {src} during training")
                if time.monotonic() > deadline:
                    raise NoDataError(
                        f"trainer {self.ctx.rank} got no complete prompt group for {self.cfg.run.timeout_s:.0f}s at "
                        f"version {self.version}; check the rollout ranks' logs (run.timeout_s sets this limit)"
                    )
                time.sleep(0.0005)
                continue
            deadline = time.monotonic() + self.cfg.run.timeout_s
            for prompt in due:  # granted groups: trained at their step, by name
                src, group = self._granted.pop(prompt)
                stale, group_weights = screen_group([s.versions for s in group], self.version, eta, policy,
                                                    self.cfg.trainer.stale_weight)
                self._consumed.append(prompt)
                self.planner.judged(prompt, stale, rejected=group_weights is None)
                if group_weights is None:
                    rejected.extend((s.sample_id, st) for s, st in zip(group, stale))
                    continue
                waited_since = time.monotonic()
                accepted.extend(group)
                staleness.extend(stale)
                weights.extend(group_weights)
            while len(accepted) < self.local_groups * self.G and (i := self._oldest_ready(taken, quota)) is not None:
                src, group = self._ready.pop(i)
                stale, group_weights = screen_group([s.versions for s in group], self.version, eta, policy,
                                                    self.cfg.trainer.stale_weight)
                self._consumed.append(group[0].group_id)
                if group_weights is None:
                    rejected.extend((s.sample_id, st) for s, st in zip(group, stale))
                    self.ctx.send(src, {"type": "credit", "groups": 1})
                    continue
                waited_since = time.monotonic()
                taken[src] = taken.get(src, 0) + 1
                accepted.extend(group)
                staleness.extend(stale)
                weights.extend(group_weights)
        self.wait_seconds += time.perf_counter() - t0
        self.rejected_total += len(rejected)
        self.downweighted_total += sum(w < 1.0 for w in weights)
        return accepted, staleness, weights, rejected

    # -- training -----------------------------------------------------------------------------------
    def step(self) -> StepStats:
        t0 = time.perf_counter()
        batch, staleness, weights, rejected = self._collect()
        t_data = time.perf_counter() - t0
        rewards = np.array([b.reward for b in batch], dtype=np.float32)
        adv = group_normalized_advantages_flat(rewards, np.array([b.group_id for b in batch]),
                                               eps=self.cfg.trainer.adv_eps)
        # Proximal log-probs: from the step's own forward (exact for one optimizer step per batch), or a
        # separate no-grad pass (trainer.proximal_logp=recompute).
        prox = self.engine.compute_logp(batch) if self.cfg.trainer.proximal_logp == "recompute" else None
        stats = self.engine.train_batch(TrainBatch(batch, adv, np.asarray(weights, dtype=np.float32), prox),
                                        self.loss_fn)
        trained_version = self.version
        self.version += 1
        # Plan the step eta+1 versions ahead before announcing the version that lets producers reach it.
        self.planner.step_done(time.perf_counter() - t0, self.version)
        if self.sender is not None:
            self.sender.send(self.engine.parameters_for_sync())
            for r in self.ctx.topo.rollout_ranks:
                self.ctx.send(r, {"type": "weights", "version": self.version})
        if self.host is not None:
            self.host.published(self.version, self.engine.parameters_for_sync)
        self.steps_log.add(trained_version + 1, trained_version, stats, [b.sample_id for b in batch], staleness,
                           weights, [i for i, _ in rejected], [st for _, st in rejected])
        return StepStats(
            n=len(batch), reward_sum=float(rewards.sum()), correct=sum(b.answer_ok for b in batch),
            tokens=sum(b.n_response for b in batch), stale_sum=sum(staleness), stale_max=max(staleness),
            rejected=len(rejected), downweighted=sum(w < 1.0 for w in weights),
            ring_full_waits=sum(s.full_waits for s in self.sources.values()),
            interrupted=sum(b.interruptions > 0 for b in batch),
            multi_version=sum(len(set(b.versions.tolist())) > 1 for b in batch),
            t_data=t_data, t_step=time.perf_counter() - t0, train=stats,
            workers=self.planner.metrics() if self.planner.workers else {})

    def consumed_prompts(self) -> np.ndarray:
        return np.asarray(self._consumed, dtype=np.int64)

    def stop_rollouts(self) -> dict[str, int]:
        """Stop generation, then drain this trainer's rings until each rollout's last record is in."""
        if self.ctx.rank == 0:
            for r in self.ctx.topo.rollout_ranks:
                self.ctx.send(r, {"type": "stop"})
        expected: dict[int, int] = {}
        deadline = time.monotonic() + 120.0
        injob = [r for r in self.popped if not is_attached(r)]
        while len(expected) < len(injob) or any(self.popped[r] < n for r, n in expected.items()):
            for src, msg in self.ctx.poll():
                if msg["type"] == "stopped":
                    expected[src] = msg["pushed"]
            if self._drain() == 0:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"trainer {self.ctx.rank}: rollout ranks did not stop within 120 s")
                time.sleep(0.001)
        for src in [s for s in self.sources if is_attached(s)]:
            self._drain_source(src)  # what attached workers delivered by now; the rest they keep in their log
        leftover = [s.sample_id for _, g in self._ready for s in g]
        leftover += [s.sample_id for _, g in self._granted.values() for s in g]
        leftover += [s.sample_id for g in self._partial.values() for s in g]
        self.steps_log.flush(leftover=leftover)
        if self.sender is not None:
            self.sender.wait()
        self.ctx.flush_sends()
        for source in self.sources.values():
            source.close()
        return {"leftover": len(leftover)}
