"""The first warm-up (minutes on CPU) says on the console that it runs and how far it is."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import torch

from areal_hpc.config.loader import load_config
from areal_hpc.model.build import build_tiny_model
from areal_hpc.model.initial import prepare_initial_policy
from areal_hpc.model.tokenizer import CharTokenizer
from areal_hpc.model.warmup import supervised_warmup
from areal_hpc.tasks import build_task

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def _small(tmp_path: Path, *extra: str):
    cfg = load_config(str(QUICKSTART), ["model.hidden_size=32", "model.n_layers=1", "model.n_heads=2",
                                        "model.intermediate_size=64", "warmup.steps=3", "warmup.batch_size=4",
                                        f"run.cache_dir={tmp_path / 'cache'}", *extra])
    return cfg, build_task(cfg)


def test_first_warmup_says_on_the_console_that_it_runs_and_when_it_is_done(tmp_path, capsys):
    torch.set_num_threads(1)
    cfg, task = _small(tmp_path)
    path = prepare_initial_policy(cfg, task)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines  # a start line, a done line: nothing per step
    assert lines[0].startswith("warm-up: 3 supervised steps") and path in lines[0], lines
    assert lines[1].startswith("warm-up: done, 3 steps in "), lines
    assert prepare_initial_policy(cfg, task) == path
    assert capsys.readouterr().err == ""  # from the cache: nothing to wait for


def test_warmup_is_silent_on_the_console_with_run_progress_false(tmp_path, capsys):
    torch.set_num_threads(1)
    cfg, task = _small(tmp_path, "run.progress=false")
    prepare_initial_policy(cfg, task)
    assert capsys.readouterr().err == ""


def test_warmup_console_line_every_interval(tmp_path):
    torch.set_num_threads(1)
    cfg, task = _small(tmp_path)
    tok = CharTokenizer(task.alphabet)
    model = build_tiny_model(32, 1, 2, 64, 32, tok.vocab_size, 0)
    out = io.StringIO()
    ticks = itertools.count(0.0, 4.0)  # every clock reading 4 s later: one per step
    supervised_warmup(model, tok, task, steps=10, batch_size=2, lr=1e-3, seed=0, console=out, every_s=15.0,
                      clock=lambda: next(ticks))
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["warm-up: step 4/10", "warm-up: step 8/10", "warm-up: done"]
    assert lines[-1].startswith("warm-up: done, 10 steps in 40 s, loss "), lines
