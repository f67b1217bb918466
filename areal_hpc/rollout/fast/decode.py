"""The decode layer: one token for the slots ``[0, n)``, a fixed-shape forward that a CUDA graph captures.

It writes the new K/V at each slot's position, attends over the slot's prefix, samples on the GPU
and advances its own inputs, so a replay needs nothing from the host. Both RMSNorms are folded into
the projections (``folded.py``) because that form has the fewest launches per step; the attention is
the Triton decode kernel (``decode_kernel.py``) where it builds and matches a reference, else torch's
flash decode, else SDPA. The split of the Triton kernel is timed on this GPU when the engine starts.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from areal_hpc.model.attention import cached_decode, decode_offsets, flash_decode_works
from areal_hpc.model.qwen2 import PackedQwen2, Qwen2Shape, rms_norm, split_qkv_rope
from areal_hpc.rollout.fast.decode_kernel import (
    DecodeAttention,
    config_name,
    decode_kernel_works,
    parse_config,
    split_args,
)
from areal_hpc.rollout.fast.folded import FoldedWeights, silu_mul, unfold_qkv
from areal_hpc.rollout.fast.folded import kernel_available as folded_kernel_available
from areal_hpc.rollout.fast.mode import StepMode
from areal_hpc.rollout.fast.slots import SlotScheduler
from areal_hpc.rollout.fast.tuner import tune
from areal_hpc.rollout.sampling import sample, sample_fused, triton_available

log = logging.getLogger(__name__)


def decode_rope(qkv: Tensor, cos: Tensor, sin: Tensor, s: Qwen2Shape) -> tuple[Tensor, Tensor, Tensor]:
    """q, k (roped) and v from the fused projection: the library attention paths' input."""
    return split_qkv_rope(qkv, cos, sin, s.n_heads, s.n_kv_heads, s.head_dim)


def decode_norm(x: Tensor, w: Tensor, s: Qwen2Shape) -> Tensor:
    return rms_norm(x, w, s.eps)


