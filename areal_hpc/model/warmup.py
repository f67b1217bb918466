"""A short supervised pass that teaches a freshly built model the task's answer format.

RL from random weights would see zero reward for a long time; a brief warm-up gives a policy that is
right sometimes, which is where RL with verifiable rewards starts in practice (from an SFT model).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TextIO

import torch

from areal_hpc.model.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def supervised_warmup(model: torch.nn.Module, tokenizer: Tokenizer, task, *, steps: int, batch_size: int,
                      lr: float, seed: int, flaw: float = 0.0, console: TextIO | None = None,
                      every_s: float = 15.0, clock: Callable[[], float] = time.monotonic) -> list[float]:
    """Train on (prompt, answer<eos>) pairs with the loss on answer tokens only; returns the loss curve.

    With ``flaw`` > 0 the teacher gives the task's flawed answer (e.g. forgotten carries) that often,
    as an imperfect SFT dataset would; the verifier-driven RL that follows has to correct it.
    ``console`` (the user's terminal or job output) gets a line every ``every_s`` seconds and one at
    the end: on CPU the first warm-up takes minutes, which must not look like a hang.
    """
    import random

    rng = random.Random(seed)
    t0 = last_line = clock()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    device = next(model.parameters()).device
    losses: list[float] = []
    index = 10**9 + seed * 10**6  # a slice of the stream far from the prompts RL will use
    for step in range(steps):
        seqs, starts = [], []
        for _ in range(batch_size):
            p = task.train_problem(index)
            index += 1
            prompt = tokenizer.encode(p.prompt)
            answer = task.flawed_answer(p) if flaw > 0 and rng.random() < flaw else p.answer
            seqs.append(prompt + tokenizer.encode(answer) + [tokenizer.eos_id])
            starts.append(len(prompt))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tokenizer.pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        mask = torch.zeros_like(ids)
        for i, (s, st) in enumerate(zip(seqs, starts)):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, st: len(s)] = torch.tensor(s[st:])
            mask[i, : len(s)] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log.info("warm-up step %d/%d loss %.4f", step + 1, steps, losses[-1])
        if console is not None and step < steps - 1:
            now = clock()
            if now - last_line >= every_s:
                last_line = now
                console.write(f"warm-up: step {step + 1}/{steps}, loss {losses[-1]:.3f}, {now - t0:.0f} s\n")
                console.flush()
    if console is not None:
        final = f", loss {losses[-1]:.3f}" if losses else ""
        console.write(f"warm-up: done, {steps} steps in {clock() - t0:.0f} s{final}\n")
        console.flush()
    model.eval()
    return losses
