"""The HDF5 rollout log: exact round trips, column isolation, numbering, crash safety, damaged files, RunLog."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from areal_hpc.storage.runlog import RunLog, version_stats
from areal_hpc.storage.schema import (
    RAGGED_FIELDS,
    ROW_FIELDS,
    SCHEMA_VERSION,
    parse_leftover_name,
    parse_shard_name,
    partial_file_name,
    shard_file_name,
)
from areal_hpc.storage.shards import ShardError, ShardWriter, iter_rows, list_shards, read_shard

REPO = Path(__file__).resolve().parents[1]
ATTRS = {"run_id": "test-run", "config_yaml": "run:\n  steps: 3\n", "rank": 2}
TEXTS = ["", "x = 42", "√2 ≈ 1.414 😀", "line\nbreak", "é" * 50]


def split(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """Per-row views of a flat array."""
    return np.split(flat, np.cumsum(lengths)[:-1]) if len(lengths) else []


def rollout_batch(rng: np.random.Generator, first_id: int, n: int, max_prompt: int = 30,
                  max_response: int = 100) -> tuple[dict, dict]:
    """Rows and per-row ragged arrays of n random samples (zero-length rows included)."""
    p_len = rng.integers(0, max_prompt + 1, n)
    r_len = rng.integers(0, max_response + 1, n)
    total = int(r_len.sum())
    logprobs = -rng.exponential(1.0, total).astype(np.float32)
    if total >= 3:
        logprobs[:3] = [np.float32(-0.0), np.nan, -np.inf]  # bit-exactness, not just equality
    versions = np.repeat(np.arange(n, dtype=np.int32) // 7, r_len)
    rows = {
        "sample_id": np.arange(first_id, first_id + n, dtype=np.int64),
        "prompt_id": rng.integers(0, 1000, n), "group_id": rng.integers(0, 1000, n),
        "rank": rng.integers(0, 8, n).astype(np.int32), "reward": rng.random(n).astype(np.float32),
        "answer_ok": rng.random(n) < 0.5, "t_start": rng.random(n) * 1e9, "t_end": rng.random(n) * 1e9,
        "interruptions": rng.integers(0, 3, n).astype(np.int32), "prompt_len": p_len.astype(np.int32),
        "response_len": r_len.astype(np.int32),
        "response_text": [TEXTS[i % len(TEXTS)] + str(i) for i in range(n)],
        "answer": [str(i % 97) for i in range(n)],
        "reward_seconds": rng.exponential(0.1, n).astype(np.float32), "reward_timed_out": rng.random(n) < 0.1,
        "worker": rng.integers(-1, 4, n).astype(np.int32),
    }
    ragged = {
        "prompt": {"prompt_tokens": split(rng.integers(0, 150_000, int(p_len.sum()), dtype=np.int32), p_len)},
        "response": {"response_tokens": split(rng.integers(0, 150_000, total, dtype=np.int32), r_len),
                     "behav_logprobs": split(logprobs, r_len), "versions": split(versions, r_len)},
    }
    return rows, ragged


def trainer_batch(steps: list[int], used: list[list[int]], used_stale: list[list[int]], rejected: list[list[int]],
                  rejected_stale: list[list[int]]) -> tuple[dict, dict]:
    n = len(steps)
    rows = {"step": np.array(steps), "trained_version": np.array(steps) - 1, "time": np.arange(n, dtype=float),
            **{k: np.full(n, 0.5, np.float32) for k in ("loss", "grad_norm", "clip_frac", "cap_frac",
                                                          "importance_weight", "ratio", "approx_kl")}}
    ragged = {
        "used": {"used_sample_id": [np.array(u, np.int64) for u in used],
                 "used_staleness": [np.array(s, np.int32) for s in used_stale],
                 "used_weight": [np.where(np.array(s) > 1, 0.5, 1.0) for s in used_stale]},
        "rejected": {"rejected_sample_id": [np.array(r, np.int64) for r in rejected],
                     "rejected_staleness": [np.array(s, np.int32) for s in rejected_stale]},
    }
    return rows, ragged


def assert_same_shard(shard, rows: dict, ragged: dict) -> None:
    for name, dtype in ROW_FIELDS["rollout"].items():
        got = shard.rows[name]
        if dtype == "str":
            assert got.tolist() == list(rows[name]), name
        else:
            assert got.dtype == np.dtype(dtype), name
            np.testing.assert_array_equal(got, np.asarray(rows[name]).astype(dtype), err_msg=name)
    for group, fields in RAGGED_FIELDS["rollout"].items():
        offsets, values = shard.ragged[group]
        lengths = [len(a) for a in ragged[group][next(iter(fields))]]
        np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(lengths)]))
        for name, dtype in fields.items():
            want = np.concatenate(ragged[group][name]).astype(dtype)
            assert values[name].dtype == want.dtype
            assert values[name].tobytes() == want.tobytes(), f"{name} not bit-exact"


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


# -- names --------------------------------------------------------------------------------------------


def test_names_round_trip():
    assert shard_file_name("rollout", 3, 12) == "rollout-r003-000012.h5"
    assert parse_shard_name("rollout-r003-000012.h5") == ("rollout", 3, 12)
    assert parse_shard_name("trainer-t001-000000.h5") == ("trainer", 1, 0)
    assert parse_shard_name("rollout-t001-000000.h5") is None
    assert parse_shard_name("notes.h5") is None
    assert parse_shard_name(partial_file_name("rollout", 0, 5)) is None
    assert parse_leftover_name(partial_file_name("rollout", 0, 5)) == ("rollout", 0, 5)
    assert parse_leftover_name(".trainer-t002-000007.h5.partial.bad.3") == ("trainer", 2, 7)


# -- round trip ---------------------------------------------------------------------------------------


def test_round_trip_100k_samples_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    w = ShardWriter(tmp_path, "rollout", 0, attrs=ATTRS)
    written = []
    for k in range(5):
        rows, ragged = rollout_batch(rng, k * 20_000, 20_000)
        path = w.write(rows, ragged)
        assert path.name == shard_file_name("rollout", 0, k)
        written.append((path, rows, ragged))
    assert w.next_seq == 5
    finished, leftovers = list_shards(tmp_path)
    assert finished == [p for p, _, _ in written] and leftovers == []
    for path, rows, ragged in written:
        shard = read_shard(path)
        assert_same_shard(shard, rows, ragged)
        assert shard.attrs["schema_version"] == SCHEMA_VERSION and shard.attrs["run_id"] == "test-run"
        assert shard.n_rows == 20_000 and shard.kind == "rollout" and shard.attrs["config_yaml"] == ATTRS["config_yaml"]
    assert not list(tmp_path.glob(".*")), "a .partial was left behind"


@pytest.mark.parametrize("compression", ["gzip", "lzf", "none"])
def test_compressions_round_trip(tmp_path, compression):
    rows, ragged = rollout_batch(np.random.default_rng(1), 0, 500)
    path = ShardWriter(tmp_path, "rollout", 0, attrs=ATTRS, compression=compression).write(rows, ragged)
    assert_same_shard(read_shard(path), rows, ragged)
    with h5py.File(path, "r") as f:
        assert f["response_tokens"].chunks is not None
        assert f["response_tokens"].compression == (None if compression == "none" else compression)


def test_empty_shard_and_iter_rows(tmp_path):
    rows, ragged = rollout_batch(np.random.default_rng(2), 0, 0)
    shard = read_shard(ShardWriter(tmp_path, "rollout", 0, attrs=ATTRS).write(rows, ragged))
    assert shard.n_rows == 0 and len(shard.rows["sample_id"]) == 0
    np.testing.assert_array_equal(shard.ragged["response"][0], [0])
    rows, ragged = rollout_batch(np.random.default_rng(2), 7, 3)
    shard = read_shard(ShardWriter(tmp_path, "rollout", 1, attrs=ATTRS).write(rows, ragged))
    got = list(iter_rows(shard, "response"))
    assert [r["sample_id"] for r in got] == [7, 8, 9]
    assert all(np.array_equal(r["versions"], v) for r, v in zip(got, ragged["response"]["versions"]))


def test_write_rejects_wrong_fields(tmp_path):
    w = ShardWriter(tmp_path, "rollout", 0, attrs=ATTRS)
    rows, ragged = rollout_batch(np.random.default_rng(3), 0, 4)
    with pytest.raises(ValueError, match="reward"):
        w.write({k: v for k, v in rows.items() if k != "reward"}, ragged)
    with pytest.raises(ValueError, match="bogus"):
        w.write({**rows, "bogus": np.zeros(4)}, ragged)
    longer = [np.append(v, 0) for v in ragged["response"]["versions"]]
    with pytest.raises(ValueError, match="share offsets"):
        w.write(rows, {**ragged, "response": {**ragged["response"], "versions": longer}})
    with pytest.raises(ValueError, match="sample_id"):
        w.write({**rows, "sample_id": np.zeros(4, np.float64)}, ragged)
    with pytest.raises(ValueError, match="set by the writer"):
        ShardWriter(tmp_path, "rollout", 0, attrs={**ATTRS, "seq": 3})
    assert w.next_seq == 0 and list(tmp_path.iterdir()) == []


# -- column isolation ---------------------------------------------------------------------------------


def test_reading_one_field_reads_only_that_dataset(tmp_path):
    rows, ragged = rollout_batch(np.random.default_rng(4), 0, 1000)
    path = ShardWriter(tmp_path, "rollout", 0, attrs=ATTRS).write(rows, ragged)
    shard = read_shard(path, fields=["reward"])
    assert list(shard.rows) == ["reward"] and shard.ragged == {} and shard.extra == {}
    np.testing.assert_array_equal(shard.rows["reward"], rows["reward"])
    shard = read_shard(path, fields=["versions"])
    assert shard.rows == {} and list(shard.ragged) == ["response"]
    assert list(shard.ragged["response"][1]) == ["versions"]
    # Proof the other columns are never touched: with one of them gone, a single-column read still works.
    damaged = tmp_path / "copy" / path.name
    damaged.parent.mkdir()
    shutil.copy(path, damaged)
    with h5py.File(damaged, "r+") as f:
        del f["response_tokens"]
        del f["response_text"]
    np.testing.assert_array_equal(read_shard(damaged, fields=["reward"]).rows["reward"], rows["reward"])
    assert read_shard(damaged, fields=["versions"]).ragged["response"][1]["versions"].size
    with pytest.raises(ShardError, match="response_text"):
        read_shard(damaged)
    with pytest.raises(ValueError, match="nope"):
        read_shard(path, fields=["nope"])


# -- numbering ----------------------------------------------------------------------------------------


def test_numbering_resumes_and_is_per_index(tmp_path):
    rng = np.random.default_rng(5)
    w = ShardWriter(tmp_path, "rollout", 0, attrs=ATTRS)
    for k in range(3):
        w.write(*rollout_batch(rng, k * 10, 10))
    again = ShardWriter(tmp_path, "rollout", 0, attrs=ATTRS)
    assert again.next_seq == 3 and again.recovered_partials == []
    assert again.write(*rollout_batch(rng, 30, 10)).name == "rollout-r000-000003.h5"
    other = ShardWriter(tmp_path, "rollout", 1, attrs=ATTRS)
    assert other.next_seq == 0
    assert other.write(*rollout_batch(rng, 40, 10)).name == "rollout-r001-000000.h5"
    assert ShardWriter(tmp_path, "trainer", 0, attrs=ATTRS).next_seq == 0
    finished, _ = list_shards(tmp_path, "rollout")
    assert [parse_shard_name(p.name)[1:] for p in finished] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    with pytest.raises(ShardError, match="second writer"):  # two writers of one index must not overwrite
        w.write(*rollout_batch(rng, 50, 10))


# -- crash injection ----------------------------------------------------------------------------------

CRASHING_WRITER = """
import sys, time
import h5py, numpy as np
from areal_hpc.storage.shards import ShardWriter
sys.path.insert(0, {tests!r})
from test_shards import ATTRS, rollout_batch
rng = np.random.default_rng(0)
w = ShardWriter(sys.argv[1], "rollout", 0, attrs=ATTRS)
for k in range(3):
    w.write(*rollout_batch(rng, k * 100, 100))
