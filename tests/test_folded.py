"""Folding the decode layer's RMSNorms into the projections computes the same layer.

CPU cases in float32 against ``rms_norm`` + projection; the Triton SiLU-mul runs under the
interpreter in the engine test of ``test_decode_kernel.py`` and compiled on a GPU here.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from areal_hpc.model.qwen2 import rms_norm
from areal_hpc.rollout.fast.folded import FoldedWeights, silu_mul, silu_mul_torch, unfold_qkv

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _layer(H=48, Q=40, inter=24, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return torch.randn(*s, generator=g).to(device, dtype)
    return SimpleNamespace(ln1=1 + 0.3 * r(H), ln2=1 + 0.3 * r(H), w_qkv=r(Q, H), b_qkv=r(Q), w_gu=r(2 * inter, H))


def test_folded_projections_equal_norm_then_projection_and_follow_updates():
    L = _layer()
    fold = FoldedWeights([L])
    x = 5 * torch.randn(7, 48, generator=torch.Generator().manual_seed(1))
    eps = 1e-6
    qkv = unfold_qkv(x @ fold.w_qkv[0].t(), x, L.b_qkv, eps)
    assert torch.allclose(qkv, rms_norm(x, L.ln1, eps) @ L.w_qkv.t() + L.b_qkv, atol=1e-4)
    g, u = (rms_norm(x, L.ln2, eps) @ L.w_gu.t()).chunk(2, -1)
    assert torch.allclose(silu_mul_torch(x @ fold.w_gu[0].t(), x, eps), torch.nn.functional.silu(g) * u, atol=1e-4)
    before = fold.w_gu[0].data_ptr()
    with torch.no_grad():
        L.ln2.mul_(2)  # a weight update: the copies are rewritten in place (graphs keep pointing at them)
    fold.refresh()
    assert fold.w_gu[0].data_ptr() == before
    assert torch.allclose(fold.w_gu[0], L.w_gu * L.ln2[None, :])


@cuda
@pytest.mark.parametrize("inter", [4864, 1000, 24])
def test_gpu_silu_mul_kernel_matches_torch(inter):
    """bf16: the kernel's row scale and SiLU-mul against the fp32 torch form, to bf16 rounding."""
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(256, 896, generator=g)).to("cuda", torch.bfloat16)
    gu = torch.randn(256, 2 * inter, generator=g).to("cuda", torch.bfloat16) * 40
    a, b = silu_mul(gu, x, 1e-6, use_kernel=True), silu_mul(gu, x, 1e-6, use_kernel=False)
    assert a.shape == b.shape == (256, inter)
    assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2)
