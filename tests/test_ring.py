"""Shared-memory SPSC ring and trajectory codec: content, wrap-around, backpressure, cleanup."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from areal_hpc.trajectory import Trajectory
from areal_hpc.transport.codec import decode, encode, encode_parts
from areal_hpc.transport.shm_ring import SHM_DIR, ShmRing, cleanup_stale, ring_name

pytestmark = pytest.mark.skipif(not os.path.isdir(SHM_DIR), reason="needs /dev/shm")

_SPAWN = mp.get_context("spawn")


@pytest.fixture
def prefix() -> Iterator[str]:
    """Unique per-test name prefix; removes anything left behind, whoever owned it."""
    p = f"areal_test{os.getpid()}_{uuid.uuid4().hex[:8]}_"
    yield p
    cleanup_stale(p, skip_live_owners=False)


def _record(i: int, size: int) -> bytes:
    """Deterministic content so the other process can verify exactly."""
    return random.Random(i).randbytes(size)


# ----------------------------------------------------------------- helpers run in child processes
def _producer_main(name: str, sizes: list[int], results: mp.Queue) -> None:
    polls = 0

    def poll() -> None:
        nonlocal polls
        polls += 1

    ring = ShmRing.attach(name, timeout=10.0)
    for i, size in enumerate(sizes):
        if i % 2:
            ring.push(_record(i, size), timeout=20.0, poll=poll)
        else:  # exercise the zero-join path too
            rec = _record(i, size)
            ring.push_parts(
                [rec[: size // 3], memoryview(rec)[size // 3 :]],
                timeout=20.0,
                poll=poll,
            )
    results.put(
        {
            "full_waits": ring.full_waits,
            "wait_seconds": ring.wait_seconds,
            "polls": polls,
        }
    )
    ring.close()


def _crashing_owner_main(name: str, ready: mp.Queue) -> None:
    ShmRing.create(name, 4096)
    ready.put("created")
    time.sleep(60)


# ----------------------------------------------------------------------------------- ring tests
def test_order_content_and_wraparound(prefix: str) -> None:
    rng = random.Random(0)
    with ShmRing.create(prefix + "a", 1000) as ring:
        assert ring.capacity == 1000 and ring.max_record_bytes == 992
        with ShmRing.attach(ring.name, timeout=1.0) as prod:
            sizes = [0, 1, 7, 8, 9, 992, 991, 0, 985] + [
                rng.choice((0, 1, rng.randrange(993))) for _ in range(3000)
            ]
            expected: list[bytes] = []
            got: list[bytes] = []
            for i, size in enumerate(sizes):
                rec = _record(i, size)
                while not prod.try_push(rec):
                    got.extend(ring.pop_many(rng.randint(1, 5)))
                expected.append(rec)
                if rng.random() < 0.3:
                    item = ring.pop()
                    if item is not None:
                        got.append(item)
            while (item := ring.pop()) is not None:
                got.append(item)
            assert got == expected  # no loss, no duplication, order kept, exact bytes
            st = ring.stats()
            assert st["pushed_records"] == st["popped_records"] == len(sizes)
            assert st["pushed_bytes"] == st["popped_bytes"] == sum(sizes)
            assert st["used_bytes"] == 0 and len(ring) == 0
            assert prod.stats()["pushed_records"] == len(sizes)  # counters are shared
            # head went round the 1000-byte data area many times
            assert sum(8 + (s + 7) // 8 * 8 for s in sizes) > 100 * ring.capacity


def test_near_capacity_records_at_every_offset(prefix: str) -> None:
    with ShmRing.create(prefix + "b", 64) as ring:
        for shift in range(0, 64, 8):  # start the big record at every aligned offset
            for _ in range(shift // 8):
                assert ring.try_push(b"")  # 8 bytes each
            while ring.pop() is not None:
                pass
            for size in (56, 55, 49):
                rec = _record(size + shift, size)
                assert ring.try_push(rec)
                assert not ring.try_push(b"")  # completely full
                assert ring.pop() == rec


def test_backpressure_across_processes(prefix: str) -> None:
    name = ring_name(prefix.removeprefix("areal_").rstrip("_"), 3, 0)
    assert name.startswith(prefix) and name.endswith("_r3_t0")
    rng = random.Random(1)
    sizes = [rng.randrange(0, 1500) for _ in range(400)] + [4088, 0, 4088]
    results = _SPAWN.Queue()
    with ShmRing.create(name, 4096) as ring:
        proc = _SPAWN.Process(target=_producer_main, args=(name, sizes, results))
        proc.start()
        try:
            got: list[bytes] = []
            deadline = time.monotonic() + 20
            while len(got) < len(sizes) and time.monotonic() < deadline:
                batch = ring.pop_many(3, timeout=1.0)
                got.extend(batch)
                time.sleep(0.0005)  # slow consumer -> the producer must block
            stats = results.get(timeout=10)
            proc.join(timeout=10)
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join()
        assert proc.exitcode == 0
        assert len(got) == len(sizes)
        assert got == [_record(i, s) for i, s in enumerate(sizes)]
        assert ring.pop() is None
        assert stats["full_waits"] > 0 and stats["wait_seconds"] > 0
        assert stats["polls"] >= stats["full_waits"]  # poll() ran while blocked
        st = ring.stats()
        assert st["pushed_records"] == st["popped_records"] == len(sizes)


def test_record_too_large(prefix: str) -> None:
    with ShmRing.create(prefix + "c", 100) as ring:  # rounded to 104
        assert ring.try_push(bytes(96))
        assert ring.pop() == bytes(96)
        with pytest.raises(
            ValueError,
            match=r"record of 97 bytes.*capacity 104 bytes.*transport\.ring_bytes",
        ):
            ring.push(bytes(97))
        with pytest.raises(ValueError, match="transport.ring_bytes"):
            ring.try_push_parts([bytes(50), bytes(50)])
        assert ring.stats()["pushed_records"] == 1


def test_try_push_full_pop_empty_and_push_timeout(prefix: str) -> None:
    with ShmRing.create(prefix + "d", 64) as ring:
        assert ring.pop() is None
        assert ring.pop_many(10) == []
        t0 = time.monotonic()
        assert ring.pop(timeout=0.05) is None
        assert time.monotonic() - t0 >= 0.04
        assert ring.try_push(b"x" * 20)  # 8 + 24 = 32 bytes
        assert ring.try_push(b"y" * 24)  # 32 more -> full
        assert not ring.try_push(b"")
        polls: list[float] = []
        with pytest.raises(TimeoutError, match=ring.name):
            ring.push(b"z", timeout=0.05, poll=lambda: polls.append(time.monotonic()))
        assert ring.full_waits == 1 and ring.wait_seconds >= 0.04 and len(polls) >= 2
        assert ring.pop_many(5) == [b"x" * 20, b"y" * 24]
        ring.push(b"z", timeout=0.05)
        assert ring.full_waits == 1  # did not have to wait
        assert ring.pop() == b"z"


def test_attach_waits_for_create(prefix: str) -> None:
    name = prefix + "e"
    created: list[ShmRing] = []
    timer = threading.Timer(0.2, lambda: created.append(ShmRing.create(name, 256)))
    timer.start()
    try:
        t0 = time.monotonic()
        with ShmRing.attach(name, timeout=5.0) as prod:
            assert time.monotonic() - t0 >= 0.15
            prod.push(b"hello")
        timer.join()
        assert created[0].pop() == b"hello"
    finally:
        timer.join()
        for ring in created:
            ring.close()
            ring.unlink()


def test_attach_timeout_message(prefix: str) -> None:
    with pytest.raises(
        TimeoutError,
        match=rf"shm ring '{prefix}missing' was not created .* within 0\.1s",
    ):
        ShmRing.attach(prefix + "missing", timeout=0.1)


def test_unlink_removes_segment_and_create_conflicts(prefix: str) -> None:
    ring = ShmRing.create(prefix + "f", 128)
    path = os.path.join(SHM_DIR, ring.name)
    assert os.path.exists(path)
    with pytest.raises(FileExistsError, match="alive"):
        ShmRing.create(ring.name, 128)
    assert cleanup_stale(prefix) == []  # our own live ring is not stale
    ring.unlink()
    assert not os.path.exists(path)
    ring.unlink()  # idempotent
    ring.close()
    ring.close()
    with pytest.raises(ValueError, match="closed"):
        ring.pop()


def test_crashed_owner_segment_is_cleaned(prefix: str) -> None:
    name = prefix + "crash"
    ready = _SPAWN.Queue()
    proc = _SPAWN.Process(target=_crashing_owner_main, args=(name, ready))
    proc.start()
    try:
        assert ready.get(timeout=20) == "created"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(timeout=10)
    assert proc.exitcode == -signal.SIGKILL
    path = os.path.join(SHM_DIR, name)
    assert os.path.exists(path)  # SIGKILL skipped atexit
    with pytest.raises(TimeoutError, match="stale"):
        ShmRing.attach(name, timeout=0.1)
    assert cleanup_stale(prefix) == [name]
    assert not os.path.exists(path)
    assert cleanup_stale(prefix) == []


def test_create_replaces_stale_segment(prefix: str) -> None:
    name = prefix + "g"
    dead = ShmRing.create(name, 64)
    dead._hdr[3] = 2**22 + 1  # above the kernel's pid_max: this "owner" is dead
    dead.close()
    with ShmRing.create(name, 128) as ring:
        assert ring.capacity == 128
        dead.unlink()  # unlinks by identity, not by name: the new segment survives
        assert os.path.exists(ring.path)
        with ShmRing.attach(name, timeout=1.0) as prod:
            prod.push(b"new")
        assert ring.pop() == b"new"
    assert not os.path.exists(os.path.join(SHM_DIR, name))


# ----------------------------------------------------------------------------------- codec tests
def _traj(n_prompt: int, n_resp: int, **fields: object) -> Trajectory:
    rng = np.random.default_rng(n_prompt * 1000 + n_resp)
    base: dict = {
        "sample_id": 2**40 + 7, "prompt_id": 12, "group_id": 3, "rank": 5,
        "prompt_tokens": rng.integers(0, 150_000, n_prompt).tolist(),
        "response_tokens": rng.integers(0, 150_000, n_resp, dtype=np.int32),
        "behav_logprobs": -rng.random(n_resp, dtype=np.float32) * 5,
        "versions": rng.integers(0, 100, n_resp).astype(np.int32),
        "reward": 0.1, "t_start": time.time(), "t_end": time.time() + 1.5, "answer_ok": True,
        "interruptions": 2, "fate": "length", "reward_seconds": 0.734, "reward_timed_out": True, "worker": 3,
    }
    return Trajectory(**{**base, **fields})


@pytest.mark.parametrize(("n_prompt", "n_resp"), [(0, 0), (3, 0), (17, 33), (512, 4096)])
def test_codec_round_trip(n_prompt: int, n_resp: int) -> None:
    t = _traj(n_prompt, n_resp, text="dropped", answer="dropped")
    b = encode(t, producer_full_waits=9)
    assert b == b"".join(bytes(p) for p in encode_parts(t, producer_full_waits=9))
    out, waits = decode(b)
    assert waits == 9
    for key in ("prompt_tokens", "response_tokens", "versions"):
        assert getattr(out, key).dtype == np.int32
        np.testing.assert_array_equal(getattr(out, key), getattr(t, key))
    assert out.behav_logprobs.dtype == np.float32
    assert out.behav_logprobs.tobytes() == t.behav_logprobs.tobytes()
    arrays = {"prompt_tokens", "response_tokens", "behav_logprobs", "versions"}
    scalars = [f.name for f in dataclasses.fields(Trajectory) if f.name not in arrays | {"text", "answer"}]
    assert {"reward_seconds", "reward_timed_out"} <= set(scalars)
    for key in scalars:  # every scalar field travels, a new one included
        assert getattr(out, key) == pytest.approx(getattr(t, key)) if key == "reward" else \
            getattr(out, key) == getattr(t, key), key
    assert type(out.reward_timed_out) is bool
    assert out.text == "" and out.answer == ""  # the text stays with the rollout's log
    assert out.response_tokens.flags.writeable
    view, _ = decode(memoryview(b), copy=False)
    np.testing.assert_array_equal(view.response_tokens, t.response_tokens)
    unknown, _ = decode(encode(_traj(n_prompt, n_resp, fate=None, reward_timed_out=False)))
    assert unknown.fate is None and unknown.reward_timed_out is False


def test_codec_through_ring_and_errors(prefix: str) -> None:
    t = _traj(10, 20, answer_ok=False, fate="aborted")
    with ShmRing.create(prefix + "codec", 4096) as ring:
        ring.push_parts(encode_parts(t))
        out, _ = decode(ring.pop())
    np.testing.assert_array_equal(out.versions, t.versions)
    assert out.answer_ok is False and out.fate == "aborted"
    with pytest.raises(ValueError, match="10 response tokens but 10 behaviour log-probs and 3 versions"):
        _traj(2, 10, versions=np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="int32"):
        _traj(1, 0, prompt_tokens=np.array([2**40]))
    with pytest.raises(ValueError, match="fate"):
        _traj(1, 0, fate="timeout")
    with pytest.raises(ValueError, match="header says"):
        decode(encode(t) + b"\0")
    with pytest.raises(ValueError, match="magic"):
        decode(bytes(100))
    old = bytearray(encode(t))
    old[4:6] = (2).to_bytes(2, "little")  # a record of the previous layout (no reward time)
    with pytest.raises(ValueError, match="codec version 2 unsupported"):
        decode(bytes(old))
    flags = bytearray(encode(t))
    flags[8] = 7  # the reward_timed_out byte
    with pytest.raises(ValueError, match="corrupted: flags"):
        decode(bytes(flags))
