"""``areal-hpc eval CHECKPOINT CONFIG``: the held-out evaluation of one checkpoint, alone, and its errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "smollm2-wordproblems.yaml"


def _eval(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "areal_hpc.cli", "eval", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def smol(smol_checkpoint: Path) -> Path:
    return smol_checkpoint


def test_eval_prints_and_writes_pass_at_k(smol: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    proc = _eval(str(smol), str(CONFIG), "eval.n=5", "eval.k=3", "rollout.max_new_tokens=8", "reward.workers=1",
                 "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert figures["checkpoint"] == str(smol) and figures["n"] == 5 and figures["k"] == 3
    assert {"pass@1", "reward@1", "avg@3", "pass@3", "reward_timeouts", "seconds"} <= set(figures)
    assert 0.0 <= figures["pass@1"] <= 1.0 and 0.0 <= figures["avg@3"] <= figures["pass@3"] <= 1.0
    assert "pass@3" in proc.stdout and "avg@3" in proc.stdout


def test_eval_of_a_run_folder_without_a_checkpoint_is_one_line(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    proc = _eval(str(run), str(CONFIG), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no checkpoint yet" in lines[0], proc.stderr


def test_eval_of_a_folder_without_a_tokenizer_is_one_line(tmp_path: Path, smol: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((smol / "config.json").read_text())
    proc = _eval(str(bare), str(CONFIG), cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no tokenizer" in lines[0], proc.stderr
