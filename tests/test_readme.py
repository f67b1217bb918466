"""The README's `areal-hpc train` lines run as written: their configs and overrides pass the checks the
launcher makes, and the MPI ones name an mpiexec that exists after the install."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from areal_hpc.config.loader import load_config
from areal_hpc.tasks import build_task

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[list[str]]:
    """Every command of the README's bash blocks, continuation lines joined and comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    text = "\n".join(blocks).replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in text.splitlines() if line.strip()]


TRAIN = [c for c in readme_commands() if "train" in c and any(w.endswith("areal-hpc") for w in c)]


def test_the_readme_has_the_train_lines_this_file_checks():
    assert any(c[0].endswith("mpiexec") for c in TRAIN) and any("task.kind=jsonl" in c for c in TRAIN), TRAIN


@pytest.mark.parametrize("cmd", TRAIN, ids=lambda c: " ".join(c[c.index("train") + 2:]) or "plain")
def test_readme_train_line_passes_the_config_checks(cmd, tmp_path):
    args = cmd[cmd.index("train") + 1:]
    rows = [json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) for i in range(20)]
    for name in ("train.jsonl", "eval.jsonl"):
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    overrides = [re.sub(r"=((train|eval)\.jsonl)$", rf"={tmp_path}/\1", a) for a in args[1:]]
    cfg = load_config(REPO / args[0], overrides)
    build_task(cfg)
    if cmd[0].endswith("mpiexec"):
        assert cmd[0] == ".venv/bin/mpiexec", cmd  # what the install puts there; a bare one is not on PATH
        assert int(cmd[cmd.index("-n") + 1]) == cfg.cluster.n_trainer + cfg.cluster.n_rollout, cmd
