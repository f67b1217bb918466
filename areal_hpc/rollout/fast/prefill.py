"""Prefill: the prompts of newly admitted requests, packed without padding, straight into their slots' KV cache.

Packed means the prompts are concatenated and attend within themselves (varlen attention), so no pad
token is computed on. On CUDA a prefill replays a graph captured for the smallest (tokens, rows)
bucket that fits: an eager prefill is ~1500 small launches, which on a slow host costs tens of
milliseconds. A group's samples share their prompt: it is computed once, its KV rows are copied into
the other slots, and each slot samples its own first token from the shared logits with its own seed,
so results equal separate prefills.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from torch import Tensor

from areal_hpc.api import Generation, GenRequest
from areal_hpc.model.attention import causal_varlen
from areal_hpc.model.qwen2 import PackedQwen2
from areal_hpc.rollout.fast.graphs import capture
from areal_hpc.rollout.fast.mode import StepMode
from areal_hpc.rollout.fast.slots import SlotScheduler
from areal_hpc.rollout.sampling import sample

log = logging.getLogger(__name__)

ROW_BUCKETS = (8, 32, 128, 512, 2048)  # sampled rows of a graphed prefill (max_batch above the last)


class Prefill:
    def __init__(self, runner: PackedQwen2, slots: SlotScheduler, mode: StepMode, *, token_budget: int,
                 pool: object | None) -> None:
        self.runner, self.slots, self.mode, self.pool = runner, slots, mode, pool
        self.graphs: dict[tuple[int, int], dict] = {}
        top = 1 << max(8, (token_budget - 1).bit_length())
        self.buckets = [b for b in (256, 512, 1024, 2048, 4096, 8192, 16384, 32768) if b < top] + [top]
        self.tokens = 0
        self.tokens_shared = 0  # prompt tokens not computed: copied from a group member's prefill
        self.capture_s = 0.0  # host seconds spent capturing graphs

    def run(self, slots: list[int], seqs: list[list[int]],
            samples: list[tuple[int, int]] | None) -> tuple[Tensor, Tensor] | None:
        """Packed prefill of ``seqs`` into ``slots``' caches; with ``samples``, sample next tokens.

        ``samples[k] = (slot, j)``: token k is drawn from the logits after the last token of ``seqs[j]``
        with ``slot``'s seed and counter, so one prefill of a prompt can start every sequence of its
        group.
        """
        lens = [len(s) for s in seqs]
        total = sum(lens)
        n_rows = max(len(seqs), len(samples or ()))
        graphs = self.mode.graphs
        if graphs and total <= self.buckets[-1] and n_rows <= self.slots.max_batch:
            self.tokens += total
            return self.graphed(slots, seqs, lens, samples)
        if graphs and len(seqs) > 1:  # too large for one graph: split (only a mass recompute gets here)
            half = len(seqs) // 2
            if samples is None:
                self.run(slots[:half], seqs[:half], None)
                return self.run(slots[half:], seqs[half:], None)
            lo = [k for k, (_, j) in enumerate(samples) if j < half]
            hi = [k for k, (_, j) in enumerate(samples) if j >= half]
            a = self.run(slots[:half], seqs[:half], [samples[k] for k in lo])
            b = self.run(slots[half:], seqs[half:], [(samples[k][0], samples[k][1] - half) for k in hi])
            back = self.slots.dev(torch.tensor(lo + hi).argsort())  # results back in the order of samples
            return torch.cat([a[0], b[0]])[back], torch.cat([a[1], b[1]])[back]
        self.tokens += total
        dev = self.slots.dev
        cu_list = [0]
        for n in lens:
            cu_list.append(cu_list[-1] + n)
        ids = dev([t for s in seqs for t in s])
        pos = dev(torch.cat([torch.arange(n) for n in lens]))
        slot_of = dev(torch.repeat_interleave(torch.tensor(slots), torch.tensor(lens)))
        cu = dev(cu_list, torch.int32)
        samples = samples or []
        last = dev([cu_list[j + 1] - 1 for _, j in samples])
        idx = dev([sl for sl, _ in samples])
        return self._body(ids, pos, slot_of, cu, max(lens), cu_list, last, self.slots.seed[idx], self.slots.ctr[idx],
                          bool(samples))

    def rebuild(self, table: list[Generation | None]) -> None:
        """Rebuild the KV cache of every live sequence (prompt + tokens fed so far) under new weights."""
        live = [(i, g) for i, g in enumerate(table) if g is not None]
        if live:
            self.run([i for i, _ in live], [g.request.prompt_tokens + g.tokens[:-1] for _, g in live], None)

    def share(self, take: list[tuple[int, GenRequest]], lead: list[int]) -> None:
        """Copy each shared prompt's KV rows from the slot that computed them into its group's other slots."""
        copies = [k for k in range(len(take)) if lead[k] != k]
        if not copies:
            return
        lens = [len(take[k][1].prompt_tokens) for k in copies]
        width = max(lens)  # beyond a slot's own prompt the copy is overwritten by decoding before it is read
        self.tokens_shared += sum(lens)
        dst = self.slots.dev([take[k][0] for k in copies])
        src = self.slots.dev([take[lead[k]][0] for k in copies])
        for c in range(0, len(copies), 64):  # bounded temporaries: a gathered chunk is a few tens of MB
            for cache in (self.slots.k_cache, self.slots.v_cache):
                cache[:, dst[c:c + 64], :width] = cache[:, src[c:c + 64], :width]

    def _body(self, ids: Tensor, pos: Tensor, slot_of: Tensor, cu: Tensor, max_len: int, cu_list: list[int] | None,
              last: Tensor, seeds: Tensor, ctr: Tensor, sample_next: bool) -> tuple[Tensor, Tensor] | None:
        k_cache, v_cache = self.slots.k_cache, self.slots.v_cache

        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            k_cache[i].index_put_((slot_of, pos), k)
            v_cache[i].index_put_((slot_of, pos), v)
            return causal_varlen(q, k, v, cu, max_len, cu_list)

        h = self.runner.hidden(ids, pos, attend)
        if not sample_next:
            return None
        return sample(self.runner.logits(h[last]), self.mode.temperature, self.mode.top_p, seeds, ctr)

    # -- the graphed path ---------------------------------------------------------------------------
    def row_bucket(self, rows: int) -> int:
        return next((b for b in ROW_BUCKETS if b >= rows), self.slots.max_batch)

    def all_buckets(self) -> list[tuple[int, int]]:
        """Every (tokens, rows) bucket a prefill of at most ``max_batch`` rows can land in."""
        rows = sorted({self.row_bucket(n) for n in range(1, self.slots.max_batch + 1)})
        return [(T, N) for T in self.buckets for N in rows]

    def capture_all(self) -> None:
        for T, N in self.all_buckets():
            if (T, N) not in self.graphs:
                self.capture(T, N)

    def graphed(self, slots: list[int], seqs: list[list[int]], lens: list[int],
                samples: list[tuple[int, int]] | None) -> tuple[Tensor, Tensor] | None:
        total, n = sum(lens), len(seqs)
        n_out = len(samples or ())
        T = next(b for b in self.buckets if b >= total)
        N = self.row_bucket(max(n, n_out))
        g = self.graphs.get((T, N)) or self.capture(T, N)
        # Host side: padding tokens write into the scratch slot; unused sequences have length zero.
        ids = torch.zeros(T, dtype=torch.int64)
        pos = torch.zeros(T, dtype=torch.int64)
        slot_of = torch.full((T,), self.slots.max_batch, dtype=torch.int64)
        cu = torch.full((N + 1,), total, dtype=torch.int32)
        last = torch.zeros(N, dtype=torch.int64)
        off = 0
        for j, (slot, seq) in enumerate(zip(slots, seqs)):
            ids[off:off + len(seq)] = torch.tensor(seq)
            pos[off:off + len(seq)] = torch.arange(len(seq))
            slot_of[off:off + len(seq)] = slot
            cu[j] = off
            off += len(seq)
        for k, (_, j) in enumerate(samples or ()):
            last[k] = int(cu[j + 1]) - 1  # cu[n] is already total
        cuda = self.slots.device.type == "cuda"
        for dst, src in zip(g["inputs"], (ids, pos, slot_of, cu, last)):
            dst.copy_(src.pin_memory() if cuda else src, non_blocking=True)
        if samples:
            idx = self.slots.dev([sl for sl, _ in samples])
            g["seeds"][:n_out] = self.slots.seed[idx]
            g["ctr"][:n_out] = self.slots.ctr[idx]
        g["graph"].replay()
        if not samples:
            return None
        return g["tok"][:n_out], g["logp"][:n_out]

    def static(self, T: int, N: int) -> tuple[dict, Callable[[], None]]:
        """The fixed input/output buffers of a (T tokens, N rows) prefill graph and the body that fills
        its outputs from its inputs (captured by ``capture``; tests replay it eagerly)."""
        dev, max_batch, max_seq_len = self.slots.device, self.slots.max_batch, self.slots.max_seq_len
        ids, pos = torch.zeros(T, dtype=torch.int64, device=dev), torch.zeros(T, dtype=torch.int64, device=dev)
        slot_of = torch.full((T,), max_batch, dtype=torch.int64, device=dev)
        cu = torch.zeros(N + 1, dtype=torch.int32, device=dev)
        max_len = min(T, max_seq_len)
        cu[1:] = max_len  # one dummy sequence in the scratch slot for warm-up and capture; the rest is padding
        last = torch.zeros(N, dtype=torch.int64, device=dev)
        seeds, ctr = torch.zeros(N, dtype=torch.int64, device=dev), torch.zeros(N, dtype=torch.int64, device=dev)
        pos.copy_(torch.arange(T, device=dev).clamp(max=max_seq_len - 1))
        entry: dict = {"inputs": (ids, pos, slot_of, cu, last), "seeds": seeds, "ctr": ctr}

        def body() -> None:
            entry["tok"], entry["logp"] = self._body(ids, pos, slot_of, cu, max_len, None, last, seeds, ctr, True)
        return entry, body

    def capture(self, T: int, N: int) -> dict:
        t = time.perf_counter()
        entry, body = self.static(T, N)
        # The outputs the capture leaves in entry are the graph's own: every replay rewrites them.
        entry["graph"] = capture(body, self.pool)
        self.graphs[(T, N)] = entry
        self.capture_s += time.perf_counter() - t
        log.info("prefill captured in a CUDA graph for %d tokens / %d sequences", T, N)
        return entry
