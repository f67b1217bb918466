"""Continuous-batching engine over a preallocated per-slot KV cache, with CUDA-graph decode.

The engine owns ``max_batch`` slots. A sequence holds one slot from its prefill to its last token;
the moment it finishes, the slot goes to the next queued request, so a long tail of a few long
sequences never leaves the batch half empty (the HF engine has to wait for half its rows).

One ``step()``:
1. prefill newly admitted prompts, packed without padding (varlen attention), straight into their
   slots' KV cache, and sample each one's first token; a per-step prompt-token budget keeps a burst
   of admissions from stalling decode for long;
2. one decode step for the slots ``[0, n)``, ``n`` the smallest batch bucket (``decode_buckets``:
   max_batch, its halves down to 16, and above 128 every 64 slots) that holds every live slot: a
   fixed-shape forward that writes the new K/V at each slot's position, attends over the slot's
   prefix, samples on the GPU and advances its own inputs.
   On CUDA each bucket is captured once in a CUDA graph and replayed, so a step costs one launch
   instead of hundreds. New requests take the lowest free slots, and when the live sequences thin
   out (a long tail, or an asynchronous rollout held back by the staleness gate) the engine moves
   the high ones down (their KV rows, a few MB each), so the tail of a batch runs at the cost of a
   small batch instead of the full one. Idle slots stay at position 0: they read no cache.

Weights are updated in place (the graph keeps pointing at the same storage). With
``interrupt='recompute'`` the KV cache of every live sequence is rebuilt under the new weights by a
packed prefill; with ``'keep'`` decoding continues on the old cache. Every token records the
version of the weights that computed its logits.

Sampling uses a per-sequence seed (``sampling.py``), so results do not depend on batching.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from areal_hpc.comm.transfer import to_device
from areal_hpc.model.attention import cached_decode, causal_varlen, decode_offsets, flash_decode_works
from areal_hpc.model.decode_kernel import DecodeAttention, config_name, decode_kernel_works, parse_config, split_args
from areal_hpc.model.folded import FoldedWeights, silu_mul, unfold_qkv
from areal_hpc.model.folded import kernel_available as folded_kernel_available
from areal_hpc.model.graphs import capture
from areal_hpc.model.qwen2 import PackedQwen2, Qwen2Shape, rms_norm, split_qkv_rope
from areal_hpc.model.tokenizer import Tokenizer
from areal_hpc.rollout.engine import Generation, GenRequest, first_versions, run_to_completion
from areal_hpc.rollout.sampling import sample, sample_fused, sequence_seed, triton_available

log = logging.getLogger(__name__)


def decode_pre(x: Tensor, ln1: Tensor, w_qkv: Tensor, b_qkv: Tensor | None, s: Qwen2Shape) -> Tensor:
    """Norm and fused q/k/v projection for one token per slot (RoPE is applied by the attention)."""
    return torch.nn.functional.linear(rms_norm(x, ln1, s.eps), w_qkv, b_qkv)


def decode_rope(qkv: Tensor, cos: Tensor, sin: Tensor, s: Qwen2Shape) -> tuple[Tensor, Tensor, Tensor]:
    """q, k (roped) and v from the fused projection: the library attention paths' input."""
    return split_qkv_rope(qkv, cos, sin, s.n_heads, s.n_kv_heads, s.head_dim)


def decode_post(x: Tensor, o: Tensor, wo: Tensor, ln2: Tensor, w_gu: Tensor, wd: Tensor, s: Qwen2Shape) -> Tensor:
    """Output projection, residual, norm and SiLU MLP."""
    x = x + torch.nn.functional.linear(o.reshape(x.shape[0], s.n_heads * s.head_dim), wo)
    g, u = torch.nn.functional.linear(rms_norm(x, ln2, s.eps), w_gu).chunk(2, dim=-1)
    return x + torch.nn.functional.linear(torch.nn.functional.silu(g) * u, wd)


def decode_norm(x: Tensor, w: Tensor, s: Qwen2Shape) -> Tensor:
    return rms_norm(x, w, s.eps)


def decode_act(gu: Tensor) -> Tensor:
    g, u = gu.chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


