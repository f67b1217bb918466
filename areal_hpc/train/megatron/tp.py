"""Model parallelism over the trainer ranks: the layout, the vocab-parallel log-prob head, the global gradient norm
and the gathers that turn shards back into whole tensors.

Layout: ``n_trainer = tp * pp * dp``; a model replica is ``tp * pp`` consecutive trainer ranks, a
tensor-parallel group ``tp`` consecutive ranks of it (one pipeline stage; consecutive so that on a cluster
the group shares a node's fast links), and a data-parallel group holds the ranks at the same place in every
replica.

No megatron import here: these are plain ``torch.distributed`` collectives over the groups the engine made.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from areal_hpc.train import nucleus
from areal_hpc.train.head_kernels import grad_logits_, lse_and_target

__all__ = ["Layout", "all_gather_tensor", "clip_grad_norm_tp", "layout", "vocab_parallel_logp"]


@dataclass(frozen=True)
class Layout:
    """Groups of trainer indices (0..n_trainer-1), each a list in rank order."""

    tp: list[list[int]]  # one pipeline stage of one replica: consecutive ranks
    pp: list[list[int]]  # the stages of one replica that hold the same tensor-parallel shard
    dp: list[list[int]]  # the same place in every replica
    mp: list[list[int]]  # one whole replica: tp * pp consecutive ranks


def layout(n_trainer: int, tp: int, pp: int = 1) -> Layout:
    """Trainer ranks as ``dp`` replicas of ``tp * pp`` consecutive ranks; inside a replica, stage ``s`` is ranks
    ``s*tp .. s*tp + tp - 1``, so tensor-parallel groups (the most traffic) are neighbours."""
    if tp < 1 or pp < 1 or n_trainer % (tp * pp):
        raise ValueError(f"trainer.tensor_parallel={tp} times trainer.pipeline_parallel={pp} does not divide "
                         f"cluster.n_trainer={n_trainer}; use sizes whose product divides the number of trainer ranks")
    m = tp * pp
    mp = [list(range(a, a + m)) for a in range(0, n_trainer, m)]
    return Layout(tp=[b[s * tp:(s + 1) * tp] for b in mp for s in range(pp)],
                  pp=[b[t::tp] for b in mp for t in range(tp)],
                  dp=[list(range(i, n_trainer, m)) for i in range(m)], mp=mp)


def all_gather_tensor(t: Tensor, group: dist.ProcessGroup) -> list[Tensor]:
    """Every rank's ``t`` (same shape and dtype on all ranks), in group-rank order."""
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, t.contiguous(), group=group)
    return out


