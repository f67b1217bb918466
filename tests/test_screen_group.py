"""Trainer-side staleness check: reject or down-weight samples staler than eta."""

import numpy as np

from areal_hpc.train.worker import screen_group


def v(*xs: int) -> np.ndarray:
    return np.array(xs, dtype=np.int32)


def test_fresh_group_accepted_with_unit_weights() -> None:
    stale, w = screen_group([v(5, 5), v(4, 5, 5)], trained_version=6, eta=2, policy="reject", stale_weight=0.5)
    assert stale == [1, 2] and w == [1.0, 1.0]


def test_oldest_token_decides_and_reject_drops_whole_group() -> None:
    # second sample started under version 2 (interrupted, finished under 5): staleness 6-2 = 4 > eta
    stale, w = screen_group([v(5), v(2, 3, 5)], trained_version=6, eta=3, policy="reject", stale_weight=0.5)
    assert stale == [1, 4] and w is None


def test_downweight_keeps_group_and_weights_only_stale_samples() -> None:
    stale, w = screen_group([v(5), v(2, 3, 5)], trained_version=6, eta=3, policy="downweight", stale_weight=0.25)
    assert stale == [1, 4] and w == [1.0, 0.25]


def test_eta_zero_accepts_only_current_version() -> None:
    assert screen_group([v(3, 3)], 3, 0, "reject", 0.5)[1] == [1.0]
    assert screen_group([v(2, 3)], 3, 0, "reject", 0.5)[1] is None