# How the decode layer's GEMMs and residual adds run (``rollout.decode_layer``):
# inplace  - cuBLAS GEMMs outside the compiled parts, each residual add accumulated into the residual
#            stream by the GEMM itself (addmm_, beta=1); only the norms and the activation are compiled.
#            Compiled whole, inductor emits an out-of-place addmm that first copies the residual:
#            48 device copies per step (H200 profile, tools/bench/NOTES.md).
# folded   - as inplace, with both norms folded into the projections (model/folded.py): the norm
#            weights live in a copy of the q/k/v and gate/up weights, the row scales are applied by
#            the decode attention and the SiLU-mul kernels; 48 fewer launches per step.
# fused    - the norm + projections and the post-attention block each compiled whole (the v7 layer).
# (torch.compile's max-autotune was tried too: 17-23 s of tuning per GEMM shape and bucket, minutes at
# engine start, and it did not finish within a device call; tools/bench/NOTES.md, fifth session.)
DECODE_LAYERS = ("inplace", "folded", "fused")
FINE_ABOVE = 128  # decode rows above which a GEMM stops being bound by reading the weights (H100/H200)


def decode_buckets(max_batch: int, step: int = 64) -> list[int]:
    """Batch sizes that get a decode graph, ascending: ``max_batch`` and its halves down to 16, and every
    ``step`` slots above ``FINE_ABOVE``.

    Why both: up to ~128 rows a decode GEMM's time is reading the weights, so a padded row is almost free
    and halves suffice. Above it the GEMMs are compute-bound (gate/up at ~550 TFLOP/s with 512 rows on an
    H200), so padded rows cost: with halves only, an asynchronous rollout held near 281 live slots by the
    staleness gate ran in the 512 bucket. Measured on an H200, 320 live slots decode in 2.00 ms in the 320
    bucket against 2.17 in the 512 one (tools/bench/NOTES.md, eighth session).
    """
    sizes = {max_batch}
    b = max_batch
    while b > 16 and b % 2 == 0:
        b //= 2
        sizes.add(b)
    if step > 0:
        sizes.update(range(step * (FINE_ABOVE // step + 1), max_batch, step))
    return sorted(sizes)


class FastEngine:
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, *, max_batch: int, max_new_tokens: int,
                 max_seq_len: int, temperature: float, top_p: float, interrupt: str = "recompute", seed: int = 0,
                 version: int = 0, cuda_graphs: bool = True, prefill_token_budget: int = 16384,
                 admit_min_free: int | None = None, compile_decode: bool = True, share_prompts: bool = True,
                 decode_attention: str = "auto", decode_layer: str = "folded", bucket_step: int = 64) -> None:
        if decode_layer not in DECODE_LAYERS:
            raise ValueError(f"decode_layer {decode_layer!r}: choose one of {DECODE_LAYERS}")
        self.model = model.eval()
        self.tok = tokenizer
        self.max_batch, self.max_new_tokens, self.max_seq_len = max_batch, max_new_tokens, max_seq_len
        self.temperature, self.top_p, self.interrupt = temperature, top_p, interrupt
        self.version = version
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.generator = torch.Generator().manual_seed(seed)  # its seed is the base of per-sequence seeds
        self.prefill_token_budget = prefill_token_budget
        self.share_prompts = share_prompts
        self.admit_min_free = admit_min_free if admit_min_free is not None else max(1, max_batch // 16)
        with torch.no_grad():
            self.runner = PackedQwen2(model, max_positions=max_seq_len, fuse=True)
        self._params = dict(model.named_parameters())
        s = self.runner.shape
        B, L, dev = max_batch, max_seq_len, self.device
        cache_shape = (s.n_layers, B + 1, L, s.n_kv_heads, s.head_dim)  # slot B: scratch for graph padding
        self.k_cache = torch.zeros(cache_shape, dtype=self.dtype, device=dev)
        self.v_cache = torch.zeros(cache_shape, dtype=self.dtype, device=dev)
        # Decode inputs per slot: the token to feed, its position, its sequence seed and token index.
        self._tok = torch.zeros(B, dtype=torch.int64, device=dev)
        self._pos = torch.zeros(B, dtype=torch.int64, device=dev)
        self._active = torch.zeros(B, dtype=torch.int64, device=dev)  # 1 for a live slot: its position advances
        self._seed = torch.zeros(B, dtype=torch.int64, device=dev)
        self._ctr = torch.zeros(B, dtype=torch.int64, device=dev)
        self._out_tok = torch.zeros(B, dtype=torch.int64, device=dev)
        self._out_logp = torch.zeros(B, dtype=torch.float32, device=dev)
        self._pre_tok = torch.zeros(B, dtype=torch.int64, device=dev)  # first tokens sampled by prefill
        self._pre_logp = torch.zeros(B, dtype=torch.float32, device=dev)
        pin = dev.type == "cuda"
        self._host = [[torch.zeros(B, dtype=dt, pin_memory=pin) for dt in (torch.int64, torch.float32) * 2]
                      for _ in range(2)]
        self._inflight: dict | None = None
        self._rows = torch.arange(B, device=dev)
        self._graph_pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
        self._prefill_graphs: dict[tuple[int, int], dict] = {}
        top = 1 << max(8, (prefill_token_budget - 1).bit_length())
        self._prefill_buckets = [b for b in (256, 512, 1024, 2048, 4096, 8192, 16384, 32768) if b < top] + [top]
        self._slots: list[Generation | None] = [None] * B
        self._live = 0  # occupied slots; kept as a count because the loop asks several times per step
        self._freed: list[int] = []  # slots freed while draining a step, reset on the device at its end
        self._pending: list[GenRequest] = []
        self._early: list[Generation] = []  # finished while ``abort`` drained the step in flight
        self._stale: bool = False
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._buckets = decode_buckets(B, bucket_step)  # ascending
        self._hi = 0  # one past the highest live slot; None when it must be recounted
        self.compactions = 0
        self.slots_moved = 0
        self.bucket_steps: dict[int, int] = {}
        self._use_graph = cuda_graphs and dev.type == "cuda"
        self._fused_sampler = triton_available(dev) and temperature > 0 and top_p >= 1.0
        self._fused_attn = decode_kernel_works(dev, self.dtype, s.n_heads, s.n_kv_heads, s.head_dim)
        self._attn = DecodeAttention(s.n_heads, s.n_kv_heads, s.head_dim, B, L, dev) if self._fused_attn else None
        if self._attn is not None:
            if decode_attention == "auto" and dev.type == "cuda":  # nothing live yet: timing may write layer 0's cache
                self._attn.tune(self.runner._cos, self.runner._sin, self.k_cache[0], self.v_cache[0], self.dtype)
                log.info("decode attention: %s chosen (us per call: %s)", config_name(self._attn.config),
                         {k: round(v, 1) for k, v in self._attn.timings.items()})
            elif decode_attention != "auto":
                self._attn.configure(**split_args(parse_config(decode_attention)))
        flash = not self._fused_attn and flash_decode_works(dev, self.dtype, s.n_heads, s.n_kv_heads, s.head_dim)
        self._offsets = decode_offsets(B, s.n_heads, s.n_kv_heads, L, dev) if flash else None
        self.decode_layer = decode_layer
        self._fold = FoldedWeights(self.runner.layers) if decode_layer == "folded" else None
        self._fold_kernel = folded_kernel_available(dev)
        self._compiled = compile_decode and dev.type == "cuda" and triton_available(dev)
        self._set_layer(self._compiled)
        self.tokens_generated = 0
        self.prefill_tokens = 0
        self.prefill_tokens_shared = 0  # prompt tokens not computed: copied from a group member's prefill
        self.decode_steps = 0

    # -- public API (same as TorchEngine) --------------------------------------------------------
    def submit(self, requests: Iterable[GenRequest]) -> None:
        for r in requests:
            need = len(r.prompt_tokens) + self._limit(r)
            if need > self.max_seq_len:
                raise ValueError(
                    f"request {r.sample_id}: prompt of {len(r.prompt_tokens)} tokens + up to {self._limit(r)} new "
                    f"tokens exceeds the KV cache length model.max_seq_len={self.max_seq_len}; raise model.max_seq_len"
                )
            self._pending.append(r)

    def num_active(self) -> int:
        return self._n_live() + len(self._pending) + (self._inflight is not None) + len(self._early)

    def active_groups(self) -> set[int]:
        return {g.request.group_id for g in self._slots if g is not None} | {r.group_id for r in self._pending}

    def free_slots(self) -> int:
        return self.max_batch - self._n_live() - len(self._pending)

    def first_versions(self) -> dict[int, int | None]:
        return first_versions((g for g in self._slots if g is not None), self._pending)

    def abort(self, group_ids: set[int]) -> list[Generation]:
        """Stop every queued or live sequence of ``group_ids`` as it stands and return them (``aborted``).

        The step in flight is applied first (slots must not change under it); sequences it finished
        come out of the next ``step()``.
        """
        self._early += self._drain()
        now = time.time()
        out = [Generation(r) for r in self._pending if r.group_id in group_ids]
        self._pending = [r for r in self._pending if r.group_id not in group_ids]
        for slot, g in enumerate(self._slots):
            if g is not None and g.request.group_id in group_ids:
                out.append(g)
                self._slots[slot] = None
                self._live -= 1
                self._freed.append(slot)
                self._hi = None
        self._reset_freed()
        for g in out:
            g.aborted, g.t_end = True, now
        return out

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        for name, tensor in named_tensors:
            self._params[name].copy_(tensor)
        if self._fold is not None:
            self._fold.refresh()
        self.version = version
        live = [g for g in self._slots if g is not None]
        for g in live:
            g.interruptions += 1
        if live and self.interrupt == "recompute":
            self._stale = True

    @torch.no_grad()
    def step(self) -> list[Generation]:
        """Launch the next decode step, then process the previous one while the GPU runs this one.

        Results therefore arrive one step late; a sequence that finished in the previous step costs
        one wasted row in this one, and the host's bookkeeping and prefill launches overlap device work.
        """
        finished, self._early = self._early, []
        if self._stale:
            finished += self._drain()  # the rebuilt cache must cover every token sampled so far
            self._recompute()
        if (target := self._compact_target()) is not None:
            finished += self._drain()  # slot indices change: no step may be in flight
            if (target := self._compact_target()) is not None:
                self._compact(target)
        admitted = self._admit()
        launch = self._launch(admitted) if self._n_live() else None
        finished += self._drain()
        self._inflight = launch
        return finished

    def generate(self, requests: list[GenRequest], greedy: bool = False) -> list[Generation]:
        """Run requests to completion (evaluation); only valid while no other work is in flight."""
        self._drain()
        assert not self._n_live() and not self._pending, "generate() needs an idle engine"
        saved = self.temperature, self._fused_sampler, self._use_graph
        if greedy:
            self.temperature, self._fused_sampler, self._use_graph = 0.0, False, False
        try:
            return run_to_completion(self, requests)
        finally:
            self.temperature, self._fused_sampler, self._use_graph = saved

    def stats(self) -> dict:
        """Counters for run summaries: how many decode steps ran at which batch bucket, and why."""
        steps = max(self.decode_steps, 1)
        return {"decode_steps": self.decode_steps, "tokens_generated": self.tokens_generated,
                "prefill_tokens": self.prefill_tokens, "prefill_tokens_shared": self.prefill_tokens_shared,
                "mean_decode_batch": sum(b * n for b, n in self.bucket_steps.items()) / steps,
                "tokens_per_decode_step": self.tokens_generated / steps,
                "bucket_steps": {str(b): n for b, n in sorted(self.bucket_steps.items())},
                "compactions": self.compactions, "slots_moved": self.slots_moved, "decode_layer": self.decode_layer,
                **({"decode_attention": config_name(self._attn.config),
                    "decode_attention_us": dict(self._attn.timings)} if self._attn is not None else {})}

    # -- internals -------------------------------------------------------------------------------
    def _n_live(self) -> int:
        return self._live

    def _dev(self, values: list[int] | Tensor, dtype: torch.dtype = torch.int64) -> Tensor:
        """Host values on the engine's device without waiting for the step in flight (comm/transfer.py)."""
        return to_device(values, self.device, dtype)

    def _limit(self, r: GenRequest) -> int:
        return min(r.max_tokens or self.max_new_tokens, self.max_new_tokens)

    def _append(self, slot: int, g: Generation, tok: int, logp: float, version: int, now: float) -> bool:
        """Record one sampled token; on EOS or the length limit finish ``g`` and free its slot."""
        self.tokens_generated += 1
        g.tokens.append(tok)
        g.logprobs.append(logp)
        g.versions.append(version)
        if tok == self.tok.eos_id or len(g.tokens) >= self._limit(g.request):
            g.finished, g.t_end = True, now
            self._slots[slot] = None
            self._live -= 1
            self._freed.append(slot)
            if self._hi is not None and slot + 1 == self._hi:
                self._hi = None
            return True
        return False

    def _prefill(self, slots: list[int], seqs: list[list[int]],
                 samples: list[tuple[int, int]] | None) -> tuple[Tensor, Tensor] | None:
        """Packed prefill of ``seqs`` into ``slots``' caches; with ``samples``, sample next tokens.

        ``samples[k] = (slot, j)``: token k is drawn from the logits after the last token of ``seqs[j]``
        with ``slot``'s seed and counter, so one prefill of a prompt can start every sequence of its
        group. On CUDA it replays a graph captured for the smallest (tokens, rows) bucket that fits: an
        eager prefill is ~1500 small launches, which on a slow host costs tens of milliseconds.
        """
        lens = [len(s) for s in seqs]
        total = sum(lens)
        n_rows = max(len(seqs), len(samples or ()))
        if self._use_graph and total <= self._prefill_buckets[-1] and n_rows <= self.max_batch:
            self.prefill_tokens += total
            return self._prefill_graphed(slots, seqs, lens, samples)
        if self._use_graph and len(seqs) > 1:  # too large for one graph: split (only a mass recompute gets here)
            half = len(seqs) // 2
            if samples is None:
                self._prefill(slots[:half], seqs[:half], None)
                return self._prefill(slots[half:], seqs[half:], None)
            lo = [k for k, (_, j) in enumerate(samples) if j < half]
            hi = [k for k, (_, j) in enumerate(samples) if j >= half]
            a = self._prefill(slots[:half], seqs[:half], [samples[k] for k in lo])
            b = self._prefill(slots[half:], seqs[half:], [(samples[k][0], samples[k][1] - half) for k in hi])
            back = self._dev(torch.tensor(lo + hi).argsort())  # results back in the order of samples
            return torch.cat([a[0], b[0]])[back], torch.cat([a[1], b[1]])[back]
        self.prefill_tokens += total
        cu_list = [0]
        for n in lens:
            cu_list.append(cu_list[-1] + n)
        ids = self._dev([t for s in seqs for t in s])
        pos = self._dev(torch.cat([torch.arange(n) for n in lens]))
        slot_of = self._dev(torch.repeat_interleave(torch.tensor(slots), torch.tensor(lens)))
        cu = self._dev(cu_list, torch.int32)
        samples = samples or []
        last = self._dev([cu_list[j + 1] - 1 for _, j in samples])
        idx = self._dev([sl for sl, _ in samples])
        return self._prefill_body(ids, pos, slot_of, cu, max(lens), cu_list, last, self._seed[idx], self._ctr[idx],
                                  bool(samples))

    def _prefill_body(self, ids: Tensor, pos: Tensor, slot_of: Tensor, cu: Tensor, max_len: int,
                      cu_list: list[int] | None, last: Tensor, seeds: Tensor, ctr: Tensor,
                      sample_next: bool) -> tuple[Tensor, Tensor] | None:
        def attend(i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            self.k_cache[i].index_put_((slot_of, pos), k)
            self.v_cache[i].index_put_((slot_of, pos), v)
            return causal_varlen(q, k, v, cu, max_len, cu_list)

        h = self.runner.hidden(ids, pos, attend)
        if not sample_next:
            return None
        return sample(self.runner.logits(h[last]), self.temperature, self.top_p, seeds, ctr)

    def _prefill_graphed(self, slots: list[int], seqs: list[list[int]], lens: list[int],
                         samples: list[tuple[int, int]] | None) -> tuple[Tensor, Tensor] | None:
        total, n = sum(lens), len(seqs)
        n_out = len(samples or ())
        T = next(b for b in self._prefill_buckets if b >= total)
        N = next((b for b in (8, 32, 128, 512, 2048) if b >= max(n, n_out)), self.max_batch)
        g = self._prefill_graphs.get((T, N)) or self._capture_prefill(T, N)
        # Host side: padding tokens write into the scratch slot; unused sequences have length zero.
        ids = torch.zeros(T, dtype=torch.int64)
        pos = torch.zeros(T, dtype=torch.int64)
        slot_of = torch.full((T,), self.max_batch, dtype=torch.int64)
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
        for dst, src in zip(g["inputs"], (ids, pos, slot_of, cu, last)):
            dst.copy_(src.pin_memory() if self.device.type == "cuda" else src, non_blocking=True)
        if samples:
            idx = self._dev([sl for sl, _ in samples])
            g["seeds"][:n_out] = self._seed[idx]
            g["ctr"][:n_out] = self._ctr[idx]
        g["graph"].replay()
        if not samples:
            return None
        return g["tok"][:n_out], g["logp"][:n_out]

    def _prefill_static(self, T: int, N: int) -> tuple[dict, Callable[[], None]]:
        """The fixed input/output buffers of a (T tokens, N rows) prefill graph and the body that fills
        its outputs from its inputs (captured by ``_capture_prefill``; tests replay it eagerly)."""
        dev = self.device
        ids, pos = torch.zeros(T, dtype=torch.int64, device=dev), torch.zeros(T, dtype=torch.int64, device=dev)
        slot_of = torch.full((T,), self.max_batch, dtype=torch.int64, device=dev)
        cu = torch.zeros(N + 1, dtype=torch.int32, device=dev)
        max_len = min(T, self.max_seq_len)
        cu[1:] = max_len  # one dummy sequence in the scratch slot for warm-up and capture; the rest is padding
        last = torch.zeros(N, dtype=torch.int64, device=dev)
        seeds, ctr = torch.zeros(N, dtype=torch.int64, device=dev), torch.zeros(N, dtype=torch.int64, device=dev)
        pos.copy_(torch.arange(T, device=dev).clamp(max=self.max_seq_len - 1))
        entry: dict = {"inputs": (ids, pos, slot_of, cu, last), "seeds": seeds, "ctr": ctr}

        def body() -> None:
            entry["tok"], entry["logp"] = self._prefill_body(ids, pos, slot_of, cu, max_len, None, last, seeds, ctr,
                                                             True)
        return entry, body

    def _capture_prefill(self, T: int, N: int) -> dict:
        entry, body = self._prefill_static(T, N)
        # The outputs the capture leaves in entry are the graph's own: every replay rewrites them.
        entry["graph"] = capture(body, self._graph_pool)
        self._prefill_graphs[(T, N)] = entry
        log.info("prefill captured in a CUDA graph for %d tokens / %d sequences", T, N)
        return entry

    def _admit(self) -> list[int]:
        """Move queued requests into free slots and prefill them (device side only, no sync).

        Admission waits until ``admit_min_free`` slots are free (or none is live): each prefill is a
        burst of eager launches, so admitting one request per step would cost more than it gains.
        Requests with the same prompt (a group's samples) share one prefill: the prompt is computed
        once, its KV rows are copied into the other slots, and each slot samples its own first token
        from the shared logits with its own seed, so results equal separate prefills.
        """
        n_free = self.max_batch - self._live
        if not self._pending or not n_free or (self._live and n_free < min(self.admit_min_free, len(self._pending))):
            return []
        free = [i for i, g in enumerate(self._slots) if g is None]
        take: list[tuple[int, GenRequest]] = []
        lead: list[int] = []  # per taken request: the index of the one whose prefill it shares
        first: dict[tuple[int, ...], int] = {}
        budget = self.prefill_token_budget
        while self._pending and len(take) < len(free):
            r = self._pending[0]
            key = tuple(r.prompt_tokens)
            shared = self.share_prompts and key in first
            if take and not shared and len(r.prompt_tokens) > budget:
                break
            if not shared:
                budget -= len(r.prompt_tokens)
                first.setdefault(key, len(take))
            lead.append(first[key] if self.share_prompts else len(take))
            take.append((free[len(take)], self._pending.pop(0)))
        base = self.generator.initial_seed()
        slots = [s for s, _ in take]
        idx = self._dev(slots)
        seeds = self._dev([sequence_seed(base, r.sample_id) for _, r in take])
        self._seed[idx] = seeds
        self._ctr.index_fill_(0, idx, 0)  # not t[idx] = 0: that copies a CPU scalar, a sync
        leaders = sorted(set(lead))
        seq_of = {k: j for j, k in enumerate(leaders)}
        tok, logp = self._prefill([slots[k] for k in leaders], [take[k][1].prompt_tokens for k in leaders],
                                  samples=[(slot, seq_of[lead[k]]) for k, slot in enumerate(slots)])
        self._copy_prompt_cache(take, lead)
        self._pre_tok[idx] = tok
        self._pre_logp[idx] = logp
        # Decode inputs: the sampled token goes in at position len(prompt), as token index 1.
        self._tok[idx] = tok
        self._pos[idx] = self._dev([len(r.prompt_tokens) for _, r in take])
        self._ctr.index_fill_(0, idx, 1)
        self._active.index_fill_(0, idx, 1)
        for slot, r in take:
            self._slots[slot] = Generation(r)
        self._live += len(take)
        if self._hi is not None:
            self._hi = max(self._hi, 1 + max(slots))
        return slots

    def _copy_prompt_cache(self, take: list[tuple[int, GenRequest]], lead: list[int]) -> None:
        """Copy each shared prompt's KV rows from the slot that computed them into its group's other slots."""
        copies = [k for k in range(len(take)) if lead[k] != k]
        if not copies:
            return
        lens = [len(take[k][1].prompt_tokens) for k in copies]
        width = max(lens)  # beyond a slot's own prompt the copy is overwritten by decoding before it is read
        self.prefill_tokens_shared += sum(lens)
        dst = self._dev([take[k][0] for k in copies])
        src = self._dev([take[lead[k]][0] for k in copies])
        for c in range(0, len(copies), 64):  # bounded temporaries: a gathered chunk is a few tens of MB
            for cache in (self.k_cache, self.v_cache):
                cache[:, dst[c:c + 64], :width] = cache[:, src[c:c + 64], :width]

    def _recompute(self) -> None:
        """Rebuild the KV cache of every live sequence (prompt + tokens fed so far) under new weights."""
        live = [(i, g) for i, g in enumerate(self._slots) if g is not None]
        self._stale = False
        if live:
            self._prefill([i for i, _ in live], [g.request.prompt_tokens + g.tokens[:-1] for _, g in live], None)

    def _decode_body(self, n: int) -> None:
        """One token for the slots ``[0, n)``, in the layer form ``decode_layer`` names. The cache write
        and attention stay outside any compiled part: an in-place write into a compiled function's
        input would make it copy the whole cache every step."""
        pos = self._pos[:n]
        lengths = None if self._fused_attn else (pos + 1).to(torch.int32)
        run, shape = self.runner, self.runner.shape
        x = torch.nn.functional.embedding(self._tok[:n], run.embed)
        cos, sin = (None, None) if self._fused_attn else run.rope_tables(pos, x.dtype)
        fold = self._fold
        for i, L in enumerate(run.layers):
            if fold is not None:  # the input norm is folded into the weights; the attention applies its row scale
                qkv = torch.mm(x, fold.w_qkv[i].t())
            else:
                qkv = self._pre(x, L.ln1, L.w_qkv, L.b_qkv, shape)
            kc, vc = self.k_cache[i, :n], self.v_cache[i, :n]
            if self._fused_attn:
                folded = () if fold is None else (x, L.b_qkv, shape.eps)
                o = self._attn(qkv, run._cos, run._sin, kc, vc, pos, *folded)
            else:
                if fold is not None:
                    qkv = unfold_qkv(qkv, x, L.b_qkv, shape.eps)
                q, k, v = self._rope(qkv, cos, sin, shape)
                kc.index_put_((self._rows[:n], pos), k)
                vc.index_put_((self._rows[:n], pos), v)
                o = cached_decode(q, kc, vc, lengths, self._offsets_for(n))
            if self.decode_layer == "fused":
                x = self._post(x, o, L.wo, L.ln2, L.w_gu, L.wd, shape)
            else:
                x = self._post_inplace(x, o, L, i, shape)
        logits = run.logits(self._norm(x, run.norm, shape))
        seed, ctr = self._seed[:n], self._ctr[:n]
        if self._fused_sampler:
            sample_fused(logits, self.temperature, seed, ctr, self._out_tok[:n], self._out_logp[:n])
        else:
            tok, logp = sample(logits, self.temperature, self.top_p, seed, ctr)
            self._out_tok[:n].copy_(tok)
            self._out_logp[:n].copy_(logp)
        # The graph advances its own inputs; idle slots stay at position 0 and are ignored.
        self._tok[:n].copy_(self._out_tok[:n])
        pos.copy_((pos + self._active[:n]).clamp(max=self.max_seq_len - 1))
        ctr.add_(1)

    def _set_layer(self, compiled: bool) -> None:
        """The decode layer's pieces, compiled (static per bucket at first; torch marks the batch
        dynamic once it changes) or eager."""
        fns = dict(pre=decode_pre, rope=decode_rope, post=decode_post, norm=decode_norm, act=decode_act)
        if compiled:
            fns = {k: torch.compile(f, fullgraph=True) for k, f in fns.items()}
        self._pre, self._rope, self._post, self._norm, self._act = (fns[k] for k in ("pre", "rope", "post", "norm",
                                                                                     "act"))
        self._compiled = compiled

    def _post_inplace(self, x: Tensor, o: Tensor, L, i: int, shape: Qwen2Shape) -> Tensor:
        """Output projection and MLP with both residual adds done by the GEMMs, into ``x`` itself."""
        x.addmm_(o.reshape(x.shape[0], shape.n_heads * shape.head_dim), L.wo.t())
        if self._fold is not None:  # the norm is folded into w_gu; the SiLU-mul applies its row scale
            act = silu_mul(torch.mm(x, self._fold.w_gu[i].t()), x, shape.eps, self._fold_kernel)
        else:
            act = self._act(torch.mm(self._norm(x, L.ln2, shape), L.w_gu.t()))
        return x.addmm_(act, L.wd.t())

    def _offsets_for(self, n: int) -> tuple[Tensor, Tensor] | None:
        if self._offsets is None:
            return None
        cu_q, cu_k = self._offsets
        return cu_q[:n + 1], cu_k[:n + 1]

    def _capture(self, n: int) -> torch.cuda.CUDAGraph:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        # Warm-up and capture advance the decode inputs, so they are restored afterwards. The cache is
        # not: they only write keys/values at or after each slot's position, which real decoding
        # overwrites before reading (a copy would cost as much memory again as the cache itself).
        saved = [t.clone() for t in (self._tok, self._pos, self._ctr)]
        with torch.cuda.stream(s):
            try:
                self._decode_body(n)
            except Exception as e:  # an inductor failure must not stop generation: run the eager layer
                if not self._compiled:
                    raise
                log.warning("torch.compile of the decode layer failed (%s); decoding with the eager layer", e)
                self._set_layer(False)
            for _ in range(2):  # warm-up: Triton compiles, cuBLAS picks kernels, outside the capture
                self._decode_body(n)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            self._decode_body(n)
        for dst, src in zip((self._tok, self._pos, self._ctr), saved):
            dst.copy_(src)
        del saved
        self._graphs[n] = graph
        log.info("decode step captured in a CUDA graph (batch %d of %d, cache length %d)", n, self.max_batch,
                 self.max_seq_len)
        return graph

    def _bucket(self) -> int:
        """The smallest batch bucket that holds every live slot."""
        if self._hi is None:
            self._hi = 1 + max((i for i, g in enumerate(self._slots) if g is not None), default=-1)
        return next(b for b in self._buckets if b >= self._hi)

    def _launch(self, admitted: list[int]) -> dict:
        """Enqueue one decode step and the copy of its results (and of new first tokens) to the host."""
        n = self._bucket()
        if self._use_graph:
            if not self._graphs:  # every bucket at once: a capture (and a recompile) mid-run would stall it
                for b in reversed(self._buckets):
                    self._capture(b)
            self._graphs[n].replay()
        else:
            self._decode_body(n)
        self.decode_steps += 1
        self.bucket_steps[n] = self.bucket_steps.get(n, 0) + 1
        k = self.decode_steps % 2  # double-buffered pinned outputs: the host reads one while the next fills
        host = self._host[k]
        host[0].copy_(self._out_tok, non_blocking=True)
        host[1].copy_(self._out_logp, non_blocking=True)
        if admitted:
            host[2].copy_(self._pre_tok, non_blocking=True)
            host[3].copy_(self._pre_logp, non_blocking=True)
        event = torch.cuda.Event() if self.device.type == "cuda" else None
        if event is not None:
            event.record()
        return {"slots": list(self._slots), "admitted": set(admitted), "version": self.version, "host": host,
                "event": event}

    def _compact_target(self) -> int | None:
        """The bucket the live slots would fit after moving the high ones down, when that is at most
        3/4 of the current one (a move costs a copy of those slots' KV rows, so not for a few rows) and
        no queued request is about to fill the gaps; else None."""
        if self._pending or not self._live:
            return None
        want = next(b for b in self._buckets if b >= self._live)
        return want if 4 * want <= 3 * self._bucket() else None

    def _compact(self, target: int) -> None:
        """Move every live slot at or above ``target`` into a free slot below it: its KV rows (up to its
        position), decode inputs and bookkeeping. Called with no step in flight."""
        src = [i for i in range(target, len(self._slots)) if self._slots[i] is not None]
        dst = [i for i in range(target) if self._slots[i] is None][:len(src)]
        if not src:
            return
        si, di = self._dev(src), self._dev(dst)
        width = 1 + max(len(self._slots[i].request.prompt_tokens) + len(self._slots[i].tokens) for i in src)
        width = min(width, self.max_seq_len)
        for c in range(0, len(src), 16):  # a few MB per slot: in groups, so the gather stays small
            a, b = si[c:c + 16], di[c:c + 16]
            for cache in (self.k_cache, self.v_cache):
                cache[:, b, :width] = cache[:, a, :width]
        for t in (self._tok, self._pos, self._seed, self._ctr, self._active):
            t[di] = t[si]
        self._active.index_fill_(0, si, 0)
        self._pos.index_fill_(0, si, 0)
        for i, j in zip(src, dst):
            self._slots[j], self._slots[i] = self._slots[i], None
        self._hi = None
        self.compactions += 1
        self.slots_moved += len(src)

    def _drain(self) -> list[Generation]:
        """Apply the in-flight step's tokens to their sequences; free the slots of finished ones."""
        launch, self._inflight = self._inflight, None
        if launch is None:
            return []
        if launch["event"] is not None:
            launch["event"].synchronize()
        host = launch["host"]
        tok_l, logp_l = host[0].tolist(), host[1].tolist()
        if launch["admitted"]:
            pre_tok, pre_logp = host[2].tolist(), host[3].tolist()
        v = launch["version"]
        now = time.time()
        done: list[Generation] = []
        for slot, g in enumerate(launch["slots"]):
            if g is None or g.finished:
                continue
            if slot in launch["admitted"] and self._append(slot, g, pre_tok[slot], pre_logp[slot], v, now):
                done.append(g)
                continue
            if self._append(slot, g, tok_l[slot], logp_l[slot], v, now):
                done.append(g)
        self._reset_freed()
        return done

    def _reset_freed(self) -> None:
        if self._freed:  # a freed slot stops advancing and reading its old cache
            idx = self._dev(self._freed)
            self._active.index_fill_(0, idx, 0)
            self._pos.index_fill_(0, idx, 0)
            self._freed.clear()
