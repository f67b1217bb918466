"""The multi-GPU broadcast benchmark runs as a cluster would start it, here on CPU/gloo: 1 sender and
3 receivers through the system's own WeightSender/WeightReceiver, every rank ending with identical
weights, plus the all-reduce reference measured in the same run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.mpi


def test_broadcast_bench_four_ranks(tmp_path):
    mpiexec = Path(sys.executable).parent / "mpiexec"
    out = tmp_path / "bcast.json"
    proc = subprocess.run([str(mpiexec), "-n", "4", sys.executable, "tools/bench/broadcast_multi_gpu.py", "--quick",
                           "--presets", "qwen2-0.5b", "--versions", "2", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ranks"] == 4 and result["backend"] == "gloo"
    (row,) = result["rows"]
    assert row["identical_on_all_ranks"]
    assert row["broadcast_GBps"] > 0 and row["allreduce_busbw_GBps"] > 0
