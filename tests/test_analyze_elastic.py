"""``areal-hpc analyze`` of a run that rollout workers attached to (``areal-hpc attach``): the producers table, the
timeline of workers joining and leaving against training throughput, and its figure.

The run is fabricated with the real ShardWriter: one in-job rollout rank (MPI rank 1) and three attached workers:
w0 is killed at 31 s (its lease goes stale; three of its grants are re-issued, one of which it had written anyway),
w1 is stopped by SIGTERM and writes its open shard after the trainer's last step, w2 registers and leaves without
a sample. Every count below comes from the ground truth the builder keeps, not from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from areal_hpc.analysis.cli import main
from areal_hpc.analysis.plots import ELASTIC_FILE
from areal_hpc.analysis.tables import elastic_timeline, load_run, producer_table, rollout_rank_table
from areal_hpc.storage.shards import ShardWriter
from tests.test_analyze import _check_png, make_run

T0 = 1_800_000_000.0
G = 4  # samples per group
LAST_STEP = 58  # steps 1..58 finish at T0 + step seconds
LEASE_S = 6.0
PROMPT_BASE = 1 << 40  # attached workers' prompts, apart from the in-job rank's
P1, P2, P3, P5 = (PROMPT_BASE + k for k in (101, 102, 103, 105))
REASON_W1 = "SIGTERM (preempted or time limit)"


def _config() -> dict[str, Any]:
    return {"async": True, "run": {"name": "elastic", "steps": LAST_STEP},
            "cluster": {"n_trainer": 1, "n_rollout": 1}, "rollout": {"eta": 3, "group_size": G},
            "trainer": {"batch_size": 8, "stale_policy": "reject"}, "transport": {"kind": "hdf5"},
            "elastic": {"lease_s": LEASE_S, "heartbeat_s": 0.5}}


class Groups:
    """Groups of G samples as the builder plans them: (producer, prompt, t_start of each member, t_end, fate)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.next_id = 0

    def add(self, producer: str, prompt: int, t_start: float, t_end: float, fate: str) -> None:
        for k in range(G):
            self.rows.append({"sample_id": self.next_id, "producer": producer, "prompt_id": prompt,
                              "t_start": T0 + t_start + 0.01 * k, "t_end": T0 + t_end - 0.01 * k, "fate": fate})
            self.next_id += 1

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def _plan(rng: np.random.Generator) -> pd.DataFrame:
    g = Groups()
    # rank 1, all along the run: the first sample starts the run's clock (t_start 0)
    fates = ["used"] * 31 + ["rejected"] * 4 + ["leftover"] * 4
    for k, fate in enumerate(fates):
        start = 0.0 if k == 0 else float(rng.uniform(0, 52))
        g.add("rank 1", k, start, start + float(rng.uniform(0.5, 3.0)), fate)
    # re-issued grants that rank 1 made and the trainer took from it; P5 is the one w1 also delivered late
    for p, start in ((P1, 33.0), (P2, 34.0), (P5, 40.0)):
        g.add("rank 1", p, start, start + 1.0, "used")
    # w0: joins at 12 s, killed at 31 s; P1 written but its grant re-issued (dropped), P3 re-issued to w1
    for k, start in enumerate((12.0, 14.0, 17.0, 20.0)):
        g.add("worker 0", PROMPT_BASE + k, start, start + 2.0, "used")
    g.add("worker 0", P1, 26.0, 30.0, "dropped")
    g.add("worker 0", P3, 27.0, 31.0, "dropped")
    # w1: joins at 25 s, leaves on SIGTERM after writing its open shard past the trainer's last step (58 s)
    for k, start in enumerate((25.0, 30.0, 36.0)):
        g.add("worker 1", PROMPT_BASE + 10 + k, start, start + 3.0, "used")
    g.add("worker 1", PROMPT_BASE + 20, 41.0, 43.0, "rejected")
    g.add("worker 1", P5, 44.0, 46.0, "dropped")  # rank 1 trained P5 already: a duplicate the log alone shows
    g.add("worker 1", PROMPT_BASE + 21, 50.0, 52.0, "leftover")
    g.add("worker 1", PROMPT_BASE + 22, 56.0, 59.0, "after_stop")
    g.add("worker 1", PROMPT_BASE + 23, 57.0, 60.0, "after_stop")
    return g.frame()


