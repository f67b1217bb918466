"""The loss head's two row-wise passes over the [rows, vocab] logits, as Triton kernels on CUDA.

Why: on a 152k vocabulary these passes move ~10 GB per 16k rows, and inductor's dynamic-shape
versions of them ran at a fraction of the copy bandwidth (docs/dev/optimizing-trainer.md).
Here each is one kernel at the copy bandwidth, and the gradient pass writes in place over the
logits, so backward needs no second [rows, vocab] buffer.

* ``lse_and_target(z, t)``: fp32 logsumexp of every row and the logit at each row's target;
* ``grad_logits_(z, lse, g, t)``: ``z <- g * (onehot(t) - exp(z - lse))`` in z's dtype, in place.

Elsewhere (CPU, or no Triton) the same functions run in plain torch.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

BLOCK = 4096

if triton is not None:

    @triton.jit
    def _lse_target(z_ptr, t_ptr, lse_ptr, zt_ptr, V, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = z_ptr + row * stride
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK], tl.float32)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_ref) + tl.exp(x - m_ref)
            m = m_new
        big = tl.max(m, 0)
        total = tl.sum(s * tl.exp(m - big), 0)
        tl.store(lse_ptr + row, big + tl.log(total))
        t = tl.load(t_ptr + row)
        tl.store(zt_ptr + row, tl.load(base + t).to(tl.float32))

    @triton.jit
    def _grad_inplace(z_ptr, lse_ptr, g_ptr, t_ptr, V, stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = cols < V
        ptr = z_ptr + row * stride + cols
        x = tl.load(ptr, mask=ok, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + row)
        g = tl.load(g_ptr + row)
        t = tl.load(t_ptr + row)
        gz = g * (tl.where(cols == t, 1.0, 0.0) - tl.exp(x - lse))
        tl.store(ptr, gz.to(z_ptr.dtype.element_ty), mask=ok)


def _use_triton(z: Tensor) -> bool:
    return triton is not None and (z.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1") \
        and z.stride(-1) == 1


def lse_and_target(z: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 logsumexp of each row of ``z`` [N, V] and the logit at ``t`` [N]: one read of ``z``."""
    if not _use_triton(z):
        zf = z.float()
        return torch.logsumexp(zf, -1), zf.gather(-1, t[:, None]).squeeze(-1)
    N, V = z.shape
    lse = torch.empty(N, dtype=torch.float32, device=z.device)
    zt = torch.empty(N, dtype=torch.float32, device=z.device)
    if N:
        _lse_target[(N,)](z, t, lse, zt, V, z.stride(0), BLOCK=BLOCK, num_warps=8)
    return lse, zt


def grad_logits_(z: Tensor, lse: Tensor, g: Tensor, t: Tensor) -> Tensor:
    """In place: ``z <- g * (onehot(t) - softmax(z))``, i.e. d(sum g * logp_t)/dz, in ``z``'s dtype."""
    if not _use_triton(z):
        onehot = torch.arange(z.shape[-1], device=z.device)[None, :] == t[:, None]
        return z.copy_((onehot.float() - torch.exp(z.float() - lse[:, None])) * g[:, None])
    N, V = z.shape
    if N:
        _grad_inplace[(N, triton.cdiv(V, BLOCK))](z, lse, g.float().contiguous(), t, V, z.stride(0), BLOCK=BLOCK,
                                                   num_warps=8)
    return z
