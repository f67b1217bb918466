"""``areal-hpc bench`` finds every benchmark script and passes its options through."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from areal_hpc.bench import BENCHES, bench_dir


def test_every_listed_benchmark_exists():
    for name, (script, _) in BENCHES.items():
        assert (bench_dir() / script).is_file(), name


@pytest.mark.parametrize("name", ["decode", "weights", "e2e"])
def test_bench_passes_options_to_the_script(name):
    out = subprocess.run([sys.executable, "-m", "areal_hpc.cli", "bench", name, "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--out" in out.stdout


def test_bench_without_the_source_checkout_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    """A wheel or non-editable install has no tools/bench: one clear line and exit 2, not a traceback."""
    import areal_hpc.bench
    from areal_hpc.cli import main

    missing = tmp_path / "site-packages" / "tools" / "bench"  # where a non-editable install would look
    monkeypatch.setattr(areal_hpc.bench, "BENCH_DIR", missing)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # a found script would overwrite it: keep pytest's
    assert main(["bench", "decode", "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("areal-hpc bench: ") and "source checkout" in err and str(missing) in err, err
    with pytest.raises(FileNotFoundError):
        bench_dir()


@pytest.mark.parametrize("script", ["decode_throughput.py", "train_throughput.py", "shared_prompts.py"])
def test_quick_bench_runs_every_path_on_cpu(script, tmp_path):
    """The CPU smoke runs go through the same calls into the engine and trainer as the GPU runs
    (a renamed internal once broke the decode bench's profile only on the device)."""
    out = tmp_path / "r.json"
    extra = ["--profile"] if script == "shared_prompts.py" else []
    r = subprocess.run([sys.executable, str(bench_dir() / script), "--quick", "--out", str(out), *extra],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    runs = json.loads(out.read_text())
    assert runs, "no results written"
    if extra:  # one profiled step per engine: a table of real ops whose times add up to its total
        assert set(runs["profiles"]) == {"shared", "separate"}
        for text in runs["profiles"].values():
            head, _, *rows = text.splitlines()
            total = float(head.split(": ")[1].split(" ms")[0])
            assert total > 0 and any("aten::mm" in line or "aten::addmm" in line for line in rows), text
            assert any(line.startswith("by group: ") and "gemm" in line for line in rows), text
        assert "profile shared prompts:" in r.stdout and "profile separate prompts:" in r.stdout


def test_e2e_sync_from_takes_only_a_matching_earlier_sync(tmp_path):
    """``--sync-from``: an earlier sync row is reused only for the same config, steps and overrides."""
    import argparse

    sys.path.insert(0, str(bench_dir().parents[1]))
    from tools.bench.e2e_one_gpu import _earlier_sync

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"config": "gpu-synthetic.yaml", "steps": 32, "overrides": ["task.len_median=256"],
                               "runs": [{"mode": "sync", "samples_per_s": 78.0}, {"mode": "async", "eta": 4}]}))
    args = argparse.Namespace(sync_from=str(old), config="configs/gpu-synthetic.yaml", steps=32,
                              overrides=["task.len_median=256"])
    row = _earlier_sync(args)
    assert row["samples_per_s"] == 78.0 and row["sync_from"] == "old.json"
    args.steps = 16
    with pytest.raises(SystemExit, match="16 steps"):
        _earlier_sync(args)
    old.write_text("{not json")
    with pytest.raises(SystemExit, match="no readable sync row"):
        _earlier_sync(args)


def test_e2e_run_past_its_timeout_leaves_no_rank_running(tmp_path):
    """A timed-out run must not keep computing under the next run's measurement."""
    from pathlib import Path

    from tests.processes import wait_gone
    from tools.bench.e2e_one_gpu import run

    quick = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    row = run(quick, tmp_path, "late", [f"run.cache_dir={tmp_path / 'cache'}", "run.steps=100000",
                                        "warmup.enabled=false", "eval.enabled=false"], timeout=30)
    assert row["failed"] and row["rc"] == "timeout"
    pids = [json.loads(p.read_text())["pid"] for p in (tmp_path / "late" / "ranks").glob("*.json")]
    assert len(pids) == 3, "the job's ranks should have started within the timeout"

    assert wait_gone(pids), "ranks of the timed-out run are still running"


