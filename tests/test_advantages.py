"""Group-normalised advantages against hand-worked values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from areal_hpc.train.advantages import (
    group_normalized_advantages,
    group_normalized_advantages_flat,
)

EPS = 1e-6


def test_hand_worked_two_groups() -> None:
    # group 0: [1, 0, 0, 1]: mean 0.5, population std sqrt(mean((+-0.5)^2)) = 0.5
    #          -> (r - 0.5) / 0.5 = [1, -1, -1, 1]
    # group 1: [3, 1, 1, 1]: mean 1.5, deviations [1.5, -0.5, -0.5, -0.5],
    #          var = (2.25 + 3 * 0.25) / 4 = 0.75, std = sqrt(0.75)
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 1.0, 1.0]])
    adv = group_normalized_advantages(r, eps=0.0)
    s = 0.75**0.5
    expected = torch.tensor([[1.0, -1.0, -1.0, 1.0], [1.5 / s, -0.5 / s, -0.5 / s, -0.5 / s]])
    torch.testing.assert_close(adv, expected)
    assert adv.dtype == torch.float32


def test_eps_in_denominator() -> None:
    # [1, 0] -> mean 0.5, std 0.5; with eps 0.5: +-0.5 / 1.0
    adv = group_normalized_advantages(np.array([[1.0, 0.0]]), eps=0.5)
    np.testing.assert_allclose(adv, [[0.5, -0.5]])


def test_constant_group_is_exactly_zero() -> None:
    # 0.1 is not exact in binary; the mean could round off, but the answer must be exactly 0.
    r = np.array([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 1.0, 0.5]])
    adv = group_normalized_advantages(r, eps=EPS)
    assert isinstance(adv, np.ndarray)
    assert np.all(adv[:2] == 0.0)
    np.testing.assert_allclose(adv[2], np.array([-1.0, 1.0, 0.0]) * 0.5 / (np.sqrt(1 / 6) + EPS))


def test_single_sample_group_is_zero() -> None:
    adv = group_normalized_advantages(torch.tensor([[2.0], [5.0]]), eps=EPS)
    assert torch.equal(adv, torch.zeros(2, 1))


def test_unordered_group_ids() -> None:
    # Same two groups as above, interleaved and with arbitrary ids (7 and 3).
    r = torch.tensor([3.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    ids = torch.tensor([3, 7, 3, 7, 3, 7, 3, 7])
    # id 3: [3, 1, 1, 1] ; id 7: [1, 0, 0, 1]
    s = 0.75**0.5
    expected = torch.tensor(
        [1.5 / s, 1.0, -0.5 / s, -1.0, -0.5 / s, -1.0, -0.5 / s, 1.0], dtype=torch.float64
    )
    adv = group_normalized_advantages_flat(r, ids, eps=0.0)
    torch.testing.assert_close(adv, expected)
    assert adv.dtype == torch.float64
    # Same through the main entry point, with numpy input and string ids.
    adv_np = group_normalized_advantages(
        r.numpy(), eps=0.0, group_ids=["b", "a", "b", "a", "b", "a", "b", "a"]
    )
    np.testing.assert_allclose(adv_np, expected.numpy())


def test_flat_matches_2d_after_shuffle() -> None:
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 2, (16, 8), generator=g).float()
    ref = group_normalized_advantages(r, eps=EPS).reshape(-1)
    ids = torch.arange(16).repeat_interleave(8)
    perm = torch.randperm(128, generator=g)
    got = group_normalized_advantages_flat(r.reshape(-1)[perm], ids[perm], eps=EPS)
    torch.testing.assert_close(got, ref[perm])


def test_ragged_groups_and_int_rewards() -> None:
    # group 0: [1, 0] -> [1, -1]; group 1: [2, 2, 2] -> 0; int numpy input -> float64 output
    adv = group_normalized_advantages_flat(np.array([1, 2, 0, 2, 2]), [0, 1, 0, 1, 1], eps=0.0)
    assert adv.dtype == np.float64
    np.testing.assert_allclose(adv, [1.0, 0.0, -1.0, 0.0, 0.0])


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError):
        group_normalized_advantages(torch.zeros(4), eps=EPS)
    with pytest.raises(ValueError):
        group_normalized_advantages_flat(torch.zeros(4), [0, 0, 1], eps=EPS)
