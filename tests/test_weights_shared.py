"""Shared-buffer weight sync: selection, the all-or-nothing / ack-before-overwrite protocol, queued versions,
crash cleanup, and a real second process (CPU shared memory; CUDA IPC when a GPU is present)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

from areal_hpc.transport.shm_ring import cleanup_stale
from areal_hpc.weights import shared
from areal_hpc.weights.select import Placement, choose_kind
from areal_hpc.weights.shared import SharedWeightReceiver, SharedWeightSender

REPO = Path(__file__).resolve().parents[1]


def params(seed: int, dtype: torch.dtype = torch.float32) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 5), (7,), (3, 3, 2), (1,), (300,)]
    return [(f"layer{i}.w", torch.randn(s, generator=g).to(dtype)) for i, s in enumerate(shapes)]


@pytest.fixture
def prefix() -> str:
    p = f"areal_test{uuid.uuid4().hex[:8]}_"
    yield p
    cleanup_stale(p, skip_live_owners=False)


def pair(prefix: str, n_readers: int = 1, dtype: torch.dtype = torch.float32, timeout_s: float = 10.0):
    sender = SharedWeightSender(params(0), path=f"/dev/shm/{prefix}weights", n_readers=n_readers, dtype=dtype,
                                device=torch.device("cpu"), timeout_s=timeout_s)
    readers = [SharedWeightReceiver(sender.handle(), i, torch.device("cpu"), params(0)) for i in range(n_readers)]
    return sender, readers


class Engine:
    """Stands in for TorchEngine.update_weights: copies each pair, then sets the version."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        self.params = {n: torch.zeros_like(p, dtype=dtype) for n, p in params(0)}
        self.version = 0

    def update_weights(self, named, version: int) -> None:
        for name, t in named:
            self.params[name].copy_(t)
        self.version = version


def apply_ready(rx: SharedWeightReceiver, engine: Engine, block: bool = False) -> int | None:
    """The rollout worker's _apply_ready."""
    v = rx.ready(block=block)
    if v is None:
        return None
    if not rx.superseded:
        engine.update_weights(rx.tensors(), v)
    rx.post_next()
    return v


# -- selection ----------------------------------------------------------------------------------------
def test_choose_kind() -> None:
    t0 = Placement("n1", "cuda:0", "GPU-a", "float32")
    same = Placement("n1", "cuda:0", "GPU-a", "bfloat16")
    other_gpu = Placement("n1", "cuda:1", "GPU-b", "bfloat16")
    other_node = Placement("n2", "cuda:0", "GPU-c", "bfloat16")
    assert choose_kind("auto", [t0, same, same], [1, 2]) == "shared"
    assert choose_kind("auto", [t0, same, other_gpu], [1, 2]) == "broadcast"
    assert choose_kind("auto", [t0, other_node], [1]) == "broadcast"
    assert choose_kind("broadcast", [t0, same], [1]) == "broadcast"
    # a second trainer elsewhere does not matter: only trainer 0 sends
    assert choose_kind("auto", [t0, other_node, same], [2]) == "shared"
    with pytest.raises(RuntimeError, match=r"rollout rank 2 .* another GPU.*weights.kind=auto"):
        choose_kind("shared", [t0, same, other_gpu], [1, 2])
    with pytest.raises(RuntimeError, match="rollout rank 1 .* another node"):
        choose_kind("shared", [t0, other_node], [1])
    cpu = Placement("n1", "cpu", None, "float32")
    assert choose_kind("auto", [cpu, cpu, cpu], [1, 2]) == "shared"
    assert choose_kind("auto", [t0, cpu], [1]) == "broadcast"


# -- protocol ---------------------------------------------------------------------------------------
def test_round_trip_converts_to_rollout_dtype(prefix: str) -> None:
    sender, (rx,) = pair(prefix, dtype=torch.bfloat16)
    engine = Engine(torch.bfloat16)
    for v in (1, 2, 3):
        new = params(v)
        sender.send(new)
        rx.announce(v)
        assert apply_ready(rx, engine) == v
        assert engine.version == v
        for name, p in new:
            assert torch.equal(engine.params[name], p.to(torch.bfloat16)), name
    assert not rx.busy
    sender.wait()  # everything released
    rx.close()
    sender.close()
    assert not os.path.exists(f"/dev/shm/{prefix}weights")


def test_incomplete_header_is_never_applied(prefix: str) -> None:
    sender, (rx,) = pair(prefix)
    engine = Engine()
    sender.send(params(1))
    # The trainer died (or is still) writing the next seq: the slot says WRITING, the data is half new.
    sender.header.set_state(0, shared.writing(2))
    sender._slots[0][0][1].fill_(7.0)
    rx.announce(1)
    assert apply_ready(rx, engine) == 1  # seq 1 is complete in slot 1
    rx.announce(2)
    assert rx.ready() is None and apply_ready(rx, engine) is None
    assert engine.version == 1
    rx.timeout_s = 0.05
    with pytest.raises(RuntimeError, match="not complete"):
        rx.ready(block=True)
    assert engine.version == 1 and torch.equal(engine.params["layer0.w"], params(1)[0][1])
    rx.close()
    sender.close()


def test_slot_changed_during_copy_is_not_applied(prefix: str) -> None:
    sender, (rx,) = pair(prefix)
    engine = Engine()
    sender.send(params(1))
    rx.announce(1)
    assert rx.ready() == 1

    def torn():
        for i, item in enumerate(rx.tensors()):
            if i == 1:  # the slot is rewritten under the reader's feet
                sender.header.set_state(1, shared.writing(3))
            yield item

    with pytest.raises(RuntimeError, match="changed during the copy"):
        engine.update_weights(torn(), 1)
    assert engine.version == 0  # the version never became visible
    rx.close()
    sender.close()


