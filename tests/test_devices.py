"""GPU binding: node-local rank order, and when NCCL may be used."""

from __future__ import annotations

import pytest

from areal_hpc.comm.devices import local_ranks
from areal_hpc.comm.dist import pick_backend


def test_local_ranks_follow_world_order_per_host():
    hosts = ["a", "a", "b", "a", "b"]
    assert [local_ranks(hosts, r) for r in range(5)] == [(0, 3), (1, 3), (0, 2), (2, 3), (1, 2)]


def test_one_trainer_three_rollouts_on_four_gpus_get_distinct_devices():
    hosts = ["n1"] * 4
    assert sorted(local_ranks(hosts, r)[0] % 4 for r in range(4)) == [0, 1, 2, 3]


def test_backend_choice(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_backend("auto") == "nccl"
    assert pick_backend("auto", gpu_shared=True) == "gloo"  # NCCL refuses two ranks on one GPU
    assert pick_backend("gloo") == "gloo"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_backend("auto") == "gloo"
    with pytest.raises(RuntimeError, match="weights.backend=gloo"):
        pick_backend("nccl")
