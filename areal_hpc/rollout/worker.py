"""The rollout role: generate without waiting for the trainer, within the staleness bound.

Loop: service control messages and finished weight receives -> admit prompt groups the gate allows
-> one decode step -> hand finished groups to the reward pool -> push scored groups into the ring. New
weights are loaded between decode steps, so a sequence in flight continues under the new version (its
tokens record which). Scoring runs in worker processes (``reward/pool.py``): a slow sympy parse or a
sandboxed code run never holds up a decode step.

With ``trainer.stale_policy: reject``, a group whose oldest token falls more than η versions behind
the weights just loaded is certain to be rejected (the trainer's version is never behind the
rollout's). It is aborted there and delivered as it stands, so its slots decode fresh groups and the
trainer rejects it, credits it back and logs it like any rejected group (``rollout.abort_stale``).
"""

from __future__ import annotations

import logging
import time

from areal_hpc.comm.dist import DistGroups
from areal_hpc.comm.mpi import MPIContext
from areal_hpc.config import Config
from areal_hpc.model.build import load_policy
from areal_hpc.rollout.producer import GroupProducer, granted_sample_base
from areal_hpc.rollout.staleness import StalenessGate, rank_shares
from areal_hpc.storage.checkpoint import ResumeState
from areal_hpc.storage.records import RunFiles
from areal_hpc.trajectory import RolloutStats
from areal_hpc.transport.sinks import rollout_sink
from areal_hpc.weights.select import build_receiver

log = logging.getLogger(__name__)

SAMPLE_ID_ATTEMPT_STRIDE = 10**12