rows, ragged = rollout_batch(rng, 300, 200_000, max_prompt=20, max_response=40)
create = h5py.Group.create_dataset
def slow_create(self, *args, **kwargs):  # widen the mid-write window so the kill always lands inside it
    ds = create(self, *args, **kwargs)
    self.file.flush()
    time.sleep(0.3)
    return ds
h5py.Group.create_dataset = slow_create
print("big write", flush=True)
w.write(rows, ragged)
print("finished", flush=True)
"""


def test_sigkill_mid_write_leaves_only_a_partial(tmp_path):
    run = tmp_path / "run"
    shard_dir = run / "rollout_log"
    (run / "trainer_log").mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER.format(tests=str(REPO / "tests")), str(shard_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    partial = shard_dir / partial_file_name("rollout", 0, 3)
    try:
        deadline = time.monotonic() + 60
        while not (partial.exists() and partial.stat().st_size > 0):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the writer never started its big shard"
            time.sleep(0.02)
        time.sleep(0.5)  # some datasets written, the rest not
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert "finished" not in proc.stdout.read()
    finished, leftovers = list_shards(shard_dir)
    assert [p.name for p in finished] == [shard_file_name("rollout", 0, k) for k in range(3)]
    assert leftovers == [partial]
    for p in finished:
        assert read_shard(p).n_rows == 100

    log = RunLog(run, strict=True)
    assert log.partials == [partial] and log.skipped == []
    assert len(log.samples()) == 300 and not log.finished

    crashed_bytes = partial.read_bytes()
    w = ShardWriter(shard_dir, "rollout", 0, attrs=ATTRS)
    assert w.next_seq == 3
    assert not partial.exists()
    assert [p.name for p in w.recovered_partials] == [partial.name + ".bad"]
    assert w.recovered_partials[0].read_bytes() == crashed_bytes, "the leftover must be kept, not changed"
    rows, ragged = rollout_batch(np.random.default_rng(9), 300, 50)
    assert w.write(rows, ragged).name == shard_file_name("rollout", 0, 3)
    log = RunLog(run, strict=True)
    assert log.partials == [] and log.set_aside == w.recovered_partials
    assert len(log.samples()) == 350


# -- damaged input ------------------------------------------------------------------------------------


def test_damaged_shards_are_named_and_skipped(tmp_path):
    run = tmp_path / "run"
    rollout = run / "rollout_log"
    rng = np.random.default_rng(6)
    for index in range(5):
        ShardWriter(rollout, "rollout", index, attrs=ATTRS).write(*rollout_batch(rng, index * 100, 20))
    name = {i: rollout / shard_file_name("rollout", i, 0) for i in range(5)}
    with open(name[1], "r+b") as f:  # truncated, as by a crash during a copy
        f.truncate(name[1].stat().st_size // 2)
    with h5py.File(name[2], "r+") as f:
        f.attrs["schema_version"] = 99
    with h5py.File(name[3], "r+") as f:
        del f["reward"]
    name[4].write_text("not an HDF5 file\n")
    (rollout / "notes.txt").write_text("mine\n")

    with pytest.raises(ShardError, match="rollout-r001-000000.h5.*not a readable HDF5 file"):
        read_shard(name[1])
    with pytest.raises(ShardError, match=r"rollout-r002-000000.h5: schema_version 99.*reads schema versions 1, 2"):
        read_shard(name[2])
    with pytest.raises(ShardError, match="rollout-r003-000000.h5.*'reward' is missing"):
        read_shard(name[3])
    with pytest.raises(ShardError, match="rollout-r004-000000.h5.*not a readable HDF5 file"):
        read_shard(name[4])
    shutil.copy(name[0], tmp_path / "noversion.h5")
    with h5py.File(tmp_path / "noversion.h5", "r+") as f:
        del f.attrs["schema_version"]
    with pytest.raises(ShardError, match="noversion.h5: no schema_version.*schema versions 1, 2"):
        read_shard(tmp_path / "noversion.h5")

    before = snapshot(run)
    with pytest.raises(ShardError, match="rollout-r001-000000.h5"):
        RunLog(run, strict=True)
    log = RunLog(run)
    samples = log.samples()
    assert samples["sample_id"].tolist() == list(range(20))
    assert sorted(p.name for p, _ in log.skipped) == sorted(name[i].name for i in (1, 2, 3, 4))
    assert all(p.name in why for p, why in log.skipped)
    assert log.ignored == [rollout / "notes.txt"]
    assert snapshot(run) == before, "reading a run modified a file"


def test_not_a_run_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        RunLog(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="empty is not an areal_hpc run folder.*config.yaml"):
        RunLog(tmp_path / "empty")


# -- RunLog on a small synthetic run ------------------------------------------------------------------


def _rollout_rows(ids: list[int], versions: list[list[int]]) -> tuple[dict, dict]:
    n = len(ids)
    rows, ragged = rollout_batch(np.random.default_rng(7), 0, n)
    rows["sample_id"] = np.array(ids)
    lens = [len(v) for v in versions]
    rows["response_len"] = np.array(lens, np.int32)
    ragged["response"] = {"response_tokens": [np.arange(k) for k in lens],
                          "behav_logprobs": [np.full(k, -0.5) for k in lens],
                          "versions": [np.array(v, np.int32) for v in versions]}
    return rows, ragged


def test_runlog_tables(tmp_path):
    run = tmp_path / "run"
    r0 = ShardWriter(run / "rollout_log", "rollout", 0, attrs=ATTRS)
    r0.write(*_rollout_rows([0, 1, 2], [[0, 0, 1], [], [1, 1]]))
    r0.write(*_rollout_rows([3], [[1, 2, 2, 3]]))
    ShardWriter(run / "rollout_log", "rollout", 1, attrs=ATTRS).write(*_rollout_rows([10, 11], [[0], [2, 1]]))
    t0 = ShardWriter(run / "trainer_log", "trainer", 0, attrs={**ATTRS, "rank": 0})
    t0.write(*trainer_batch([1, 2], [[0, 10], [2, 3]], [[0, 0], [1, 1]], [[], [1]], [[], [5]]),
             extra_attrs={"final": 0})
    t1 = ShardWriter(run / "trainer_log", "trainer", 1, attrs={**ATTRS, "rank": 1})
    t1.write(*trainer_batch([1], [[]], [[]], [[11]], [[9]]), extra_attrs={"final": 0})

    log = RunLog(run, strict=True)
    assert not log.finished and log.leftover().size == 0
    s = log.samples()
    assert s["sample_id"].tolist() == [0, 1, 2, 3, 10, 11]
    assert s["min_version"].tolist() == [0, -1, 1, 1, 0, 1]
    assert s["max_version"].tolist() == [1, -1, 1, 3, 0, 2]
    assert s["n_versions"].tolist() == [2, 0, 1, 3, 1, 2]
    assert s["shard"].tolist() == ["rollout-r000-000000.h5"] * 3 + ["rollout-r000-000001.h5", "rollout-r001-000000.h5",
                                                                    "rollout-r001-000000.h5"]
    assert list(log.samples(["reward"]).columns) == ["sample_id", "reward", "shard"]
    ids, offsets, versions = log.sample_versions()
    assert ids.tolist() == [0, 1, 2, 3, 10, 11] and offsets.tolist() == [0, 3, 3, 5, 9, 10, 12]
    assert versions.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 3, 0, 2, 1]

    steps = log.steps()
    assert steps[["rank", "step", "trained_version", "n_used", "n_rejected", "staleness_max"]].values.tolist() == [
        [0, 1, 0, 2, 0, 0], [0, 2, 1, 2, 1, 1], [1, 1, 0, 0, 1, -1]]
    assert steps["staleness_mean"].tolist()[:2] == [0.0, 1.0] and np.isnan(steps["staleness_mean"].iloc[2])

    fates = log.step_samples()
    assert fates[["step", "rank", "sample_id", "staleness"]].values.tolist() == [
        [1, 0, 0, 0], [1, 0, 10, 0], [2, 0, 2, 1], [2, 0, 3, 1], [2, 0, 1, 5], [1, 1, 11, 9]]
    assert fates["fate"].tolist() == ["used"] * 4 + ["rejected"] * 2
    assert fates["weight"].iloc[:4].tolist() == [1.0] * 4 and fates["weight"].iloc[4:].isna().all()

    t0.write(*trainer_batch([3], [[]], [[]], [[]], [[]]), extra_attrs={"final": 1},
             extra_datasets={"leftover_sample_id": np.array([], np.int64)})
    assert not RunLog(run).finished
    t1.write(*trainer_batch([], [], [], [], []), extra_attrs={"final": 1},
             extra_datasets={"leftover_sample_id": np.array([3, 10])})
    log = RunLog(run)
    assert log.finished and sorted(log.leftover().tolist()) == [3, 10]
    assert len(log.steps()) == 4

    assert log.config() == {"run": {"steps": 3}}  # from the shards' config_yaml
    (run / "config.yaml").write_text("run:\n  steps: 7\n")
    assert log.config() == {"run": {"steps": 7}}


def test_version_stats_edge_cases():
    offsets = np.array([0, 0, 3, 3, 6, 7])
    versions = np.array([2, 0, 2, 4, 4, 4, 9], np.int32)  # row 1 decreases: the sorting fallback
    lo, hi, n = version_stats(offsets, versions)
    assert lo.tolist() == [-1, 0, -1, 4, 9] and hi.tolist() == [-1, 2, -1, 4, 9] and n.tolist() == [0, 2, 0, 1, 1]
    lo, hi, n = version_stats(np.array([0, 2, 2]), np.array([1, 3]))
    assert lo.tolist() == [1, -1] and hi.tolist() == [3, -1] and n.tolist() == [2, 0]
    assert [a.tolist() for a in version_stats(np.array([0, 0]), np.zeros(0, np.int32))] == [[-1], [-1], [0]]
