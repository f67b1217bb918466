"""Per-sequence reproducible sampling on the device, with the exact log-probability of each token.

Inverse CDF: one uniform ``u`` per row, and the token is the first vocab id whose cumulative
probability under ``softmax(logits / T)`` exceeds ``u``, an exact draw. ``u`` is a 32-bit integer
hash of (sequence seed, token index), not a stateful generator, so a sequence samples the same
tokens whatever batch it shares and whichever slot it sits in: continuous batching changes
throughput, never results. The hash is computed identically by the torch path (CPU, top-p) and the
fused Triton kernels (CUDA).

Why not Gumbel-max (what this replaced): it needs a hash and two logs per vocab entry, which made
the fused kernel compute-bound (about six times the time it takes to read the logits at 256 rows of a
152k vocabulary). Here the pass over the logits does one exp per entry; a second small kernel scans
only the one vocab chunk holding the sample.

Precision: ``u`` has 24 bits, so probabilities are resolved to ~6e-8, the order the Gumbel path's
uniform had too. The token depends on fp32 prefix sums, so the torch and Triton paths can disagree
when ``u`` falls within their rounding (~1e-6 of the total) of a boundary between two tokens, about
one row in 2000 at 152k vocab; each path alone is deterministic and batch-independent.
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


def _mix32(x: Tensor) -> Tensor:
    """Avalanche a 32-bit value held in int64 (a bijection on [0, 2^32))."""
    x = x ^ (x >> 15)
    x = (x * _R1) & _M32
    x = x ^ (x >> 12)
    x = (x * _R2) & _M32
    return x ^ (x >> 15)


def row_uniform(seeds: Tensor, counters: Tensor) -> Tensor:
    """u in (0, 1] per row: [B] float32, a pure function of (seed, counter), bit-equal to the kernel's.

    Two mixing rounds (seed, then counter) so consecutive tokens of one sequence are not a linear
    progression through a single round. ``(h >> 8) + 0.5`` rounds in fp32 above 2^23 (u = 1 has
    probability 2^-24 and lands on the last token with nonzero probability); both paths round alike.
    """
    s = seeds.long() & _M32
    c = counters.long() & _M32
    h = _mix32((s * _A + _C) & _M32)
    h = _mix32((h + c * _B) & _M32)
    return ((h >> 8).float() + 0.5) * (1.0 / 16777216.0)


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
    probs = logp.exp()
    cum = probs.cumsum(-1)
    target = row_uniform(seeds, counters).to(cum.device)[:, None] * cum[:, -1:]
    tok = torch.searchsorted(cum, target, right=True).squeeze(-1)  # first id with cum > target
    ids = torch.arange(logits.shape[-1], device=logits.device)
    last = torch.where(probs > 0, ids, -1).amax(-1)  # u * total may round past the last step
    tok = torch.minimum(tok, last)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


@lru_cache(maxsize=1)
def _triton_kernels():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _chunk_stats(logits_ptr, stride, part_ptr, V, inv_t, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                     C: tl.constexpr):
        """One (row, vocab chunk): running max m and sum of exp(x - m), x = logit / T."""
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        base = logits_ptr + row.to(tl.int64) * stride
        m = tl.full([], float("-inf"), tl.float32)
        s = tl.zeros([], tl.float32)
        lo = chunk * CHUNK
        for start in range(lo, lo + CHUNK, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
            m_new = tl.maximum(m, tl.max(x, 0))
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block past the vocab is all -inf
            s = s * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), 0)
            m = m_new
        out = part_ptr + (row * C + chunk) * 2
        tl.store(out, m)
        tl.store(out + 1, s)

    @triton.jit
    def _pick(logits_ptr, stride, part_ptr, seeds_ptr, counters_ptr, tok_ptr, logp_ptr, V, inv_t,
              CHUNK: tl.constexpr, BLOCK: tl.constexpr, C: tl.constexpr):
        """One row: pick the chunk holding u * total mass, then the token inside it by a prefix scan."""
        row = tl.program_id(0)
        base = logits_ptr + row.to(tl.int64) * stride
        # u: the same two-round hash as row_uniform, in wrapping uint32 arithmetic
        seed = tl.load(seeds_ptr + row).to(tl.uint32)
        ctr = tl.load(counters_ptr + row).to(tl.uint32)
        h = seed * 0x5BD1E995 + 0x27D4EB2F
        h = h ^ (h >> 15)
        h = h * 0x2C1B3C6D
        h = h ^ (h >> 12)
        h = h * 0x297A2D39
        h = h ^ (h >> 15)
        h = h + ctr * 0x2545F491
        h = h ^ (h >> 15)
        h = h * 0x2C1B3C6D
        h = h ^ (h >> 12)
        h = h * 0x297A2D39
        h = h ^ (h >> 15)
        u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)

        c = tl.arange(0, C)
        m = tl.load(part_ptr + (row * C + c) * 2)
        s = tl.load(part_ptr + (row * C + c) * 2 + 1)
        big = tl.max(m, 0)
        big = tl.where(big == float("-inf"), 0.0, big)
        w = s * tl.exp(m - big)
        total = tl.sum(w, 0)
        cum = tl.cumsum(w, 0)
        target = u * total
        pick = tl.min(tl.where(cum > target, c, C), 0)
        last_c = tl.max(tl.where(w > 0, c, 0), 0)
        pick = tl.where(pick == C, last_c, pick)  # u * total rounded past the last chunk's sum
        rest = target - tl.sum(tl.where(c == pick, cum - w, 0.0), 0)

        # scan the chunk: first token whose inclusive prefix of exp(x - big) exceeds rest
        lo = pick * CHUNK
        run = tl.zeros([], tl.float32)
        found = tl.zeros([], tl.int32)
        tok = tl.zeros([], tl.int32)
        last = tl.full([], -1, tl.int32)
        for off in range(0, CHUNK, BLOCK):
            cols = lo + off + tl.arange(0, BLOCK)
            ok = cols < tl.where(found == 0, V, 0)  # nothing is read once the token is found
            x = tl.load(base + cols, mask=ok, other=float("-inf")).to(tl.float32) * inv_t
            p = tl.exp(x - big)
            live = ok & (p > 0)
            hit = live & (run + tl.cumsum(p, 0) > rest)
            first = tl.min(tl.where(hit, cols, 2147483647), 0)
            has = first < 2147483647
            tok = tl.where(has, first, tok)
            found = tl.where(has, 1, found)
            last = tl.maximum(last, tl.max(tl.where(live, cols, -1), 0))
            run = run + tl.sum(p, 0)
        # the chunk's own sum may round below its partial: then rest is past its end, take its last token
        tok = tl.where(found != 0, tok, tl.maximum(last, 0))
        x_tok = tl.load(base + tok).to(tl.float32) * inv_t
        tl.store(tok_ptr + row, tok.to(tl.int64))
        tl.store(logp_ptr + row, x_tok - big - tl.log(total))

    return _chunk_stats, _pick


def triton_available(device: torch.device) -> bool:
    return device.type == "cuda" and _triton_kernels() is not None


def sample_fused(logits: Tensor, temperature: float, seeds: Tensor, counters: Tensor,
                 out_tok: Tensor | None = None, out_logp: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Temperature > 0, no top-p: the same tokens as ``sample_torch`` up to fp32 rounding at boundaries.

    Kernel 1 splits each row into 16 vocab chunks read by separate programs (a row per program left
    most of the GPU idle at small batch) and keeps only (max, sum exp) per chunk. Kernel 2, a program
    per row, picks the chunk from those sums and rereads just that chunk (1/16 of the row) to find the
    token. No host syncs and fixed shapes, so it is CUDA-graph capturable. No device check here: under
    ``TRITON_INTERPRET=1`` it runs on CPU tensors (tests); ``sample`` decides where it is used.
    """
    B, V = logits.shape
    C, BLOCK = 16, 2048
    chunk = -(-V // C)
    chunk = -(-chunk // BLOCK) * BLOCK
    inv_t = 1.0 / temperature
    tok = out_tok if out_tok is not None else torch.empty(B, dtype=torch.int64, device=logits.device)
    logp = out_logp if out_logp is not None else torch.empty(B, dtype=torch.float32, device=logits.device)
    part = torch.empty(B, C, 2, dtype=torch.float32, device=logits.device)
    chunk_stats, pick = _triton_kernels()
    chunk_stats[(B, C)](logits, logits.stride(0), part, V, inv_t, CHUNK=chunk, BLOCK=BLOCK, C=C, num_warps=8)
    pick[(B,)](logits, logits.stride(0), part, seeds, counters, tok, logp, V, inv_t, CHUNK=chunk, BLOCK=BLOCK,
               C=C, num_warps=8)
    return tok, logp


def sample(logits: Tensor, temperature: float, top_p: float, seeds: Tensor, counters: Tensor) -> tuple[Tensor, Tensor]:
    """Fused kernels where they apply (CUDA, T > 0, top_p == 1), the torch path otherwise."""
    if temperature > 0 and top_p >= 1.0 and triton_available(logits.device):
        return sample_fused(logits, temperature, seeds, counters)
    return sample_torch(logits, temperature, top_p, seeds, counters)
