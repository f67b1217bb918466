"""``areal-hpc bench NAME``: run one of the benchmark scripts of the source checkout's ``tools/bench``.

The scripts stay plain files (readable, runnable with ``python tools/bench/X.py``); this only finds
them, so a user on a cluster types one command whatever their working directory; each writes its JSON
into that directory (or ``--out``), never into the checkout, whose ``tools/bench/results`` holds the
figures the docs cite. They are not part of the installed package (they import ``tools.bench``), so an
installation made from a wheel or a non-editable ``pip install .`` has none: the command then says in one
line that it needs the source checkout and exits with 2.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path
from typing import Any

BENCHES = {
    "decode": ("decode_throughput.py", "rollout decode tok/s vs HF generate() and the HBM roofline"),
    "train": ("train_throughput.py", "trainer tokens/s and fraction of the bf16 peak"),
    "weights": ("weight_sync.py", "weight sync per version: CUDA IPC / shared memory / broadcast vs a copy"),
    "e2e": ("e2e_one_gpu.py", "end to end: async at several eta vs the sync baseline (any config, 1+ GPUs)"),
    "broadcast": ("broadcast_multi_gpu.py", "weight broadcast GB/s vs all-reduce bus bandwidth (under mpiexec/srun)"),
    "async-vs-sync": ("async_vs_sync.py", "async vs sync on the CPU quickstart"),
    "shared-prompts": ("shared_prompts.py", "trainer step with a group's prompt shared in the stream vs one copy per "
                       "sample"),
    "proximal": ("proximal_pass.py", "proximal log-probs from the training forward vs a separate pass (any config)"),
    "shard-io": ("shard_io.py", "HDF5 rollout-shard write/read speed vs a plain file"),
    "disk-weights": ("disk_weights.py", "disk weight channel: the step's publish stall, write MB/s, a worker's "
                     "load time"),
    "elastic": ("elastic_attach.py", "samples/s of a run with 0, 1, 2, ... attached rollout workers, side by side"),
}

# Where an editable install (or running from the checkout) finds the scripts: the checkout's root is two
# levels above this package. A module attribute so a test can point it where an installed package would.
BENCH_DIR = Path(__file__).resolve().parents[2] / "tools" / "bench"


def bench_dir() -> Path:
    """The checkout's ``tools/bench``; ``FileNotFoundError`` (one line, what to do) when not installed from one."""
    if not BENCH_DIR.is_dir():
        raise FileNotFoundError(f"the benchmarks need the source checkout: {BENCH_DIR} does not exist in this "
                                f"installation; clone the repository and `pip install -e .` there, or run "
                                f"`python tools/bench/<script>.py` from the clone")
    return BENCH_DIR


def _run(args: argparse.Namespace) -> int:
    try:
        script = bench_dir() / BENCHES[args.name][0]
    except FileNotFoundError as e:
        print(f"areal-hpc bench: {e}", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(script.parents[2]))
    runpy.run_path(str(script), run_name="__main__")
    return 0


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``bench`` on the top-level ``areal-hpc`` parser."""
    lines = "\n".join(f"  {k:14} {v[1]}" for k, v in BENCHES.items())
    p = sub.add_parser("bench", help="run a benchmark (prints a table, writes JSON)",
                       description=f"benchmarks:\n{lines}", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(BENCHES))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own options (--help for them)")
    p.set_defaults(func=_run)
    return p
