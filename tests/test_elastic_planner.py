"""The trainer's planner of attached workers' grants (elastic/planner.py) and the in-job gate's per-step plan."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from areal_hpc.config import load_config
from areal_hpc.elastic.layout import PROMPT_BASE, ElasticFiles
from areal_hpc.elastic.lease import read_lease, register, renew
from areal_hpc.elastic.planner import PROBE_EVERY, ElasticPlanner, source_of
from areal_hpc.rollout.producer import granted_sample_base
from areal_hpc.rollout.staleness import StalenessGate
from areal_hpc.rollout.worker import SAMPLE_ID_ATTEMPT_STRIDE

ETA = 2


class Planner:
    """A planner for trainer 0 of 1 with in-job ranks 1 and 2, 6 groups a step, and what it sent."""

    def __init__(self, tmp: Path, consumed: np.ndarray | None = None, **overrides: str) -> None:
        args = [f"rollout.eta={ETA}", "run.steps=50", "elastic.lease_s=3", "elastic.heartbeat_s=1",
                "elastic.poll_s=0.01", *(f"{k}={v}" for k, v in overrides.items())]
        self.cfg = load_config(None, args)
        self.files = ElasticFiles(tmp)
        self.files.workers.mkdir(parents=True)
        self.sent: list[tuple[int, dict]] = []
        self.drained: list[int] = []
        self.p = ElasticPlanner(self.cfg, self.files, trainer_index=0, n_trainer=1, injob=[1, 2], groups_per_step=6,
                                attempt=0, version=0, consumed=np.zeros(0, np.int64) if consumed is None else consumed,
                                send=lambda r, m: self.sent.append((r, m)))

    def look(self) -> list[int] | None:
        self.p._next_look = 0.0
        return self.p.maintain(self.drained.append)

    def ready_worker(self):
        lease = register(self.files, attempt=0)
        lease.state, lease.version = "ready", 0
        renew(self.files, lease)
        assert self.look() == [lease.worker]
        return lease

    def grants_file(self, wid: int) -> list[dict]:
        path = self.files.grants(wid)
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_without_workers_the_static_shares_stand_and_nothing_is_sent(tmp_path):
    t = Planner(tmp_path)
    assert t.look() == []
    for v in range(1, 5):
        t.p.step_done(0.1, v)
    assert t.sent == [] and t.p.injob_quota(4 + ETA + 1) == {1: 3, 2: 3} and not t.p.grants_for(7)


def test_a_ready_worker_gets_named_grants_for_a_step_planned_eta_plus_one_ahead(tmp_path):
    t = Planner(tmp_path)
    w = t.ready_worker()
    t.p.step_done(0.1, 1)  # version 1: plans step 1 + eta + 1
    step = 1 + ETA + 1
    grants = t.grants_file(w.worker)
    assert [g["step"] for g in grants] == [step]  # one group while its pace is not known
    assert grants[0]["prompt"] >= PROMPT_BASE and t.p.grants_for(step) == {grants[0]["prompt"]}
    plans = {r: m["share"] for r, m in t.sent if m["type"] == "plan" and m["step"] == step}
    assert plans == {1: 3, 2: 2} and t.p.injob_quota(step) == plans  # the in-job ranks make the rest
    assert t.p.injob_quota(step - 1) == {1: 3, 2: 3}  # already planned before it attached: unchanged


def test_a_worker_gets_more_while_its_groups_come_in_time_less_when_late_and_the_in_job_ranks_keep_one(tmp_path):
    t = Planner(tmp_path)
    w = t.ready_worker()
    a = t.p.workers[w.worker]
    t.p.step_done(1.0, 1)  # 1 s steps: a grant has eta = 2 s between its version and its step
    (probe,) = t.p.grants
    assert t.p.arrived(source_of(w.worker), probe) and a.latency < 0.5  # in at once
    t.p.step_done(1.0, 2)
    assert a.target == 2 and len(t.p.grants_for(2 + ETA + 1)) == 2  # nothing outstanding: two more
    t.p.step_done(1.0, 3)
    assert a.target == 3 and len(t.p.grants_for(3 + ETA + 1)) == 1  # tops up to three outstanding
    a.latency = 1.9  # close to the 2 s a grant has: halve
    t.p.step_done(1.0, 4)
    assert a.target == 1 and not t.p.grants_for(4 + ETA + 1)
    a.latency, a.target = 0.1, 100  # however quick, the in-job ranks keep one group each
    t.p.step_done(1.0, 5)
    assert len(t.p.grants_for(5 + ETA + 1)) == 4 and t.p.injob_quota(5 + ETA + 1) == {1: 1, 2: 1}


def test_a_worker_too_slow_for_one_group_gets_a_probe_now_and_then(tmp_path):
    t = Planner(tmp_path)
    w = t.ready_worker()
    a = t.p.workers[w.worker]
    t.p.step_done(0.1, 1)
    (probe,) = t.p.grants
    t.p.arrived(source_of(w.worker), probe)
    t.p.judged(probe, [0] * 8, rejected=False)
    a.latency = 5.0  # steps of 0.1 s give a grant 0.2 s
    granted = []
    for v in range(2, 2 + 2 * PROBE_EVERY):
        t.p.step_done(0.1, v)
        granted.append(len(t.p.grants_for(v + ETA + 1)))
        for p in list(t.p.grants):  # each probe arrives (late) and is trained
            t.p.arrived(source_of(w.worker), p)
            t.p.judged(p, [0] * 8, rejected=False)
            a.latency = 5.0
    assert a.target == 0 and sum(granted) == 2


def test_an_expired_worker_s_grants_go_to_an_in_job_rank_and_its_late_group_is_dropped(tmp_path):
    t = Planner(tmp_path)
    w = t.ready_worker()
    t.p.step_done(0.1, 1)
    (prompt,) = t.p.grants_for(1 + ETA + 1)
    lease = read_lease(t.files, w.worker)
    lease.time -= 10  # no heartbeat for longer than elastic.lease_s
    t.files.lease(w.worker).write_text(json.dumps(vars(lease)))
    log_dir = tmp_path / "rollout_log"
    log_dir.mkdir()
    (log_dir / f".rollout-r{1000 + w.worker}-000002.h5.partial").write_bytes(b"half a shard")
    t.look()
    assert t.drained == [source_of(w.worker)]  # what it wrote is read before its grants move
    assert [p.name for p in log_dir.iterdir()] == [f".rollout-r{1000 + w.worker}-000002.h5.partial.bad"]
    assert "lease expired" in json.loads(t.files.revoked(w.worker).read_text())["reason"]  # if alive: stop
    grants = [(r, m) for r, m in t.sent if m["type"] == "grant"]
    assert len(grants) == 1 and grants[0][1]["prompts"][0][0] == prompt and grants[0][1]["step"] == 1 + ETA + 1
    rank = grants[0][0]
    assert not t.p.arrived(source_of(w.worker), prompt)  # the worker's copy, if it ever comes: dropped
    assert t.p.arrived(rank, prompt) and t.p.duplicates == 1
    reissued = [json.loads(line) for line in t.files.reissued.read_text().splitlines()]
    assert reissued == [{"prompt": prompt, "step": 1 + ETA + 1, "from": w.worker, "to": f"rank {rank}",
                         "time": pytest.approx(time.time(), abs=60)}]
    t.p.step_done(0.1, 2)  # no live worker: the static shares return
    assert t.p.injob_quota(2 + ETA + 1) == {1: 3, 2: 3}


def test_a_worker_that_left_hands_its_undelivered_grants_to_another_worker(tmp_path):
    t = Planner(tmp_path)
    a, b = t.ready_worker(), t.ready_worker()
    t.p.step_done(1.0, 1)
    (delivered,) = [g["prompt"] for g in t.grants_file(a.worker)]
    assert t.p.arrived(source_of(a.worker), delivered)  # in, waiting for its step
    t.p.step_done(1.0, 2)  # it delivered in time: more for it
    pending = [g["prompt"] for g in t.grants_file(a.worker) if g["prompt"] != delivered]
    assert pending
    a.state, a.reason = "left", "SIGTERM"
    renew(t.files, a)
    t.look()
    moved = [g["prompt"] for g in t.grants_file(b.worker)]
    assert set(pending) <= set(moved) and delivered not in moved  # what it delivered stays its own
    assert all(t.p.grants[p].holder == source_of(b.worker) for p in pending)
    assert t.p.grants[delivered].holder == source_of(a.worker) and t.p.reissued == len(pending)
    assert "left: SIGTERM" in t.p.workers[a.worker].gone


def test_a_worker_rejected_as_stale_again_and_again_is_told_to_stop(tmp_path):
    t = Planner(tmp_path, **{"elastic.stale_stop": "2"})
    w = t.ready_worker()
    t.p.step_done(0.1, 1)
    (first,) = t.p.grants
    t.p.judged(first, [ETA + 1] * 8, rejected=True)
    (second,) = t.p.grants  # its replacement, same step: the worker is still the producer to ask
    assert t.p.grants[second].holder == source_of(w.worker) and t.p.grants[second].step == 1 + ETA + 1
    t.p.judged(second, [ETA + 1] * 8, rejected=True)
    assert "rejected as stale 2 times" in json.loads(t.files.revoked(w.worker).read_text())["reason"]
    assert t.p.workers[w.worker].gone
    (third,) = t.p.grants  # the step still gets its group: from an in-job rank now
    assert t.p.grants[third].holder in (1, 2)


def test_a_resumed_planner_grants_the_prompts_granted_but_never_consumed_first(tmp_path):
    consumed = np.array([5, 9, PROMPT_BASE + 0, PROMPT_BASE + 2, PROMPT_BASE + 3], np.int64)
    t = Planner(tmp_path, consumed=consumed)
    w = t.ready_worker()
    t.p.step_done(1.0, 1)
    assert sorted(t.p.grants) == [PROMPT_BASE + 1]  # the hole first
    t.p.workers[w.worker].target = 5  # quick: as many as the in-job ranks leave (4)
    t.p.step_done(1.0, 2)
    assert sorted(t.p.grants) == [PROMPT_BASE + k for k in (1, 4, 5, 6, 7)]


def test_sample_ids_of_grants_never_meet_in_job_ids():
    in_job_max = 3 * SAMPLE_ID_ATTEMPT_STRIDE + 10**9 * 16
    assert granted_sample_base(0, 0, 16) > in_job_max
    assert granted_sample_base(0, 2**40 // 16, 16) < granted_sample_base(1, 0, 16)


def test_the_gate_takes_the_trainer_s_plan_and_grants_for_one_step():
    gate = StalenessGate(eta=1, share=3)
    assert gate.capacity(0) == 6
    gate.plan(1, 1)  # step 1: one group instead of three
    assert gate.capacity(0) == 4
    gate.grant(1, 2)  # two prompts taken back from a worker, for step 1
    assert gate.capacity(0) == 6
    gate.plan(2, 0)
    assert gate.capacity(1) == 6 + 0
    for _ in range(6):
        assert gate.admit(1)
    assert not gate.admit(1) and gate.capacity(5) == 3 * 4  # old entries folded, same budget
