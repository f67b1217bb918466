"""The slot scheduler: which sequence holds which KV-cache slot, admission into free slots, compaction.

The engine owns ``max_batch`` slots. A sequence holds one slot from its prefill to its last token;
the moment it finishes, the slot goes to the next queued request, so a long tail of a few long
sequences never leaves the batch half empty (the HF engine has to wait for half its rows). New
requests take the lowest free slots, and when the live sequences thin out (a long tail, or an
asynchronous rollout held back by the staleness gate) the high ones move down (their KV rows, a few
MB each), so the tail of a batch runs at the cost of a small batch bucket instead of the full one.
Idle slots stay at position 0: they read no cache.

The per-slot tensors a decode step reads and advances live here too, so that every change of a
slot's owner and its inputs happens in one place.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Protocol

import torch
from torch import Tensor

from areal_hpc.api import Generation, GenRequest
from areal_hpc.comm.transfer import to_device
from areal_hpc.model.qwen2 import Qwen2Shape
from areal_hpc.rollout.engine import first_versions
from areal_hpc.rollout.sampling import sequence_seed


class Prefill(Protocol):
    """What admission needs of the prefill (``prefill.Prefill``), which itself writes into these slots."""

    def run(self, slots: list[int], seqs: list[list[int]],
            samples: list[tuple[int, int]] | None) -> tuple[Tensor, Tensor] | None: ...

    def share(self, take: list[tuple[int, GenRequest]], lead: list[int]) -> None: ...


class SlotScheduler:
    def __init__(self, shape: Qwen2Shape, *, max_batch: int, max_seq_len: int, max_new_tokens: int,
                 stop_ids: frozenset[int], dtype: torch.dtype, device: torch.device, admit_min_free: int | None,
                 share_prompts: bool) -> None:
        B, L, dev = max_batch, max_seq_len, device
        self.max_batch, self.max_seq_len, self.max_new_tokens, self.stop_ids = B, L, max_new_tokens, stop_ids
        self.device = dev
        self.share_prompts = share_prompts
        self.admit_min_free = admit_min_free if admit_min_free is not None else max(1, max_batch // 16)
        cache_shape = (shape.n_layers, B + 1, L, shape.n_kv_heads, shape.head_dim)  # slot B: scratch for padding
        self.k_cache = torch.zeros(cache_shape, dtype=dtype, device=dev)
        self.v_cache = torch.zeros(cache_shape, dtype=dtype, device=dev)
        # Decode inputs per slot: the token to feed, its position, its sequence seed and token index.
        self.tok = torch.zeros(B, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(B, dtype=torch.int64, device=dev)
        self.active = torch.zeros(B, dtype=torch.int64, device=dev)  # 1 for a live slot: its position advances
        self.seed = torch.zeros(B, dtype=torch.int64, device=dev)
        self.ctr = torch.zeros(B, dtype=torch.int64, device=dev)
        self.out_tok = torch.zeros(B, dtype=torch.int64, device=dev)
        self.out_logp = torch.zeros(B, dtype=torch.float32, device=dev)
        self.pre_tok = torch.zeros(B, dtype=torch.int64, device=dev)  # first tokens sampled by prefill
        self.pre_logp = torch.zeros(B, dtype=torch.float32, device=dev)
        self.rows = torch.arange(B, device=dev)
        self.table: list[Generation | None] = [None] * B  # the sequence in each slot
        self.live = 0  # occupied slots; kept as a count because the loop asks several times per step
        self.freed: list[int] = []  # slots freed while draining a step, reset on the device at its end
        self.pending: list[GenRequest] = []
        self.hi = 0  # one past the highest live slot; None when it must be recounted
        self.compactions = 0
        self.slots_moved = 0
        self.tokens_generated = 0

    def dev(self, values: list[int] | Tensor, dtype: torch.dtype = torch.int64) -> Tensor:
        """Host values on the engine's device without waiting for the step in flight (comm/transfer.py)."""
        return to_device(values, self.device, dtype)

    # -- the queue ------------------------------------------------------------------------------------
    def limit(self, r: GenRequest) -> int:
        return min(r.max_tokens or self.max_new_tokens, self.max_new_tokens)

    def queue(self, requests: Iterable[GenRequest]) -> None:
        for r in requests:
            need = len(r.prompt_tokens) + self.limit(r)
            if need > self.max_seq_len:
                raise ValueError(
                    f"request {r.sample_id}: prompt of {len(r.prompt_tokens)} tokens + up to {self.limit(r)} new "
                    f"tokens exceeds the KV cache length model.max_seq_len={self.max_seq_len}; raise model.max_seq_len"
                )
            self.pending.append(r)

    def active_groups(self) -> set[int]:
        return {g.request.group_id for g in self.table if g is not None} | {r.group_id for r in self.pending}

    def first_versions(self) -> dict[int, int | None]:
        return first_versions((g for g in self.table if g is not None), self.pending)

    def remove_groups(self, group_ids: set[int]) -> list[Generation]:
        """Take every queued or live sequence of ``group_ids`` out, marked ``aborted``; no step may be in flight."""
        now = time.time()
        out = [Generation(r) for r in self.pending if r.group_id in group_ids]
        self.pending = [r for r in self.pending if r.group_id not in group_ids]
        for slot, g in enumerate(self.table):
            if g is not None and g.request.group_id in group_ids:
                out.append(g)
                self.table[slot] = None
                self.live -= 1
                self.freed.append(slot)
                self.hi = None
        self.reset_freed()
        for g in out:
            g.aborted, g.t_end = True, now
        return out

    # -- tokens in, slots out ----------------------------------------------------------------------
    def append(self, slot: int, g: Generation, tok: int, logp: float, version: int, now: float) -> bool:
        """Record one sampled token; on a stop id or the length limit finish ``g`` and free its slot."""
        self.tokens_generated += 1
        g.tokens.append(tok)
        g.logprobs.append(logp)
        g.versions.append(version)
        if tok in self.stop_ids or len(g.tokens) >= self.limit(g.request):
            g.finished, g.t_end = True, now
            self.table[slot] = None
            self.live -= 1
            self.freed.append(slot)
            if self.hi is not None and slot + 1 == self.hi:
                self.hi = None
            return True
        return False

    def reset_freed(self) -> None:
        if self.freed:  # a freed slot stops advancing and reading its old cache
            idx = self.dev(self.freed)
            self.active.index_fill_(0, idx, 0)
            self.pos.index_fill_(0, idx, 0)
            self.freed.clear()

    def bucket(self, buckets: list[int]) -> int:
        """The smallest batch bucket that holds every live slot."""
        if self.hi is None:
            self.hi = 1 + max((i for i, g in enumerate(self.table) if g is not None), default=-1)
        return next(b for b in buckets if b >= self.hi)

    # -- admission ----------------------------------------------------------------------------------
    def admit(self, prefill: Prefill, prefill_token_budget: int, base_seed: int) -> list[int]:
        """Move queued requests into free slots and prefill them (device side only, no sync).

        Admission waits until ``admit_min_free`` slots are free (or none is live): each prefill is a
        burst of eager launches, so admitting one request per step would cost more than it gains.
        Requests with the same prompt (a group's samples) share one prefill (``Prefill.share``).
        """
        n_free = self.max_batch - self.live
        if not self.pending or not n_free or (self.live and n_free < min(self.admit_min_free, len(self.pending))):
            return []
        free = [i for i, g in enumerate(self.table) if g is None]
        take: list[tuple[int, GenRequest]] = []
        lead: list[int] = []  # per taken request: the index of the one whose prefill it shares
        first: dict[tuple[int, ...], int] = {}
        budget = prefill_token_budget
        while self.pending and len(take) < len(free):
            r = self.pending[0]
            key = tuple(r.prompt_tokens)
            shared = self.share_prompts and key in first
            if take and not shared and len(r.prompt_tokens) > budget:
                break
            if not shared:
                budget -= len(r.prompt_tokens)
                first.setdefault(key, len(take))
            lead.append(first[key] if self.share_prompts else len(take))
            take.append((free[len(take)], self.pending.pop(0)))
        slots = [s for s, _ in take]
        idx = self.dev(slots)
        seeds = self.dev([sequence_seed(base_seed, r.sample_id) for _, r in take])
        self.seed[idx] = seeds
        self.ctr.index_fill_(0, idx, 0)  # not t[idx] = 0: that copies a CPU scalar, a sync
        leaders = sorted(set(lead))
        seq_of = {k: j for j, k in enumerate(leaders)}
        tok, logp = prefill.run([slots[k] for k in leaders], [take[k][1].prompt_tokens for k in leaders],
                                samples=[(slot, seq_of[lead[k]]) for k, slot in enumerate(slots)])
        prefill.share(take, lead)
        self.pre_tok[idx] = tok
        self.pre_logp[idx] = logp
        # Decode inputs: the sampled token goes in at position len(prompt), as token index 1.
        self.tok[idx] = tok
        self.pos[idx] = self.dev([len(r.prompt_tokens) for _, r in take])
        self.ctr.index_fill_(0, idx, 1)
        self.active.index_fill_(0, idx, 1)
        for slot, r in take:
            self.table[slot] = Generation(r)
        self.live += len(take)
        if self.hi is not None:
            self.hi = max(self.hi, 1 + max(slots))
        return slots

    # -- compaction ---------------------------------------------------------------------------------
    def compact_target(self, buckets: list[int]) -> int | None:
        """The bucket the live slots would fit after moving the high ones down, when that is at most
        3/4 of the current one (a move costs a copy of those slots' KV rows, so not for a few rows) and
        no queued request is about to fill the gaps; else None."""
        if self.pending or not self.live:
            return None
        want = next(b for b in buckets if b >= self.live)
        return want if 4 * want <= 3 * self.bucket(buckets) else None

    def compact(self, target: int) -> None:
        """Move every live slot at or above ``target`` into a free slot below it: its KV rows (up to its
        position), decode inputs and bookkeeping. Called with no step in flight."""
        src = [i for i in range(target, len(self.table)) if self.table[i] is not None]
        dst = [i for i in range(target) if self.table[i] is None][:len(src)]
        if not src:
            return
        si, di = self.dev(src), self.dev(dst)
        width = 1 + max(len(self.table[i].request.prompt_tokens) + len(self.table[i].tokens) for i in src)
        width = min(width, self.max_seq_len)
        for c in range(0, len(src), 16):  # a few MB per slot: in groups, so the gather stays small
            a, b = si[c:c + 16], di[c:c + 16]
            for cache in (self.k_cache, self.v_cache):
                cache[:, b, :width] = cache[:, a, :width]
        for t in (self.tok, self.pos, self.seed, self.ctr, self.active):
            t[di] = t[si]
        self.active.index_fill_(0, si, 0)
        self.pos.index_fill_(0, si, 0)
        for i, j in zip(src, dst):
            self.table[j], self.table[i] = self.table[i], None
        self.hi = None
        self.compactions += 1
        self.slots_moved += len(src)
