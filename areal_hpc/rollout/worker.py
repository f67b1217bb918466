"""The rollout role: generate without waiting for the trainer, within the staleness bound.

Loop: service control messages and finished weight receives -> admit prompt groups the gate allows
-> one decode step -> push finished groups into the ring. New weights are loaded between decode
steps, so a sequence in flight continues under the new version (its tokens record which).

With ``trainer.stale_policy: reject``, a group whose oldest token falls more than η versions behind
the weights just loaded is certain to be rejected (the trainer's version is never behind the
rollout's). It is aborted there and delivered as it stands, so its slots decode fresh groups and the
trainer rejects it, credits it back and logs it like any rejected group (``rollout.abort_stale``).
"""

from __future__ import annotations

import logging
import time

import numpy as np

from areal_hpc.comm.dist import DistGroups
from areal_hpc.comm.mpi import MPIContext
from areal_hpc.config import Config
from areal_hpc.model.build import load_policy
from areal_hpc.rollout.build import build_engine
from areal_hpc.rollout.engine import Generation, GenRequest
from areal_hpc.rollout.reward import problem_reward
from areal_hpc.rollout.staleness import StalenessGate, rank_shares
from areal_hpc.storage.checkpoint import ResumeState
from areal_hpc.storage.records import RunFiles
from areal_hpc.storage.writers import RolloutLogWriter
from areal_hpc.tasks import Problem, build_task, prompt_ids
from areal_hpc.transport.codec import encode_sample_parts
from areal_hpc.transport.select import log_attrs, pair_uses_ring
from areal_hpc.transport.shm_ring import ShmRing, ring_name
from areal_hpc.weights.select import build_receiver

log = logging.getLogger(__name__)

SAMPLE_ID_ATTEMPT_STRIDE = 10**12


