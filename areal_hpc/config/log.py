"""``log``: the HDF5 rollout log's shard sizes and compression."""

from __future__ import annotations

from dataclasses import dataclass

from areal_hpc.config.fields import need, setting


@dataclass
class LogConfig:
    """The HDF5 rollout log (docs/rollout-log.md): shard sizes and compression."""

    shard_samples: int = setting(512, "samples per rollout shard (a shard also closes when old or idle)")
    flush_s: float = setting(2.0, "close an open rollout shard after this many seconds")
    trainer_shard_steps: int = setting(20, "training steps per trainer shard")
    compression: str = setting(
        "lzf",
        "dataset compression (lzf: fast, built into h5py; gzip: smaller, readable by every HDF5 tool)",
        ("gzip", "lzf", "none"),
    )

    def validate(self) -> None:
        need(self.shard_samples >= 1, "log.shard_samples", self.shard_samples, "must be >= 1",
             "set log.shard_samples=512")
        need(self.flush_s > 0, "log.flush_s", self.flush_s, "must be > 0", "set log.flush_s=2.0")
        need(self.trainer_shard_steps >= 1, "log.trainer_shard_steps", self.trainer_shard_steps, "must be >= 1",
             "set log.trainer_shard_steps=20")
