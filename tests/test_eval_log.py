"""Reward time and evaluations in the HDF5 log: the writers, the shard transport, schema-1 logs, and analyze."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

from areal_hpc.analysis.cli import main
from areal_hpc.storage.runlog import RunLog
from areal_hpc.storage.schema import ADDED_ROW_FIELDS, SCHEMA_VERSION, shard_file_name
from areal_hpc.storage.shards import ShardError, read_shard
from areal_hpc.storage.writers import RolloutLogWriter, TrainerLogWriter
from areal_hpc.trajectory import TrainStats, Trajectory
from areal_hpc.transport.hdf5_source import ShardSource, shard_trajectories

ATTRS = {"run_id": "eval-run", "config_yaml": "run:\n  steps: 3\n", "rank": 0}
T0 = 1.7e9


def _traj(i: int, *, seconds: float, timed_out: bool = False) -> Trajectory:
    rng = np.random.default_rng(i)
    n = 1 + i % 5
    return Trajectory(sample_id=i, group_id=i // 2, prompt_tokens=rng.integers(0, 100, 3 + i % 2),
                      response_tokens=rng.integers(0, 100, n), behav_logprobs=-rng.random(n),
                      versions=np.full(n, i // 4), reward=0.0 if timed_out else float(i % 2), rank=1 + i % 2,
                      answer_ok=not timed_out and bool(i % 2), t_start=T0 + i, t_end=T0 + i + 0.5,
                      interruptions=i % 3, text=f"answer {i} √2", answer=str(i), reward_seconds=seconds,
                      reward_timed_out=timed_out)


def _rollout(run: Path, trajs: list[Trajectory], shard_samples: int = 4) -> None:
    w = RolloutLogWriter(run / "rollout_log", 0, attrs={**ATTRS, "rank": 1}, shard_samples=shard_samples,
                         flush_s=1e9, compression="lzf")
    for t in trajs:
        w.add(t)
    w.flush()


def _stats(loss: float) -> TrainStats:
    return TrainStats(loss=loss, grad_norm=1.0, n_tokens=10, n_tokens_global=10, n_microbatches=1, stream_tokens=20,
                      loss_stats={"clip_frac": 0.1})


def _trainer(run: Path, used: list[list[int]], leftover: list[int],
             evals: dict[int, dict[str, float]]) -> TrainerLogWriter:
    """Steps 1..len(used) two per shard, evaluations as the trainer loop makes them: at start, after a step,
    and the last one after the final shard (``evals[len(used)]``)."""
    w = TrainerLogWriter(run / "trainer_log", 0, attrs=ATTRS, shard_steps=2, compression="lzf")
    last = len(used)
    for step in range(last + 1):
        if step:
            w.add(step, step - 1, _stats(0.5 / step), used[step - 1], [0] * len(used[step - 1]),
                  [1.0] * len(used[step - 1]), [], [])
        if step in evals and step != last:
            w.add_eval(step, evals[step])
    w.flush(leftover=leftover)
    if last in evals:
        w.add_eval(last, evals[last])
    return w


def test_reward_time_round_trips_through_shards_and_the_shard_transport(tmp_path: Path) -> None:
    trajs = [_traj(i, seconds=0.01 * (i + 1), timed_out=i == 3) for i in range(6)]
    _rollout(tmp_path, trajs)
    shard = read_shard(tmp_path / "rollout_log" / shard_file_name("rollout", 0, 0))
    assert shard.attrs["schema_version"] == SCHEMA_VERSION
    assert shard.rows["reward_seconds"].dtype == np.float32 and shard.rows["reward_timed_out"].dtype == np.uint8
    source = ShardSource(tmp_path / "rollout_log", 0, retain=True)
    back = source.poll()
    assert source.shards_read == 2 and len(back) == len(trajs)
    for t, b in zip(trajs, back):
        for key in ("sample_id", "group_id", "prompt_id", "rank", "answer_ok", "interruptions", "t_start", "t_end",
                    "text", "answer", "reward_timed_out"):
            assert getattr(b, key) == getattr(t, key), key
        assert b.reward == pytest.approx(t.reward) and b.reward_seconds == pytest.approx(t.reward_seconds, rel=1e-6)
        assert type(b.reward_timed_out) is bool and b.fate is None
        for key in ("prompt_tokens", "response_tokens", "behav_logprobs", "versions"):
            np.testing.assert_array_equal(getattr(b, key), getattr(t, key), err_msg=key)
    s = RunLog(tmp_path, strict=True).samples(["reward_seconds", "reward_timed_out"])
    assert s["reward_timed_out"].tolist() == [0, 0, 0, 1, 0, 0]
    np.testing.assert_allclose(s["reward_seconds"], [0.01 * (i + 1) for i in range(6)], rtol=1e-6)


def _to_schema_1(path: Path) -> None:
    """Rewrite a shard in the layout of schema 1: without the columns schemas 2 and 3 added."""
    with h5py.File(path, "r+") as f:
        for name in ADDED_ROW_FIELDS["rollout"]:
            del f[name]
        f.attrs["schema_version"] = 1


def test_schema_1_shards_still_read(tmp_path: Path) -> None:
    _rollout(tmp_path, [_traj(i, seconds=0.2) for i in range(6)])
    old = tmp_path / "rollout_log" / shard_file_name("rollout", 0, 0)
    _to_schema_1(old)
    shard = read_shard(old)
    assert np.isnan(shard.rows["reward_seconds"]).all() and shard.rows["reward_seconds"].dtype == np.float32
    assert shard.rows["reward_timed_out"].tolist() == [0] * 4 and shard.rows["reward_timed_out"].dtype == np.uint8
    assert [math.isnan(t.reward_seconds) for t in shard_trajectories(old)] == [True] * 4
    assert shard.rows["worker"].tolist() == [-1] * 4
    s = RunLog(tmp_path, strict=True).samples()  # a log of both versions, as a resumed run after an upgrade
    assert s["sample_id"].tolist() == list(range(6))
    assert s["reward_seconds"].isna().tolist() == [True] * 4 + [False] * 2
    assert read_shard(old, ["reward_timed_out"]).rows["reward_timed_out"].tolist() == [0] * 4
    new = tmp_path / "rollout_log" / shard_file_name("rollout", 0, 1)
    with h5py.File(new, "r+") as f:  # a shard of the current schema must have them
        del f["reward_seconds"]
    with pytest.raises(ShardError, match=r"rollout-r000-000001.h5: dataset 'reward_seconds' is missing; schema "
                                         rf"version {SCHEMA_VERSION} requires it"):
        read_shard(new)


EVALS = {0: {"pass@1": 0.25, "n": 200}, 2: {"pass@1": 0.5, "avg@4": 0.4, "pass@4": 0.75, "n": 200, "k": 4},
         3: {"pass@1": 0.625, "n": 200}}


def test_evals_at_start_mid_run_and_after_the_final_shard(tmp_path: Path) -> None:
    w = _trainer(tmp_path, [[0, 1], [2, 3], [4]], leftover=[5], evals=EVALS)
    names = sorted(p.name for p in (tmp_path / "trainer_log").iterdir())
    assert names == [shard_file_name("trainer", 0, k) for k in range(3)]  # steps 1-2, step 3 (final), eval-only
    eval_only = read_shard(tmp_path / "trainer_log" / names[2])
    assert eval_only.n_rows == 0 and eval_only.attrs["final"] == 1 and "leftover_sample_id" not in eval_only.extra
    log = RunLog(tmp_path, strict=True)
    assert log.finished and log.leftover().tolist() == [5]
    assert log.steps()["step"].tolist() == [1, 2, 3]
    ev = log.evals()
    assert list(ev.columns) == ["step", "metric", "value"]
    assert ev.values.tolist() == [[s, k, v] for s, m in EVALS.items() for k, v in m.items()]
    w.add_eval(3, {"pass@8": 0.9})  # one more after the end: its own final shard, the run still finished
    log = RunLog(tmp_path, strict=True)
    assert log.finished and log.evals()["metric"].tolist()[-1] == "pass@8" and log.leftover().tolist() == [5]
    with pytest.raises(ValueError, match=r"add_eval\(step=4\): metrics \['note'\] are not name -> number"):
        w.add_eval(4, {"note": "high"})  # type: ignore[dict-item]
    with pytest.raises(RuntimeError, match="flush.*called twice"):
        w.flush(leftover=[])
    no_evals = tmp_path / "plain"
    _trainer(no_evals, [[0]], leftover=[], evals={})
    assert RunLog(no_evals).evals().empty and list(RunLog(no_evals).evals().columns) == ["step", "metric", "value"]


def test_analyze_shows_reward_time_and_evals(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    seconds = [0.01 * (i + 1) for i in range(10)]
    _rollout(tmp_path, [_traj(i, seconds=seconds[i], timed_out=i in (2, 7)) for i in range(10)])
    _trainer(tmp_path, [[0, 1], [2, 3], [4, 5]], leftover=[6, 7, 8, 9], evals=EVALS)
    assert main([str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    p50, p99 = np.percentile(np.float32(seconds), [50, 99])
    assert (f"reward time per sample: mean {np.mean(np.float32(seconds)):.3f} s, p50 {p50:.3f} s, p99 {p99:.3f} s; "
            "timed out: 2 (20.0%)") in out
    table = out.split("Held-out evaluation (step 0: before training)\n", 1)[1].splitlines()
    assert table[0].split() == ["step", "pass@1", "n", "avg@4", "pass@4", "k"]
    assert [r.split() for r in table[2:5]] == [["0", "0.250", "200", "-", "-", "-"],
                                               ["2", "0.500", "200", "0.400", "0.750", "4"],
                                               ["3", "0.625", "200", "-", "-", "-"]]
    assert main([str(tmp_path), "--no-plots", "--format", "json"]) == 0
    run = json.loads(capsys.readouterr().out)["runs"][0]
    rt = run["info"]["reward_time"]
    assert rt["timeouts"] == 2 and rt["timeout_fraction"] == 0.2 and rt["samples"] == 10
    assert rt["p99_s"] == pytest.approx(p99)
    assert run["tables"]["evals"][1] == {"step": 2, "pass@1": 0.5, "n": 200, "avg@4": 0.4, "pass@4": 0.75, "k": 4}
    assert run["tables"]["evals"][0]["k"] is None
    assert main([str(tmp_path), "--no-plots", "--format", "csv", "--out", str(tmp_path / "csv")]) == 0
    capsys.readouterr()
    with open(tmp_path / "csv" / "evals.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["0", "2", "3"] and rows[2]["pass@1"] == "0.625"
    # a schema-1 log has no reward time: no line rather than a line of NaN; no evals: no table
    for p in (tmp_path / "rollout_log").glob("*.h5"):
        _to_schema_1(p)
    for p in (tmp_path / "trainer_log").glob("*.h5"):
        with h5py.File(p, "r+") as f:
            for name in ("eval_step", "eval_metric", "eval_value"):
                if name in f:
                    del f[name]
    assert main([str(tmp_path), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "reward time" not in out and "Held-out evaluation" not in out
