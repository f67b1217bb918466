"""``transport``: how samples travel from rollout ranks to trainer ranks."""

from __future__ import annotations

from dataclasses import dataclass

from areal_hpc.config.fields import need, setting


@dataclass
class TransportConfig:
    """Rollout -> trainer sample transport."""

    kind: str = setting(
        "auto",
        "shm: shared-memory ring; hdf5: finished log shards on a shared filesystem; "
        "auto: shm for rollout/trainer pairs on one node, hdf5 across nodes",
        ("auto", "shm", "hdf5"),
    )
    ring_bytes: int = setting(8388608, "ring buffer size in bytes (>= 65536)")
    retain_shards: bool = setting(True, "keep consumed rollout shards as the log (false: delete them in hdf5 mode)")
    poll_s: float = setting(0.002, "how often a trainer looks for new shards in hdf5 mode (seconds)")

    def validate(self) -> None:
        need(self.ring_bytes >= 65536, "transport.ring_bytes", self.ring_bytes, "must be >= 65536",
             "set transport.ring_bytes=8388608")
        need(self.poll_s > 0, "transport.poll_s", self.poll_s, "must be > 0", "set transport.poll_s=0.002")
