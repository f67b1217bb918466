"""Shared fixtures for the CPU test suite."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny matmuls are
    dominated by thread hand-off on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def triton_interpreter() -> Callable[..., str]:
    """Run ``python ARGS...`` with ``TRITON_INTERPRET=1`` in a subprocess and return its stdout.

    Why a subprocess: Triton reads the variable when a kernel is defined (at import), so a process
    that already imported the kernels compiled cannot switch. The GPU kernels' CPU tests go through
    this; without triton installed they skip (CI installs it with the dev extras).
    """
    if importlib.util.find_spec("triton") is None:
        pytest.skip("needs triton (pip install triton; CI installs it)")

    def run(*args: str, timeout: float = 600) -> str:
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=timeout,
                              env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path})
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    return run


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that skips without CUDA as ``gpu``: ``pytest -m gpu`` is the device machine's run."""
    for item in items:
        if any("CUDA" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture(scope="session")
def smol_checkpoint(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer and chat template over a tiny random Llama (``tests/smol.py``), built once per session."""
    from tests.smol import tiny_smol_checkpoint

    return tiny_smol_checkpoint(tmp_path_factory.getbasetemp() / "smol-tiny")


@pytest.fixture(scope="session")
def real_smol_cache(tmp_path_factory) -> Path:
    """A run.cache_dir the tests on SmolLM2-135M-Instruct's real weights share: its GGUF is dequantized into it
    once per session (~15 s), by whichever of them runs first."""
    return tmp_path_factory.getbasetemp() / "smol-real-cache"
