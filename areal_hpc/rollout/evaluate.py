"""Held-out evaluation through the same engine, prompts and verifiers the rollout workers use.

Greedy pass@1 is the headline (deterministic, comparable across runs). With ``k`` > 1, ``k`` samples per
problem at the rollout's temperature/top-p give avg@k (mean reward) and pass@k (a problem counts when
any of its samples is fully correct): what RL on verifiable rewards is expected to move first.
Responses are scored by the reward pool, so a slow verifier or a hostile code sample costs its time limit,
never the evaluation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from areal_hpc.api import GenRequest
from areal_hpc.model.tokenizer import Tokenizer
from areal_hpc.reward.pool import RewardPool
from areal_hpc.rollout.engine import TorchEngine
from areal_hpc.tasks.base import Problem
from areal_hpc.tasks.prompt import PromptBuilder


def evaluate(model: torch.nn.Module, tok: Tokenizer, prompts: PromptBuilder, problems: Sequence[Problem],
             pool: RewardPool, *, max_new_tokens: int, k: int = 1, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0, batch: int = 256) -> dict[str, Any]:
    """``{"n", "k", "pass@1", "reward@1"[, "avg@k", "pass@k"], "reward_timeouts"}`` on ``problems``."""
    if not problems:
        return {"n": 0, "k": k, "pass@1": float("nan")}
    was_training = model.training
    ids = [prompts.ids(p) for p in problems]
    greedy = _generate(model, tok, problems, ids, 1, max_new_tokens, batch, greedy=True, temperature=1.0,
                       top_p=1.0, seed=seed)
    out: dict[str, Any] = {"n": len(problems), "k": k}
    scored = pool.score_all(_items(problems, greedy, tok))
    timeouts = sum(r.timed_out for r in scored)
    out["pass@1"] = sum(r.reward >= 1.0 for r in scored) / len(problems)
    out["reward@1"] = sum(r.reward for r in scored) / len(problems)
    if k > 1:
        sampled = _generate(model, tok, problems, ids, k, max_new_tokens, batch, greedy=False,
                            temperature=temperature, top_p=top_p, seed=seed + 1)
        rs = pool.score_all(_items(problems, sampled, tok))
        timeouts += sum(r.timed_out for r in rs)
        out[f"avg@{k}"] = sum(r.reward for r in rs) / len(rs)
        solved = {i for i, r in zip((j // k for j in range(len(rs))), rs, strict=True) if r.reward >= 1.0}
        out[f"pass@{k}"] = len(solved) / len(problems)
    out["reward_timeouts"] = timeouts
    model.train(was_training)
    return out


def _generate(model, tok: Tokenizer, problems: Sequence[Problem], ids: list[list[int]], k: int,
              max_new_tokens: int, batch: int, *, greedy: bool, temperature: float, top_p: float,
              seed: int) -> list[list[int]]:
    """Response ids (stop ids dropped) for each problem ``k`` times, problem-major."""
    engine = TorchEngine(model, tok, max_batch=batch, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, seed=seed)
    reqs = [GenRequest(i * k + j, p.prompt_id, i, ids[i], max_tokens=p.max_tokens)
            for i, p in enumerate(problems) for j in range(k)]
    gens = sorted(engine.generate(reqs, greedy=greedy), key=lambda g: g.request.sample_id)
    stops = tok.stop_ids
    return [[t for t in g.tokens if t not in stops] for g in gens]


def _items(problems: Sequence[Problem], responses: list[list[int]], tok: Tokenizer):
    k = len(responses) // len(problems)
    return [(problems[i // k], tuple(r), tok.decode(r)) for i, r in enumerate(responses)]