def _row_chunk(vocab: int, chunk_bytes: int) -> int:
    return max(1, chunk_bytes // (4 * vocab))


class _VocabParallelLogp(torch.autograd.Function):
    """``log softmax(h @ W.T)[t]`` over a vocabulary split by rows of ``W`` across the tensor-parallel ranks.

    Every rank holds the same rows ``h`` (the replicated final norm's output) and its own vocabulary chunk
    ``w_t``; each computes its chunk's logits a block of rows at a time, and only three [N] vectors cross the
    group: the per-rank logsumexp (combined as max + log-sum-exp) and the target logit from the rank that owns
    it. Backward recomputes each block's logits, turns them into ``g * (onehot - softmax)`` with the global
    logsumexp, and all-reduces ``dL/dh``: each rank's vocabulary chunk gives a part of it, and the layers below
    expect the whole gradient on every rank (what Megatron's own output layer does with
    ``copy_to_tensor_model_parallel_region``).
    """

    @staticmethod
    def forward(ctx, h: Tensor, w_t: Tensor, local_t: Tensor, rows: int,
                group: dist.ProcessGroup) -> tuple[Tensor, Tensor]:
        n = h.shape[0]
        owned = local_t >= 0
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        zt = torch.empty(n, dtype=torch.float32, device=h.device)
        for a in range(0, n, rows):
            lse[a:a + rows], zt[a:a + rows] = lse_and_target(h[a:a + rows] @ w_t.T, local_t[a:a + rows].clamp(min=0))
        zt = torch.where(owned, zt, 0.0)
        top = lse.clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
        s = torch.exp(lse - top)
        dist.all_reduce(s, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(zt, op=dist.ReduceOp.SUM, group=group)
        lse = top + s.log()
        ctx.save_for_backward(h, w_t, local_t, lse)
        ctx.rows, ctx.group = rows, group
        ctx.mark_non_differentiable(lse)
        return zt - lse, lse

    @staticmethod
    def backward(ctx, g: Tensor, _g_lse: Tensor | None) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        h, w_t, local_t, lse = ctx.saved_tensors
        g = g.float()
        gh = torch.empty_like(h)
        gw = torch.zeros(w_t.shape, dtype=torch.float32, device=w_t.device)
        for a in range(0, h.shape[0], ctx.rows):
            b = a + ctx.rows
            hc = h[a:b]
            # a target another rank owns is -1 here: no column of this chunk is its one-hot
            gz = grad_logits_(hc @ w_t.T, lse[a:b], g[a:b], local_t[a:b])
            torch.mm(gz, w_t, out=gh[a:b])
            gw += (gz.T @ hc).float()
        dist.all_reduce(gh, op=dist.ReduceOp.SUM, group=ctx.group)
        return gh, gw.to(w_t.dtype), None, None, None


@torch.no_grad()
def _vocab_parallel_log_mass(h: Tensor, w_t: Tensor, lse: Tensor, top_p: float, group: dist.ProcessGroup,
                             width: int, chunk_bytes: int) -> Tensor:
    """``log m`` of the top-p nucleus of each row (``train/nucleus.py``) over the split vocabulary.

    The global ``TOP_K`` largest logits of a row are among the union of every rank's local ``TOP_K`` largest, so
    one all-gather of those [N, k] settles every row whose nucleus they reach; the rare rows it does not (flat
    distributions) all-gather their local logits, a block of rows at a time, and sort the whole row. Each rank
    decides the same rows (from gathered values), so the collectives match. Every rank's logits are padded with
    -inf to ``width`` columns (the padded vocabulary's rows per rank), so the gathered shapes agree."""
    n, local = h.shape[0], w_t.shape[0]

    def logits(x: Tensor) -> Tensor:
        return F.pad((x @ w_t.T).float(), (0, width - local), value=-math.inf)

    k = min(nucleus.TOP_K, width)
    rows = _row_chunk(width, chunk_bytes)
    top = torch.cat([logits(h[a:a + rows]).topk(k, -1, sorted=True).values for a in range(0, n, rows)])
    merged = torch.cat(all_gather_tensor(top, group), dim=-1)
    k_all = min(nucleus.TOP_K, merged.shape[-1])
    mass, short = nucleus._sorted_mass(merged.topk(k_all, -1, sorted=True).values, lse, top_p)
    if k == width and k_all == merged.shape[-1]:  # every rank's whole chunk was in its top-k: nothing left out
        short = torch.zeros_like(short)
    rest = short.nonzero().squeeze(-1)
    per = max(1, chunk_bytes // (24 * width * dist.get_world_size(group)))  # a gathered row: the whole vocabulary
    for a in range(0, rest.numel(), per):
        idx = rest[a:a + per]
        z = torch.cat(all_gather_tensor(logits(h[idx]), group), dim=-1)
        mass[idx] = nucleus._sorted_mass(z.sort(-1, descending=True).values, lse[idx], top_p)[0]
    return mass.log()


def vocab_parallel_logp(h: Tensor, weight: Tensor, targets: Tensor, *, vocab_start: int, width: int,
                        temperature: float, top_p: float, group: dist.ProcessGroup,
                        chunk_bytes: int = nucleus.SORT_CHUNK_BYTES) -> Tensor:
    """fp32 ``log softmax(h @ W.T / T)[targets] - log m`` for rows ``h`` [N, H] replicated over the
    tensor-parallel ``group``, where this rank holds vocabulary rows ``vocab_start .. vocab_start + len(weight)``
    of ``W`` (padding rows already left out; ``width``: every rank's share of the padded vocabulary). The same
    value on every rank of the group; the gradient reaches this rank's ``weight`` and, all-reduced, ``h``. No
    rank makes more than a block of its own chunk's logits.

    top_p < 1: ``log m`` (a constant of the gradient, as on one rank) comes from a vocab-parallel top-k
    (``_vocab_parallel_log_mass``), so no rank gathers the head weight or a whole row of logits except for the
    rows the top-k does not settle."""
    if h.shape[0] == 0:
        return h.new_zeros(0, dtype=torch.float32)
    with torch.autocast(h.device.type, enabled=False):
        w_t = (weight / temperature if temperature != 1.0 else weight).to(h.dtype)
        local_t = targets.long() - vocab_start
        local_t = torch.where((local_t >= 0) & (local_t < w_t.shape[0]), local_t, -1)
        rows = _row_chunk(w_t.shape[0], chunk_bytes)
        out, lse = _VocabParallelLogp.apply(h, w_t, local_t, rows, group)
        if top_p < 1.0:
            out = out - _vocab_parallel_log_mass(h.detach(), w_t.detach(), lse, top_p, group, width,
                                             chunk_bytes)
        return out


@torch.no_grad()
def clip_grad_norm_tp(params: Sequence[torch.nn.Parameter], kinds: Iterable[str], max_norm: float,
                      tp_group: dist.ProcessGroup | None, pp_group: dist.ProcessGroup | None = None) -> float:
    """``clip_grad_norm_`` of the whole model when its parameters are split over tensor-parallel ranks and
    pipeline stages. ``kinds`` per parameter: ``split`` (a shard: squares summed over ``tp_group``),
    ``replicated`` (the same on every tensor-parallel rank: counted once) or ``copy`` (a second copy of a
    weight another stage holds, a tied head: not counted). Each stage's sum is then summed over ``pp_group``.
    Every rank gets the same norm, so all clip (or skip a non-finite step) alike."""
    sq = torch.zeros(2, dtype=torch.float64, device=params[0].device)
    for p, kind in zip(params, kinds, strict=True):
        if p.grad is not None and kind != "copy":
            sq[0 if kind == "split" else 1] += p.grad.detach().double().pow(2).sum()
    if tp_group is not None:
        part = sq[:1].clone()
        dist.all_reduce(part, op=dist.ReduceOp.SUM, group=tp_group)
        sq[0] = part[0]
    total = sq.sum().reshape(1)
    if pp_group is not None:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=pp_group)
    norm = float(total.sqrt())
    if math.isfinite(norm) and max_norm < math.inf:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.tensor(norm, device=params[0].device))
    return norm
