"""``elastic``: rollout workers that attach to a running run from other (preemptible) Slurm jobs."""

from __future__ import annotations

from dataclasses import dataclass

from areal_hpc.config.fields import need, setting


@dataclass
class ElasticConfig:
    """How a run hands work to attached rollout workers and notices when one is gone (docs/elastic.md)."""

    lease_s: float = setting(
        60.0,
        "an attached worker whose heartbeat is older than this is taken as gone: its grants that have not "
        "arrived go to other producers. Longer than a shared filesystem's attribute-cache delay (NFS: ~30 s)")
    heartbeat_s: float = setting(2.0, "seconds between an attached worker's heartbeats (its lease renewals)")
    poll_s: float = setting(
        0.5, "seconds between a trainer's looks at the workers' leases and an attached worker's looks at its "
        "grants and the newest weights")
    weights_dtype: str = setting(
        "auto",
        "dtype of the weight files written for attached workers; auto: the rollout's dtype "
        "(bfloat16 on CUDA, else model.dtype)",
        ("auto", "float32", "bfloat16", "float16"))
    stale_stop: int = setting(
        4, "an attached worker whose groups the trainer rejects as stale this many times in a row is told to "
        "stop (it cannot keep up and would only waste its GPU); 0: never")

    def validate(self) -> None:
        need(self.heartbeat_s > 0, "elastic.heartbeat_s", self.heartbeat_s, "must be > 0",
             "set elastic.heartbeat_s=2")
        need(self.lease_s >= 3 * self.heartbeat_s, "elastic.lease_s", self.lease_s,
             f"must be at least 3 heartbeats (3 x elastic.heartbeat_s = {3 * self.heartbeat_s:g})",
             "raise elastic.lease_s (60 is a safe value on a shared filesystem)")
        need(self.poll_s > 0, "elastic.poll_s", self.poll_s, "must be > 0", "set elastic.poll_s=0.5")
        need(self.stale_stop >= 0, "elastic.stale_stop", self.stale_stop, "must be >= 0",
             "set elastic.stale_stop=4 (0 never stops a slow worker)")
