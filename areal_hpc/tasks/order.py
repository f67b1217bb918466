"""Which row training problem ``i`` is, and which rows are held out: pure functions of the seed.

Every rollout rank draws its own share of prompts by index and a resumed run must regenerate exactly
the problems it would have seen, so nothing here keeps state that depends on the order of calls: the
permutation of epoch ``e`` is a function of (seed, e) alone (cached, as consecutive indices share it).
"""

from __future__ import annotations

import random
from functools import lru_cache


class EpochOrder:
    """An endless stream over ``n`` rows: epoch ``e = i // n`` visits every row once.

    With ``shuffle`` the rows of epoch ``e`` come in a permutation seeded by (seed, e), so successive
    epochs see different orders; without it every epoch is file order.
    """

    def __init__(self, n: int, seed: int, shuffle: bool) -> None:
        if n < 1:
            raise ValueError(f"an epoch order needs at least one row, got {n}")
        self.n, self.seed, self.shuffle = n, seed, shuffle

    def epoch_of(self, index: int) -> int:
        """The epoch that training problem ``index`` belongs to."""
        return index // self.n

    def row_of(self, index: int) -> int:
        """The row (0-based, in the order the rows were given) that training problem ``index`` is."""
        if index < 0:
            raise ValueError(f"training problem indices start at 0, got {index}")
        epoch, pos = divmod(index, self.n)
        if not self.shuffle:
            return pos
        return _permutation(self.n, self.seed, epoch)[pos]


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    rows = list(range(n))
    random.Random(f"{seed}-epoch-{epoch}").shuffle(rows)
    return tuple(rows)


def held_out_split(n: int, n_eval: int, seed: int, source: str, alternative: str = "") -> tuple[list[int], list[int]]:
    """(held-out rows, training rows) of ``n`` rows: ``n_eval`` rows drawn by the seed, each list in file order.

    At most half the rows are held out, so a default ``task.n_eval`` never leaves a dataset with
    almost nothing to train on without saying so; ``source`` names the data in that error and
    ``alternative`` is a second fix it offers (e.g. a separate held-out file).
    """
    if n_eval < 1 or n_eval > n // 2:
        raise ValueError(f"{source}: task.n_eval={n_eval} must hold out between 1 and half of its {n} rows; "
                         f"set task.n_eval={max(1, n // 10)}{' or ' + alternative if alternative else ''}")
    held = sorted(random.Random(f"{seed}-heldout").sample(range(n), n_eval))
    held_set = set(held)
    return held, [r for r in range(n) if r not in held_set]
