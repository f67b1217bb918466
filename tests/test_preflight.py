"""Checks made before the ranks start (``launch.preflight``): each mistake a rank would meet after MPI start-up
and the warm-up is one line naming the key and the fix, at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from areal_hpc.config import load_config
from areal_hpc.launch.preflight import PreflightError, check_inputs, check_world

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def _message(cfg) -> str:
    with pytest.raises(PreflightError) as info:
        check_inputs(cfg)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_checkpoint_folder_without_config_json(tmp_path):
    message = _message(load_config(QUICKSTART, ["model.kind=hf", f"model.path={tmp_path}"]))
    assert f"model.path '{tmp_path}'" in message and "config.json" in message and "model.kind=tiny" in message


def test_bad_jsonl_row_names_key_file_and_line(tmp_path):
    good = json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n"
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text(good + good + '{"prompt": "2+2="}\n')
    held.write_text(good)
    message = _message(load_config(QUICKSTART, ["task.kind=jsonl", f"task.train_path={train}",
                                                f"task.eval_path={held}", "warmup.flaw=0"]))
    assert message.startswith(f"task.train_path: {train}:3: expected") and "fix or remove that line" in message


def test_reward_function_that_does_not_import():
    message = _message(load_config(QUICKSTART, ["reward.fn=no_such_module_xyz:score"]))
    assert message.startswith("reward.fn") and "no_such_module_xyz" in message and "PYTHONPATH" in message


def test_chat_prompt_for_a_checkpoint_without_a_chat_template(tmp_path):
    """The tiny model's char tokenizer has no template: asking for chat stops before the ranks start."""
    from areal_hpc.model.build import build_tiny_model, save_policy
    from areal_hpc.model.tokenizer import CharTokenizer

    tok = CharTokenizer("0123456789+= ")
    save_policy(build_tiny_model(16, 1, 2, 32, 32, tok.vocab_size, seed=0), tok, tmp_path / "ckpt")
    message = _message(load_config(QUICKSTART, ["model.kind=hf", f"model.path={tmp_path / 'ckpt'}",
                                                "prompt.format=chat"]))
    assert "prompt.format=chat" in message and "no chat template" in message and "prompt.format=raw" in message


def test_code_dataset_row_without_tests(tmp_path):
    train = tmp_path / "code.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"write f{i}", "entry_point": "f"}) + "\n" for i in range(4)))
    message = _message(load_config(QUICKSTART, ["task.kind=dataset", f"task.train_path={train}", "task.n_eval=1",
                                                "task.verifier=code", "task.answer_key=prompt", "warmup.flaw=0"]))
    assert str(train) in message and "tests" in message


def test_cuda_device_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    message = _message(load_config(QUICKSTART, ["model.device=cuda"]))
    assert "model.device=cuda" in message and "model.device=auto" in message
    check_inputs(load_config(QUICKSTART, ["model.device=auto"]))  # falls back to the CPU


def test_world_of_the_wrong_size():
    with pytest.raises(PreflightError, match=r"MPI world has 3 ranks but .* = 2 \+ 2 = 4; start 4 ranks"):
        check_world(load_config(QUICKSTART, ["cluster.n_trainer=2"]), 3)
    check_world(load_config(QUICKSTART, ["cluster.n_trainer=2"]), 4)


def test_train_says_it_in_one_line_and_leaves_the_run_folder(tmp_path):
    """Before mpiexec and before an earlier run of the same name is moved aside."""
    earlier = tmp_path / "out" / "quickstart"
    earlier.mkdir(parents=True)
    (earlier / "summary.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "areal_hpc.cli", "train", str(QUICKSTART),
                           f"run.output_dir={tmp_path / 'out'}", "model.kind=hf", f"model.path={tmp_path}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "has no config.json" in lines[0], proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["quickstart"]


def test_jsonl_row_that_is_not_utf8(tmp_path):
    good = json.dumps({"prompt": "1+1=", "answer": "2"}).encode() + b"\n"
    train = tmp_path / "train.jsonl"
    train.write_bytes(good + b'{"prompt": "\xff", "answer": "1"}\n')
    message = _message(load_config(QUICKSTART, ["task.kind=jsonl", f"task.train_path={train}",
                                                f"task.eval_path={train}", "warmup.flaw=0"]))
    assert message.startswith(f"task.train_path: {train}:2: expected") and "UnicodeDecodeError" in message
