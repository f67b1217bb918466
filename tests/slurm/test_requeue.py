"""Preemption on a real Slurm: `scontrol requeue` mid-training, the job resumes from its checkpoint."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter

import numpy as np
import pytest

from areal_hpc.storage.runlog import RunLog
from tests.warmup import shared_warmup_cache

from .conftest import job_records, sbatch, wait_job

pytestmark = pytest.mark.slurm
STEPS = 80


def test_requeued_job_resumes_without_losing_or_repeating_prompts(slurm_env, tmp_path_factory):
    root = tmp_path_factory.mktemp("requeue")
    cache = shared_warmup_cache(tmp_path_factory)  # the session's one warm-up cache
    out = root / "job-%j.out"
    job = sbatch(slurm_env, f"--output={out}", "slurm/run.sbatch", f"run.output_dir={root}", "run.name=rq",
                 f"run.cache_dir={cache}", f"run.steps={STEPS}",
                 "run.timeout_s=400", "run.progress=false", "eval.n=50")
    run_dir, out = root / "rq", root / f"job-{job}.out"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        m = run_dir / "metrics.jsonl"
        if m.exists() and len(m.read_text().splitlines()) >= 15:
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"job never reached step 15:\n{out.read_text(errors='replace')[-3000:] if out.exists() else ''}")
    subprocess.run(["scontrol", "requeue", job], env=slurm_env, check=True, capture_output=True, timeout=30)
    # A requeued job waits for a begin time; let it start at once.
    for _ in range(60):
        recs = job_records(slurm_env, job)
        if recs and recs[0].get("JobState") == "PENDING":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm_env,
                           capture_output=True, timeout=30)
            break
        time.sleep(0.5)
    (rec,) = wait_job(slurm_env, job, timeout=400)
    text = out.read_text(errors="replace")
    assert rec["JobState"] == "COMPLETED", text[-3000:]
    assert "preempted at version" in text and "resuming from" in text, text[-3000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_version"] == STEPS and summary["attempt"] == 1 and not summary["preempted"]
    log = RunLog(run_dir, strict=True)
    assert log.finished
    samples = log.samples().set_index("sample_id")
    fates = log.step_samples()
    assert (fates[fates["fate"] == "used"]["staleness"] <= 4).all(), "staleness bound broken across the resume"
    assert sorted(log.steps()["trained_version"]) == list(range(STEPS))
    per_prompt = Counter(samples.loc[fates["sample_id"], "prompt_id"].tolist())
    assert set(per_prompt.values()) == {8}, "a prompt was trained in two attempts"
    unconsumed_at_end = set(samples.loc[log.leftover(), "prompt_id"]) | set(summary["abandoned_prompts"])
    consumed = np.array(sorted(per_prompt))
    for index in range(2):
        local = consumed[consumed % 2 == index] // 2
        holes = {int(k) * 2 + index for k in set(range(int(local.max()) + 1)) - set(local.tolist())}
        assert holes <= unconsumed_at_end, f"rollout {index} skipped prompts {sorted(holes - unconsumed_at_end)}"