def test_e2e_vary_takes_one_dotted_key_and_its_values():
    import argparse

    sys.path.insert(0, str(bench_dir().parents[1]))
    from tools.bench.e2e_one_gpu import _parse_vary

    ap = argparse.ArgumentParser()
    assert _parse_vary(ap, None) == (None, [])
    assert _parse_vary(ap, "rollout.batch_bucket_step=64,0") == ("rollout.batch_bucket_step", ["64", "0"])
    for bad in ("rollout.batch_bucket_step", "batch_bucket_step=64,0", "rollout.eta="):
        with pytest.raises(SystemExit):
            _parse_vary(ap, bad)


def test_e2e_vary_twice_runs_every_combination_first_values_first():
    import argparse

    sys.path.insert(0, str(bench_dir().parents[1]))
    from tools.bench.e2e_one_gpu import vary_combos

    ap = argparse.ArgumentParser()
    assert vary_combos(ap, None) == [[]]
    combos = vary_combos(ap, ["trainer.share_prompts=true,false", "rollout.batch_bucket_step=64,0"])
    assert combos == [[("trainer.share_prompts", "true"), ("rollout.batch_bucket_step", "64")],
                      [("trainer.share_prompts", "true"), ("rollout.batch_bucket_step", "0")],
                      [("trainer.share_prompts", "false"), ("rollout.batch_bucket_step", "64")],
                      [("trainer.share_prompts", "false"), ("rollout.batch_bucket_step", "0")]]
    with pytest.raises(SystemExit):
        vary_combos(ap, ["rollout.eta=1,2", "rollout.eta=4"])


def test_decode_bench_times_partial_batches_in_both_bucket_sets():
    """The decode bench's side-by-side of a gated batch (some slots live) in the fine and the halves-only
    bucket: rows only where the two differ, both timed on the same engine."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    sys.path.insert(0, str(bench_dir().parents[1]))
    from areal_hpc.rollout.fast import FastEngine
    from tools.bench.decode_throughput import _NoEos, partial_batches

    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    eng = FastEngine(Qwen2ForCausalLM(cfg).eval(), _NoEos(), max_batch=256, max_new_tokens=8, max_seq_len=48,
                     temperature=1.0, top_p=1.0, cuda_graphs=False)
    rows = partial_batches(eng, ctx=20)
    assert [(r["live"], r["bucket"], r["halves_bucket"]) for r in rows] == [(160, 192, 256)]  # 96 live: 128 either way
    assert rows[0]["ms"] > 0 and rows[0]["halves_ms"] > 0 and rows[0]["speedup"] > 0
    assert not eng.slots.pos.any(), "the timed slots must be parked again"


def test_e2e_vary_line_names_an_earlier_sync_row_by_its_file():
    """--vary with --sync-from: the reused sync row has no 'vary' (it once ended the bench in a KeyError)."""
    sys.path.insert(0, str(bench_dir().parents[1]))
    from tools.bench.e2e_one_gpu import vary_line

    line = vary_line("rollout.batch_bucket_step", [{"mode": "sync", "eta": 0, "sync_from": "old.json"},
                                                   {"mode": "async", "eta": 1, "vary": "rollout.batch_bucket_step=0"}])
    assert line == ("--vary rollout.batch_bucket_step: sync eta 0 (from old.json); "
                    "async eta 1 rollout.batch_bucket_step=0")


def test_e2e_trainer_split_reads_compute_wait_and_stream_tokens(tmp_path):
    sys.path.insert(0, str(bench_dir().parents[1]))
    from tools.bench.e2e_one_gpu import trainer_split

    rows = [{"step": s, "t_step": 2.0 + s, "t_data": 0.5, "train/stream_tokens": 1000.0 * s} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert trainer_split(tmp_path, skip=1) == (4.0, 0.5, 2500.0)  # steps 2 and 3
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3, "t_step": 2.0, "t_data": 1.0}) + "\n")
    train, wait, stream = trainer_split(tmp_path, skip=1)  # an older run's metrics: no stream tokens
    assert (train, wait) == (1.0, 1.0) and stream != stream


def test_bench_writes_its_json_into_the_current_folder(tmp_path):
    """Without --out a benchmark writes where the user stands, not over the checkout's cited results."""
    results = bench_dir() / "results"
    before = {p.name: p.stat().st_mtime_ns for p in results.iterdir()}
    r = subprocess.run([sys.executable, "-m", "areal_hpc.cli", "bench", "shard-io", "--samples", "600",
                        "--repeats", "1", "--compressions", "none"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "shard_io_cpu.json"
    assert json.loads(out.read_text())["results"], "no results written"
    assert str(out) in r.stdout, r.stdout  # the path a user can open
    assert {p.name: p.stat().st_mtime_ns for p in results.iterdir()} == before
