"""One trainer's plan of each step's prompt groups over its in-job rollout ranks and its attached workers.

Staleness across a changing set of producers: every step's groups are decided η+1 versions ahead, before any
producer may start them (AReaL's bound ⌊(N_r−1)/B⌋ ≤ i+η, per step instead of per rank). An in-job rank gets a
*share* of the step (a count, taken oldest-first as before: ``rollout/staleness.py``); an attached worker gets
*grants*: named prompts with the step they are trained in. A worker starts a grant for step t only with weights
of version ≥ t−η, and the trainer trains it exactly at step t, so it is never more than η behind.

What a worker is given follows how quickly its groups arrive (``ElasticPlanner._plan``), the in-job ranks make
the rest (at least one each).

A worker that is gone (its lease expired: killed; or it left: preempted, told to stop) has its grants that
did not arrive taken back and re-issued, same prompt and step, to another worker or an in-job rank. A group
that still arrives from it afterwards is recognised by its prompt and dropped, so nothing is trained twice.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from areal_hpc.config import Config
from areal_hpc.elastic.layout import PROMPT_BASE, SHARD_INDEX_BASE, SOURCE_BASE, ElasticFiles, write_json
from areal_hpc.elastic.lease import Lease, read_leases
from areal_hpc.rollout.staleness import rank_shares
from areal_hpc.storage.records import RunFiles
from areal_hpc.storage.shards import set_aside_partials

log = logging.getLogger(__name__)


#: Steps between single-group probes of a worker too slow for the run's pace.
PROBE_EVERY = 20


def worker_of(src: int) -> int:
    return src - SOURCE_BASE


def source_of(wid: int) -> int:
    return SOURCE_BASE + wid


def is_attached(src: int) -> bool:
    return src >= SOURCE_BASE


@dataclass
class Grant:
    prompt: int
    step: int
    issue: int  # unique per trainer and attempt: the producer numbers the group's samples from it
    holder: int  # source key of the producer making it: an in-job rank, or source_of(worker)
    delivered: bool = False  # its group is in, waiting for its step: it stays with its holder whatever happens
    issued_at: float = field(default_factory=time.time)


@dataclass
class Attached:
    """What a trainer knows of one attached worker."""

    wid: int
    lease: Lease
    seen: float = field(default_factory=time.time)  # when this trainer first saw it ready
    granted: int = 0
    delivered: int = 0  # groups
    samples_trained: int = 0
    stale_sum: int = 0
    rejected_in_row: int = 0
    first_grant_at: float = 0.0
    target: int = 1  # groups it should have outstanding (granted, not in yet): see ElasticPlanner._plan
    latency: float | None = None  # seconds from when it could start a grant to its group's arrival (average)
    idle_steps: int = 0  # steps planned without a grant for it while it is too slow
    gone: str = ""  # why it no longer gets work ('' while it does)

    def rate(self, now: float) -> float | None:
        """Groups per second since its first grant; None before it delivered any (not known yet)."""
        if not self.delivered or not self.first_grant_at:
            return None
        return self.delivered / max(now - self.first_grant_at, 1e-3)


class ElasticPlanner:
    """Plans steps, hands grants out and takes them back; the trainer asks it what each step needs."""

    def __init__(self, cfg: Config, files: ElasticFiles, *, trainer_index: int, n_trainer: int, injob: list[int],
                 groups_per_step: int, attempt: int, version: int, consumed: np.ndarray,
                 send: Callable[[int, dict], None]) -> None:
        self.cfg, self.files = cfg, files
        self.trainer_index, self.n_trainer = trainer_index, n_trainer
        self.injob, self.groups_per_step, self.attempt = injob, groups_per_step, attempt
        self.eta, self.last_step = cfg.rollout.eta, cfg.run.steps - 1
        self.send = send
        self.default = dict(zip(injob, rank_shares(groups_per_step, len(injob)), strict=True))
        self.shares: dict[int, dict[int, int]] = {}  # step -> in-job rank -> share, where planned
        self.grants: dict[int, Grant] = {}  # prompt -> its live grant
        self.by_step: dict[int, set[int]] = {}  # step -> prompts granted for it
        self.workers: dict[int, Attached] = {}
        self.planned_until = version + self.eta + 1  # up to here the static shares stand (nobody attached yet)
        self._issue = 0
        mine = consumed[(consumed >= PROMPT_BASE) & ((consumed - PROMPT_BASE) % n_trainer == trainer_index)]
        ks = (mine - PROMPT_BASE) // n_trainer
        self._next_k = int(ks.max()) + 1 if ks.size else 0
        self._holes = np.setdiff1d(np.arange(self._next_k), ks).tolist()  # granted, never consumed: first again
        self._step_s = 0.0  # a step's duration (moving average): what "one step's worth" of a worker's work is
        self._published: dict[int, float] = {version: time.time()}  # recent versions: when each was out
        self._next_look = 0.0
        self.duplicates = 0  # groups dropped: their grant had been re-issued to another producer
        self.reissued = 0

    # -- what the trainer asks ---------------------------------------------------------------------------
    def is_grant(self, prompt: int) -> bool:
        return prompt in self.grants

    def injob_quota(self, step: int) -> dict[int, int]:
        return self.shares.get(step, self.default)

    def grants_for(self, step: int) -> set[int]:
        return self.by_step.get(step, set())

    def arrived(self, src: int, prompt: int) -> bool:
        """A complete group of ``prompt`` came from ``src``: True if it is the grant's (to be trained at its
        step), False if the grant had moved to another producer (or was already trained): drop it."""
        g = self.grants.get(prompt)
        if g is None or g.holder != src:
            self.duplicates += 1
            log.warning("trainer %d: dropped a group of prompt %d from %s: its grant was re-issued", self.trainer_index,
                        prompt, _name(src))
            return False
        g.delivered = True
        if is_attached(src) and (w := self.workers.get(worker_of(src))) is not None:
            w.delivered += 1
            # It could start the group once the version eta before its step was out (or when granted, if later).
            lat = time.time() - max(g.issued_at, self._published.get(g.step - self.eta, g.issued_at))
            w.latency = lat if w.latency is None else 0.7 * w.latency + 0.3 * lat
        return True

    def judged(self, prompt: int, staleness: list[int], rejected: bool) -> Grant:
        """The grant's group was trained (or rejected as stale) at its step; it leaves the plan."""
        g = self.grants.pop(prompt)
        self.by_step[g.step].discard(prompt)
        if is_attached(g.holder) and (w := self.workers.get(worker_of(g.holder))) is not None:
            if rejected:
                w.rejected_in_row += 1
                if self.cfg.elastic.stale_stop and w.rejected_in_row >= self.cfg.elastic.stale_stop and not w.gone:
                    self._revoke(w, f"its groups were rejected as stale {w.rejected_in_row} times in a row: it "
                                    "cannot keep up with the trainer")
            else:
                w.rejected_in_row = 0
                w.samples_trained += len(staleness)
                w.stale_sum += sum(staleness)
        if rejected:  # the step still needs a group in its place: a new prompt, same step
            self._grant(g.step, [self._pick_holder()])
        return g

    def step_done(self, seconds: float, version: int) -> None:
        """After a step: remember its length and plan the step η+1 versions ahead."""
        self._step_s = seconds if not self._step_s else 0.8 * self._step_s + 0.2 * seconds
        self._published[version] = time.time()
        self._published.pop(version - 4 * self.eta - 8, None)
        self._plan_through(version + self.eta + 1)

    # -- planning ----------------------------------------------------------------------------------------
    def live(self) -> list[Attached]:
        return [w for w in self.workers.values() if not w.gone and w.lease.state == "ready"]

    def _plan_through(self, step: int) -> None:
        while self.planned_until < min(step, self.last_step):
            self.planned_until += 1
            self._plan(self.planned_until)

    def _plan(self, step: int) -> None:
        """How many of ``step``'s groups each producer makes; the in-job ranks make the rest, at least one each.

        A step waits for every group granted for it, so what a worker is given follows how quickly its groups
        arrive: each worker has a target of groups outstanding (granted, not in yet), one to start with. While
        its groups arrive well within the η steps between the version they may start at and their step, the
        target grows by one a step; when they come close to that limit it halves (additive increase,
        multiplicative decrease, as TCP finds a link's rate). A worker too slow for even one group (a slow
        filesystem, a long ``elastic.poll_s``, a slow GPU next to very short training steps) would hold every
        step up: it gets one probe group every ``PROBE_EVERY`` steps until it is quick enough."""
        live = self.live()
        if not live and not self.shares:
            return  # nobody attached yet: the static shares stand, no message needed
        room = self.groups_per_step - len(self.injob)
        limit = self.eta * self._step_s
        want = []
        for w in live:
            src = source_of(w.wid)
            outstanding = sum(1 for g in self.grants.values() if g.holder == src and not g.delivered)
            if w.latency is not None and self._step_s:
                if w.latency < 0.5 * limit:
                    w.target = min(w.target + 1, self.groups_per_step * (self.eta + 1))
                elif w.latency > 0.8 * limit:
                    w.target //= 2
            if w.target == 0:
                w.idle_steps += 1
                probe = not outstanding and w.idle_steps >= PROBE_EVERY
                w.idle_steps = 0 if probe else w.idle_steps
                want.append(int(probe))
                continue
            want.append(max(0, w.target - outstanding))
        while sum(want) > room and any(want):  # trim the largest first
            want[want.index(max(want))] -= 1
        injob = self.groups_per_step - sum(want)
        shares = dict(zip(self.injob, rank_shares(injob, len(self.injob)), strict=True))
        self.shares[step] = shares
        for rank, n in shares.items():
            self.send(rank, {"type": "plan", "step": step, "share": n})
        for w, n in zip(live, want, strict=True):
            if n:
                self._grant(step, [source_of(w.wid)] * n)

    def _new_prompt(self) -> int:
        if self._holes:
            k = self._holes.pop(0)
        else:
            k, self._next_k = self._next_k, self._next_k + 1
        return PROMPT_BASE + k * self.n_trainer + self.trainer_index

    def _grant(self, step: int, holders: list[int], prompts: list[int] | None = None) -> None:
        """Grant one group of ``step`` to each of ``holders`` (new prompts, or ``prompts`` re-issued)."""
        by_holder: dict[int, list[Grant]] = {}
        for i, holder in enumerate(holders):
            prompt = prompts[i] if prompts is not None else self._new_prompt()
            issue = self._issue * self.n_trainer + self.trainer_index
            self._issue += 1
            g = Grant(prompt=prompt, step=step, issue=issue, holder=holder)
            self.grants[prompt] = g
            self.by_step.setdefault(step, set()).add(prompt)
            by_holder.setdefault(holder, []).append(g)
        for holder, gs in by_holder.items():
            if is_attached(holder):
                w = self.workers[worker_of(holder)]
                w.granted += len(gs)
                w.first_grant_at = w.first_grant_at or time.time()
                with open(self.files.grants(w.wid), "a", encoding="utf-8") as f:  # closed: visible on NFS
                    f.write("".join(json.dumps({"prompt": g.prompt, "step": g.step, "issue": g.issue}) + "\n"
                                    for g in gs))
            else:
                self.send(holder, {"type": "grant", "step": step, "prompts": [[g.prompt, g.issue] for g in gs]})

    def _pick_holder(self, avoid: int | None = None) -> int:
        """The producer for a re-issued or replacement grant: the fastest live worker, else an in-job rank."""
        now = time.time()
        live = [w for w in self.live() if source_of(w.wid) != avoid]
        if live:
            return source_of(max(live, key=lambda w: w.rate(now) or 0.0).wid)
        load = {r: sum(1 for g in self.grants.values() if g.holder == r) for r in self.injob}
        return min(self.injob, key=lambda r: load[r])

    # -- workers coming and going ------------------------------------------------------------------------
    def maintain(self, drain: Callable[[int], None], waiting_step: int | None = None,
                 waited_s: float = 0.0) -> list[int] | None:
        """Look at the leases (at most every ``elastic.poll_s``; None when it did not look): returns ids of
        workers newly ready (the trainer opens their shard sources). A gone worker's source is drained
        (``drain(src)``) before its grants are taken back, so a shard it wrote on its way out still counts."""
        now = time.time()
        if now < self._next_look:
            return None
        self._next_look = now + self.cfg.elastic.poll_s
        new = []
        for wid, lease in read_leases(self.files).items():
            if wid % self.n_trainer != self.trainer_index or lease.attempt != self.attempt:
                continue
            w = self.workers.get(wid)
            if w is None:
                if lease.state != "ready" or lease.expired(now, self.cfg.elastic.lease_s):
                    continue
                w = self.workers[wid] = Attached(wid=wid, lease=lease)
                new.append(wid)
                log.warning("trainer %d: attached worker %d ready (job %s on %s)", self.trainer_index, wid, lease.job,
                            lease.host)
            w.lease = lease
            if w.gone:
                continue
            if lease.state == "left":
                drain(source_of(wid))
                self._gone(w, f"left: {lease.reason or 'stopped'}")
            elif lease.expired(now, self.cfg.elastic.lease_s):
                drain(source_of(wid))
                # Should it still be alive (a partitioned node), it stops; a shard it was writing is set aside.
                self._revoke(w, f"lease expired ({now - lease.time:.0f} s without a heartbeat; killed?)")
                aside = set_aside_partials(RunFiles(self.files.run_dir).rollout_log, "rollout",
                                           SHARD_INDEX_BASE + wid)
                if aside:
                    log.warning("trainer %d: set aside the unfinished shard(s) of worker %d: %s", self.trainer_index,
                                wid, ", ".join(p.name for p in aside))
        if waiting_step is not None and waited_s > self.cfg.elastic.lease_s:
            for w in self.live():  # a live worker holding up the step this long is too slow for the run
                if any(self.grants[p].holder == source_of(w.wid) for p in self.grants_for(waiting_step)):
                    self._revoke(w, f"step {waiting_step} waited {waited_s:.0f} s for its groups")
        return new

    def _revoke(self, w: Attached, reason: str) -> None:
        write_json(self.files.revoked(w.wid), {"reason": reason, "time": time.time()})
        self._gone(w, f"told to stop: {reason}")

    def _gone(self, w: Attached, reason: str) -> None:
        w.gone = reason
        src = source_of(w.wid)
        back = sorted((g for g in self.grants.values() if g.holder == src and not g.delivered),
                      key=lambda g: (g.step, g.prompt))
        log.warning("trainer %d: attached worker %d %s; %d grants go to other producers", self.trainer_index,
                    w.wid, reason, len(back))
        with open(self.files.reissued, "a", encoding="utf-8") as f:
            for g in back:
                holder = self._pick_holder(avoid=src)
                self.by_step[g.step].discard(g.prompt)
                del self.grants[g.prompt]
                self._grant(g.step, [holder], [g.prompt])
                f.write(json.dumps({"prompt": g.prompt, "step": g.step, "from": w.wid, "to": _name(holder),
                                    "time": time.time()}) + "\n")
        self.reissued += len(back)

    # -- seeing it ---------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Per-worker figures for the step's metrics row (``worker/W/...``) and the totals (``elastic/...``)."""
        now = time.time()
        out: dict[str, float] = {"elastic/workers_live": float(len(self.live())),
                                 "elastic/duplicates_dropped": float(self.duplicates),
                                 "elastic/reissued": float(self.reissued)}
        for w in self.workers.values():
            up = max(now - w.seen, 1e-3)
            out[f"worker/{w.wid}/samples"] = float(w.samples_trained)
            out[f"worker/{w.wid}/samples_per_s"] = w.samples_trained / up
            out[f"worker/{w.wid}/staleness_mean"] = w.stale_sum / w.samples_trained if w.samples_trained else 0.0
            out[f"worker/{w.wid}/uptime_s"] = up if not w.gone else 0.0
            out[f"worker/{w.wid}/live"] = float(not w.gone)
        return out


def _name(src: int) -> str:
    return f"worker {worker_of(src)}" if is_attached(src) else f"rank {src}"
