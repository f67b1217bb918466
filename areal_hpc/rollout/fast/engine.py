"""Continuous-batching engine over a preallocated per-slot KV cache, with CUDA-graph decode.

``FastEngine`` wires the parts together and runs the step loop:

* ``slots.py``         which sequence holds which slot, admission, compaction (the slot scheduler);
* ``prefill.py``       packed prefill of admitted prompts into their slots, shared per group;
* ``decode.py``        the decode layer: one token for the slots ``[0, n)``, sampled on the GPU;
* ``graphs.py``        the decode step captured per batch bucket and replayed (the graph runner);
* ``decode_kernel.py`` the Triton decode attention, ``tuner.py`` the choice of its split on this GPU;
* ``folded.py``        the decode layer's norms folded into its projections.

One ``step()``: prefill newly admitted prompts (a per-step prompt-token budget keeps a burst of
admissions from stalling decode for long), then one decode step for the slots ``[0, n)``, ``n`` the
smallest batch bucket that holds every live slot; it is launched before the previous step's results
are read, so the host's bookkeeping overlaps device work.

Weights are updated in place (the graphs keep pointing at the same storage). With
``interrupt='recompute'`` the KV cache of every live sequence is rebuilt under the new weights by a
packed prefill; with ``'keep'`` decoding continues on the old cache. Every token records the
version of the weights that computed its logits.

Sampling uses a per-sequence seed (``rollout/sampling.py``), so results do not depend on batching.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable

import torch
from torch import Tensor

from areal_hpc.api import Generation, GenRequest
from areal_hpc.model.qwen2 import PackedQwen2
from areal_hpc.model.tokenizer import Tokenizer
from areal_hpc.rollout.engine import run_to_completion
from areal_hpc.rollout.fast.decode import DecodeStep
from areal_hpc.rollout.fast.decode_kernel import config_name
from areal_hpc.rollout.fast.graphs import DecodeGraphs, decode_buckets
from areal_hpc.rollout.fast.mode import StepMode
from areal_hpc.rollout.fast.prefill import Prefill
from areal_hpc.rollout.fast.slots import SlotScheduler
from areal_hpc.rollout.sampling import triton_available


class FastEngine:
    """The rollout engine for the architectures ``PackedQwen2`` implements (the ``fast`` engine).

    ``warm_up()`` (or ``warm_up=True``) does the one-time work of graph capture and compilation before
    the first step; without it that work lands in the first steps.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, *, max_batch: int, max_new_tokens: int,
                 max_seq_len: int, temperature: float, top_p: float, interrupt: str = "recompute", seed: int = 0,
                 version: int = 0, cuda_graphs: bool = True, prefill_token_budget: int = 16384,
                 admit_min_free: int | None = None, compile_decode: bool = True, share_prompts: bool = True,
                 decode_attention: str = "auto", bucket_step: int = 64, warm_up: bool = False) -> None:
        self.model = model.eval()
        self.tok = tokenizer
        self.max_batch, self.max_new_tokens, self.max_seq_len = max_batch, max_new_tokens, max_seq_len
        self.interrupt = interrupt
        self.version = version
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.generator = torch.Generator().manual_seed(seed)  # its seed is the base of per-sequence seeds
        self.prefill_token_budget = prefill_token_budget
        with torch.no_grad():
            self.runner = PackedQwen2(model, max_positions=max_seq_len, fuse=True)
        self._params = dict(model.named_parameters())
        B, dev = max_batch, self.device
        self.slots = SlotScheduler(self.runner.shape, max_batch=B, max_seq_len=max_seq_len,
                                   max_new_tokens=max_new_tokens, stop_ids=tokenizer.stop_ids, dtype=self.dtype,
                                   device=dev,
                                   admit_min_free=admit_min_free, share_prompts=share_prompts)
        pin = dev.type == "cuda"
        self._host = [[torch.zeros(B, dtype=dt, pin_memory=pin) for dt in (torch.int64, torch.float32) * 2]
                      for _ in range(2)]
        self._inflight: dict | None = None
        self._early: list[Generation] = []  # finished while ``abort`` drained the step in flight
        self._stale: bool = False
        pool = torch.cuda.graph_pool_handle() if dev.type == "cuda" else None
        fused_sampler = triton_available(dev) and temperature > 0 and top_p >= 1.0
        self.mode = StepMode(temperature, top_p, fused_sampler=fused_sampler, graphs=cuda_graphs and dev.type == "cuda")
        self.prefill = Prefill(self.runner, self.slots, self.mode, token_budget=prefill_token_budget, pool=pool)
        self.decode = DecodeStep(self.runner, self.slots, self.mode, attention=decode_attention,
                                 compile=compile_decode, dtype=self.dtype, device=dev)
        s = self.slots
        self.graphs = DecodeGraphs(decode_buckets(B, bucket_step), self.decode, self.decode.first,
                                   (s.tok, s.pos, s.ctr), pool, max_seq_len)
        self.bucket_steps: dict[int, int] = {}
        self.decode_steps = 0
        self.warmup_s = 0.0
        self._steps_capture_s = 0.0  # one-time work (capture, compile) that landed inside step()
        if warm_up:
            self.warm_up()

    # -- public API (same as TorchEngine) --------------------------------------------------------
    def submit(self, requests: Iterable[GenRequest]) -> None:
        self.slots.queue(requests)

    def num_active(self) -> int:
        return self.slots.live + len(self.slots.pending) + (self._inflight is not None) + len(self._early)

    def active_groups(self) -> set[int]:
        return self.slots.active_groups()

    def free_slots(self) -> int:
        return self.max_batch - self.slots.live - len(self.slots.pending)

    def first_versions(self) -> dict[int, int | None]:
        return self.slots.first_versions()

    def abort(self, group_ids: set[int]) -> list[Generation]:
        """Stop every queued or live sequence of ``group_ids`` as it stands and return them (``aborted``).

        The step in flight is applied first (slots must not change under it); sequences it finished
        come out of the next ``step()``.
        """
        self._early += self._drain()
        return self.slots.remove_groups(group_ids)

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> None:
        for name, tensor in named_tensors:
            self._params[name].copy_(tensor)
        self.decode.refresh_weights()
        self.version = version
        live = [g for g in self.slots.table if g is not None]
        for g in live:
            g.interruptions += 1
        if live and self.interrupt == "recompute":
            self._stale = True

    @torch.no_grad()
    def warm_up(self) -> float:
        """Do the one-time work before the first step instead of inside it: capture every decode bucket's
        graph (compiling the layer's compiled pieces with them) and every prefill bucket's graph. Without
        CUDA graphs, run the decode step once per bucket (compiling it where it is compiled). Returns
        the seconds it took (their sum over calls is ``stats()['warmup_s']``).

        Why: done lazily, this work lands in the first steps, inside a benchmark's timed window or the
        RL loop's first rollout steps.
        """
        t = time.perf_counter()
        if self.mode.graphs:
            self.graphs.capture_all()
            self.prefill.capture_all()
        else:
            inputs = (self.slots.tok, self.slots.pos, self.slots.ctr)
            for b in reversed(self.graphs.buckets):
                saved = [x.clone() for x in inputs]
                self.decode.first(b)
                for dst, src in zip(inputs, saved):
                    dst.copy_(src)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        took = time.perf_counter() - t
        self.warmup_s += took
        return took

    @torch.no_grad()
    def step(self) -> list[Generation]:
        """Launch the next decode step, then process the previous one while the GPU runs this one.

        Results therefore arrive one step late; a sequence that finished in the previous step costs
        one wasted row in this one, and the host's bookkeeping and prefill launches overlap device work.
        """
        finished, self._early = self._early, []
        if self._stale:
            finished += self._drain()  # the rebuilt cache must cover every token sampled so far
            self._stale = False
            self.prefill.rebuild(self.slots.table)
        if (target := self.slots.compact_target(self.graphs.buckets)) is not None:
            finished += self._drain()  # slot indices change: no step may be in flight
            if (target := self.slots.compact_target(self.graphs.buckets)) is not None:
                self.slots.compact(target)
        admitted = self._admit()
        launch = self._launch(admitted) if self.slots.live else None
        finished += self._drain()
        self._inflight = launch
        return finished

    def generate(self, requests: list[GenRequest], greedy: bool = False) -> list[Generation]:
        """Run requests to completion (evaluation); only valid while no other work is in flight."""
        self._drain()
        assert not self.slots.live and not self.slots.pending, "generate() needs an idle engine"
        saved = dataclasses.replace(self.mode)
        if greedy:
            self.mode.temperature, self.mode.fused_sampler, self.mode.graphs = 0.0, False, False
        try:
            return run_to_completion(self, requests)
        finally:
            self.mode.temperature, self.mode.fused_sampler, self.mode.graphs = (saved.temperature, saved.fused_sampler,
                                                                               saved.graphs)

    def stats(self) -> dict:
        """Counters for run summaries: how many decode steps ran at which batch bucket, and why; the
        one-time work done up front (``warmup_s``) and what still landed inside steps."""
        steps = max(self.decode_steps, 1)
        attn = self.decode.attn
        return {"decode_steps": self.decode_steps, "tokens_generated": self.tokens_generated,
                "prefill_tokens": self.prefill_tokens, "prefill_tokens_shared": self.prefill_tokens_shared,
                "mean_decode_batch": sum(b * n for b, n in self.bucket_steps.items()) / steps,
                "tokens_per_decode_step": self.tokens_generated / steps,
                "bucket_steps": {str(b): n for b, n in sorted(self.bucket_steps.items())},
                "compactions": self.compactions, "slots_moved": self.slots_moved,
                "warmup_s": self.warmup_s, "capture_s_in_steps": self._steps_capture_s,
                "decode_graphs": len(self.graphs.graphs), "prefill_graphs": len(self.prefill.graphs),
                **({"decode_attention": config_name(attn.config),
                    "decode_attention_us": dict(attn.timings)} if attn is not None else {})}

    # -- settings and counters kept by the parts ---------------------------------------------------
    @property
    def temperature(self) -> float:
        return self.mode.temperature

    @property
    def top_p(self) -> float:
        return self.mode.top_p

    @property
    def tokens_generated(self) -> int:
        return self.slots.tokens_generated

    @property
    def prefill_tokens(self) -> int:
        return self.prefill.tokens

    @property
    def prefill_tokens_shared(self) -> int:
        return self.prefill.tokens_shared

    @property
    def compactions(self) -> int:
        return self.slots.compactions

    @property
    def slots_moved(self) -> int:
        return self.slots.slots_moved

    # -- the step loop ----------------------------------------------------------------------------
    def _admit(self) -> list[int]:
        if not self.slots.pending:
            return []
        t = self.prefill.capture_s
        admitted = self.slots.admit(self.prefill, self.prefill_token_budget, self.generator.initial_seed())
        self._steps_capture_s += self.prefill.capture_s - t
        return admitted

    def _launch(self, admitted: list[int]) -> dict:
        """Enqueue one decode step and the copy of its results (and of new first tokens) to the host."""
        n = self.slots.bucket(self.graphs.buckets)
        if self.mode.graphs:
            if not self.graphs.graphs:  # every bucket at once: a capture (and a recompile) mid-run would stall it
                t = self.graphs.capture_s
                self.graphs.capture_all()
                self._steps_capture_s += self.graphs.capture_s - t
            self.graphs.graphs[n].replay()
        else:
            self.decode(n)
        self.decode_steps += 1
        self.bucket_steps[n] = self.bucket_steps.get(n, 0) + 1
        k = self.decode_steps % 2  # double-buffered pinned outputs: the host reads one while the next fills
        host, s = self._host[k], self.slots
        host[0].copy_(s.out_tok, non_blocking=True)
        host[1].copy_(s.out_logp, non_blocking=True)
        if admitted:
            host[2].copy_(s.pre_tok, non_blocking=True)
            host[3].copy_(s.pre_logp, non_blocking=True)
        event = torch.cuda.Event() if self.device.type == "cuda" else None
        if event is not None:
            event.record()
        return {"slots": list(s.table), "admitted": set(admitted), "version": self.version, "host": host,
                "event": event}

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
        append = self.slots.append
        for slot, g in enumerate(launch["slots"]):
            if g is None or g.finished:
                continue
            if slot in launch["admitted"] and append(slot, g, pre_tok[slot], pre_logp[slot], v, now):
                done.append(g)
                continue
            if append(slot, g, tok_l[slot], logp_l[slot], v, now):
                done.append(g)
        self.slots.reset_freed()
        return done
