"""Decode attention as one Triton kernel: RoPE, cache write, split-K attention and the merge.

Why kernels of our own: at decode, each slot has one query per head and a cache prefix of its own
length. Library kernels pad the query tile to 64-128 rows (one real row per head), and need RoPE,
a contiguous copy of the value and index kernels to write the new key first: per layer that was
~35 us of attention plus five small launches. Here:

* it reads q, k and v straight out of the fused q/k/v projection's output, applies
  RoPE (fp32 tables, so no per-step cast of the tables), stores the new key/value in the slot's
  cache and attends over one CHUNK of the slot's valid prefix. One program serves one (slot, KV
  head, chunk): the G query heads sharing that KV head are the rows of a small tile, and the
  chunks of one slot run in parallel (split-K), so a batch of long prefixes is not a few hundred
  serial loops. Chunks past a slot's length exit at once;
* the chunks' (max, sum, weighted values) are merged by the last chunk of each (slot, KV head) to
  finish (an atomic count), so there is no second launch; a prefix that fits one chunk is written
  straight out.

An earlier single-kernel version (one program looping over the whole prefix) was latency-bound at
about twice the time its bytes need. The split-K kernel with
one tile per program is latency-bound too, differently: ~2.5 waves of short programs per layer at
batch 256, each paying the position load, RoPE and its stores before the next wave's loads start.
So a third form sits between them: a program covers CHUNK keys in BLOCK-key tiles, a software-
pipelined loop keeping the next tiles' loads in flight, so fewer programs stream longer. The
tuner picks among all three shapes on the GPU at hand.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 64  # keys per program by default: one tile; a 256-token prefix is 4 programs per (slot, KV head)
# (keys per program, warps[, keys per loop tile]) tried by the tuner (tuner.py): the best split differs
# between GPUs (with their memory bandwidth) and with the batch and context, and a wrong one costs
# up to half the kernel. Two numbers: one tile per program; three: a pipelined loop over tiles.
CONFIGS = ((64, 4), (32, 2), (128, 4), (128, 8), (256, 8), (256, 4, 64), (512, 4, 64), (1024, 4, 64),
           (512, 8, 128), (128, 4, 128, 1), (256, 4, 64, 1), (512, 4, 64, 1), (1024, 4, 64, 1),
           (256, 4, 32, 2), (512, 4, 32, 2), (512, 8, 64, 2), (1024, 4, 32, 2))
# A fourth number 1 ("h" in the name) orders the grid head-major: the programs of a slot's KV heads run next
# to each other. The cache rows interleave the KV heads (one position = Hkv x D values), so slot-major
# programs read the 128-byte halves of each 256-byte row ~B programs apart, head-major ones at about the
# same time. At large batches and contexts the slot-major kernel reads KV well below copy bandwidth; the
# tuner times both orders. A fourth number 2 ("p") gives one
# program a slot's pair of KV heads (``_split_pair``): whole rows per tile, one dot for both heads.
STAGES = 3  # loads in flight in the looped kernel: the tile being used and the next two


def split_args(cfg: tuple[int, ...]) -> dict:
    """A ``CONFIGS`` entry as keyword arguments: chunk, num_warps, block (None: one tile), head_major, pairs."""
    chunk, warps, *rest = cfg
    block = rest[0] if rest and rest[0] != chunk else None
    order = rest[1] if len(rest) > 1 else 0
    return {"chunk": chunk, "num_warps": warps, "block": block, "head_major": order == 1, "pairs": order == 2}


def config_name(cfg: tuple[int, ...]) -> str:
    """``(256, 4, 64)`` -> ``"256x4x64"``, ``(512, 4, 64, 1)`` -> ``"512x4x64h"``, ``(512, 4, 32, 2)`` ->
    ``"512x4x32p"``: the spelling of ``rollout.decode_attention``."""
    a = split_args(cfg)
    parts = [a["chunk"], a["num_warps"], *([a["block"]] if a["block"] is not None else [])]
    return "x".join(str(x) for x in parts) + ("h" if a["head_major"] else "p" if a["pairs"] else "")


def parse_config(name: str) -> tuple[int, ...]:
    for cfg in CONFIGS:
        if config_name(cfg) == name:
            return cfg
    raise ValueError(f"decode attention split {name!r} is not one of {[config_name(c) for c in CONFIGS]}")


try:  # Triton ships with CUDA builds of torch; without it the library attention paths serve
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

if triton is not None:

    @triton.jit
    def _heads(qkv_ptr, b_ptr, row, col, g, d, qmask, r, HAS_B: tl.constexpr, D: tl.constexpr):
        """Rows ``g`` of the heads starting at column ``col`` of the projection, in fp32: ``r`` times the
        GEMM output plus the bias (r = 1 and no bias when the projection applied both itself)."""
        off = col + g[:, None] * D + d[None, :]
        x = tl.load(qkv_ptr + row + off, mask=qmask[:, None], other=0.0).to(tl.float32) * r
        if HAS_B:
            x += tl.load(b_ptr + off, mask=qmask[:, None], other=0.0).to(tl.float32)
        return x

    @triton.jit
    def _rope(qkv_ptr, b_ptr, row, col, g, d, qmask, r, cos, sin, HAS_B: tl.constexpr, HALF: tl.constexpr,
              D: tl.constexpr):
        """Rows ``g`` of the heads starting at ``col``: x * cos + rotate_half(x) * sin, in fp32."""
        x = _heads(qkv_ptr, b_ptr, row, col, g, d, qmask, r, HAS_B, D)
        xr = _heads(qkv_ptr, b_ptr, row, col, g, (d + HALF) % D, qmask, r, HAS_B, D)
        sign = tl.where(d < HALF, -1.0, 1.0)
        return x * cos[None, :] + sign[None, :] * xr * sin[None, :]

    @triton.jit
    def _row_scale(x_ptr, b, s_x, eps, FOLD: tl.constexpr, HID: tl.constexpr, HP: tl.constexpr):
        """1 / rms of the residual row ``b`` when the input norm is folded into the projection, else 1."""
        if FOLD:
            hx = tl.arange(0, HP)
            xr = tl.load(x_ptr + b * s_x + hx, mask=hx < HID, other=0.0).to(tl.float32)
            return tl.rsqrt(tl.sum(xr * xr, 0) / HID + eps)
        else:
            return 1.0

    @triton.jit
    def _query(qkv_ptr, b_ptr, cos_ptr, sin_ptr, row, h, p, r, scale, HAS_B: tl.constexpr, G: tl.constexpr,
               GP: tl.constexpr, D: tl.constexpr):
        """The G query heads of KV head ``h`` (rows of a GP-row tile), roped at ``p`` and pre-scaled,
        and the RoPE tables at ``p`` (the new key needs them too)."""
        d = tl.arange(0, D)
        g = tl.arange(0, GP)
        cos = tl.load(cos_ptr + p * D + d)
        sin = tl.load(sin_ptr + p * D + d)
        q = _rope(qkv_ptr, b_ptr, row, h * G * D, g, d, g < G, r, cos, sin, HAS_B, D // 2, D)
        return (q * scale).to(qkv_ptr.dtype.element_ty), cos, sin

    @triton.jit
    def _new_token(qkv_ptr, b_ptr, kc_ptr, vc_ptr, row, cache, h, p, r, sc_l, q, cos, sin, HAS_B: tl.constexpr,
                   HQ: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr):
        """Store the new token's roped key and value at ``p`` of the cache; return the query rows'
        scores against that key and the value in fp32 (it joins the attention from registers)."""
        d = tl.arange(0, D)
        one = tl.arange(0, 1)
        kn = _rope(qkv_ptr, b_ptr, row, (HQ + h) * D, one, d, one < 1, r, cos, sin, HAS_B, D // 2, D)
        kn = kn.to(kc_ptr.dtype.element_ty)
        vn = _heads(qkv_ptr, b_ptr, row, (HQ + HKV + h) * D, one, d, one < 1, r, HAS_B, D).to(vc_ptr.dtype.element_ty)
        tl.store(kc_ptr + cache + p * sc_l + one[:, None] * 0 + d[None, :], kn)
        tl.store(vc_ptr + cache + p * sc_l + one[:, None] * 0 + d[None, :], vn)
        return tl.sum(q.to(tl.float32) * kn.to(tl.float32), 1), vn.to(tl.float32)

    @triton.jit
    def _merge(b, h, used, acc_ptr, ml_ptr, out_ptr, so_b, n_split, G: tl.constexpr, GP: tl.constexpr,
               HQ: tl.constexpr, D: tl.constexpr, SP: tl.constexpr):
        """Merge the ``used`` chunks' (max, sum, weighted values) of (slot b, KV head h) into the output.

        The partials were written by other programs of this launch: they are read through L2 (``.cg``),
        since this SM's L1 may still hold the same scratch rows from an earlier layer."""
        g = tl.arange(0, GP)
        qmask = g < G
        heads = h * G + g
        d = tl.arange(0, D)
        m_run = tl.full([GP], float("-inf"), tl.float32)
        l_run = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for c0 in range(0, used, SP):
            c = c0 + tl.arange(0, SP)
            cmask = c < used
            part = (b * HQ + heads[:, None]) * n_split + c[None, :]  # [GP, SP]
            mk = qmask[:, None] & cmask[None, :]
            m = tl.load(ml_ptr + part * 2, mask=mk, other=float("-inf"), cache_modifier=".cg")
            l_c = tl.load(ml_ptr + part * 2 + 1, mask=mk, other=0.0, cache_modifier=".cg")
            m_new = tl.maximum(m_run, tl.max(m, 1))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            w = tl.exp(m - m_ref[:, None])  # [GP, SP]
            alpha = tl.exp(m_run - m_ref)
            l_run = l_run * alpha + tl.sum(w * l_c, 1)
            a = tl.load(acc_ptr + part[:, :, None] * D + d[None, None, :], mask=mk[:, :, None], other=0.0,
                        cache_modifier=".cg")
            acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * a, 1)
            m_run = m_new
        out = acc / l_run[:, None]
        tl.store(out_ptr + b * so_b + heads[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=qmask[:, None])

    @triton.jit
    def _finish(acc_ptr, ml_ptr, cnt_ptr, out_ptr, so_b, b, h, c, p, n_split, acc, m, l_sum, HQ: tl.constexpr,
                HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, CH: tl.constexpr):
        """One chunk done. A slot whose prefix fits one chunk writes its output at once. Otherwise the
        chunk stores its (weighted values, max, sum) and counts itself done; the last of the slot's
        chunks to finish merges them all. No second kernel: at batch 256 the separate combine launch
        cost a few us per layer, mostly launch and drain.

        The barrier makes every thread's partial stores happen before the one thread's release
        (the count), as in a grid-wide sync; the count's acquire orders the merge's reads after the
        other programs' stores."""
        d = tl.arange(0, D)
        g = tl.arange(0, GP)
        qmask = g < G
        heads = h * G + g
        used = p // CH + 1  # chunks that run for this slot
        if used == 1:
            out = acc / l_sum[:, None]
            tl.store(out_ptr + b * so_b + heads[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=qmask[:, None])
        else:
            part = (b * HQ + heads) * n_split + c
            tl.store(acc_ptr + part[:, None] * D + d[None, :], acc, mask=qmask[:, None])
            tl.store(ml_ptr + part * 2, m, mask=qmask)
            tl.store(ml_ptr + part * 2 + 1, l_sum, mask=qmask)
            tl.debug_barrier()
            done = tl.atomic_add(cnt_ptr + b * HKV + h, 1, sem="acq_rel")
            if done == used - 1:
                tl.store(cnt_ptr + b * HKV + h, 0)  # ready for the next launch (kernel order keeps it apart)
                _merge(b, h, used, acc_ptr, ml_ptr, out_ptr, so_b, n_split, G, GP, HQ, D, 8)

    @triton.jit
    def _slot_head(HEAD_MAJOR: tl.constexpr):
        """(slot, KV head) of this program; head-major grids put a slot's KV heads in neighbouring programs."""
        first = tl.program_id(0)
        second = tl.program_id(1)
        if HEAD_MAJOR:
            b = second
            h = first
        else:
            b = first
            h = second
        return b, h

    @triton.jit
    def _split(qkv_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, acc_ptr, ml_ptr, cnt_ptr, out_ptr, x_ptr, b_ptr,
               s_qkv, sc_b, sc_l, sc_h, n_split, scale, so_b, s_x, eps,
               HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
               CH: tl.constexpr, FOLD: tl.constexpr, HAS_B: tl.constexpr, HID: tl.constexpr, HP: tl.constexpr,
               HEAD_MAJOR: tl.constexpr):
        b, h = _slot_head(HEAD_MAJOR)
        c = tl.program_id(2)
        p = tl.load(pos_ptr + b).to(tl.int32)  # the new token's position: keys 0..p-1 are cached
        lo = c * CH
        if lo <= p:
            d = tl.arange(0, D)
            row = b * s_qkv
            r = _row_scale(x_ptr, b, s_x, eps, FOLD, HID, HP)
            q, cos, sin = _query(qkv_ptr, b_ptr, cos_ptr, sin_ptr, row, h, p, r, scale, HAS_B, G, GP, D)
            cache = b * sc_b + h * sc_h
            n = lo + tl.arange(0, CH)
            kmask = n < p
            k = tl.load(kc_ptr + cache + n[:, None] * sc_l + d[None, :], mask=kmask[:, None], other=0.0)
            v = tl.load(vc_ptr + cache + n[:, None] * sc_l + d[None, :], mask=kmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k))
            s = tl.where(kmask[None, :], s, float("-inf"))
            m = tl.max(s, 1)
            if p < lo + CH:  # this chunk holds position p: the new key/value join from registers
                s_new, vn = _new_token(qkv_ptr, b_ptr, kc_ptr, vc_ptr, row, cache, h, p, r, sc_l, q, cos, sin,
                                         HAS_B, HQ, HKV, D)
                m = tl.maximum(m, s_new)
                pr = tl.exp(s - m[:, None])
                pn = tl.exp(s_new - m)
                l_sum = tl.sum(pr, 1) + pn
                acc = tl.dot(pr.to(v.dtype), v) + pn[:, None] * vn
            else:
                pr = tl.exp(s - m[:, None])
                l_sum = tl.sum(pr, 1)
                acc = tl.dot(pr.to(v.dtype), v)
            _finish(acc_ptr, ml_ptr, cnt_ptr, out_ptr, so_b, b, h, c, p, n_split, acc, m, l_sum, HQ, HKV, G, GP,
                    D, CH)

    @triton.jit
    def _split_loop(qkv_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, acc_ptr, ml_ptr, cnt_ptr, out_ptr, x_ptr, b_ptr,
                    s_qkv, sc_b, sc_l, sc_h, n_split, scale, so_b, s_x, eps,
                    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                    CH: tl.constexpr, FOLD: tl.constexpr, HAS_B: tl.constexpr, HID: tl.constexpr, HP: tl.constexpr,
                    BLK: tl.constexpr, STAGES: tl.constexpr, HEAD_MAJOR: tl.constexpr):
        """As ``_split``, over CH keys in BLK-key tiles with an online softmax; same partial outputs."""
        b, h = _slot_head(HEAD_MAJOR)
        c = tl.program_id(2)
        p = tl.load(pos_ptr + b).to(tl.int32)
        lo = c * CH
        if lo <= p:
            d = tl.arange(0, D)
            row = b * s_qkv
            r = _row_scale(x_ptr, b, s_x, eps, FOLD, HID, HP)
            q, cos, sin = _query(qkv_ptr, b_ptr, cos_ptr, sin_ptr, row, h, p, r, scale, HAS_B, G, GP, D)
            cache = b * sc_b + h * sc_h
            hi = tl.minimum(lo + CH, p)  # cached keys of this chunk: lo..hi-1
            m_i = tl.full([GP], float("-inf"), tl.float32)
            l_i = tl.zeros([GP], tl.float32)
            acc = tl.zeros([GP, D], tl.float32)
            for start in tl.range(lo, hi, BLK, num_stages=STAGES):
                n = start + tl.arange(0, BLK)
                kmask = n < hi
                k = tl.load(kc_ptr + cache + n[:, None] * sc_l + d[None, :], mask=kmask[:, None], other=0.0)
                v = tl.load(vc_ptr + cache + n[:, None] * sc_l + d[None, :], mask=kmask[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k))
                s = tl.where(kmask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key `start` < hi is always valid
                alpha = tl.exp(m_i - m_new)
                pr = tl.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(pr, 1)
                acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
                m_i = m_new
            if p < lo + CH:  # this chunk holds position p: the new key/value join from registers
                s_new, vn = _new_token(qkv_ptr, b_ptr, kc_ptr, vc_ptr, row, cache, h, p, r, sc_l, q, cos, sin,
                                         HAS_B, HQ, HKV, D)
                m_new = tl.maximum(m_i, s_new)
                alpha = tl.exp(m_i - m_new)
                pn = tl.exp(s_new - m_new)
                l_i = l_i * alpha + pn
                acc = acc * alpha[:, None] + pn[:, None] * vn
                m_i = m_new
            _finish(acc_ptr, ml_ptr, cnt_ptr, out_ptr, so_b, b, h, c, p, n_split, acc, m_i, l_i, HQ, HKV, G, GP,
                    D, CH)

    @triton.jit
    def _pair_values(qkv_ptr, b_ptr, row, h0, cc, r, OFF: tl.constexpr, HAS_B: tl.constexpr, D: tl.constexpr):
        """Heads OFF + h0 and OFF + h0 + 1 of the projection side by side, [2D] in fp32 (r and bias applied)."""
        off = (OFF + h0) * D + cc  # the two heads are adjacent columns of the projection
        x = tl.load(qkv_ptr + row + off).to(tl.float32) * r
        if HAS_B:
            x += tl.load(b_ptr + off).to(tl.float32)
        return x

    @triton.jit
    def _pair_keys(qkv_ptr, b_ptr, row, h0, cc, r, cos_ptr, sin_ptr, p, HQ: tl.constexpr, HAS_B: tl.constexpr,
                   D: tl.constexpr):
        """The new token's keys of heads h0 and h0 + 1, roped at ``p``, [2D] in fp32."""
        HALF = D // 2  # constexpr: D is
        dd = cc % D
        x = _pair_values(qkv_ptr, b_ptr, row, h0, cc, r, HQ, HAS_B, D)
        partner = cc - dd + (dd + HALF) % D
        off = (HQ + h0) * D + partner
        xr = tl.load(qkv_ptr + row + off).to(tl.float32) * r
        if HAS_B:
            xr += tl.load(b_ptr + off).to(tl.float32)
        cos = tl.load(cos_ptr + p * D + dd)
        sin = tl.load(sin_ptr + p * D + dd)
        return x * cos + tl.where(dd < HALF, -1.0, 1.0) * xr * sin

    @triton.jit
    def _finish_pair(acc_ptr, ml_ptr, cnt_ptr, out_ptr, so_b, b, h0, c, p, n_split, acc, m, l_sum, sel, j, valid, cc,
                     HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                     CH: tl.constexpr):
        """``_finish`` for a pair of KV heads: each row keeps its own head's half of the columns."""
        act = valid[:, None] & ((cc // D)[None, :] == sel[:, None])
        head = (h0 + sel) * G + j  # query head of each row
        dd = cc % D
        used = p // CH + 1
        if used == 1:
            out = acc / l_sum[:, None]
            tl.store(out_ptr + b * so_b + head[:, None] * D + dd[None, :], out.to(out_ptr.dtype.element_ty), mask=act)
        else:
            part = (b * HQ + head) * n_split + c
            tl.store(acc_ptr + part[:, None] * D + dd[None, :], acc, mask=act)
            tl.store(ml_ptr + part * 2, m, mask=valid)
            tl.store(ml_ptr + part * 2 + 1, l_sum, mask=valid)
            tl.debug_barrier()
            done = tl.atomic_add(cnt_ptr + b * HKV + h0, 1, sem="acq_rel")
            if done == used - 1:
                tl.store(cnt_ptr + b * HKV + h0, 0)
                _merge(b, h0, used, acc_ptr, ml_ptr, out_ptr, so_b, n_split, G, GP // 2, HQ, D, 8)
                _merge(b, h0 + 1, used, acc_ptr, ml_ptr, out_ptr, so_b, n_split, G, GP // 2, HQ, D, 8)

    @triton.jit
    def _pair_queries(qkv_ptr, b_ptr, row, h0, sel, j, c, valid, r, cos_ptr, sin_ptr, p, G: tl.constexpr,
                      HAS_B: tl.constexpr, D: tl.constexpr):
        """The block-diagonal query tile [rows, 2D], roped at ``p``: row i holds query head
        ``(h0 + sel[i]) * G + j[i]`` in the columns of its KV head's half (``c // D == sel``), zeros elsewhere."""
        HALF = D // 2  # constexpr: D is
        dd = c % D
        act = valid[:, None] & ((c // D)[None, :] == sel[:, None])
        base = ((h0 + sel[:, None]) * G + j[:, None]) * D
        x = tl.load(qkv_ptr + row + base + dd[None, :], mask=act, other=0.0).to(tl.float32) * r
        xr = tl.load(qkv_ptr + row + base + ((dd + HALF) % D)[None, :], mask=act, other=0.0).to(tl.float32) * r
        if HAS_B:
            x += tl.load(b_ptr + base + dd[None, :], mask=act, other=0.0).to(tl.float32)
            xr += tl.load(b_ptr + base + ((dd + HALF) % D)[None, :], mask=act, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + p * D + dd)
        sin = tl.load(sin_ptr + p * D + dd)
        sign = tl.where(dd < HALF, -1.0, 1.0)
        return x * cos[None, :] + sign[None, :] * xr * sin[None, :]

    @triton.jit
    def _split_pair(qkv_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, pos_ptr, acc_ptr, ml_ptr, cnt_ptr, out_ptr, x_ptr,
                    b_ptr, s_qkv, sc_b, sc_l, sc_h, n_split, scale, so_b, s_x, eps,
                    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                    CH: tl.constexpr, FOLD: tl.constexpr, HAS_B: tl.constexpr, HID: tl.constexpr,
                    HP: tl.constexpr, BLK: tl.constexpr, STAGES: tl.constexpr):
        """As ``_split_loop``, one program for a slot's KV heads h0 and h0 + 1. A cache position holds
        both keys side by side (Hkv x D values), so each tile is whole 2D-wide rows, and one dot with a
        block-diagonal query tile (rows of head h0 in columns 0..D-1, of h0 + 1 in D..2D-1) scores
        both heads. Partials, counts and the merge are per KV head, as in the other kernels."""
        b = tl.program_id(0)
        h0 = tl.program_id(1) * 2
        c = tl.program_id(2)
        p = tl.load(pos_ptr + b).to(tl.int32)
        lo = c * CH
        if lo <= p:
            RH = GP // 2  # rows per head in the tile (constexpr: GP is)
            i = tl.arange(0, GP)
            sel = i // RH
            j = i % RH
            valid = j < G
            cc = tl.arange(0, 2 * D)
            row = b * s_qkv
            r = _row_scale(x_ptr, b, s_x, eps, FOLD, HID, HP)
            q = _pair_queries(qkv_ptr, b_ptr, row, h0, sel, j, cc, valid, r, cos_ptr, sin_ptr, p, G, HAS_B, D)
            q = (q * scale).to(qkv_ptr.dtype.element_ty)
            cache = b * sc_b + h0 * sc_h  # heads h0, h0 + 1: 2D contiguous values per position
            hi = tl.minimum(lo + CH, p)
            m_i = tl.full([GP], float("-inf"), tl.float32)
            l_i = tl.zeros([GP], tl.float32)
            acc = tl.zeros([GP, 2 * D], tl.float32)
            for start in tl.range(lo, hi, BLK, num_stages=STAGES):
                n = start + tl.arange(0, BLK)
                kmask = n < hi
                k = tl.load(kc_ptr + cache + n[:, None] * sc_l + cc[None, :], mask=kmask[:, None], other=0.0)
                v = tl.load(vc_ptr + cache + n[:, None] * sc_l + cc[None, :], mask=kmask[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k))
                s = tl.where(kmask[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp(m_i - m_new)
                pr = tl.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(pr, 1)
                acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
                m_i = m_new
            if p < lo + CH:  # the new token: both heads' key and value, stored and joined from registers
                kn = _pair_keys(qkv_ptr, b_ptr, row, h0, cc, r, cos_ptr, sin_ptr, p, HQ, HAS_B, D)
                vn = _pair_values(qkv_ptr, b_ptr, row, h0, cc, r, HQ + HKV, HAS_B, D)
                tl.store(kc_ptr + cache + p * sc_l + cc, kn.to(kc_ptr.dtype.element_ty))
                tl.store(vc_ptr + cache + p * sc_l + cc, vn.to(vc_ptr.dtype.element_ty))
                kq = kn.to(kc_ptr.dtype.element_ty).to(tl.float32)
                s_new = tl.sum(q.to(tl.float32) * kq[None, :], 1)
                m_new = tl.maximum(m_i, s_new)
                alpha = tl.exp(m_i - m_new)
                pn = tl.exp(s_new - m_new)
                l_i = l_i * alpha + pn
                vq = vn.to(vc_ptr.dtype.element_ty).to(tl.float32)
                acc = acc * alpha[:, None] + pn[:, None] * vq[None, :]
                m_i = m_new
            _finish_pair(acc_ptr, ml_ptr, cnt_ptr, out_ptr, so_b, b, h0, c, p, n_split, acc, m_i, l_i, sel, j, valid,
                         cc, HQ, HKV, G, GP, D, CH)


def _kernels():
    return None if triton is None else (_split, _split_loop, _split_pair)


class DecodeAttention:
    """Fused decode attention for one engine: holds the split-K scratch, sized for (batch, cache, chunk)."""

    def __init__(self, n_heads: int, n_kv: int, head_dim: int, max_batch: int, cache_len: int,
                 device: torch.device, chunk: int = CHUNK, num_warps: int = 4, block: int | None = None,
                 head_major: bool = False, pairs: bool = False) -> None:
        self.hq, self.hkv, self.d = n_heads, n_kv, head_dim
        self.g = n_heads // n_kv
        self.max_batch, self.cache_len, self.device = max_batch, cache_len, device
        self.timings: dict[str, float] = {}  # us per call of each config the tuner tried (tuner.py)
        self.configure(chunk, num_warps, block, head_major, pairs)

    @property
    def config(self) -> tuple[int, ...]:
        """This split as its ``CONFIGS`` entry."""
        if self.head_major or self.pairs:
            return (self.chunk, self.num_warps, self.block or self.chunk, 1 if self.head_major else 2)
        return (self.chunk, self.num_warps) if self.block is None else (self.chunk, self.num_warps, self.block)

    def configure(self, chunk: int, num_warps: int, block: int | None = None, head_major: bool = False,
                  pairs: bool = False) -> None:
        """Use ``chunk`` keys per program and ``num_warps`` warps, in one tile or (``block``) a loop over
        ``block``-key tiles, the grid slot-major or head-major, or (``pairs``) a program per pair of KV
        heads; the scratch is resized to match."""
        if block is not None and (chunk % block or block < 16):
            raise ValueError(f"decode attention: chunk {chunk} must be a multiple of the tile {block} (>= 16)")
        if pairs and (self.hkv % 2 or block is None or block == chunk):
            raise ValueError(f"decode attention: pairs of KV heads need an even number of them ({self.hkv}) and a "
                             f"looped split (a tile smaller than the chunk)")
        self.chunk, self.num_warps, self.block = chunk, num_warps, (None if block == chunk else block)
        self.head_major, self.pairs = bool(head_major), bool(pairs)
        self.n_split = -(-self.cache_len // chunk)
        n = self.max_batch * self.hq * self.n_split
        self.acc = torch.empty(n * self.d, dtype=torch.float32, device=self.device)
        self.ml = torch.empty(n * 2, dtype=torch.float32, device=self.device)
        # chunks finished per (slot, KV head); the last one merges and sets it back to 0
        self.count = torch.zeros(self.max_batch * self.hkv, dtype=torch.int32, device=self.device)

    def __call__(self, qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor,
                 x: Tensor | None = None, bias: Tensor | None = None, eps: float = 0.0) -> Tensor:
        """qkv [B, (Hq + 2 Hkv) D] (the projection's output, bias included, before RoPE); cos/sin the
        fp32 tables [max_pos, D]; caches [B', L, Hkv, D] with B' >= B; pos [B] -> out [B, Hq, D].

        Writes the roped key and the value of the new token at ``pos`` of each slot's cache, then
        attends over keys 0..pos inclusive.

        With ``x`` (the residual rows [B, H] the projection read) the input RMSNorm's weight was folded
        into the projection and its row scale is not yet applied: the kernel takes 1 / rms(x) itself
        and adds ``bias`` after it (``folded.py``), so the norm costs no launch of its own.
        """
        split, split_loop, split_pair = _kernels()
        B = qkv.shape[0]
        assert qkv.stride(1) == 1 and k_cache.stride(3) == 1 and k_cache.stride() == v_cache.stride()
        out = torch.empty(B, self.hq, self.d, dtype=qkv.dtype, device=qkv.device)
        gp = max(16, 1 << (self.g - 1).bit_length())
        if self.pairs:  # two heads' rows in one tile, each head's at a power-of-two offset
            assert k_cache.stride(2) == self.d, "pairs of KV heads need the heads adjacent in each cache row"
            gp = 2 * max(8, 1 << (self.g - 1).bit_length())
        fold = x is not None
        if fold:
            assert x.shape[0] == B and x.stride(1) == 1
        hid = x.shape[1] if fold else 1
        args = (qkv, cos, sin, k_cache, v_cache, pos, self.acc, self.ml, self.count, out,
                x if fold else qkv, bias if bias is not None else qkv, qkv.stride(0), k_cache.stride(0),
                k_cache.stride(1), k_cache.stride(2), self.n_split, self.d ** -0.5, out.stride(0),
                x.stride(0) if fold else 0, eps)
        shape = dict(HQ=self.hq, HKV=self.hkv, G=self.g, GP=gp, D=self.d, CH=self.chunk, FOLD=fold,
                     HAS_B=fold and bias is not None, HID=hid, HP=triton.next_power_of_2(hid),
                     HEAD_MAJOR=self.head_major, num_warps=self.num_warps)
        if self.pairs:
            del shape["HEAD_MAJOR"]
            split_pair[(B, self.hkv // 2, self.n_split)](*args, **shape, BLK=self.block, STAGES=STAGES)
            return out
        grid = (self.hkv, B, self.n_split) if self.head_major else (B, self.hkv, self.n_split)
        if self.block is None:
            split[grid](*args, **shape)
        else:
            split_loop[grid](*args, **shape, BLK=self.block, STAGES=STAGES)
        return out


def rope_qkv(qkv: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, n_heads: int, n_kv: int,
             head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """The plain-torch meaning of the kernel's input: q, k (roped at ``pos``) and v from the fused projection."""
    from areal_hpc.model.qwen2 import split_qkv_rope

    c, s = cos[pos].to(qkv.dtype)[:, None, :], sin[pos].to(qkv.dtype)[:, None, :]
    return split_qkv_rope(qkv, c, s, n_heads, n_kv, head_dim)


def kernel_available(device: torch.device, head_dim: int) -> bool:
    return _kernels() is not None and head_dim >= 16 and not head_dim & (head_dim - 1) and (
        device.type == "cuda" or interpreting())


def interpreting() -> bool:
    """Triton runs on CPU tensors here (``TRITON_INTERPRET=1``, the tests' interpreter runs)."""
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


def decode_kernel_works(device: torch.device, dtype: torch.dtype, n_heads: int, n_kv: int, head_dim: int) -> bool:
    """Whether the kernels build here and match a plain reference (checked once per engine)."""
    if not kernel_available(device, head_dim):  # CUDA, or the Triton interpreter on CPU (tests)
        return False
    try:
        return check_against_reference(device, dtype, n_heads, n_kv, head_dim) < 2e-2
    except Exception:  # no Triton backend for this GPU, or a compile error: the library path serves
        return False


def check_against_reference(device: torch.device, dtype: torch.dtype, n_heads: int, n_kv: int, head_dim: int,
                            lengths: tuple[int, ...] = (0, 1, 31, 33, 63, 64, 65, 127, 128, 129, 199, 255),
                            chunk: int = CHUNK, num_warps: int = 4, block: int | None = None,
                            fold: bool = False, reps: int = 1, head_major: bool = False, pairs: bool = False) -> float:
    """Max abs difference of the fused kernel against RoPE + index write + SDPA; raises if the cache
    was written wrongly. Positions cover chunk edges, an empty prefix and the last cache row.

    ``fold``: the projection output comes without its row scale and bias (the folded input norm),
    and the kernel applies both from the residual rows. ``reps``: call the kernel that many times,
    alternating between two inputs, so that a merge reading a partial before it is written (stale
    from the other input) shows as a wrong output."""
    from areal_hpc.model.attention import cached_decode
    from areal_hpc.model.qwen2 import rope_cache

    g = torch.Generator(device="cpu").manual_seed(0)
    B, L = len(lengths), max(lengths) + 1
    width = (n_heads + 2 * n_kv) * head_dim
    kc = torch.randn(B, L, n_kv, head_dim, generator=g).to(device, dtype)
    vc = torch.randn(B, L, n_kv, head_dim, generator=g).to(device, dtype)
    cos, sin = rope_cache(L, head_dim, 10000.0, device)
    pos = torch.tensor(lengths, device=device)
    rows = torch.arange(B, device=device)
    cases = []
    for _ in range(2 if reps > 1 else 1):
        qkv = torch.randn(B, width, generator=g).to(device, dtype)
        fold_args: tuple = ()
        ref_qkv = qkv
        if fold:  # residual rows of another width than the heads, and the projection's bias
            eps = 1e-6
            x = (3 * torch.randn(B, 3 * head_dim + 8, generator=g)).to(device, dtype)
            bias = torch.randn(width, generator=g).to(device, dtype)
            r = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
            ref_qkv = (qkv.float() * r + bias.float()).to(dtype)
            fold_args = (x, bias, eps)
        q, k, v = rope_qkv(ref_qkv, cos, sin, pos, n_heads, n_kv, head_dim)
        kc2, vc2 = kc.clone(), vc.clone()
        kc2[rows, pos], vc2[rows, pos] = k, v
        cases.append((qkv, fold_args, kc2, vc2, cached_decode(q, kc2, vc2, pos + 1).float()))
    attn = DecodeAttention(n_heads, n_kv, head_dim, B, L, device, chunk=chunk, num_warps=num_warps, block=block,
                           head_major=head_major, pairs=pairs)
    worst = 0.0
    tol = 0 if dtype == torch.float32 else 2e-2
    for rep in range(reps):
        qkv, fold_args, kc2, vc2, ref = cases[rep % len(cases)]
        k_in, v_in = kc.clone(), vc.clone()
        out = attn(qkv, cos, sin, k_in, v_in, pos, *fold_args).float()
        # relative: the kernel ropes in fp32, the reference in the cache dtype (bf16 keys of size ~5
        # differ by a few 1e-2 between the two)
        if not (torch.allclose(v_in.float(), vc2.float(), rtol=tol, atol=tol + 1e-5)
                and torch.allclose(k_in.float(), kc2.float(), rtol=tol, atol=tol + 1e-5)):
            raise AssertionError("fused decode attention wrote the KV cache wrongly")
        worst = max(worst, float((out - ref).abs().max()))
    if int(attn.count.abs().sum()) != 0:
        raise AssertionError("fused decode attention left its chunk counts non-zero (a merge was skipped)")
    return worst
