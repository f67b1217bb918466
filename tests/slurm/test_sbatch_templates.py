"""The sbatch templates in slurm/, submitted as they are to a local single-node Slurm.

Each job's results are read from its own records (summary.json, config.yaml, the HDF5 log), the way
a user checks a run afterwards.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml

from areal_hpc.storage.runlog import RunLog

from .conftest import REPO, sbatch, wait_job

pytestmark = pytest.mark.slurm

RUN_STEPS = 60
SWEEP_ETAS = {0: 0, 1: 2, 2: 4}  # array task -> rollout.eta, as in slurm/sweep-eta.txt


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slurm-jobs")


def cache_of(root: Path) -> Path:
    # The session's one warm-up cache (tests/warmup.py): the tiny model is warmed up once.
    return root.parent / "warmup-cache"


def job_output(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else f"(no {path})"


def check_accounting(run_dir: Path) -> dict:
    """Every generated sample is trained, rejected or left over at stop: exactly once."""
    summary = json.loads((run_dir / "summary.json").read_text())
    log = RunLog(run_dir, strict=True)
    assert log.finished and not log.partials
    samples = log.samples()
    fates = log.step_samples()
    ids = samples["sample_id"].tolist()
    assert ids and len(ids) == len(set(ids)), "a sample id was generated twice"
    used = fates[fates["fate"] == "used"]["sample_id"].tolist()
    rejected = fates[fates["fate"] == "rejected"]["sample_id"].tolist()
    every = used + rejected + [int(i) for i in log.leftover()]
    dup = [i for i, c in Counter(every).items() if c > 1]
    assert not dup, f"samples trained/rejected more than once: {dup[:10]}"
    assert set(every) == set(ids), "a generated sample was neither trained, rejected nor left over"
    assert summary["generated"] == len(ids)
    return summary


def test_run_sbatch_learns(slurm_env, root):
    """slurm/run.sbatch: 1 node x 3 tasks (1 trainer + 2 rollout) started by srun --mpi=pmi2."""
    out = root / "run-%j.out"
    job = sbatch(slurm_env, f"--output={out}", "slurm/run.sbatch",
                 f"run.output_dir={root}", "run.name=slurm_run", f"run.cache_dir={cache_of(root)}",
                 f"run.steps={RUN_STEPS}", "run.timeout_s=400", "run.progress=false")
    out = root / f"run-{job}.out"
    (rec,) = wait_job(slurm_env, job, timeout=360)
    assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", job_output(out)
    run_dir = root / "slurm_run"
    summary = check_accounting(run_dir)
    assert summary["final_version"] == RUN_STEPS
    before, after = summary["accuracy_before"], summary["accuracy_after"]
    assert after >= before + 0.03, f"held-out accuracy {before:.3f} -> {after:.3f}: no clear improvement"
    # The ranks were the job's tasks: one MPI world of 3 with both roles.
    roles = Counter(json.loads(p.read_text())["role"] for p in (run_dir / "ranks").glob("*.json"))
    assert roles == {"trainer": 1, "rollout": 2}, roles
    text = out.read_text()
    assert "run.sbatch: job" in text and "3 ranks (1 trainer)" in text
    # The batch script ran srun under the MPS wrapper; this CPU node has no GPU, so it started no daemon.
    assert summary["cuda_mps"].startswith("off (no GPU visible"), summary["cuda_mps"]


def test_sweep_sbatch_array(slurm_env, root):
    """slurm/sweep.sbatch: a 3-task array over eta; one independent run folder per array task."""
    sweep_dir = root / "sweep"
    env = dict(slurm_env, SWEEP_DIR=str(sweep_dir), SWEEP_NAME="eta")
    args = [f"--output={root}/sweep-%A_%a.out"]
    if not any(cache_of(root).glob("tiny-*/config.json")):
        args.append("--array=0-2%1")  # no warm-up cache yet: one task at a time, so it is built once
    job = sbatch(env, *args, "slurm/sweep.sbatch", f"run.cache_dir={cache_of(root)}", "run.steps=10",
                 "eval.enabled=false", "run.timeout_s=300", "run.progress=false")
    records = wait_job(slurm_env, job, timeout=300, n_tasks=3)
    assert len(records) == 3
    for rec in records:
        task = int(rec["ArrayTaskId"])
        assert rec["JobState"] == "COMPLETED" and rec["ExitCode"] == "0:0", job_output(root / f"sweep-{job}_{task}.out")
    runs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert runs == ["eta_task0", "eta_task1", "eta_task2"], runs
    for task, eta in SWEEP_ETAS.items():
        run_dir = sweep_dir / f"eta_task{task}"
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["final_version"] == 10
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["rollout"]["eta"] == eta
        assert cfg["async"] is (task != 0)  # the first line is the synchronous baseline
        assert cfg["cluster"]["n_trainer"] == 1 and cfg["cluster"]["n_rollout"] == 2
        check_accounting(run_dir)


def test_srun_without_mpi_plugin_is_explained(slurm_env, root):
    """The classic mistake: srun --mpi=none gives every task a world of 1; the run says so and fails."""
    proc = subprocess.run(["srun", "--mpi=none", "-n", "3", str(Path(sys.executable).parent / "areal-hpc"), "train",
                           str(REPO / "configs" / "quickstart.yaml"), f"run.output_dir={root}", "run.name=nompi",
                           f"run.cache_dir={cache_of(root)}", "run.steps=5"],
                          cwd=REPO, env=slurm_env, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "srun started 3 tasks but MPI sees a world of 1" in out, out[-3000:]
    assert "--mpi=pmi2" in out