class RolloutWorker:
    def __init__(self, cfg: Config, ctx: MPIContext, groups: DistGroups, files: RunFiles, policy_path: str,
                 run_id: str, resume: ResumeState | None = None) -> None:
        self.cfg, self.ctx = cfg, ctx
        topo = ctx.topo
        self.index = topo.role_rank
        self.n_rollout = topo.n_rollout
        self.G = cfg.rollout.group_size
        self.task = build_task(cfg)
        model, self.tok = load_policy(policy_path, cfg.model.dtype, cfg.model.device)
        self.engine = build_engine(cfg, model, self.tok, seed=cfg.run.seed * 7919 + ctx.rank)
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
            self.gate.admitted = resume.version * share  # not the true count: see launch/checkpoint.py
        else:
            self._next_local_prompt_start = 0
        self.ring = None
        if pair_uses_ring(cfg.transport.kind, ctx, ctx.rank, self.trainer):
            self.ring = ShmRing.attach(ring_name(run_id, ctx.rank, self.trainer), timeout=120.0)
        self.log = RolloutLogWriter(
            files.rollout_log, self.index, attrs=log_attrs(files, run_id, ctx.rank),
            shard_samples=cfg.log.shard_samples, flush_s=cfg.log.flush_s, compression=cfg.log.compression)
        self._groups: dict[int, list[Generation]] = {}
        self._problems: dict[int, Problem] = {}  # prompt of each group in flight, for the verifier
        self._next_local_prompt = self._next_local_prompt_start
        self.pushed = 0
        self.stop = False
        self.idle_seconds = 0.0
        self.yield_seconds = 0.0
        self._groups_base = self.gate.admitted  # groups a resumed run counts as already delivered
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
        while self.engine.free_slots() >= self.G and self.gate.admit(self.engine.version):
            if self._redo:
                local = self._redo.pop(0)
            else:
                local = self._next_local_prompt
                self._next_local_prompt += 1
            prompt_index = local * self.n_rollout + self.index
            problem = self.task.train_problem(prompt_index)
            self._problems[prompt_index] = problem
            tokens = prompt_ids(problem, self.tok)
            self.engine.submit(
                # ids stay unique across resumed attempts that regenerate the same prompt
                GenRequest(sample_id=self._attempt * SAMPLE_ID_ATTEMPT_STRIDE + prompt_index * self.G + j,
                           prompt_id=prompt_index, group_id=prompt_index,
                           prompt_tokens=tokens, max_tokens=problem.max_tokens)
                for j in range(self.G)
            )

    def _finish(self, g: Generation) -> None:
        members = self._groups.setdefault(g.request.group_id, [])
        members.append(g)
        if len(members) == self.G:
            del self._groups[g.request.group_id]
            problem = self._problems.pop(g.request.group_id)
            for m in sorted(members, key=lambda x: x.request.sample_id):
                self._push(m, problem)

    def _push(self, g: Generation, problem: Problem) -> None:
        out = [t for t in g.tokens if t != self.tok.eos_id]
        text = self.tok.decode(out)
        reward = problem_reward(problem, out, text)
        record = {
            "sample_id": g.request.sample_id, "prompt_id": g.request.prompt_id, "group_id": g.request.group_id,
            "rank": self.ctx.rank, "prompt_tokens": np.asarray(g.request.prompt_tokens, dtype=np.int32),
            "response_tokens": np.asarray(g.tokens, dtype=np.int32),
            "behav_logprobs": np.asarray(g.logprobs, dtype=np.float32),
            "versions": np.asarray(g.versions, dtype=np.int32), "reward": reward, "t_start": g.t_start,
            "t_end": g.t_end, "answer_ok": reward >= 1.0, "interruptions": g.interruptions,
        }
        if self.ring is not None:
            self.ring.push_parts(encode_sample_parts({**record, "ring_full_waits": self.ring.full_waits}),
                                 poll=self.poll)
        self.log.add(record, text, problem.answer)  # in hdf5 mode the log's shards are the transport
        self.pushed += 1

    def _yield_now(self) -> bool:
        """Whether to leave the GPU to a trainer sharing it for a moment (``rollout.gated_yield_ms``).

        Only while the gate admits nothing (a fuller batch is not possible), the trainer already has
        its next batch from this rank beyond the one it is on (so no step waits on this tail), and
        under a quarter of the slots are live (a thin tail, the least work per GPU time slice). The
        tail still advances between sleeps, so nothing can wait on it forever.
        """
        if self.cfg.rollout.gated_yield_ms <= 0 or self.gate.capacity(self.engine.version) > 0:
            return False
        if 4 * self.engine.num_active() >= getattr(self.engine, "max_batch", 0):
            return False
        delivered = self._groups_base + self.pushed // self.G - self.gate.credited
        return delivered >= (self.engine.version + 2) * self.gate.share

    def run(self) -> dict[str, float]:
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
                self.log.flush_if_due()
                if self._yield_now():
                    t = time.perf_counter()
                    time.sleep(self.cfg.rollout.gated_yield_ms / 1e3)
                    self.yield_seconds += time.perf_counter() - t
            else:  # the gate holds us until a newer version (or a credit) arrives
                # Shards are the transport without a ring: a waiting trainer must see what is buffered.
                self.log.flush_if_due(idle=self.ring is None)
                t = time.perf_counter()
                time.sleep(0.0005)
                self.idle_seconds += time.perf_counter() - t
        # Stop: sequences still in flight are abandoned (never pushed, never trained). Every weight
        # broadcast already announced is received so the trainer's collective completes.
        while self.receiver.busy:
            self._apply_ready(block=True)
        if hasattr(self.receiver, "close"):
            self.receiver.close()  # shared weights: hand the CUDA IPC mapping back before the trainer exits
        abandoned = self.engine.num_active() + sum(len(m) for m in self._groups.values())
        abandoned_prompts = sorted(self._groups.keys() | self.engine.active_groups())
        self.log.flush()
        self.ctx.send(self.trainer, {"type": "stopped", "pushed": self.pushed})
        self.ctx.flush_sends()
        stats = {"pushed": self.pushed, "abandoned": abandoned, "idle_seconds": self.idle_seconds,
                 "aborted_groups": self.aborted_groups, "aborted_tokens": self.aborted_tokens,
                 "yield_seconds": self.yield_seconds,
                 "tokens_generated": self.engine.tokens_generated, "versions_applied": self.versions_applied,
                 "ring_full_waits": self.ring.full_waits if self.ring else 0,
                 "ring_wait_seconds": self.ring.wait_seconds if self.ring else 0.0,
                 "shards_written": self.log.shards_written, "abandoned_prompts": abandoned_prompts,
                 "engine": self.engine.stats() if hasattr(self.engine, "stats") else {}}
        if self.ring is not None:
            self.ring.close()
        log.info("rollout %d done: %s", self.index, stats)
        return stats
