"""Decode attention as one Triton kernel: write the new key/value into the slot's cache, attend.

Why a kernel of our own: at decode, each slot has one query per head and a cache prefix of its own
length. Library kernels pad the query tile to 64-128 rows (one real row per head) and need the new
key written by separate index kernels first; per layer that was ~35 us of attention plus four small
launches. Here one program serves one (slot, KV head): the G query heads that share that KV head
form the rows of a small tile, the loop reads only the valid prefix, and the new key/value are
stored to the cache and used from registers in the same program.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor


@lru_cache(maxsize=1)
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    # Tuned once per (batch, cache length) before the CUDA graph is captured. Re-running the kernel
    # while timing is harmless: it stores the same new key/value at the same position each time.
    configs = [triton.Config({"BLOCK": b}, num_warps=w, num_stages=st)
               for b in (32, 64, 128) for w in (2, 4) for st in (1, 3)]

    @triton.autotune(configs=configs, key=["n_slots", "sc_b"])
    @triton.jit
    def _decode_attn(q_ptr, kn_ptr, vn_ptr, kc_ptr, vc_ptr, pos_ptr, out_ptr, n_slots,
                     sq_b, sq_h, sn_b, sn_h, sc_b, sc_l, sc_h, so_b, so_h, scale,
                     G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr):
        b = tl.program_id(0)
        h = tl.program_id(1)
        p = tl.load(pos_ptr + b).to(tl.int32)  # the new token's position: keys 0..p-1 are cached
        d = tl.arange(0, D)
        kn = tl.load(kn_ptr + b * sn_b + h * sn_h + d)
        vn = tl.load(vn_ptr + b * sn_b + h * sn_h + d)
        cache = b * sc_b + h * sc_h
        tl.store(kc_ptr + cache + p * sc_l + d, kn)
        tl.store(vc_ptr + cache + p * sc_l + d, vn)
        g = tl.arange(0, GP)
        qmask = g < G
        q = tl.load(q_ptr + b * sq_b + (h * G + g)[:, None] * sq_h + d[None, :], mask=qmask[:, None], other=0.0)
        m = tl.full([GP], float("-inf"), tl.float32)
        l_sum = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, D], tl.float32)
        for start in range(0, p, BLOCK):
            n = start + tl.arange(0, BLOCK)
            kmask = n < p
            k = tl.load(kc_ptr + cache + n[:, None] * sc_l + d[None, :], mask=kmask[:, None], other=0.0)
            v = tl.load(vc_ptr + cache + n[:, None] * sc_l + d[None, :], mask=kmask[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(kmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            pr = tl.exp(s - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(pr, 1)
            acc = acc * alpha[:, None] + tl.dot(pr.to(v.dtype), v)
            m = m_new
        s_new = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * scale
        m_new = tl.maximum(m, s_new)
        alpha = tl.exp(m - m_new)
        pn = tl.exp(s_new - m_new)
        l_sum = l_sum * alpha + pn
        acc = acc * alpha[:, None] + pn[:, None] * vn.to(tl.float32)[None, :]
        out = acc / l_sum[:, None]
        tl.store(out_ptr + b * so_b + (h * G + g)[:, None] * so_h + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=qmask[:, None])

    return _decode_attn


def decode_attention(q: Tensor, k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor,
                     pos: Tensor) -> Tensor:
    """q [B, Hq, D], k_new/v_new [B, Hkv, D], caches [B, L, Hkv, D], pos [B] -> [B, Hq, D].

    Writes k_new/v_new at ``pos`` of each slot's cache, then attends over keys 0..pos inclusive.
    """
    B, Hq, D = q.shape
    Hkv = k_cache.shape[2]
    G = Hq // Hkv
    out = torch.empty_like(q)
    k_new, v_new = k_new.contiguous(), v_new.contiguous()
    _kernel()[(B, Hkv)](q, k_new, v_new, k_cache, v_cache, pos, out, B, q.stride(0), q.stride(1),
                        k_new.stride(0), k_new.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                        out.stride(0), out.stride(1), D ** -0.5, G=G, GP=max(16, 1 << (G - 1).bit_length()), D=D)
    return out


def decode_kernel_works(device: torch.device, dtype: torch.dtype, n_heads: int, n_kv: int, head_dim: int) -> bool:
    """Whether the kernel builds here and matches a plain reference (checked once per engine)."""
    if device.type != "cuda" or _kernel() is None or head_dim & (head_dim - 1):
        return False
    try:
        from areal_hpc.model.attention import cached_decode

        g = torch.Generator(device=device).manual_seed(0)
        B, L = 5, 200
        q = torch.randn(B, n_heads, head_dim, device=device, dtype=dtype, generator=g)
        kn = torch.randn(B, n_kv, head_dim, device=device, dtype=dtype, generator=g)
        vn = torch.randn(B, n_kv, head_dim, device=device, dtype=dtype, generator=g)
        kc = torch.randn(B, L, n_kv, head_dim, device=device, dtype=dtype, generator=g)
        vc = torch.randn(B, L, n_kv, head_dim, device=device, dtype=dtype, generator=g)
        pos = torch.tensor([0, 1, 63, 64, 199], device=device)
        kc2, vc2 = kc.clone(), vc.clone()
        rows = torch.arange(B, device=device)
        kc2[rows, pos], vc2[rows, pos] = kn, vn
        ref = cached_decode(q, kc2, vc2, pos + 1).float()
        out = decode_attention(q, kn, vn, kc, vc, pos).float()
        return bool(torch.equal(kc, kc2) and torch.equal(vc, vc2)) and float((out - ref).abs().max()) < 2e-2
    except Exception:  # no Triton backend for this GPU, or a compile error: the library path serves
        return False
