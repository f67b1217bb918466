"""`areal-hpc submit` through submitit against the local Slurm: one run, and a 2-point sweep."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.warmup import shared_warmup_cache

from .conftest import REPO

pytestmark = pytest.mark.slurm
FAST = ["run.steps=5", "eval.enabled=false", "run.progress=false", "run.timeout_s=300"]


def _cli(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "areal_hpc.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _wait_summaries(env: dict, run_dirs: list[Path], status_dir: Path, timeout: float = 420) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all((d / "summary.json").exists() for d in run_dirs):
            return
        for d in run_dirs:
            assert not (d / "errors").exists(), [p.read_text() for p in (d / "errors").iterdir()]
        time.sleep(2)
    pytest.fail(f"runs not finished:\n{_cli(env, 'status', str(status_dir)).stdout}")


def _cache(tmp_path_factory) -> Path:
    return shared_warmup_cache(tmp_path_factory)  # the session's one warm-up cache


def test_submit_one_run(slurm_env, tmp_path, tmp_path_factory):
    proc = _cli(slurm_env, "submit", "configs/quickstart.yaml", *FAST, f"run.output_dir={tmp_path}",
                f"run.cache_dir={_cache(tmp_path_factory)}", "run.name=one", "--time", "10")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run_dir = tmp_path / "one"
    _wait_summaries(slurm_env, [run_dir], run_dir)
    assert len(list((run_dir / "ranks").glob("rank*.json"))) == 3  # one MPI world of the job's 3 tasks
    # submitit's setup lines asked for a CUDA MPS daemon; this CPU node has no GPU, so none was started
    assert json.loads((run_dir / "summary.json").read_text())["cuda_mps"].startswith("off (no GPU visible")
    table = _cli(slurm_env, "status", str(run_dir)).stdout
    assert "DONE" in table or "COMPLETED" in table, table


def test_submit_sweep_is_a_job_array_of_independent_runs(slurm_env, tmp_path, tmp_path_factory):
    proc = _cli(slurm_env, "submit", "configs/quickstart.yaml", *FAST, f"run.output_dir={tmp_path}",
                f"run.cache_dir={_cache(tmp_path_factory)}", "--name", "sw", "--time", "10",
                "--sweep", "rollout.eta=2,4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (sweep_json,) = tmp_path.glob("sw-sweep-*/sweep.json")
    sweep = json.loads(sweep_json.read_text())
    text = json.dumps(sweep)
    run_dirs = sorted({Path(p) for p in _find_key(sweep, "run_dir")})
    assert len(run_dirs) == 2, text
    _wait_summaries(slurm_env, run_dirs, sweep_json.parent)
    etas = sorted(json.loads((d / "summary.json").read_text())["eta"] for d in run_dirs)
    assert etas == [2, 4]
    table = _cli(slurm_env, "status", str(sweep_json.parent)).stdout
    assert table.count("DONE") + table.count("COMPLETED") >= 2, table


def _find_key(obj, key: str) -> list:
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == key] + [x for v in obj.values() for x in _find_key(v, key)]
    if isinstance(obj, list):
        return [x for v in obj for x in _find_key(v, key)]
    return []
