"""Attention over packed token streams: causal variable-length (prefill, training) and cached decode.

Packed means tokens of several sequences are concatenated, ``cu_seqlens`` marks where each starts,
and no pad token is ever computed on. On CUDA the variable-length case runs torch's flash-attention
``varlen_attn``; elsewhere (and where that op is missing) each sequence goes through SDPA on its own,
which gives the same function, only slower.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor


@lru_cache(maxsize=1)
def _varlen_op():
    """torch's flash varlen op and how this torch version spells causality and GQA (2.11 vs 2.13)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    return varlen_attn, causal, "enable_gqa" in params


def varlen_available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) and _varlen_op() is not None


def causal_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_len: int,
                  cu_list: list[int] | None = None) -> Tensor:
    """Causal attention within each packed sequence. q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D].

    ``cu_list`` is ``cu_seqlens`` on the host (the fallback path needs it; passing it avoids a sync).
    """
    if varlen_available(q.device, q.dtype):
        op, causal, has_gqa = _varlen_op()
        if k.shape[1] != q.shape[1] and not has_gqa:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        kw = dict(causal)
        if has_gqa and k.shape[1] != q.shape[1]:
            kw["enable_gqa"] = True
        cu = cu_seqlens.to(torch.int32)
        return op(q, k, v, cu, cu, max_len, max_len, **kw)
    bounds = cu_list if cu_list is not None else cu_seqlens.tolist()
    out = torch.empty_like(q)
    gqa = k.shape[1] != q.shape[1]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None],
                                               v[a:b].transpose(0, 1)[None], is_causal=True, enable_gqa=gqa)
            out[a:b] = o[0].transpose(0, 1)
    return out


def decode_offsets(batch: int, n_heads: int, n_kv_heads: int, cache_len: int,
                   device: torch.device) -> tuple[Tensor, Tensor]:
    """Static ``cu_seqlens`` for :func:`cached_decode`'s flash path: group-size queries and L keys per slot."""
    cu = torch.arange(batch + 1, device=device, dtype=torch.int32)
    return cu * (n_heads // n_kv_heads), cu * cache_len


def cached_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, lengths: Tensor,
                  offsets: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """One query token per slot against that slot's cache prefix. q [B, Hq, D]; caches [B, L, Hkv, D].

    ``lengths[b]`` keys are valid (the new token's own key is already written). With ``offsets``
    (from :func:`decode_offsets`), torch's flash kernel runs with ``seqused_k``, reading only the valid
    prefix of each slot: what a long-tailed batch needs, most slots short and a few near L. The query
    heads sharing a KV head are passed as that head's queries (one tile row each instead of one tile
    per head), so the kernel does G times less padded work. Without offsets: SDPA over the whole
    cache with a mask. Fixed shapes and no host sync either way, so it can be captured in a CUDA graph.
    """
    B, Hq, D = q.shape
    L, Hkv = k_cache.shape[1], k_cache.shape[2]
    G = Hq // Hkv
    if offsets is not None:
        cu_q, cu_k = offsets
        qg = q.view(B, Hkv, G, D).transpose(1, 2).reshape(B * G, Hkv, D)
        out = torch.ops.aten._flash_attention_forward(
            qg, k_cache.view(B * L, Hkv, D), v_cache.view(B * L, Hkv, D), cu_q, cu_k, G, L, 0.0, False, False,
            seqused_k=lengths)[0]
        return out.view(B, G, Hkv, D).transpose(1, 2).reshape(B, Hq, D)
    qg = q.view(B, Hkv, G, D)
    valid = torch.arange(L, device=q.device)[None, :] < lengths[:, None]  # [B, L]
    o = F.scaled_dot_product_attention(qg, k_cache.transpose(1, 2), v_cache.transpose(1, 2),
                                       attn_mask=valid[:, None, None, :])
    return o.reshape(B, Hq, D)


def flash_decode_works(device: torch.device, dtype: torch.dtype, n_heads: int, n_kv: int, head_dim: int) -> bool:
    """Whether the flash decode path exists here and agrees with SDPA (checked once per engine)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        g = torch.Generator(device=device).manual_seed(0)
        B, L = 4, 64
        q = torch.randn(B, n_heads, head_dim, device=device, dtype=dtype, generator=g)
        k = torch.randn(B, L, n_kv, head_dim, device=device, dtype=dtype, generator=g)
        v = torch.randn(B, L, n_kv, head_dim, device=device, dtype=dtype, generator=g)
        lengths = torch.tensor([1, 17, 64, 40], device=device, dtype=torch.int32)
        a = cached_decode(q, k, v, lengths, decode_offsets(B, n_heads, n_kv, L, device)).float()
        b = cached_decode(q, k, v, lengths).float()
        return bool(torch.isfinite(a).all()) and float((a - b).abs().max()) < 2e-2
    except Exception:  # op missing or not built for this GPU: the SDPA path serves
        return False