class DecodeStep:
    """``step(n)``: one decode step over the slots ``[0, n)`` of ``slots``.

    The GEMMs run in cuBLAS outside any compiled part, each residual add accumulated into the residual
    stream by the GEMM itself (``addmm_``, beta=1); compiled whole, inductor emits an out-of-place addmm
    that first copies the residual. The cache write and attention stay outside any compiled part too:
    an in-place write into a compiled function's input would make it copy the whole cache every step.
    Only the final norm (and the library attention paths' RoPE) is compiled. (torch.compile's
    max-autotune was tried: tens of seconds of tuning per GEMM shape and bucket at engine start.)
    """

    def __init__(self, runner: PackedQwen2, slots: SlotScheduler, mode: StepMode, *, attention: str, compile: bool,
                 dtype: torch.dtype, device: torch.device) -> None:
        s = runner.shape
        B, L, dev = slots.max_batch, slots.max_seq_len, device
        self.runner, self.slots, self.mode = runner, slots, mode
        self.fused_attn = decode_kernel_works(dev, dtype, s.n_heads, s.n_kv_heads, s.head_dim)
        self.attn = DecodeAttention(s.n_heads, s.n_kv_heads, s.head_dim, B, L, dev) if self.fused_attn else None
        if self.attn is not None:
            if attention == "auto" and dev.type == "cuda":  # nothing live yet: timing may write layer 0's cache
                tune(self.attn, runner._cos, runner._sin, slots.k_cache[0], slots.v_cache[0], dtype)
                log.info("decode attention: %s chosen (us per call: %s)", config_name(self.attn.config),
                         {k: round(v, 1) for k, v in self.attn.timings.items()})
            elif attention != "auto":
                self.attn.configure(**split_args(parse_config(attention)))
        flash = not self.fused_attn and flash_decode_works(dev, dtype, s.n_heads, s.n_kv_heads, s.head_dim)
        self.offsets = decode_offsets(B, s.n_heads, s.n_kv_heads, L, dev) if flash else None
        self.fold = FoldedWeights(runner.layers)
        self.fold_kernel = folded_kernel_available(dev)
        self.compiled = compile and dev.type == "cuda" and triton_available(dev)
        self.set_compiled(self.compiled)

    @property
    def attention_name(self) -> str:
        return "triton" if self.fused_attn else ("flash" if self.offsets is not None else "sdpa")

    def set_compiled(self, compiled: bool) -> None:
        """The compiled pieces (static per bucket at first; torch marks the batch dynamic once it changes)
        or their eager forms."""
        rope, norm = decode_rope, decode_norm
        if compiled:
            rope, norm = torch.compile(rope, fullgraph=True), torch.compile(norm, fullgraph=True)
        self._rope, self._norm = rope, norm
        self.compiled = compiled

    def refresh_weights(self) -> None:
        """After a weight update: the folded copies are rewritten in place (graphs keep pointing at them)."""
        self.fold.refresh()

    def first(self, n: int) -> None:
        """The first run at bucket ``n`` (it compiles): an inductor failure must not stop generation,
        so it falls back to the eager layer."""
        try:
            self(n)
        except Exception as e:
            if not self.compiled:
                raise
            log.warning("torch.compile of the decode layer failed (%s); decoding with the eager layer", e)
            self.set_compiled(False)

    def __call__(self, n: int) -> None:
        sl, mode = self.slots, self.mode
        pos = sl.pos[:n]
        lengths = None if self.fused_attn else (pos + 1).to(torch.int32)
        run, shape = self.runner, self.runner.shape
        x = torch.nn.functional.embedding(sl.tok[:n], run.embed)
        cos, sin = (None, None) if self.fused_attn else run.rope_tables(pos, x.dtype)
        fold = self.fold
        for i, L in enumerate(run.layers):
            # the input norm is folded into the weights; the attention applies its row scale
            qkv = torch.mm(x, fold.w_qkv[i].t())
            kc, vc = sl.k_cache[i, :n], sl.v_cache[i, :n]
            if self.fused_attn:
                o = self.attn(qkv, run._cos, run._sin, kc, vc, pos, x, L.b_qkv, shape.eps)
            else:
                qkv = unfold_qkv(qkv, x, L.b_qkv, shape.eps)
                q, k, v = self._rope(qkv, cos, sin, shape)
                kc.index_put_((sl.rows[:n], pos), k)
                vc.index_put_((sl.rows[:n], pos), v)
                o = cached_decode(q, kc, vc, lengths, self._offsets_for(n))
            # output projection and MLP, both residual adds done by the GEMMs into x itself; the post-
            # attention norm is folded into w_gu and the SiLU-mul applies its row scale
            x.addmm_(o.reshape(x.shape[0], shape.n_heads * shape.head_dim), L.wo.t())
            act = silu_mul(torch.mm(x, fold.w_gu[i].t()), x, shape.eps, self.fold_kernel)
            x = x.addmm_(act, L.wd.t())
        logits = run.logits(self._norm(x, run.norm, shape))
        seed, ctr = sl.seed[:n], sl.ctr[:n]
        if mode.fused_sampler:
            sample_fused(logits, mode.temperature, seed, ctr, sl.out_tok[:n], sl.out_logp[:n])
        else:
            tok, logp = sample(logits, mode.temperature, mode.top_p, seed, ctr)
            sl.out_tok[:n].copy_(tok)
            sl.out_logp[:n].copy_(logp)
        # The graph advances its own inputs; idle slots stay at position 0 and are ignored.
        sl.tok[:n].copy_(sl.out_tok[:n])
        pos.copy_((pos + sl.active[:n]).clamp(max=sl.max_seq_len - 1))
        ctr.add_(1)

    def _offsets_for(self, n: int) -> tuple[Tensor, Tensor] | None:
        if self.offsets is None:
            return None
        cu_q, cu_k = self.offsets
        return cu_q[:n + 1], cu_k[:n + 1]
