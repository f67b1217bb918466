"""The HF-forward inference engine (``rollout.engine: hf``): batched sampling with a dynamic KV cache.

The rollout worker drives an engine one decode step at a time (``step()``), which is the point where
a new policy version can be swapped in without dropping in-flight sequences. Every engine implements
``api.InferenceEngine``; this one runs any HF causal LM, on any device.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable
from typing import Any

import torch

from areal_hpc.api import Generation, GenRequest, InferenceEngine
from areal_hpc.model.tokenizer import Tokenizer
from areal_hpc.rollout.sampling import nucleus


def first_versions(live: Iterable[Generation], queued: Iterable[GenRequest]) -> dict[int, int | None]:
    """Per group with a sequence in flight: the version of its oldest token, or None while one of its
    sequences has no token yet (queued, or admitted in a step whose results are not back)."""
    out: dict[int, int | None] = {}
    for g in live:
        gid = g.request.group_id
        if not g.versions:
            out[gid] = None
        elif gid not in out:
            out[gid] = g.versions[0]
        elif out[gid] is not None:
            out[gid] = min(out[gid], g.versions[0])
    for r in queued:
        out[r.group_id] = None
    return out


def run_to_completion(engine: InferenceEngine, requests: list[GenRequest]) -> list[Generation]:
    """Submit ``requests`` and step ``engine`` until all are finished; results in sample-id order."""
    engine.submit(requests)
    out: list[Generation] = []
    while engine.num_active():
        out.extend(engine.step())
    return sorted(out, key=lambda g: g.request.sample_id)


def generate_at_temperature(engine: Any, requests: list[GenRequest], greedy: bool) -> list[Generation]:
    """``run_to_completion`` with ``engine.temperature`` set to 0 for the call when ``greedy`` (engines whose
    sampling reads that attribute at each step or submit)."""
    saved = engine.temperature
    if greedy:
        engine.temperature = 0.0
    try:
        return run_to_completion(engine, requests)
    finally:
        engine.temperature = saved


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row; return it and its exact log-probability under the sampling distribution.

    The distribution is softmax(logits / T), truncated to the top-p nucleus and renormalised when
    top_p < 1; the returned logprob is of that distribution, so the trainer's importance weight
    π_prox/π_behav corrects for the truncation. ``temperature == 0`` means greedy.
    """
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    logp = nucleus(torch.log_softmax(logits / temperature, -1), top_p)
    tok = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


