"""The loss head's Triton passes (logsumexp + target logit; in-place logit gradient) against torch.

On CPU they run under Triton's interpreter (a subprocess with ``TRITON_INTERPRET=1``); on a GPU,
compiled, including a vocabulary wider than one block and a row of -inf-like logits.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
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

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


@pytest.mark.skipif(not HAVE_TRITON, reason="needs triton (CI installs it)")
def test_head_kernels_under_interpreter():
    code = CHECK + "\nfor dt in (torch.float32, torch.bfloat16):\n    check('cpu', dt)\n"
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["ok", "ok"], proc.stderr[-3000:]


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
