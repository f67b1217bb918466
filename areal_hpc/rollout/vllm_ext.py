"""The part of the vLLM engine that runs inside vLLM's engine-core process (``worker_extension_cls``).

vLLM mixes this class into its worker; the rollout rank calls its methods with ``collective_rpc``. The
weights do not travel through that call (vLLM would serialise every tensor): the rank writes each version
into a shared buffer (``weights/shared.py``: a /dev/shm file on CPU, CUDA IPC memory on a GPU) and this
side maps the same buffer once and loads from it in place.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator

import torch


class WeightLoader:
    """Methods added to vLLM's worker: attach to the rank's weight buffer, load one version from it."""

    def areal_attach(self, handle: bytes, tied_embedding: str | None, timeout_s: float) -> None:
        from areal_hpc.weights.shared import SharedWeightReceiver

        device = getattr(self, "device", None) or torch.device("cpu")
        self._areal_rx = SharedWeightReceiver(pickle.loads(handle), 0, torch.device(device), timeout_s=timeout_s)
        self._areal_tied = tied_embedding

    def areal_load(self, version: int) -> int:
        """Load the version the rank just wrote; returns the number of tensors loaded."""
        rx = self._areal_rx
        rx.announce(version)
        got = rx.ready(block=True)
        if got != version:
            raise RuntimeError(f"vLLM weight loader: expected version {version}, the buffer holds {got}")
        count = [0]

        def named() -> Iterator[tuple[str, torch.Tensor]]:
            for name, t in rx.tensors():
                count[0] += 1
                yield name, t
                # vLLM keeps its own copy of a tied LM head (repacked for its kernels): an update of the
                # embedding alone would leave the head on the old weights.
                if name == self._areal_tied:
                    yield "lm_head.weight", t

        self.reload_weights(weights_iterator=named())  # type: ignore[attr-defined]  (vLLM's worker method)
        rx.post_next()
        return count[0]

    def areal_detach(self) -> None:
        rx = getattr(self, "_areal_rx", None)
        if rx is not None:
            rx.close()
            self._areal_rx = None

