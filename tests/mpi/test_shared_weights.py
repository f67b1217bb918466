"""Real jobs with shared-buffer weight sync (weights.kind=shared / auto on one node, CPU shared memory),
and the broadcast path for comparison.

The run's own records must show what the broadcast path shows: versions applied in order on every
rollout rank, staleness within η, and no /dev/shm file left behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import run_train
from .test_async_loop import _run_id, check_records

pytestmark = pytest.mark.mpi

STEPS = 12


def _kind_chosen(run_dir: Path) -> str:
    text = (run_dir / "logs" / "rank0.log").read_text()
    line = next(x for x in text.splitlines() if "weights.kind=" in x)
    return line.split("-> ")[1].split()[0]


# The last two: the fast engine with a bf16 rollout copy fed by fp32 master weights (the GPU layout,
# on CPU): both sync paths must convert, and the run must stay within eta.
FAST_BF16 = ("rollout.engine=fast", "rollout.dtype=bfloat16")


@pytest.mark.parametrize(("kind", "chosen", "extra"), [
    ("auto", "shared", ()), ("broadcast", "broadcast", ()),  # auto picks shared here: shared's own run
    ("shared", "shared", FAST_BF16), ("broadcast", "broadcast", FAST_BF16),
])
def test_weights_kind_run(job_root, kind: str, chosen: str, extra: tuple[str, ...]):
    name = f"weights_{kind}" + ("_fast_bf16" if extra else "")
    job = run_train(job_root, name, f"run.steps={STEPS}", f"weights.kind={kind}", "eval.enabled=false", *extra)
    assert job.rc == 0, job.output[-3000:]
    assert _kind_chosen(job.run_dir) == chosen
    rec = check_records(job.run_dir, eta=4, steps=STEPS)  # staleness within eta, versions never go backwards
    samples = rec["samples"]
    # Versions were applied: later samples carry newer policy versions than the first ones, on every rank.
    for rank, per_rank in samples.groupby("rank"):
        assert per_rank["max_version"].max() >= 2, f"rollout rank {rank} never applied a new version"
    # Samples the trainer rejected (more than eta stale) are rare (check_records has checked that none was
    # trained): each step takes each rollout rank's share, so a faster rank cannot push the other's groups a
    # version late; only a group overtaken by many later groups of its own rank can still miss its step.
    fates = rec["log"].step_samples()
    assert (fates["fate"] == "rejected").mean() < 0.05, fates["fate"].value_counts()
    summary = json.loads((job.run_dir / "summary.json").read_text())
    assert summary["final_version"] == STEPS
    assert not Path(f"/dev/shm/areal_{_run_id(job.run_dir)}_weights").exists(), "shared weights file left behind"
