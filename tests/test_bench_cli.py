"""``areal-hpc bench`` finds every benchmark script and passes its options through."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from areal_hpc.bench import BENCHES, bench_dir


def test_every_listed_benchmark_exists():
    for name, (script, _) in BENCHES.items():
        assert (bench_dir() / script).is_file(), name


@pytest.mark.parametrize("name", ["decode", "weights", "e2e"])
def test_bench_passes_options_to_the_script(name):
    out = subprocess.run([sys.executable, "-m", "areal_hpc.cli", "bench", name, "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--out" in out.stdout


@pytest.mark.parametrize("script", ["decode_throughput.py", "train_throughput.py"])
def test_quick_bench_runs_every_path_on_cpu(script, tmp_path):
    """The CPU smoke runs go through the same calls into the engine and trainer as the GPU runs
    (a renamed internal once broke the decode bench's profile only on the device)."""
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, str(bench_dir() / script), "--quick", "--out", str(out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = json.loads(out.read_text())
    assert runs, "no results written"
