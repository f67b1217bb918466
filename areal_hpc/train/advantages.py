"""Group-normalised advantages (GRPO-style, as used by AReaL's math/code recipes).

Each prompt is sampled ``group_size`` times; a sample's advantage is its reward relative to its
siblings:

    A_i = (r_i - mean_g) / (std_g + eps)

``std_g`` is the *population* std (``unbiased=False``, divide by n): it is the std of the group
actually observed, it stays defined for a group of one, and for 0/1 rewards it gives the
symmetric [1, 0, 0, 1] -> [1, -1, -1, 1]. A group whose rewards are all equal carries no
learning signal and gets exactly A = 0 (not round-off divided by eps).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

__all__ = ["group_normalized_advantages", "group_normalized_advantages_flat"]

ArrayLike = TypeVar("ArrayLike", Tensor, np.ndarray)


def group_normalized_advantages(
    rewards: ArrayLike,
    eps: float = 1e-6,
    group_ids: Tensor | np.ndarray | Sequence | None = None,
) -> ArrayLike:
    """A = (r - mean_g) / (std_g + eps) per row of ``rewards`` ``[n_groups, group_size]``.

    With ``group_ids``, ``rewards`` is flat ``[N]`` instead and this is
    ``group_normalized_advantages_flat``. Returns the same type (Tensor or ndarray), shape and
    device as ``rewards``; see the module docstring for the population std and constant groups.
    """
    if group_ids is not None:
        return group_normalized_advantages_flat(rewards, group_ids, eps)
    if rewards.ndim != 2:
        raise ValueError(
            f"rewards must be [n_groups, group_size], got shape {tuple(rewards.shape)}; "
            "use group_normalized_advantages_flat for flat rewards with group ids"
        )
    n_groups, group_size = rewards.shape
    group_ids = np.repeat(np.arange(n_groups), group_size)
    flat = rewards.reshape(-1)
    return group_normalized_advantages_flat(flat, group_ids, eps).reshape(n_groups, group_size)


def group_normalized_advantages_flat(
    rewards: ArrayLike,
    group_ids: Tensor | np.ndarray | Sequence,
    eps: float = 1e-6,
) -> ArrayLike:
    """A_i = (r_i - mean_{g(i)}) / (std_{g(i)} + eps) for flat ``rewards`` in any order.

    Samples arrive from the rollout side unordered and groups may be ragged, so the group of
    sample i is ``group_ids[i]`` (any hashable/comparable ids: ints, strings, ...). Returns the
    same type, shape ``[N]`` and device as ``rewards``; float output (input float dtype kept).
    """
    is_numpy = isinstance(rewards, np.ndarray)
    r = torch.from_numpy(np.asarray(rewards)) if is_numpy else rewards
    if r.ndim != 1:
        raise ValueError(f"rewards must be 1-D, got shape {tuple(r.shape)}")
    if len(group_ids) != r.shape[0]:
        raise ValueError(f"{len(group_ids)} group ids for {r.shape[0]} rewards")
    out_dtype = r.dtype if r.is_floating_point() else torch.get_default_dtype()
    if is_numpy and not r.is_floating_point():
        out_dtype = torch.float64

    # Dense group index 0..G-1 for each sample (np.unique also handles string ids).
    if isinstance(group_ids, Tensor):
        _, inverse = torch.unique(group_ids, return_inverse=True)
    else:
        _, inverse = np.unique(np.asarray(group_ids), return_inverse=True)
        inverse = torch.from_numpy(inverse.reshape(-1))
    inverse = inverse.to(r.device)
    n_groups = int(inverse.max().item()) + 1 if inverse.numel() else 0

    # Statistics in float64: rewards are few, and round-off must not fake a signal.
    x = r.to(torch.float64)
    count = torch.zeros(n_groups, dtype=torch.float64, device=x.device).index_add_(
        0, inverse, torch.ones_like(x)
    )
    mean = torch.zeros_like(count).index_add_(0, inverse, x) / count
    centred = x - mean[inverse]
    var = torch.zeros_like(count).index_add_(0, inverse, centred * centred) / count  # population
    std = var.sqrt()
    gmax = torch.full_like(count, -torch.inf).scatter_reduce_(0, inverse, x, "amax")
    gmin = torch.full_like(count, torch.inf).scatter_reduce_(0, inverse, x, "amin")
    constant = (gmax == gmin)[inverse]

    adv = torch.where(constant, torch.zeros_like(x), centred / (std[inverse] + eps))
    adv = adv.to(out_dtype)
    return adv.numpy() if is_numpy else adv
