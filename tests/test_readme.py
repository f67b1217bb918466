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
    assert any(c[0].endswith("mpiexec") for c in TRAIN) and any("task.kind=dataset" in c for c in TRAIN), TRAIN


def _stand_in(arg: str, tmp_path: Path) -> str:
    """A README override naming the user's files (``~/models/...``, ``~/data/...``) gets a stand-in of the
    same kind: a checkpoint folder, a Parquet file in verl's layout (chat-message prompts, nested answers)."""
    key, _, value = arg.partition("=")
    if value.startswith("~/models/"):
        folder = tmp_path / "models" / Path(value).name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text("{}")
        return f"{key}={folder}"
    if value.startswith("~/data/") and value.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / Path(value).name
        rows = [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
                 "reward_model": {"ground_truth": str(2 * i)}} for i in range(20)]
        pq.write_table(pa.Table.from_pylist(rows), path)
        return f"{key}={path}"
    return arg


@pytest.mark.parametrize("cmd", TRAIN, ids=lambda c: " ".join(c[c.index("train") + 2:]) or "plain")
def test_readme_train_line_passes_the_config_checks(cmd, tmp_path):
    args = cmd[cmd.index("train") + 1:]
    rows = [json.dumps({"prompt": f"{i}+{i}=", "answer": str(2 * i)}) for i in range(20)]
    for name in ("train.jsonl", "eval.jsonl"):
        (tmp_path / name).write_text("\n".join(rows) + "\n")
    overrides = [_stand_in(re.sub(r"=((train|eval)\.jsonl)$", rf"={tmp_path}/\1", a), tmp_path) for a in args[1:]]
    cfg = load_config(REPO / args[0], overrides)
    build_task(cfg)
    if cmd[0].endswith("mpiexec"):
        assert cmd[0] == ".venv/bin/mpiexec", cmd  # what the install puts there; a bare one is not on PATH
        assert int(cmd[cmd.index("-n") + 1]) == cfg.cluster.n_trainer + cfg.cluster.n_rollout, cmd
