"""``weights``: how a new policy version travels from the trainer to the rollout ranks."""

from __future__ import annotations

from dataclasses import dataclass

from areal_hpc.config.fields import need, setting


@dataclass
class WeightsConfig:
    """Trainer -> rollout weight broadcast."""

    backend: str = setting("auto", "auto: nccl on GPU, gloo on CPU", ("auto", "gloo", "nccl"))
    bucket_mb: int = setting(64, "broadcast bucket size in MiB")
    kind: str = setting(
        "auto",
        "broadcast: gloo/NCCL bucketed broadcast; shared: trainer and rollout on one node share buffers "
        "(CUDA IPC on a shared GPU, shared memory on CPU), no copy through the network or host; "
        "auto: shared when every rollout rank is on trainer rank 0's node and device, else broadcast",
        ("auto", "broadcast", "shared"),
    )

    def validate(self) -> None:
        need(self.bucket_mb >= 1, "weights.bucket_mb", self.bucket_mb, "must be >= 1", "set weights.bucket_mb=64")