def _write_rollout(run: Path, cfg_yaml: str, index: int, rank: int, worker: int, s: pd.DataFrame,
                   rng: np.random.Generator) -> None:
    w = ShardWriter(run / "rollout_log", "rollout", index, attrs={"run_id": "elastic", "config_yaml": cfg_yaml,
                                                                 "rank": max(rank, 0)})
    for part in np.array_split(np.arange(len(s)), 2):
        p = s.iloc[part]
        n = len(p)
        lens = rng.integers(1, 6, n).astype(np.int32)
        rows = {
            "sample_id": p["sample_id"].to_numpy(np.int64), "prompt_id": p["prompt_id"].to_numpy(np.int64),
            "group_id": p["prompt_id"].to_numpy(np.int64), "rank": np.full(n, rank, np.int32),
            "reward": rng.choice([0.0, 1.0], n).astype(np.float32), "answer_ok": np.zeros(n, np.uint8),
            "t_start": p["t_start"].to_numpy(float), "t_end": p["t_end"].to_numpy(float),
            "interruptions": np.zeros(n, np.int32), "prompt_len": np.full(n, 2, np.int32), "response_len": lens,
            "response_text": ["x"] * n, "answer": ["1"] * n, "reward_seconds": np.full(n, 0.01, np.float32),
            "reward_timed_out": np.zeros(n, np.uint8), "worker": np.full(n, worker, np.int32),
        }
        ragged = {"prompt": {"prompt_tokens": [np.array([1, 2], np.int32)] * n},
                  "response": {"response_tokens": [np.ones(k, np.int32) for k in lens],
                               "behav_logprobs": [np.full(k, -1.0, np.float32) for k in lens],
                               "versions": [np.zeros(k, np.int32) for k in lens]}}
        w.write(rows, ragged)


def make_elastic_run(root: Path) -> dict[str, Any]:
    rng = np.random.default_rng(7)
    run = root / "elastic"
    run.mkdir(parents=True)
    cfg_yaml = yaml.safe_dump(_config())
    (run / "config.yaml").write_text(cfg_yaml)
    s = _plan(rng)
    _write_rollout(run, cfg_yaml, 0, 1, -1, s[s["producer"] == "rank 1"], rng)
    for wid in (0, 1):
        _write_rollout(run, cfg_yaml, 1000 + wid, -1, wid, s[s["producer"] == f"worker {wid}"], rng)
    # each trained or rejected group goes to the first step after its last member ended
    s["step"] = np.minimum(LAST_STEP, np.floor(s.groupby("prompt_id")["t_end"].transform("max") - T0) + 1)
    s["staleness"] = rng.integers(0, 4, len(s))
    tw = ShardWriter(run / "trainer_log", "trainer", 0, attrs={"run_id": "elastic", "config_yaml": cfg_yaml,
                                                               "rank": 0})
    for steps in (range(1, 30), range(30, LAST_STEP + 1)):
        last = steps[-1] == LAST_STEP
        used = [s[(s["fate"] == "used") & (s["step"] == k)] for k in steps]
        rej = [s[(s["fate"] == "rejected") & (s["step"] == k)] for k in steps]
        rows: dict[str, np.ndarray] = {"step": np.array(steps, np.int64),
                                       "trained_version": np.array(steps, np.int64) - 1,
                                       "time": T0 + np.array(steps, float)}
        for f in ("loss", "grad_norm", "clip_frac", "cap_frac", "importance_weight", "ratio", "approx_kl"):
            rows[f] = np.zeros(len(steps), np.float32)
        ragged = {"used": {"used_sample_id": [u["sample_id"].to_numpy(np.int64) for u in used],
                           "used_staleness": [u["staleness"].to_numpy(np.int32) for u in used],
                           "used_weight": [np.ones(len(u), np.float32) for u in used]},
                  "rejected": {"rejected_sample_id": [r["sample_id"].to_numpy(np.int64) for r in rej],
                               "rejected_staleness": [np.full(len(r), 4, np.int32) for r in rej]}}
        leftover = s.loc[s["fate"] == "leftover", "sample_id"].to_numpy(np.int64)
        tw.write(rows, ragged, extra_attrs={"final": int(last)},
                 extra_datasets={"leftover_sample_id": leftover} if last else None)
    # the run folder's elastic records, as trainer 0 and the workers leave them
    el = run / "elastic"
    leases = {0: ("ready", "", 31.5), 1: ("left", REASON_W1, 60.5), 2: ("left", "the run ended", 20.0)}
    for wid, (state, reason, beat) in leases.items():
        (el / "workers" / f"w{wid:04d}").mkdir(parents=True)
        (el / "workers" / f"w{wid:04d}" / "lease.json").write_text(json.dumps({
            "worker": wid, "attempt": 0, "host": "node", "pid": 1, "job": "7", "state": state, "version": 9,
            "loading": -1, "samples": 0, "groups": 0, "started": T0 + 10, "time": T0 + beat, "reason": reason}))
    back = [(P1, "rank 1"), (P2, "rank 1"), (P3, "worker 1")]
    (el / "reissued.jsonl").write_text("".join(json.dumps({"prompt": p, "step": 40, "from": 0, "to": to,
                                                           "time": T0 + 38.5}) + "\n" for p, to in back))
    (el / "run.json").write_text(json.dumps({"state": "ended", "time": T0 + 61.0, "attempt": 0}))
    return {"dir": run, "s": s}


