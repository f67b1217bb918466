"""Per-pair transport choice: rings within a node, HDF5 shards across nodes."""

import pytest

from areal_hpc.transport.select import pair_uses_ring


class FakeCtx:
    def __init__(self, hosts: list[str]) -> None:
        self.hosts = hosts

    def same_node(self, a: int, b: int) -> bool:
        return self.hosts[a] == self.hosts[b]


def test_auto_uses_ring_on_one_node_and_shards_across_nodes() -> None:
    ctx = FakeCtx(["n1", "n1", "n2"])  # trainer 0 on n1; rollouts 1 (n1) and 2 (n2)
    assert pair_uses_ring("auto", ctx, 1, 0)
    assert not pair_uses_ring("auto", ctx, 2, 0)


def test_forced_modes() -> None:
    ctx = FakeCtx(["n1", "n1"])
    assert pair_uses_ring("shm", ctx, 1, 0)
    assert not pair_uses_ring("hdf5", ctx, 1, 0)


def test_shm_across_nodes_is_an_error_naming_hosts() -> None:
    with pytest.raises(RuntimeError, match="n2.*transport.kind=auto or hdf5"):
        pair_uses_ring("shm", FakeCtx(["n1", "n2"]), 1, 0)
