"""The decode layer's two RMSNorms folded into the projections that read them.

``rms_norm(x, w) @ W.T`` equals ``r * (x @ (W * w).T)`` with ``r = 1 / rms(x)`` one number per row.
So the norm weight is folded into a copy of the q/k/v and gate/up weights once per weight version,
and the row scale is applied by the kernel that reads the projection's output anyway: the decode
attention (``decode_kernel.py``, with the q/k/v bias after it) and the SiLU-mul below. Each takes
``r`` from the residual row itself (H values, a few KB per program). This is the engine's only
decode layer because it has the fewest launches per step: two norm launches per layer cost about 5%
of a large-batch step, almost all launch and drain, not bytes.

The price is memory: a second copy of the q/k/v and gate/up weights (two thirds of each Qwen2
layer's, half of the 0.5B model's bytes).
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None


class FoldedWeights:
    """Per layer, the q/k/v and gate/up weights with the preceding norm's weight folded in.

    ``refresh()`` after every weight update: the copies are written in place, so CUDA graphs that
    captured them keep reading the right storage.
    """

    def __init__(self, layers: list) -> None:
        self.layers = layers
        self.w_qkv = [torch.empty_like(L.w_qkv) for L in layers]
        self.w_gu = [torch.empty_like(L.w_gu) for L in layers]
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        for L, qkv, gu in zip(self.layers, self.w_qkv, self.w_gu, strict=True):
            torch.mul(L.w_qkv, L.ln1[None, :], out=qkv)
            torch.mul(L.w_gu, L.ln2[None, :], out=gu)


def row_scale(x: Tensor, eps: float) -> Tensor:
    """1 / rms of each row, in fp32 [T, 1] (the plain-torch form of what the kernels compute)."""
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


def unfold_qkv(qkv: Tensor, x: Tensor, bias: Tensor | None, eps: float) -> Tensor:
    """The folded projection's output as the plain one: row scale, then bias (library attention paths)."""
    out = qkv.float() * row_scale(x, eps)
    if bias is not None:
        out = out + bias.float()
    return out.to(qkv.dtype)


def silu_mul_torch(gu: Tensor, x: Tensor, eps: float) -> Tensor:
    r = row_scale(x, eps)
    g, u = gu.float().chunk(2, dim=-1)
    g = g * r
    return (torch.nn.functional.silu(g) * (u * r)).to(gu.dtype)


if triton is not None:

    @triton.jit
    def _silu_mul(gu_ptr, x_ptr, out_ptr, s_gu, s_x, s_out, inter, eps, HID: tl.constexpr, HP: tl.constexpr,
                  BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        hx = tl.arange(0, HP)
        xr = tl.load(x_ptr + row * s_x + hx, mask=hx < HID, other=0.0).to(tl.float32)
        r = tl.rsqrt(tl.sum(xr * xr, 0) / HID + eps)
        m = cols < inter
        g = tl.load(gu_ptr + row * s_gu + cols, mask=m, other=0.0).to(tl.float32) * r
        u = tl.load(gu_ptr + row * s_gu + inter + cols, mask=m, other=0.0).to(tl.float32) * r
        out = g * tl.sigmoid(g) * u
        tl.store(out_ptr + row * s_out + cols, out.to(out_ptr.dtype.element_ty), mask=m)


def kernel_available(device: torch.device) -> bool:
    """The Triton SiLU-mul runs on CUDA, or on CPU tensors under Triton's interpreter (tests)."""
    from areal_hpc.rollout.fast.decode_kernel import interpreting

    return triton is not None and (device.type == "cuda" or interpreting())


def silu_mul(gu: Tensor, x: Tensor, eps: float, use_kernel: bool) -> Tensor:
    """``silu(r * g) * (r * u)`` for the folded gate/up output ``gu`` [T, 2I] and residual rows ``x`` [T, H]."""
    if not use_kernel:
        return silu_mul_torch(gu, x, eps)
    T, inter = gu.shape[0], gu.shape[1] // 2
    assert gu.stride(1) == 1 and x.stride(1) == 1
    out = torch.empty(T, inter, dtype=gu.dtype, device=gu.device)
    block = 1024
    _silu_mul[(T, triton.cdiv(inter, block))](gu, x, out, gu.stride(0), x.stride(0), out.stride(0), inter, eps,
                                             HID=x.shape[1], HP=triton.next_power_of_2(x.shape[1]), BLOCK=block,
                                             num_warps=4)
    return out
