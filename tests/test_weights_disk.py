"""Disk weight channel: bit-exact round trip, coalescing under a slow disk, no torn file ever visible,
pruning against held versions, a reader whose file is pruned under it, corrupt files, a restarted writer."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch
from safetensors import safe_open

from areal_hpc.weights import disk
from areal_hpc.weights.disk import DiskWeightReader, DiskWeightWriter, file_name, read_latest, versions_on_disk


def tiny_model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 5)).to(dtype)


def filled(version: int) -> list[tuple[str, torch.Tensor]]:
    """Parameters whose every element is the version: a file's content tells which version it holds."""
    return [("b.weight", torch.full((4, 3), float(version))), ("a.bias", torch.full((7,), float(version)))]


@pytest.fixture
def writer(tmp_path):
    w = DiskWeightWriter(tmp_path)
    yield w
    w.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_round_trip_is_bit_exact_in_the_writers_order(tmp_path, writer, dtype):
    model = tiny_model(dtype)
    params = list(model.named_parameters())
    writer.publish(3, params)
    writer.wait()
    version, named = DiskWeightReader(tmp_path, poll_s=0.01).wait_for(3, timeout=10)
    assert version == 3
    assert [n for n, _ in named] == [n for n, _ in params]  # not safetensors' sorted order
    for (_, got), (_, want) in zip(named, params):
        assert got.dtype == want.dtype and got.shape == want.shape
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        assert torch.equal(got.view(bits), want.detach().view(bits))
    other = tiny_model(dtype)
    with torch.no_grad():  # what an engine's update_weights does with them
        for p, (_, t) in zip(other.parameters(), named):
            p.copy_(t)
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters()))
    assert read_latest(tmp_path) == {"version": 3, "file": file_name(3),
                                     "bytes": (tmp_path / file_name(3)).stat().st_size,
                                     "time": read_latest(tmp_path)["time"]}


def test_writer_converts_to_the_rollout_dtype_and_counts(tmp_path):
    w = DiskWeightWriter(tmp_path, dtype=torch.bfloat16)
    w.publish(1, [*filled(1), ("steps", torch.tensor([5]))])
    w.close()
    _, named = DiskWeightReader(tmp_path, poll_s=0.01).wait_for(1, timeout=10)
    assert [t.dtype for _, t in named] == [torch.bfloat16, torch.bfloat16, torch.int64]  # integers untouched
    assert (w.written, w.skipped) == (1, 0) and w.bytes_written == (tmp_path / file_name(1)).stat().st_size
    assert w.seconds_writing > 0


def slow_save(monkeypatch, seconds: float = 0.0, gate: threading.Event | None = None):
    """Replace the file write with one that records the version and is slow (or waits for ``gate``)."""
    saved, entered = [], threading.Event()
    real = disk._save

    def save(tensors, path, metadata):
        entered.set()
        if gate is not None:
            assert gate.wait(10)
        time.sleep(seconds)
        real(tensors, path, metadata)
        saved.append(int(metadata["version"]))

    monkeypatch.setattr(disk, "_save", save)
    return saved, entered


def test_publish_returns_while_the_disk_is_busy_and_the_newest_pending_wins(tmp_path, writer, monkeypatch):
    gate = threading.Event()
    saved, entered = slow_save(monkeypatch, gate=gate)
    writer.publish(1, filled(1))
    assert entered.wait(10)  # the thread holds version 1; the rest queue behind it
    for v in range(2, 11):
        writer.publish(v, filled(v))
    assert saved == [] and versions_on_disk(tmp_path) == []  # nine publishes, none waited for the disk
    gate.set()
    writer.wait()
    assert saved == [1, 10] and (writer.written, writer.skipped) == (2, 8)
    assert versions_on_disk(tmp_path) == [1, 10] and read_latest(tmp_path)["version"] == 10
    with pytest.raises(ValueError, match="version 10 published after version 10"):
        writer.publish(10, filled(10))


