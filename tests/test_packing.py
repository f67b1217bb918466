"""First-fit-decreasing packing and right padding."""

from __future__ import annotations

import logging
import math
import random

import pytest
import torch

from areal_hpc.train.packing import ffd_pack, pad_microbatch


def test_ffd_worked_example() -> None:
    # budget 10, lengths by index: 0:2 1:5 2:4 3:7 4:1 5:3 6:8
    # decreasing order (len, idx): 6:8, 3:7, 1:5, 2:4, 5:3, 0:2, 4:1
    #   6:8 -> new bin A (room 2)
    #   3:7 -> A full for 7 -> new bin B (room 3)
    #   1:5 -> new bin C (room 5)
    #   2:4 -> A(2) no, B(3) no, C(5) yes -> C room 1
    #   5:3 -> A no, B(3) yes -> B room 0
    #   0:2 -> A(2) yes -> A room 0
    #   4:1 -> A(0) no, B(0) no, C(1) yes -> C room 0
    # bins in creation order, indices ascending: A=[0, 6], B=[3, 5], C=[1, 2, 4]
    assert ffd_pack([2, 5, 4, 7, 1, 3, 8], 10) == [[0, 6], [3, 5], [1, 2, 4]]


def test_ffd_ties_are_deterministic() -> None:
    # equal lengths: lower index first -> [0, 1], [2, 3], [4]
    assert ffd_pack([5, 5, 5, 5, 5], 10) == [[0, 1], [2, 3], [4]]
    assert ffd_pack([], 10) == []


def test_ffd_overlong_sequence_gets_own_bin(caplog: pytest.LogCaptureFixture) -> None:
    # 1:12 > budget 10: alone, and closed (the 1 must not join it)
    with caplog.at_level(logging.WARNING, logger="areal_hpc.train.packing"):
        bins = ffd_pack([3, 12, 9, 1], 10)
    assert bins == [[1], [2, 3], [0]]
    assert "sequence 1 has 12 tokens" in caplog.text


@pytest.mark.parametrize("seed", range(20))
def test_ffd_invariants_random(seed: int) -> None:
    rng = random.Random(seed)
    budget = rng.choice([16, 100, 4096])
    lengths = [rng.randint(0, budget) for _ in range(rng.randint(1, 300))]
    bins = ffd_pack(lengths, budget)
    flat = [i for b in bins for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every index exactly once
    assert all(sum(lengths[i] for i in b) <= budget for b in bins)
    assert all(b == sorted(b) for b in bins)
    lower = math.ceil(sum(lengths) / budget)  # OPT >= lower
    assert len(bins) <= max(2 * lower, 1)
    assert bins == ffd_pack(lengths, budget)  # deterministic


def test_ffd_bad_budget() -> None:
    with pytest.raises(ValueError):
        ffd_pack([1, 2], 0)


def test_pad_microbatch() -> None:
    seqs = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10])]
    input_ids, attention_mask = pad_microbatch(seqs, pad_id=0)
    assert torch.equal(input_ids, torch.tensor([[5, 6, 7], [8, 0, 0], [9, 10, 0]]))
    assert torch.equal(attention_mask, torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]]))
    assert input_ids.dtype == torch.long and attention_mask.dtype == torch.long
    with pytest.raises(ValueError):
        pad_microbatch([], pad_id=0)
    with pytest.raises(ValueError):
        pad_microbatch([torch.zeros(2, 2, dtype=torch.long)], pad_id=0)