def test_trainer_waits_for_ack_before_overwriting(prefix: str) -> None:
    sender, (rx_a, rx_b) = pair(prefix, n_readers=2)
    engines = [Engine(), Engine()]
    sender.send(params(1))  # slot 1
    sender.send(params(2))  # slot 0
    for rx in (rx_a, rx_b):
        rx.announce(1)
        rx.announce(2)
    t = threading.Thread(target=sender.send, args=(params(3),))  # slot 1 again: seq 1 not released yet
    t.start()
    time.sleep(0.2)
    assert t.is_alive(), "trainer overwrote a slot no reader had released"
    assert apply_ready(rx_a, engines[0]) == 1  # superseded by 2: skipped, but released
    time.sleep(0.1)
    assert t.is_alive(), "trainer overwrote a slot reader b still holds"
    assert apply_ready(rx_b, engines[1]) == 1
    t.join(5)
    assert not t.is_alive()
    assert sender.seconds_waiting >= 0.25
    for rx, eng in zip((rx_a, rx_b), engines):
        rx.announce(3)
        assert apply_ready(rx, eng) == 2  # superseded by 3
        assert apply_ready(rx, eng) == 3
        assert eng.version == 3 and torch.equal(eng.params["layer4.w"], params(3)[4][1])
    rx_a.close()
    rx_b.close()
    sender.close()


def test_unreleased_slot_times_out_naming_the_reader(prefix: str) -> None:
    sender, (rx,) = pair(prefix, n_readers=1, timeout_s=0.2)
    sender.send(params(1))
    sender.send(params(2))
    with pytest.raises(RuntimeError, match="rollout reader 0 has not released seq 1"):
        sender.send(params(3))
    rx.close()
    sender.close()


def test_queued_versions_apply_only_the_newest(prefix: str) -> None:
    sender, (rx,) = pair(prefix)
    engine = Engine()
    sender.send(params(1))
    rx.announce(1)
    sender.send(params(2))
    rx.announce(2)
    assert rx.busy
    applied = []
    while rx.busy:
        v = rx.ready(block=True)
        if not rx.superseded:
            engine.update_weights(rx.tensors(), v)
            applied.append(v)
        rx.post_next()
    assert applied == [2] and engine.version == 2
    assert torch.equal(engine.params["layer2.w"], params(2)[2][1])
    rx.close()
    sender.close()


def test_layout_mismatch_is_explained(prefix: str) -> None:
    sender, _ = pair(prefix, n_readers=1)
    wrong = [("other", p) if i == 2 else (n, p) for i, (n, p) in enumerate(params(0))]
    with pytest.raises(RuntimeError, match="at index 2"):
        SharedWeightReceiver(sender.handle(), 0, torch.device("cpu"), wrong)
    sender.close()


def test_crashed_owner_file_is_cleaned_live_one_kept(prefix: str) -> None:
    sender, (rx,) = pair(prefix)
    assert cleanup_stale(prefix) == []  # owner (this process) alive
    sender.header.words[shared._W_OWNER_PID] = 2**22 + 12345  # a pid that does not exist
    assert cleanup_stale(prefix) == [f"{prefix}weights"]
    rx.close()
    sender.close()


# -- a second process ----------------------------------------------------------------------------------
CHILD = r"""
import pickle, sys, torch
from areal_hpc.weights.shared import SharedWeightReceiver
handle, device, n, out = pickle.load(sys.stdin.buffer)
rx = SharedWeightReceiver(handle, 0, torch.device(device))
got = {}
for v in range(1, n + 1):
    rx.announce(v)
    assert rx.ready(block=True) == v
    got[v] = {name: t.detach().to("cpu", copy=True) for name, t in rx.tensors()}
    rx.post_next()
rx.close()
torch.save(got, out)
print("child ok", flush=True)
"""


def run_child(sender: SharedWeightSender, device: str, versions: dict[int, list], out: Path) -> dict:
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, env={**os.environ, "NCCL_NVLS_ENABLE": "0"})
    child.stdin.write(pickle.dumps((sender.handle(), device, len(versions), str(out))))
    child.stdin.close()
    for v in sorted(versions):  # the child acks each before the slot comes round again
        sender.send(versions[v])
    sender.wait()
    output = child.stdout.read().decode()
    assert child.wait(120) == 0, output
    return torch.load(out)


def test_second_process_cpu_shared_memory(prefix: str, tmp_path: Path) -> None:
    sender = SharedWeightSender(params(0), path=f"/dev/shm/{prefix}weights", n_readers=1, dtype=torch.bfloat16,
                                device=torch.device("cpu"), timeout_s=60)
    versions = {v: params(v) for v in range(1, 6)}
    got = run_child(sender, "cpu", versions, tmp_path / "got.pt")
    for v, ps in versions.items():
        for name, p in ps:
            assert torch.equal(got[v][name], p.to(torch.bfloat16)), (v, name)
    sender.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_second_process_cuda_ipc_bit_identical(prefix: str, tmp_path: Path) -> None:
    sender = SharedWeightSender([(n, p.cuda()) for n, p in params(0)], path=f"/dev/shm/{prefix}weights",
                                n_readers=1, dtype=torch.bfloat16, device=torch.device("cuda", 0), timeout_s=60)
    versions = {v: [(n, p.cuda()) for n, p in params(v)] for v in range(1, 6)}
    got = run_child(sender, "cuda:0", versions, tmp_path / "got.pt")
    for v, ps in versions.items():
        for name, p in ps:
            assert torch.equal(got[v][name], p.to(torch.bfloat16).cpu()), (v, name)
    sender.close()
