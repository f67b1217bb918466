"""``reward``: how responses are scored."""

from __future__ import annotations

import re
from dataclasses import dataclass

from areal_hpc.config.fields import need, setting

# "package.module:function": dotted identifiers, one colon, a (possibly dotted) attribute path.
_FN_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclass
class RewardConfig:
    """How responses are scored, off the decode loop."""

    fn: str | None = setting(None, "a reward function by import path 'package.module:function', "
                                   "called as fn(response: str, problem) -> float in [0, 1]; overrides the "
                                   "task's verifier; the module must import on every rollout rank")
    workers: int = setting(2, "reward worker processes per rollout rank (0: score inline, for debugging)")
    timeout_s: float = setting(5.0, "math and reward.fn: time limit of one scoring; a timeout scores 0 and is "
                                    "counted (a worker past it is killed and replaced)")
    code_timeout_s: float = setting(10.0, "code: wall-clock limit of one sandboxed run; past it the run's "
                                          "process group is killed and scores 0")
    code_memory_mb: int = setting(1024, "code: address-space limit of one sandboxed run, in MiB")
    code_partial: bool = setting(False, "code: reward = fraction of the problem's test snippets that pass, "
                                        "instead of 1 only when all pass")

    def validate(self) -> None:
        need(self.workers >= 0, "reward.workers", self.workers, "must be >= 0", "set reward.workers=2")
        need(self.timeout_s > 0, "reward.timeout_s", self.timeout_s, "must be > 0", "set reward.timeout_s=5")
        need(self.code_timeout_s > 0, "reward.code_timeout_s", self.code_timeout_s, "must be > 0",
             "set reward.code_timeout_s=10")
        need(self.code_memory_mb >= 64, "reward.code_memory_mb", self.code_memory_mb,
             "must be >= 64 (a Python interpreter needs about that much to start)", "set reward.code_memory_mb=1024")
        need(isinstance(self.code_partial, bool), "reward.code_partial", self.code_partial, "must be true or false",
             "set reward.code_partial=false")
        if self.fn is not None:
            need(bool(_FN_PATH.fullmatch(self.fn)), "reward.fn", self.fn, "must be an import path "
                 "'package.module:function'", "write it as e.g. reward.fn=my_rewards.gsm8k:score")