class TorchEngine:
    """HF causal LM + DynamicCache; rows join by re-prefill and leave by cache row selection.

    New requests are admitted when at least half the slots are free (or none are in flight): all live
    rows are then re-prefilled together with the newcomers, which keeps one rectangular KV cache. With
    ``interrupt='recompute'`` a weight update also re-prefills live rows (prompt + tokens so far) under
    the new weights; with ``'keep'`` decoding continues on the old KV cache.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, *, max_batch: int, max_new_tokens: int,
                 temperature: float, top_p: float, interrupt: str = "recompute", seed: int = 0,
                 version: int = 0) -> None:
        self.model = model.eval()
        self.tok = tokenizer
        self._stops = frozenset(tokenizer.stop_ids)
        self.max_batch, self.max_new_tokens = max_batch, max_new_tokens
        self.temperature, self.top_p, self.interrupt = temperature, top_p, interrupt
        self.version = version
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._params = dict(model.named_parameters())
        # transformers 5 renamed ``past_key_values`` to ``cache``; accept both generations.
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._pending: list[GenRequest] = []
        self._live: list[Generation] = []
        self._cache = None
        self._mask: torch.Tensor | None = None  # [rows, cached_len]
        self._pos: torch.Tensor | None = None  # [rows] position of the next token
        self._next_logits: torch.Tensor | None = None
        self._stale_cache = False
        self._logits_version = version  # the weights that computed _next_logits (differs in 'keep' mode)
        self.tokens_generated = 0
        self.prefill_tokens = 0

    # -- public API -------------------------------------------------------------------------------
    def submit(self, requests: Iterable[GenRequest]) -> None:
        self._pending.extend(requests)

    def num_active(self) -> int:
        return len(self._live) + len(self._pending)

    def active_groups(self) -> set[int]:
        """Group ids with a sequence queued or in flight."""
        return {g.request.group_id for g in self._live} | {r.group_id for r in self._pending}

    def free_slots(self) -> int:
        return self.max_batch - len(self._live) - len(self._pending)

    def first_versions(self) -> dict[int, int | None]:
        return first_versions(self._live, self._pending)

    def abort(self, group_ids: set[int]) -> list[Generation]:
        """Stop every queued or live sequence of ``group_ids`` as it stands and return them (``aborted``)."""
        out = [Generation(r) for r in self._pending if r.group_id in group_ids]
        self._pending = [r for r in self._pending if r.group_id not in group_ids]
        keep = [i for i, g in enumerate(self._live) if g.request.group_id not in group_ids]
        if len(keep) < len(self._live):
            out += [g for g in self._live if g.request.group_id in group_ids]
            self._live = [self._live[i] for i in keep]
            if not self._live:
                self._cache = self._mask = self._pos = self._next_logits = None
            else:  # the cache rows of the live sequences that stay, as a finished row leaves
                idx = torch.tensor(keep, device=self.device)
                self._cache.batch_select_indices(idx)
                self._mask, self._pos, self._next_logits = self._mask[idx], self._pos[idx], self._next_logits[idx]
        now = time.time()
        for g in out:
            g.aborted, g.t_end = True, now
        return out

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        for name, tensor in named_tensors:
            self._params[name].copy_(tensor)
        self.version = version
        if self._live:
            for g in self._live:
                g.interruptions += 1
            self._stale_cache = self.interrupt == "recompute"

    @torch.no_grad()
    def step(self) -> list[Generation]:
        """Admit/recompute if needed, sample one token for every live row, advance the cache."""
        free = self.max_batch - len(self._live)
        admit = self._pending and (not self._live or free >= max(1, self.max_batch // 2))
        if admit:
            n = min(free, len(self._pending))
            self._live.extend(Generation(r) for r in self._pending[:n])
            del self._pending[:n]
        if admit or self._stale_cache:
            self._prefill()
        if not self._live:
            return []
        tok, logp = sample_tokens(self._next_logits, self.temperature, self.top_p, self.generator)
        tok_l, logp_l = tok.tolist(), logp.tolist()
        done_rows, keep_rows = [], []
        now = time.time()
        for i, g in enumerate(self._live):
            g.tokens.append(tok_l[i])
            g.logprobs.append(logp_l[i])
            g.versions.append(self._logits_version)
            limit = min(g.request.max_tokens or self.max_new_tokens, self.max_new_tokens)
            if tok_l[i] in self._stops or len(g.tokens) >= limit:
                g.finished, g.t_end = True, now
                done_rows.append(i)
            else:
                keep_rows.append(i)
        self.tokens_generated += len(tok_l)
        finished = [self._live[i] for i in done_rows]
        if done_rows:
            self._live = [self._live[i] for i in keep_rows]
            if not self._live:
                self._cache = None
                return finished
            idx = torch.tensor(keep_rows, device=self.device)
            self._cache.batch_select_indices(idx)
            self._mask, self._pos, tok = self._mask[idx], self._pos[idx], tok[idx]
        self._decode(tok)
        return finished

    def warm_up(self) -> float:
        return 0.0  # an eager HF forward: nothing is captured or compiled ahead

    def stats(self) -> dict[str, Any]:
        return {"engine": "hf", "prefill_tokens": self.prefill_tokens, "interrupt": self.interrupt}

    def generate(self, requests: list[GenRequest], greedy: bool = False) -> list[Generation]:
        """Run requests to completion (evaluation); only valid while no other work is in flight."""
        assert not self._live and not self._pending, "generate() needs an idle engine"
        return generate_at_temperature(self, requests, greedy)

    # -- internals --------------------------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         **{self._cache_kw: self._cache}, logits_to_keep=1)
        self._cache = getattr(out, "cache", None) or out.past_key_values
        self._logits_version = self.version
        return out.logits[:, -1, :]

    def _prefill(self) -> None:
        """Left-padded prefill of prompt + tokens so far for every live row, under current weights."""
        from transformers import DynamicCache

        seqs = [g.request.prompt_tokens + g.tokens for g in self._live]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.tok.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        self._cache = DynamicCache()
        self._next_logits = self._forward(ids, mask, pos)
        self._mask, self._pos = mask, pos[:, -1] + 1
        self._stale_cache = False
        self.prefill_tokens += int(mask.sum())

    def _decode(self, tok: torch.Tensor) -> None:
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(tok), 1))], dim=1)
        self._next_logits = self._forward(tok[:, None], self._mask, self._pos[:, None])
        self._pos = self._pos + 1