def test_many_quick_versions_over_a_slow_disk_only_complete_files_visible(tmp_path, writer, monkeypatch):
    saved, _ = slow_save(monkeypatch, seconds=0.02)
    seen: dict[int, float] = {}
    errors: list[BaseException] = []
    stop = threading.Event()

    def watch() -> None:  # another process's view: every file it can list must load whole
        try:
            while not stop.is_set():
                for v in versions_on_disk(tmp_path):
                    if v not in seen:
                        with safe_open(tmp_path / file_name(v), "pt") as f:
                            seen[v] = float(f.get_tensor("a.bias")[0])
                pointer = read_latest(tmp_path)
                assert pointer is None or (tmp_path / pointer["file"]).exists()
        except BaseException as e:
            errors.append(e)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for v in range(1, 41):
            writer.publish(v, filled(v))
            time.sleep(0.002)
        writer.wait()
    finally:
        stop.set()
        watcher.join()
    assert not errors, errors
    assert saved[-1] == 40 and saved == sorted(set(saved))  # newest written, none twice
    assert len(saved) < 40 and writer.written + writer.skipped == 40
    assert all(seen[v] == v for v in seen)


def test_reader_never_sees_a_half_written_file(tmp_path, writer, monkeypatch):
    writer.publish(1, filled(1))
    writer.wait()
    reader = DiskWeightReader(tmp_path, poll_s=0.0)
    assert reader.wait_for(1, timeout=10)[0] == 1
    gate = threading.Event()
    real = disk._save

    def half_then_wait(tensors, path, metadata):
        path.write_bytes(b"\x00" * 100)  # a torn file under the temporary name
        assert gate.wait(10)
        real(tensors, path, metadata)

    monkeypatch.setattr(disk, "_save", half_then_wait)
    writer.publish(2, filled(2))
    time.sleep(0.05)
    for _ in range(5):
        reader.poll()
        assert reader.ready() is None
    assert versions_on_disk(tmp_path) == [1] and reader.latest_version() == 1
    assert any(p.name.startswith(".") for p in tmp_path.iterdir())  # it exists, hidden
    gate.set()
    writer.wait()
    version, named = reader.wait_for(2, timeout=10)
    assert version == 2 and all(torch.equal(t, w) for (_, t), (_, w) in zip(named, filled(2)))
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_prune_keeps_held_versions_and_the_latest(tmp_path):
    w = DiskWeightWriter(tmp_path, keep_extra=1)
    for v in range(1, 7):
        w.publish(v, filled(v))
        w.wait()
    w.prune([4, 5])
    assert versions_on_disk(tmp_path) == [3, 4, 5, 6]  # held 4 and 5, the newest, and one extra (3)
    w.keep_extra = 0
    w.prune([9])  # a held version newer than the newest on disk: only the newest stays
    assert versions_on_disk(tmp_path) == [6]
    w.prune([])
    assert versions_on_disk(tmp_path) == [6] and w.latest == 6
    w.close()


def test_reader_whose_file_is_pruned_under_it_loads_the_newer_one(tmp_path, writer, monkeypatch):
    writer.publish(1, filled(1))
    writer.wait()
    real = disk._load_file
    calls = []

    def newer_written_and_old_pruned_first(path, pointer):
        calls.append(pointer["version"])
        if len(calls) == 1:  # between reading the pointer (v1) and opening the file
            writer.publish(2, filled(2))
            writer.wait()
            writer.prune([])
        return real(path, pointer)

    monkeypatch.setattr(disk, "_load_file", newer_written_and_old_pruned_first)
    reader = DiskWeightReader(tmp_path, poll_s=0.01)
    version, named = reader.wait_for(1, timeout=10)
    assert calls == [1, 2] and version == 2 and float(named[0][1][0, 0]) == 2.0
    assert versions_on_disk(tmp_path) == [2] and reader.latest_version() == 2


