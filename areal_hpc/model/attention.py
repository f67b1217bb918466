"""Attention over packed token streams: causal variable-length (prefill, training) and cached decode.

Packed means tokens of several sequences are concatenated, ``cu_seqlens`` marks where each starts,
and no pad token is ever computed on. On CUDA the variable-length case runs torch's flash-attention
``varlen_attn``; elsewhere (and where that op is missing) each sequence goes through SDPA on its own,
which gives the same function, only slower.
"""

from __future__ import annotations

import inspect
import logging
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)

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
        return _flash_varlen(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)
    bounds = cu_list if cu_list is not None else cu_seqlens.tolist()
    return _prefix_sdpa(q, k, v, bounds, bounds)


def prefix_causal_varlen(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                         cu_q_list: list[int], cu_k_list: list[int]) -> Tensor:
    """Packed segments whose queries are the last of their keys: segment j's queries (rows
    ``cu_q[j]:cu_q[j+1]`` of q) attend to keys ``cu_k[j]:cu_k[j+1]`` of k/v, causally aligned at the bottom
    right (query i of Lq sees keys up to ``i + Lk - Lq``): a response attending to a shared prompt that is
    not repeated in q. q [Tq, Hq, D], k/v [Tk, Hkv, D] -> [Tq, Hq, D].
    """
    if varlen_available(q.device, q.dtype) and bottom_right_varlen(q.device, q.dtype, q.shape[1], k.shape[1],
                                                                   q.shape[2]):
        return _flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k)
    return _prefix_sdpa(q, k, v, cu_q_list, cu_k_list)


def _flash_varlen(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int) -> Tensor:
    op, causal, has_gqa = _varlen_op()
    kw = dict(causal)
    if k.shape[1] != q.shape[1]:
        if has_gqa:
            kw["enable_gqa"] = True
        else:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return op(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k, **kw)


def _prefix_sdpa(q: Tensor, k: Tensor, v: Tensor, cu_q_list: list[int], cu_k_list: list[int]) -> Tensor:
    """The reference form: SDPA per segment, causal at the bottom right (an explicit mask where a segment has
    more keys than queries; SDPA's own causal flag, which aligns at the top left, where they are equal)."""
    out = torch.empty_like(q)
    gqa = k.shape[1] != q.shape[1]
    for a, b, c, d in zip(cu_q_list[:-1], cu_q_list[1:], cu_k_list[:-1], cu_k_list[1:]):
        if b > a:
            lq, lk = b - a, d - c
            mask = None if lq == lk else (torch.arange(lk, device=q.device)[None, :]
                                          <= torch.arange(lq, device=q.device)[:, None] + (lk - lq))
            o = F.scaled_dot_product_attention(q[a:b].transpose(0, 1)[None], k[c:d].transpose(0, 1)[None],
                                               v[c:d].transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=gqa)
            out[a:b] = o[0].transpose(0, 1)
    return out


@lru_cache(maxsize=8)
def bottom_right_varlen(device: torch.device, dtype: torch.dtype, n_heads: int, n_kv: int, head_dim: int) -> bool:
    """Whether the flash varlen op aligns causality at the bottom right when a segment has more keys than
    queries (flash-attention's convention); checked once against the SDPA form, which it must equal."""
    g = torch.Generator(device=device).manual_seed(0)
    lq, lk = [3, 5, 1], [9, 5, 4]
    cq, ck = [0, *torch.tensor(lq).cumsum(0).tolist()], [0, *torch.tensor(lk).cumsum(0).tolist()]
    q = torch.randn(cq[-1], n_heads, head_dim, device=device, generator=g).to(dtype)
    k = torch.randn(ck[-1], n_kv, head_dim, device=device, generator=g).to(dtype)
    v = torch.randn(ck[-1], n_kv, head_dim, device=device, generator=g).to(dtype)
    try:
        got = _flash_varlen(q, k, v, torch.tensor(cq, device=device), torch.tensor(ck, device=device), max(lq),
                            max(lk))
    except RuntimeError as e:
        log.warning("flash varlen with more keys than queries failed (%s): shared-prompt attention uses SDPA", e)
        return False
    ok = torch.allclose(got.float(), _prefix_sdpa(q, k, v, cq, ck).float(), atol=2e-2, rtol=0)
    if not ok:
        log.warning("flash varlen does not align causality at the bottom right here: shared-prompt attention uses SDPA")
    return ok


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
