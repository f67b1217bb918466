"""Rewards: verifiers that score a response (math answers, code run in a sandbox, a user's function).

``build_scorer(cfg.reward)`` gives the one callable that scores any problem; ``RewardPool`` runs it in worker
processes off the decode loop. Verifier modules (math-verify and sympy, the sandbox) load on first use, so
importing this package stays cheap.
"""

from areal_hpc.reward.pool import RewardPool
from areal_hpc.reward.result import RewardResult
from areal_hpc.reward.scorer import Scorer, build_scorer, even_token_reward

__all__ = ["RewardPool", "RewardResult", "Scorer", "build_scorer", "even_token_reward"]
