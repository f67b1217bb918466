"""The loss head's Triton passes (logsumexp + target logit; in-place logit gradient) against torch.

On CPU they run under Triton's interpreter (a subprocess with ``TRITON_INTERPRET=1``); on a GPU,
compiled, including a vocabulary wider than one block and a row of -inf-like logits.
"""

from __future__ import annotations

import pytest
import torch

CHECK = """
import torch
from areal_hpc.train import head_kernels as hk

def check(device, dtype, n=7, vocab=9000):
    torch.manual_seed(0)
    z = (torch.randn(n, vocab) * 3).to(device, dtype)
    z[2, 100:] = -1e4  # one row with its mass in the first block
    t = torch.randint(0, 100, (n,), device=device)
    g = torch.randn(n, device=device)
    lse, zt = hk.lse_and_target(z, t)
    ref = torch.logsumexp(z.float(), -1)
    assert (lse - ref).abs().max() < 1e-4 and torch.equal(zt, z.float().gather(-1, t[:, None])[:, 0])
    want = ((torch.nn.functional.one_hot(t, vocab).float() - torch.exp(z.float() - ref[:, None])) * g[:, None])
    got = hk.grad_logits_(z.clone(), lse, g, t).float()
    ulp = 0 if dtype == torch.float32 else 2 ** -6  # bf16: one ulp at |x| ~ 2
    assert (got - want.to(dtype).float()).abs().max() <= ulp + 1e-6
    print("ok")
"""

def test_head_kernels_under_interpreter(triton_interpreter):
    code = CHECK + "\nfor dt in (torch.float32, torch.bfloat16):\n    check('cpu', dt)\n"
    assert triton_interpreter("-c", code, timeout=300).split() == ["ok", "ok"]


def test_head_fallback_on_cpu():
    scope: dict = {}
    exec(CHECK, scope)  # noqa: S102 - the same checks, torch path (no Triton on CPU tensors)
    scope["check"]("cpu", torch.float32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_head_kernels_on_gpu():
    scope: dict = {}
    exec(CHECK, scope)  # noqa: S102
    scope["check"]("cuda", torch.bfloat16, n=33, vocab=151936)
    scope["check"]("cuda", torch.float32, n=5, vocab=5000)