class RolloutWorker(GroupProducer):
    def __init__(self, cfg: Config, ctx: MPIContext, groups: DistGroups, files: RunFiles, policy_path: str,
                 run_id: str, resume: ResumeState | None = None) -> None:
        self.ctx = ctx
        topo = ctx.topo
        self.index = topo.role_rank
        self.n_rollout = topo.n_rollout
        model, tok = load_policy(policy_path, cfg.model.dtype, cfg.model.device)
        super().__init__(cfg, model, tok, rank=ctx.rank, worker=-1, seed=cfg.run.seed * 7919 + ctx.rank)
        if self.index == 0 and self.task.train_problem(0).verifier == "code" and cfg.reward.fn is None:
            from areal_hpc.reward.sandbox import isolation_report

            gaps = isolation_report()  # said once per run: what this machine cannot isolate from generated code
            if gaps:
                log.warning("code sandbox: not isolated on this machine: %s", "; ".join(gaps))
        # Collective with trainer 0's build_sender (before the ring attach, which waits on the trainer).
        self.receiver = build_receiver(cfg.weights, ctx, groups.weights, list(model.named_parameters()),
                                       self.engine.device, cfg.run.timeout_s)
        self.trainer = topo.trainer_of(ctx.rank)
        siblings = topo.rollouts_of(self.trainer)
        groups_per_trainer = cfg.trainer.batch_size // self.G // topo.n_trainer
        share = rank_shares(groups_per_trainer, len(siblings))[siblings.index(ctx.rank)]
        if share == 0:
            raise RuntimeError(
                f"rollout rank {ctx.rank} gets no prompt groups: trainer.batch_size/rollout.group_size = "
                f"{cfg.trainer.batch_size // self.G} groups per step is fewer than the rollout ranks sharing trainer "
                f"{self.trainer}; raise trainer.batch_size or lower cluster.n_rollout"
            )
        self.gate = StalenessGate(eta=cfg.rollout.eta, share=share)
        # Data position: prompts the trainers have not consumed are regenerated first after a resume.
        self._redo: list[int] = []
        self._attempt = 0
        if resume is not None:
            self._redo, self._next_local_prompt_start = resume.rollout_plan(self.index, self.n_rollout)
            self._attempt = resume.attempt + 1
            self.engine.version = resume.version
            self.engine.generator.manual_seed(cfg.run.seed * 7919 + ctx.rank + 104729 * self._attempt)
            self.gate.admitted = resume.version * share  # not the true count: see storage/checkpoint.py
        else:
            self._next_local_prompt_start = 0
        self.sink = rollout_sink(cfg, ctx, files, run_id, self.trainer)  # waits for the trainer's ring
        # Prompts a trainer took back from an attached worker that left: (prompt, issue, step), made first.
        self._grants: list[tuple[int, int, int]] = []
        self._next_local_prompt = self._next_local_prompt_start
        self.stop = False
        self.idle_seconds = 0.0
        self.versions_applied = 0
        self._abort_stale = cfg.rollout.abort_stale and cfg.trainer.stale_policy == "reject"
        self._unjudged: set[int] = set()  # groups not judged at the last version change (a member had no token)
        self.aborted_groups = 0
        self.aborted_tokens = 0  # tokens the aborted sequences had when stopped

    # -- control ------------------------------------------------------------------------------------
    def poll(self) -> None:
        """Control messages, then any weight version whose buckets have all arrived."""
        for _, msg in self.ctx.poll():
            kind = msg["type"]
            if kind == "weights":
                self.receiver.announce(msg["version"])
            elif kind == "credit":
                self.gate.credit(msg["groups"])
            elif kind == "plan":  # the trainer's plan of a step eta+1 versions ahead (workers are attached)
                self.gate.plan(msg["step"], msg["share"])
            elif kind == "grant":
                self.gate.grant(msg["step"], len(msg["prompts"]))
                self._grants.extend((prompt, issue, msg["step"]) for prompt, issue in msg["prompts"])
                self._grants.sort(key=lambda g: g[2])  # earliest step first, whatever order they were taken back in
            elif kind == "stop":
                self.stop = True
        self._apply_ready(block=False)

    def _apply_ready(self, block: bool) -> None:
        v = self.receiver.ready(block=block)
        if v is None:
            return
        applied = not self.receiver.superseded
        if applied:
            self.engine.update_weights(self.receiver.tensors(), v)
            self.versions_applied += 1
        self.receiver.post_next()
        # After post_next: delivering an aborted group may poll (a full ring) and land here again.
        if applied and self._abort_stale and not self.stop:
            self._abort_doomed()

    def _abort_doomed(self, only: set[int] | None = None) -> None:
        """Abort the groups (of ``only``, if given) that the trainer will reject whatever happens next,
        and deliver them. A group with a member that has not sampled yet is judged after a later step."""
        limit = self.engine.version - self.cfg.rollout.eta  # an oldest token before this is > eta behind
        doomed: set[int] = set()
        unjudged: set[int] = set()
        for gid, oldest in self.engine.first_versions().items():
            if only is not None and gid not in only:
                continue
            if oldest is None:
                unjudged.add(gid)
                continue
            done = [m.versions[0] for m in self._groups.get(gid, []) if m.versions]
            if min([oldest, *done]) < limit:
                doomed.add(gid)
        self._unjudged = unjudged  # groups admitted since the version change are never doomed by it
        if not doomed:
            return
        stopped = self.engine.abort(doomed)  # a member the step in flight finished comes out of the next step
        self.aborted_groups += len({g.request.group_id for g in stopped})
        self.aborted_tokens += sum(len(g.tokens) for g in stopped)
        for g in stopped:
            self._finish(g)

    # -- generation ---------------------------------------------------------------------------------
    def _admit(self) -> None:
        eta = self.cfg.rollout.eta
        while self.engine.free_slots() >= self.G and self._grants and self._grants[0][2] - eta <= self.engine.version:
            if not self.gate.admit(self.engine.version):
                break
            prompt, issue, _ = self._grants.pop(0)
            self._submit_group(prompt, granted_sample_base(self._attempt, issue, self.G))
        while self.engine.free_slots() >= self.G and self.gate.admit(self.engine.version):
            if self._redo:
                local = self._redo.pop(0)
            else:
                local = self._next_local_prompt
                self._next_local_prompt += 1
            prompt_index = local * self.n_rollout + self.index
            # ids stay unique across resumed attempts that regenerate the same prompt
            self._submit_group(prompt_index, self._attempt * SAMPLE_ID_ATTEMPT_STRIDE + prompt_index * self.G)

    def run(self) -> RolloutStats:
        log.info("rollout %d: share %d groups/step, eta %d, feeding trainer %d", self.index, self.gate.share,
                 self.gate.eta, self.trainer)
        while not self.stop:
            self.poll()
            if self.stop:
                break
            self._admit()
            if self.engine.num_active():
                for g in self.engine.step():
                    self._finish(g)
                if self._unjudged:
                    self._abort_doomed(self._unjudged)
                self._collect()
                self.sink.flush_if_due()
            elif self._scoring:  # nothing to decode until the pool's scores free the gate's credit
                self._collect()
                self.sink.flush_if_due(idle=True)
                t = time.perf_counter()
                time.sleep(0.0005)
                self.idle_seconds += time.perf_counter() - t
            else:  # the gate holds us until a newer version (or a credit) arrives
                self.sink.flush_if_due(idle=True)
                t = time.perf_counter()
                time.sleep(0.0005)
                self.idle_seconds += time.perf_counter() - t
        # Stop: sequences still in flight are abandoned (never pushed, never trained). Every weight
        # broadcast already announced is received so the trainer's collective completes.
        while self.receiver.busy:
            self._apply_ready(block=True)
        self.receiver.close()  # shared weights: hand the CUDA IPC mapping back before the trainer exits
        self.rewards.close()  # groups still being scored are abandoned like those in flight
        abandoned = (self.engine.num_active() + sum(len(m) for m in self._groups.values())
                     + sum(len(m) for m in self._scoring.values()))
        abandoned_prompts = sorted(self._groups.keys() | self._scoring.keys() | self.engine.active_groups())
        self.sink.close()
        self.ctx.send(self.trainer, {"type": "stopped", "pushed": self.pushed})
        self.ctx.flush_sends()
        stats = RolloutStats(
            pushed=self.pushed, abandoned=abandoned, abandoned_prompts=abandoned_prompts,
            idle_seconds=self.idle_seconds, aborted_groups=self.aborted_groups, aborted_tokens=self.aborted_tokens,
            tokens_generated=self.engine.tokens_generated, versions_applied=self.versions_applied,
            ring_full_waits=self.sink.full_waits, ring_wait_seconds=self.sink.wait_seconds,
            shards_written=self.sink.shards_written, reward_seconds=self.reward_seconds,
            reward_timeouts=self.reward_timeouts, engine=self.engine.stats())
        log.info("rollout %d done: %s", self.index, stats)
        return stats