def one_line_error(reader: DiskWeightReader) -> str:
    with pytest.raises(RuntimeError) as e:
        reader.wait_for(1, timeout=10)
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def test_a_corrupt_file_is_one_line_naming_it(tmp_path, writer):
    bad = tmp_path / file_name(3)
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    (tmp_path / "latest.json").write_text(json.dumps({"version": 3, "file": bad.name, "bytes": 18, "time": 0}))
    msg = one_line_error(DiskWeightReader(tmp_path, poll_s=0.01))
    assert str(bad) in msg and "may be corrupt" in msg, msg

    writer.publish(4, filled(4))
    writer.wait()
    good = tmp_path / file_name(4)
    good.write_bytes(good.read_bytes()[:-8])  # truncated after the fact
    msg = one_line_error(DiskWeightReader(tmp_path, poll_s=0.01))
    assert str(good) in msg and "may be corrupt" in msg and "bytes" in msg, msg

    (tmp_path / "latest.json").write_text("{")
    msg = one_line_error(DiskWeightReader(tmp_path, poll_s=0.01))
    assert str(tmp_path / "latest.json") in msg and "may be corrupt" in msg, msg


def test_reader_timeout_and_a_missing_latest_file_are_one_line(tmp_path, writer):
    reader = DiskWeightReader(tmp_path, poll_s=0.01)
    with pytest.raises(TimeoutError, match=r"no version >= 1 in .* within 0s \(newest there: None\)"):
        reader.wait_for(1, timeout=0.05)
    writer.publish(1, filled(1))
    writer.wait()
    (tmp_path / file_name(1)).unlink()
    msg = one_line_error(reader)
    assert file_name(1) in msg and "stays missing" in msg, msg


def test_a_failed_write_is_raised_on_the_next_call_naming_the_file(tmp_path, writer, monkeypatch):
    def full(tensors, path, metadata):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disk, "_save", full)
    writer.publish(1, filled(1))
    with pytest.raises(RuntimeError) as e:
        writer.wait()
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / file_name(1)) in msg and "No space left" in msg, msg
    assert not list(tmp_path.iterdir())  # neither the temporary nor a pointer
    monkeypatch.undo()
    writer.publish(2, filled(2))  # the error was reported once; the channel goes on
    writer.wait()
    assert versions_on_disk(tmp_path) == [2]
    with pytest.raises(ValueError, match="index 0"):
        writer.publish(3, filled(3)[::-1])


def test_a_restarted_writer_removes_temporaries_and_keeps_the_pointer(tmp_path):
    w = DiskWeightWriter(tmp_path)
    w.publish(1, filled(1))
    w.close()
    (tmp_path / f".tmp-{file_name(2)}.{os.getpid() + 1}").write_bytes(b"\x00" * 64)  # a crashed write
    (tmp_path / f".tmp-latest.json.{os.getpid() + 1}").write_text("{")
    w = DiskWeightWriter(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", file_name(1)]
    assert w.latest == 1
    w.prune([])
    assert versions_on_disk(tmp_path) == [1]  # the pointer read at start is the floor
    w.publish(2, filled(2))
    w.wait()
    w.prune([])
    assert versions_on_disk(tmp_path) == [2]
    w.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_parameters_are_snapshotted_before_the_step_changes_them(tmp_path, writer):
    params = [(n, t.cuda()) for n, t in filled(1)]
    busy = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):  # queue work ahead of the copy: a thread that did not wait for it reads too early
        busy = busy @ busy / 64
    writer.publish(1, params)
    with torch.no_grad():
        for _, t in params:
            t.add_(1)  # the next optimizer step, queued behind the snapshot on the same stream
    writer.wait()
    _, named = DiskWeightReader(tmp_path, poll_s=0.01).wait_for(1, timeout=10)
    assert all(torch.equal(t, w) for (_, t), (_, w) in zip(named, filled(1)))
