"""Held-out accuracy (mean reward) with greedy decoding, through the same engine the rollout workers use."""

from __future__ import annotations

import torch

from areal_hpc.api import GenRequest
from areal_hpc.model.tokenizer import Tokenizer
from areal_hpc.rollout.engine import TorchEngine
from areal_hpc.rollout.reward import problem_reward
from areal_hpc.tasks.base import prompt_ids


def evaluate(model: torch.nn.Module, tok: Tokenizer, problems, max_new_tokens: int, batch: int = 256) -> float:
    if not problems:
        return float("nan")
    was_training = model.training
    engine = TorchEngine(model, tok, max_batch=batch, max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0)
    reqs = [GenRequest(i, p.prompt_id, i, prompt_ids(p, tok), max_tokens=p.max_tokens) for i, p in enumerate(problems)]
    gens = engine.generate(reqs, greedy=True)
    correct = 0.0
    for g in gens:
        out = [t for t in g.tokens if t != tok.eos_id]
        correct += problem_reward(problems[g.request.sample_id], out, tok.decode(out))
    model.train(was_training)
    return correct / len(problems)