@pytest.fixture(scope="module")
def elastic_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return make_elastic_run(tmp_path_factory.mktemp("elastic"))


def test_producers_count_every_sample(elastic_run: dict[str, Any]) -> None:
    s = elastic_run["s"]
    prod = producer_table(load_run(elastic_run["dir"])).set_index("producer")
    assert list(prod.index) == ["rank 1", "worker 0", "worker 1", "worker 2"]
    for name, row in prod.iterrows():
        mine = s[s["producer"] == name]
        fate = mine["fate"].value_counts()
        assert row["generated"] == len(mine), name
        assert row["trained"] == fate.get("used", 0), name
        assert row["rejected"] == fate.get("rejected", 0), name
        assert row["leftover"] == fate.get("leftover", 0), name
        assert row["duplicates"] == fate.get("dropped", 0), name
        assert row["after_stop"] == fate.get("after_stop", 0), name
        assert row["not_trained"] == len(mine) - fate.get("used", 0) - fate.get("rejected", 0), name
        used = mine[mine["fate"] == "used"]
        if len(mine):
            assert row["stale_mean"] == pytest.approx(float(used["staleness"].mean()))
            assert row["joined_s"] == pytest.approx(float(mine["t_start"].min() - T0))
            assert row["left_s"] == pytest.approx(float(mine["t_end"].max() - T0))
            span = float(mine["t_end"].max() - mine["t_start"].min())
            assert row["samples_per_s"] == pytest.approx(len(mine) / span)
    # what the builder planned, in plain numbers: the counts above are not all zero by accident
    assert prod.loc["worker 0", ["generated", "trained", "duplicates"]].tolist() == [24, 16, 8]
    assert prod.loc["worker 1", ["generated", "trained", "rejected", "leftover", "duplicates", "after_stop"]
                    ].tolist() == [32, 12, 4, 4, 4, 8]
    assert prod.loc["worker 2", "generated"] == 0 and np.isnan(prod.loc["worker 2", "joined_s"])
    # how each worker left: w0's lease went stale (killed), w1 and w2 said goodbye; only w0 had grants taken back
    assert prod.loc["worker 0", "lease"] == "expired" and "killed" in prod.loc["worker 0", "reason"]
    assert prod.loc["worker 1", ["lease", "reason"]].tolist() == ["left", REASON_W1]
    assert prod.loc["worker 2", ["lease", "reason"]].tolist() == ["left", "the run ended"]
    assert prod["reissued"].tolist() == [None, 3, 0, 0]
    assert pd.isna(prod.loc["rank 1", "lease"]) and pd.isna(prod.loc["rank 1", "reason"])


