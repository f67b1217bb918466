"""Per-sequence reproducible sampling on the device, with the exact log-probability of each token.

Gumbel-max: ``argmax(logits / T + g)`` with ``g = -log(-log(u))`` draws exactly from
``softmax(logits / T)``. The uniform ``u`` is a hash of (sequence seed, token index, vocab id), not
a stateful generator, so a sequence samples the same tokens whatever batch it shares and whichever
slot it sits in: continuous batching changes throughput, never results. The hash is 32-bit integer
arithmetic done identically by the torch path (CPU, top-p) and the fused Triton kernel (CUDA: one
pass over the logits computes the sample, its logit and the log-normaliser).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
_A, _B, _C = 0x5BD1E995, 0x2545F491, 0x27D4EB2F  # mixing constants (< 2^31, so int64 products never overflow)
_R1, _R2 = 0x2C1B3C6D, 0x297A2D39


def sequence_seed(base_seed: int, sample_id: int) -> int:
    """A 31-bit seed per sequence, from the engine seed and the sample id."""
    x = (base_seed * 0x9E3779B1 + sample_id * 0x85EBCA77 + 0x165667B1) & 0xFFFFFFFFFFFF
    x ^= x >> 17
    x = (x * 0xC2B2AE3D) & 0xFFFFFFFFFFFF
    x ^= x >> 13
    return int(x & 0x7FFFFFFF)


def uniform_noise(seeds: Tensor, counters: Tensor, vocab: int) -> Tensor:
    """u in (0, 1) for every (row, vocab id): [B, V] float32, a pure function of (seed, counter, id)."""
    col = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    x = (seeds[:, None].long() * _A + counters[:, None].long() * _B + col[None, :] * _C) & _M32
    x = x ^ (x >> 15)
    x = (x * _R1) & _M32
    x = x ^ (x >> 12)
    x = (x * _R2) & _M32
    x = x ^ (x >> 15)
    return ((x >> 8).float() + 0.5) * (1.0 / 16777216.0)


def nucleus(logp: Tensor, top_p: float) -> Tensor:
    """Log-probs truncated to the smallest set with mass >= ``top_p`` and renormalised (identity at 1)."""
    if top_p >= 1.0:
        return logp
    sorted_logp, order = logp.sort(-1, descending=True)
    p = sorted_logp.exp()
    drop = (p.cumsum(-1) - p) >= top_p
    sorted_logp = sorted_logp.masked_fill(drop, float("-inf"))
    return torch.log_softmax(torch.full_like(logp, float("-inf")).scatter(-1, order, sorted_logp), -1)


def sample_torch(logits: Tensor, temperature: float, top_p: float, seeds: Tensor,
                 counters: Tensor) -> tuple[Tensor, Tensor]:
    """Reference path: any device, any top_p. Returns (token [B] int64, logprob [B] float32).

    The logprob is of the distribution actually sampled (temperature, top-p truncation and
    renormalisation included), which the trainer's behaviour importance weight needs.
    ``temperature == 0`` is greedy, with the logprob of the untempered softmax.
    """
    logits = logits.float()
    if temperature == 0:
        tok = logits.argmax(-1)
        return tok, torch.log_softmax(logits, -1).gather(-1, tok[:, None]).squeeze(-1)
    logp = nucleus(torch.log_softmax(logits / temperature, -1), top_p)
    g = -torch.log(-torch.log(uniform_noise(seeds, counters, logits.shape[-1])))
    tok = (logp + g).argmax(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


@lru_cache(maxsize=1)
def _triton_kernels():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _partial(logits_ptr, stride, seeds_ptr, counters_ptr, part_ptr, V, inv_t, CHUNK: tl.constexpr,
                 BLOCK: tl.constexpr, C: tl.constexpr):
        """One (row, chunk of the vocab): running max, sum of exp, and the best Gumbel score."""
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        seed = tl.load(seeds_ptr + row).to(tl.uint32)
        ctr = tl.load(counters_ptr + row).to(tl.uint32)
        base = seed * 0x5BD1E995 + ctr * 0x2545F491
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        best = tl.full([], float("-inf"), tl.float32)
        best_x = tl.zeros([], tl.float32)
        best_i = tl.zeros([], tl.int32)
        lo = chunk * CHUNK
        for start in range(lo, lo + CHUNK, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            ok = cols < V
            x = tl.load(logits_ptr + row * stride + cols, mask=ok, other=float("-inf")).to(tl.float32) * inv_t
            h = base + cols.to(tl.uint32) * 0x27D4EB2F
            h = h ^ (h >> 15)
            h = h * 0x2C1B3C6D
            h = h ^ (h >> 12)
            h = h * 0x297A2D39
            h = h ^ (h >> 15)
            u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            z = tl.where(ok, x - tl.log(-tl.log(u)), float("-inf"))
            zi = tl.argmax(z, 0)
            zmax = tl.max(z, 0)
            xz = tl.sum(tl.where(tl.arange(0, BLOCK) == zi, x, 0.0), 0)
            take = zmax > best
            best_x = tl.where(take, xz, best_x)
            best_i = tl.where(take, start + zi, best_i)
            best = tl.maximum(best, zmax)
            m_new = tl.maximum(m, tl.max(x, 0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block past the vocab is all -inf
            s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), 0)
            m = m_new
        out = part_ptr + (row * C + chunk) * 5
        tl.store(out, m)
        tl.store(out + 1, s)
        tl.store(out + 2, best)
        tl.store(out + 3, best_x)
        tl.store(out + 4, best_i.to(tl.float32))

    @triton.jit
    def _combine(part_ptr, tok_ptr, logp_ptr, C: tl.constexpr):
        row = tl.program_id(0)
        c = tl.arange(0, C)
        p = part_ptr + (row * C + c) * 5
        m = tl.load(p)
        s = tl.load(p + 1)
        z = tl.load(p + 2)
        x = tl.load(p + 3)
        idx = tl.load(p + 4)
        big = tl.max(m, 0)
        total = tl.sum(s * tl.exp(m - big), 0)
        k = tl.argmax(z, 0)
        sel = tl.arange(0, C) == k
        tl.store(tok_ptr + row, tl.sum(tl.where(sel, idx, 0.0), 0).to(tl.int64))
        tl.store(logp_ptr + row, tl.sum(tl.where(sel, x, 0.0), 0) - big - tl.log(total))

    return _partial, _combine


def triton_available(device: torch.device) -> bool:
    return device.type == "cuda" and _triton_kernels() is not None


def sample_fused(logits: Tensor, temperature: float, seeds: Tensor, counters: Tensor,
                 out_tok: Tensor | None = None, out_logp: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CUDA, temperature > 0, no top-p: one pass over [B, V] logits; same tokens as ``sample_torch``.

    Each row is split into 16 vocab chunks read by separate programs (a row per program left most of
    the GPU idle at small batch); a second tiny kernel combines the chunks' maxima, sums and winners.
    """
    B, V = logits.shape
    C, BLOCK = 16, 2048
    chunk = -(-V // C)
    chunk = -(-chunk // BLOCK) * BLOCK
    tok = out_tok if out_tok is not None else torch.empty(B, dtype=torch.int64, device=logits.device)
    logp = out_logp if out_logp is not None else torch.empty(B, dtype=torch.float32, device=logits.device)
    part = torch.empty(B, C, 5, dtype=torch.float32, device=logits.device)
    partial, combine = _triton_kernels()
    partial[(B, C)](logits, logits.stride(0), seeds, counters, part, V, 1.0 / temperature, CHUNK=chunk, BLOCK=BLOCK,
                    C=C, num_warps=8)
    combine[(B,)](part, tok, logp, C=C, num_warps=1)
    return tok, logp


def sample(logits: Tensor, temperature: float, top_p: float, seeds: Tensor, counters: Tensor) -> tuple[Tensor, Tensor]:
    """Fused kernel where it applies (CUDA, T > 0, top_p == 1), the torch path otherwise."""
    if temperature > 0 and top_p >= 1.0 and triton_available(logits.device):
        return sample_fused(logits, temperature, seeds, counters)
    return sample_torch(logits, temperature, top_p, seeds, counters)
