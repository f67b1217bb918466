"""Host-to-device copies that never wait for the GPU work already queued.

A copy from pageable host memory (``tensor.to("cuda")``, ``torch.tensor(..., device="cuda")``) makes
the host wait for every kernel queued before it (CUDA may synchronize with the stream to stage the
data), which in a per-step path stops the host from preparing step k+1 while the GPU runs step k.
Staging in pinned memory and copying with ``non_blocking`` keeps the host ahead; the caching host
allocator keeps the pinned source alive until the copy has run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def to_device(values: Tensor | Sequence[int], device: torch.device, dtype: torch.dtype = torch.int64) -> Tensor:
    """``values`` (a CPU tensor, or a list of ints made into ``dtype``) on ``device``, without a host wait."""
    t = values if isinstance(values, Tensor) else torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
