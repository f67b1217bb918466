"""``areal-hpc bench`` finds every benchmark script and passes its options through."""

from __future__ import annotations

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
