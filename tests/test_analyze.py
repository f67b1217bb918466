"""``areal-hpc analyze`` on small synthetic runs written with the real ShardWriter."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml

from areal_hpc.analysis import plot_runs, summarize
from areal_hpc.analysis.cli import main
from areal_hpc.analysis.plots import COMPARE_FILE, PLOT_FILES
from areal_hpc.storage.shards import ShardWriter

N_ROLLOUT, SHARDS_PER_RANK, PER_SHARD = 2, 2, 200
N_STEPS, PER_STEP = 30, 24
T0 = 1_700_000_000.0


def _config(name: str, eta: int) -> dict[str, Any]:
    return {"async": True, "run": {"name": name, "steps": N_STEPS},
            "cluster": {"n_trainer": 1, "n_rollout": N_ROLLOUT},
            "rollout": {"eta": eta, "group_size": 8}, "trainer": {"batch_size": PER_STEP, "stale_policy": "reject"},
            "transport": {"kind": "hdf5"}}


def make_run(root: Path, name: str, eta: int, *, seed: int, finished: bool = True, graded: bool = False,
             resp_len: tuple[int, int] = (1, 9)) -> dict[str, Any]:
    """A run folder: 2 rollout indexes x 2 shards x 200 samples, 1 trainer with 30 steps in 2 shards.

    ``graded``: rewards in [0, 1] with ``answer_ok`` only for reward 1 (a partial-credit verifier), else 0/1
    rewards equal to ``answer_ok`` (a math verifier). ``resp_len``: [low, high) of the response lengths.
    Returns what the tables should find: per-sample arrays and each step's used/rejected sample ids.
    """
    rng = np.random.default_rng(seed)
    run = root / name
    run.mkdir(parents=True)
    cfg = _config(name, eta)
    cfg_yaml = yaml.safe_dump(cfg)
    (run / "config.yaml").write_text(cfg_yaml)
    n = N_ROLLOUT * SHARDS_PER_RANK * PER_SHARD
    s: dict[str, np.ndarray] = {
        "sample_id": np.arange(n, dtype=np.int64),
        "reward": (rng.choice([0.0, 0.25, 0.5, 1.0], n) if graded else rng.choice([0.0, 1.0], n)).astype(np.float32),
        "t_start": T0 + np.sort(rng.uniform(0, 60, n)),
        "interruptions": rng.choice([0, 0, 0, 1, 2], n).astype(np.int32),
        "response_len": rng.integers(*resp_len, n).astype(np.int32),
    }
    s["t_end"] = s["t_start"] + rng.uniform(0.1, 2.0, n)
    s["reward_seconds"] = rng.exponential(0.05, n).astype(np.float32)
    s["reward_timed_out"] = (rng.random(n) < 0.02).astype(np.uint8)
    s["reward"][s["reward_timed_out"] == 1] = 0.0  # a timeout scores 0
    s["index"] = np.repeat(np.arange(N_ROLLOUT), SHARDS_PER_RANK * PER_SHARD)
    s["index"] = s["index"][rng.permutation(n)]  # both ranks generate all along the run
    for idx in range(N_ROLLOUT):
        w = ShardWriter(run / "rollout_log", "rollout", idx,
                        attrs={"run_id": name, "config_yaml": cfg_yaml, "rank": idx + 1}, compression="gzip")
        mine = np.flatnonzero(s["index"] == idx)
        for part in np.array_split(mine, SHARDS_PER_RANK):
            rows = {
                "sample_id": s["sample_id"][part], "prompt_id": s["sample_id"][part] // 8,
                "group_id": s["sample_id"][part] // 8, "rank": np.full(len(part), idx + 1, np.int32),
                "reward": s["reward"][part], "answer_ok": (s["reward"][part] >= 1.0).astype(np.uint8),
                "t_start": s["t_start"][part], "t_end": s["t_end"][part], "interruptions": s["interruptions"][part],
                "prompt_len": np.full(len(part), 3, np.int32), "response_len": s["response_len"][part],
                "response_text": [f"{i} ok" for i in part], "answer": [str(i) for i in part],
                "reward_seconds": s["reward_seconds"][part], "reward_timed_out": s["reward_timed_out"][part],
                "worker": np.full(len(part), -1, np.int32),
            }
            resp = [rng.integers(0, 50, s["response_len"][i]).astype(np.int32) for i in part]
            versions = [np.sort(rng.integers(0, 1 + s["interruptions"][i], len(r))).astype(np.int32)
                        for i, r in zip(part, resp)]
            ragged = {"prompt": {"prompt_tokens": [np.array([1, 2, 3], np.int32)] * len(part)},
                      "response": {"response_tokens": resp,
                                   "behav_logprobs": [np.full(len(r), -1.0, np.float32) for r in resp],
                                   "versions": versions}}
            w.write(rows, ragged)
    # trainer: steps consume samples in t_end order; a few extra ones per step arrive too stale and are rejected
    order = list(np.argsort(s["t_end"]))
    used: dict[int, np.ndarray] = {}
    rejected: dict[int, np.ndarray] = {}
    stale_used: dict[int, np.ndarray] = {}
    for step in range(1, N_STEPS + 1):
        used[step] = np.array([order.pop(0) for _ in range(PER_STEP)], np.int64)
        stale_used[step] = rng.integers(0, eta + 1, PER_STEP).astype(np.int32)
        rejected[step] = np.array([order.pop(0) for _ in range(step % 2)], np.int64)
    leftover = np.array(order, np.int64)
    tw = ShardWriter(run / "trainer_log", "trainer", 0, attrs={"run_id": name, "config_yaml": cfg_yaml, "rank": 0},
                     compression="gzip")
    for steps in (range(1, 16), range(16, N_STEPS + 1)):
        last = steps[-1] == N_STEPS
        if last and not finished:
            break
        k = len(steps)
        rows = {"step": np.array(steps, np.int64), "trained_version": np.array(steps, np.int64) - 1,
                "time": np.array([s["t_end"][used[i]].max() + 0.05 for i in steps])}
        for f in ("loss", "grad_norm", "clip_frac", "cap_frac", "importance_weight", "ratio", "approx_kl"):
            rows[f] = rng.uniform(0, 1, k).astype(np.float32)
        ragged = {"used": {"used_sample_id": [used[i] for i in steps], "used_staleness": [stale_used[i] for i in steps],
                           "used_weight": [np.ones(PER_STEP, np.float32) for _ in steps]},
                  "rejected": {"rejected_sample_id": [rejected[i] for i in steps],
                               "rejected_staleness": [np.full(len(rejected[i]), eta + 1, np.int32) for i in steps]}}
        w_final = {"final": int(last)}
        tw.write(rows, ragged, extra_attrs=w_final, extra_datasets={"leftover_sample_id": leftover} if last else None)
    return {"dir": run, "s": s, "used": used, "rejected": rejected, "stale": stale_used, "eta": eta}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("runs")
    return {"a": make_run(root, "eta2", 2, seed=1), "b": make_run(root, "eta4", 4, seed=2)}


def _json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _check_png(path: Path) -> None:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    assert len(data) > 10_000, (path, len(data))
    img = mpimg.imread(path)
    assert img.ndim == 3 and float(img[..., :3].std()) > 0.01, path


def test_json_tables_match_the_log(runs: dict[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    r = runs["a"]
    obj = _json(capsys, [str(r["dir"]), "--format", "json", "--bins", "3", "--no-plots"])
    (one,) = obj["runs"]
    info, t = one["info"], one["tables"]
    assert set(t) == {"step_ranges", "throughput", "rollout_ranks"}
    assert info["finished"] is True and info["skipped"] == [] and info["partials"] == []
    assert info["config"]["eta"] == 2 and info["config"]["n_rollout"] == N_ROLLOUT
    assert info["samples_generated"] == 800 and info["samples_trained"] == N_STEPS * PER_STEP
    assert info["leftover"] == 800 - N_STEPS * PER_STEP - sum(len(v) for v in r["rejected"].values())

    sr = t["step_ranges"]
    assert [(x["step_first"], x["step_last"]) for x in sr] == [(1, 10), (11, 20), (21, 30)]
    s = r["s"]
    for x in sr:
        steps = range(x["step_first"], x["step_last"] + 1)
        ids = np.concatenate([r["used"][i] for i in steps])
        stale = np.concatenate([r["stale"][i] for i in steps])
        assert x["trained"] == len(ids)
        assert x["rejected"] == sum(len(r["rejected"][i]) for i in steps)
        assert x["reward"] == pytest.approx(float(s["reward"][ids].mean()))
        assert x["accuracy"] == pytest.approx(float(s["reward"][ids].mean()))
        assert x["resp_len"] == pytest.approx(float(s["response_len"][ids].mean()))
        assert x["stale_mean"] == pytest.approx(float(stale.mean()))
        assert x["stale_max"] == int(stale.max())
        assert [x[f"stale_{k}"] for k in range(3)] == [int((stale == k).sum()) for k in range(3)]
        assert x["stale_gt2"] == 0

    tp = t["throughput"]
    assert len(tp) == 3 and sum(x["generated"] for x in tp) == 800
    assert sum(x["trained"] for x in tp) == N_STEPS * PER_STEP and sum(x["steps"] for x in tp) == N_STEPS

    rr = t["rollout_ranks"]
    assert [x["rank"] for x in rr] == [1, 2] and [x["index"] for x in rr] == [0, 1]
    for x in rr:
        m = s["index"] == x["index"]
        assert x["generated"] == int(m.sum())
        assert x["gen_s_mean"] == pytest.approx(float((s["t_end"][m] - s["t_start"][m]).mean()))
        assert x["interruptions"] == int(s["interruptions"][m].sum())
        assert x["interrupted"] == int((s["interruptions"][m] > 0).sum())


def test_api_and_table_output(runs: dict[str, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    r = runs["b"]
    tables = summarize(r["dir"])
    assert set(tables) == {"step_ranges", "throughput", "rollout_ranks"}
    assert len(tables["step_ranges"]) == 10 and "stale_gt4" in tables["step_ranges"].columns
    assert tables["step_ranges"]["trained"].sum() == N_STEPS * PER_STEP
    capsys.readouterr()
    assert main([str(r["dir"]), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert f"== run {r['dir']}" in out and "eta=4" in out and "status: finished" in out
    assert "damaged shards skipped: 0" in out
    for title in ("Training by step range", "Throughput over time", "Rollout ranks"):
        assert title in out


def test_csv_and_plots(runs: dict[str, dict[str, Any]], capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    r = runs["a"]
    capsys.readouterr()
    assert main([str(r["dir"]), "--format", "csv", "--out", str(tmp_path / "out")]) == 0
    printed = [Path(p) for p in capsys.readouterr().out.split()]
    csvs = sorted(p.name for p in printed if p.suffix == ".csv")
    assert csvs == ["rollout_ranks.csv", "step_ranges.csv", "throughput.csv"]
    for p in printed:
        assert p.is_file() and p.parent == tmp_path / "out"
    df = pd.read_csv(tmp_path / "out" / "step_ranges.csv")
    assert len(df) == 10 and df["trained"].sum() == N_STEPS * PER_STEP
    assert pd.read_csv(tmp_path / "out" / "rollout_ranks.csv")["generated"].sum() == 800
    pngs = [p for p in printed if p.suffix == ".png"]
    assert len(pngs) == 4
    for p in pngs:
        _check_png(p)


def test_default_out_is_run_analysis(runs: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    run = tmp_path / "copy"
    shutil.copytree(runs["b"]["dir"], run)
    assert main([str(run), "--format", "json"]) == 0
    assert sorted(p.name for p in (run / "analysis").glob("*.png")) == sorted(
        ["reward_accuracy.png", "staleness.png", "response_length.png", "throughput.png"])


def test_several_runs_share_figures(runs: dict[str, dict[str, Any]], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    paths = plot_runs([runs["a"]["dir"], runs["b"]["dir"]], tmp_path / "sweep")
    assert [p.name for p in paths] == [*PLOT_FILES, COMPARE_FILE]
    for p in paths:
        _check_png(p)
    obj = _json(capsys, [str(runs["a"]["dir"]), str(runs["b"]["dir"]), "--format", "json", "--no-plots"])
    assert [x["info"]["config"]["eta"] for x in obj["runs"]] == [2, 4]
    assert main([str(runs["a"]["dir"]), str(runs["b"]["dir"]), "--format", "csv", "--no-plots",
                 "--out", str(tmp_path / "csv")]) == 0
    for name in ("eta2", "eta4"):
        assert len(list((tmp_path / "csv").glob(f"{name}_*.csv"))) == 3


def test_damaged_shard_is_skipped_not_touched(runs: dict[str, dict[str, Any]], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str],
                                              caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "damaged"
    shutil.copytree(runs["a"]["dir"], run)
    bad = run / "rollout_log" / "rollout-r001-000001.h5"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    digest = hashlib.sha256(bad.read_bytes()).hexdigest()
    with caplog.at_level(logging.WARNING):
        capsys.readouterr()
        assert main([str(run), "--format", "json", "--no-plots"]) == 0
        captured = capsys.readouterr()
    info = json.loads(captured.out)["runs"][0]["info"]
    assert [Path(x["path"]).name for x in info["skipped"]] == [bad.name]
    assert info["samples_generated"] == 800 - PER_SHARD
    # said exactly once: on stderr (stdout is JSON), not also through the log reader's logger
    said = (captured.err + "\n".join(caplog.messages)).splitlines()
    assert sum(bad.name in line for line in said) == 1, said
    with caplog.at_level(logging.WARNING):
        assert main([str(run), "--no-plots"]) == 0
        captured = capsys.readouterr()
    assert "damaged shards skipped: 1" in captured.out and "WARNING: skipped damaged shard" in captured.out
    said = (captured.out + captured.err + "\n".join(caplog.messages)).splitlines()
    assert sum(bad.name in line for line in said) == 1, said
    assert main([str(run), "--no-plots", "--strict"]) == 1
    assert bad.name in capsys.readouterr().err
    assert hashlib.sha256(bad.read_bytes()).hexdigest() == digest
    assert not (run / "analysis").exists()


@pytest.mark.parametrize("kind", ["empty", "missing", "not_a_run", "no_shards"])
def test_bad_folder_exits_2(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = tmp_path / kind
    if kind != "missing":
        d.mkdir()
    if kind == "not_a_run":
        (d / "notes.txt").write_text("hello")
    if kind == "no_shards":
        (d / "rollout_log").mkdir()
    assert main([str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert str(d) in err and len(err.splitlines()) == 1


def test_running_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    r = make_run(tmp_path, "running", 3, seed=3, finished=False)
    # a shard caught mid-write: the writer's output under its hidden .partial name
    done = r["dir"] / "rollout_log" / "rollout-r000-000001.h5"
    partial = r["dir"] / "rollout_log" / ".rollout-r000-000002.h5.partial"
    shutil.copyfile(done, partial)
    obj = _json(capsys, [str(r["dir"]), "--format", "json", "--out", str(tmp_path / "out")])
    info = obj["runs"][0]["info"]
    assert info["finished"] is False and info["steps_done"] == 15
    assert [Path(p).name for p in info["partials"]] == [partial.name]
    assert info["samples_generated"] == 800 and info["samples_trained"] == 15 * PER_STEP
    assert len(obj["plots"]) == 4
    assert main([str(r["dir"]), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "NOT finished" in out and "partial files: 1" in out