def test_timeline_counts_workers_per_bin(elastic_run: dict[str, Any]) -> None:
    run = load_run(elastic_run["dir"])
    tl = elastic_timeline(run, 6)
    # the span is 0-60 s (w1's last sample), so the 6 buckets are 10 s each
    assert tl["t_from_s"].tolist() == pytest.approx([0, 10, 20, 30, 40, 50])
    # w0 from 12 s to 31 s, w1 from 25 s to 60 s; w2 wrote nothing
    assert tl["workers"].tolist() == [0, 1, 2, 2, 1, 1]
    assert tl["events"].tolist() == ["", "+w0", "+w1", "-w0", "", "-w1"]
    assert tl["reissued"].tolist() == [0, 0, 0, 3, 0, 0]
    s = elastic_run["s"]
    steps = np.arange(1, LAST_STEP + 1)
    assert tl["steps"].tolist() == [int(((steps >= lo) & (steps < lo + 10)).sum()) for lo in range(0, 60, 10)]
    used = s[s["fate"] == "used"]
    assert tl["trained"].sum() == len(used)
    by_worker = used[used["producer"].str.startswith("worker")]
    assert tl["from_workers"].tolist() == [int(((by_worker["step"] >= lo) & (by_worker["step"] < lo + 10)).sum())
                                           for lo in range(0, 60, 10)]
    # the workers' own rows in the rollout-rank table: rank -1, told apart by their shards' index
    rr = rollout_rank_table(run)
    assert rr[["rank", "index", "generated"]].values.tolist() == [[1, 0, 168], [-1, 1000, 24], [-1, 1001, 32]]


def test_cli_prints_writes_and_plots(elastic_run: dict[str, Any], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = elastic_run["dir"]
    capsys.readouterr()
    assert main([str(run), "--format", "csv", "--bins", "6", "--out", str(tmp_path / "csv")]) == 0
    printed = [Path(p) for p in capsys.readouterr().out.split()]
    assert {p.name for p in printed} >= {"producers.csv", "elastic_timeline.csv", ELASTIC_FILE}
    assert pd.read_csv(tmp_path / "csv" / "producers.csv")["generated"].tolist() == [168, 24, 32, 0]
    assert pd.read_csv(tmp_path / "csv" / "elastic_timeline.csv")["workers"].tolist() == [0, 1, 2, 2, 1, 1]
    _check_png(tmp_path / "csv" / ELASTIC_FILE)
    assert main([str(run), "--format", "json", "--no-plots"]) == 0
    obj = json.loads(capsys.readouterr().out)
    tables = obj["runs"][0]["tables"]
    assert [r["producer"] for r in tables["producers"]] == ["rank 1", "worker 0", "worker 1", "worker 2"]
    assert tables["producers"][0]["reissued"] is None and tables["producers"][1]["reissued"] == 3
    assert obj["runs"][0]["info"]["elastic"] == {"workers": [0, 1, 2], "samples_generated": 56, "samples_trained": 28,
                                                 "grants_reissued": 3}
    assert main([str(run), "--no-plots", "--bins", "6"]) == 0
    out = capsys.readouterr().out
    assert "attached workers: 3 (w0, w1, w2) generated 56 samples" in out and "3 grants re-issued" in out
    assert out.index("Producers:") < out.index("Training throughput against attached workers")
    assert "+w0" in out and REASON_W1 in out


def test_run_without_workers_prints_no_producers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path, "plain", 2, seed=5)["dir"]
    capsys.readouterr()
    assert main([str(run), "--no-plots"]) == 0  # test_analyze checks that its figures are PLOT_FILES alone
    out = capsys.readouterr().out
    assert "Rollout ranks" in out
    for text in ("Producers", "attached workers", "against attached workers"):
        assert text not in out
    assert main([str(run), "--format", "json", "--no-plots"]) == 0
    obj = json.loads(capsys.readouterr().out)
    tables = obj["runs"][0]["tables"]
    assert set(tables) == {"step_ranges", "throughput", "rollout_ranks"} and "elastic" not in obj["runs"][0]["info"]
