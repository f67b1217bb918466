"""``areal-hpc clean`` and the start-up clean: segments of dead runs go, MPICH's included; a live run's stay."""

from __future__ import annotations

import argparse
import mmap
import multiprocessing as mp
import os
import signal
import uuid
from collections.abc import Iterator

import pytest

from areal_hpc.launch import clean
from areal_hpc.transport.shm_ring import SHM_DIR, ShmRing, cleanup_stale

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /dev/shm and /proc")

_SPAWN = mp.get_context("spawn")


@pytest.fixture
def tag() -> Iterator[str]:
    """A unique infix: the test's segments are ``areal_<tag>...`` and ``mpich_shm_<tag>...``."""
    t = f"test{os.getpid()}{uuid.uuid4().hex[:8]}_"
    yield t
    cleanup_stale((f"areal_{t}", f"mpich_shm_{t}"), skip_live_owners=False)


def _mpich_like(name: str) -> str:
    """A segment as MPICH leaves it: no header of ours, no owner pid."""
    path = os.path.join(SHM_DIR, name)
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)
    return path


def _crashing_owner(name: str, ready) -> None:
    ShmRing.create(name, 4096)
    ready.put("created")
    signal.pause()


def test_dead_segments_go_live_ones_stay(tag, capsys):
    prefixes = (f"areal_{tag}", f"mpich_shm_{tag}")
    dead_mpich = _mpich_like(f"mpich_shm_{tag}dead")
    live_mpich = _mpich_like(f"mpich_shm_{tag}live")
    with open(live_mpich, "r+b") as f, mmap.mmap(f.fileno(), 4096) as mapped:  # a live job maps its segment
        ready = _SPAWN.Queue()
        owner = _SPAWN.Process(target=_crashing_owner, args=(f"areal_{tag}r1_t0", ready))
        owner.start()
        assert ready.get(timeout=60) == "created"
        os.kill(owner.pid, signal.SIGKILL)  # killed: its ring stays in /dev/shm
        owner.join(timeout=10)
        live_ring = ShmRing.create(f"areal_{tag}r2_t0", 4096)
        try:
            assert clean.run(argparse.Namespace(dry_run=True)) == 0
            listed = capsys.readouterr().out
            assert f"mpich_shm_{tag}dead" in listed and f"areal_{tag}r1_t0" in listed
            assert f"mpich_shm_{tag}live" not in listed and f"areal_{tag}r2_t0" not in listed
            assert os.path.exists(dead_mpich), "--dry-run removed a segment"
            assert sorted(cleanup_stale(prefixes)) == [f"areal_{tag}r1_t0", f"mpich_shm_{tag}dead"]
            assert os.path.exists(live_mpich) and os.path.exists(live_ring.path)
            mapped[0] = 1  # still usable
        finally:
            live_ring.unlink()
            live_ring.close()
    assert cleanup_stale(prefixes) == [f"mpich_shm_{tag}live"]  # unmapped and closed now: dead


def test_clean_is_a_command():
    from areal_hpc.cli import main

    assert main(["clean", "--dry-run"]) == 0
