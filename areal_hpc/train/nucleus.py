"""The mass of the top-p nucleus, so the trainer's log-probs are those of the distribution the rollout sampled.

With ``rollout.top_p < 1`` every engine samples from softmax(z) (z = logits / T) truncated to its nucleus, the
smallest set of highest-probability tokens whose mass reaches ``top_p``, renormalised, and records that
log-prob as the behaviour policy's. The trainer therefore reads its proximal and current log-probs from the
same truncated distribution: ``logp(t) - log m``, m the nucleus mass. Without ``- log m`` the behaviour
weight pi_prox / pi_behav of a fresh sample would be m (< 1), not 1.

The nucleus is the same rule as ``rollout/sampling.py::nucleus`` (and vLLM's): in descending order of
probability a token is kept while the mass before it is < top_p, so the first is always kept. ``log m`` is a
constant of the gradient (computed without grad): the gradient stays that of log softmax, and a token outside
this nucleus (a stale sample's) keeps p / m rather than 0, so its weight never becomes 0 or -inf.

Cost, only when top_p < 1 (nothing is computed at 1): a top-k of each row (k = ``TOP_K``), which settles every
row whose k largest probabilities already reach top_p, and a full sort of the other rows (flat distributions),
a chunk at a time, after one host sync per call to find them. The head costs two to three times as much
with every row settled by the top-k (figures: docs/gpu-path.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["SORT_CHUNK_BYTES", "TOP_K", "log_mass", "log_nucleus_mass", "top_k_mass"]

# Largest logits read per row before falling back to a full sort. A top-k costs about the same for any k up to
# ~1000 (radix select: its time does not grow with k there), so k is large
# enough to settle nearly every row of an LM's nucleus at top_p ~0.9.
TOP_K = 1024
# Memory of one full-sort chunk: its fp32 logits, sorted values, int64 order, probabilities and prefix sums
# (~24 bytes a vocab entry: ~70 rows at a 152k vocabulary).
SORT_CHUNK_BYTES = 256 << 20


def _sorted_mass(s: Tensor, lse: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """(nucleus mass, whether the nucleus reaches past these values) of rows of logits ``s`` sorted descending."""
    p = torch.exp(s.float() - lse[:, None])
    cum = p.cumsum(-1)
    kept = (cum - p) < top_p  # the mass before a token: the same test as the rollout's
    return torch.where(kept, p, 0.0).sum(-1), cum[:, -1] < top_p


def top_k_mass(z: Tensor, lse: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """Nucleus mass of each row of logits ``z`` [N, V] (``lse``: their fp32 logsumexp) from its ``TOP_K`` largest,
    and ``short`` [N]: the row's nucleus reaches past them, so its mass is not final (``log_mass`` sorts it)."""
    z = z.detach()
    k = min(TOP_K, z.shape[-1])
    mass, short = _sorted_mass(z.topk(k, -1, sorted=True).values, lse.detach().float(), top_p)
    if k == z.shape[-1]:  # the top-k was a full sort: every row is final
        short = torch.zeros_like(short)
    return mass, short


@torch.no_grad()
def log_mass(mass: Tensor, short: Tensor, logits: Callable[[Tensor], Tensor], vocab: int, top_p: float,
             chunk_bytes: int = SORT_CHUNK_BYTES) -> Tensor:
    """fp32 ``log m`` per row from ``top_k_mass``'s results; the ``short`` rows get their exact mass from a full
    sort of ``logits(rows)`` (their [n, vocab] logits, recomputed or indexed by the caller), a memory-bounded
    chunk of rows at a time."""
    rest = short.nonzero().squeeze(-1)  # the one host sync: which rows need the sort
    if rest.numel():
        mass = mass.clone()
        rows = max(1, chunk_bytes // (24 * vocab))
        for a in range(0, rest.numel(), rows):
            idx = rest[a:a + rows]
            z = logits(idx).float()
            mass[idx] = _sorted_mass(z.sort(-1, descending=True).values, torch.logsumexp(z, -1), top_p)[0]
    return mass.log()


@torch.no_grad()
def log_nucleus_mass(z: Tensor, top_p: float, chunk_bytes: int = SORT_CHUNK_BYTES) -> Tensor:
    """fp32 ``log m`` of each row of logits ``z`` [N, V] (already divided by the temperature); 0 at top_p >= 1.

    Rows are read ``chunk_bytes / (24 V)`` at a time, so memory stays bounded on a large vocabulary."""
    n, vocab = z.shape
    if top_p >= 1.0 or n == 0:
        return torch.zeros(n, dtype=torch.float32, device=z.device)
    rows = max(1, chunk_bytes // (24 * vocab))
    mass = torch.empty(n, dtype=torch.float32, device=z.device)
    short = torch.empty(n, dtype=torch.bool, device=z.device)
    for a in range(0, n, rows):
        zc = z[a:a + rows]
        mass[a:a + rows], short[a:a + rows] = top_k_mass(zc, torch.logsumexp(zc.float(), -1), top_p)
    return log_mass(mass, short, lambda idx: z[idx], vocab, top_p, chunk_bytes)
