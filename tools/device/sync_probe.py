"""Where the GPU step loops wait for the device, and whether a trainer step is host-bound (CUDA only).

Torch's sync debug mode flags every synchronizing call; this groups them by the Python line that
made them, for the fast engine's decode loop and for one trainer step over many micro-batches, and
prints the first one's stack. It then times a trainer step by wall clock against its device time
(profiler kernels), at one micro-batch and at several, so a gap between them is seen as host time.
Usage on the GPU machine: python3 tools/device/sync_probe.py [--out probe.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from areal_hpc.api import GenRequest  # noqa: E402
from areal_hpc.rollout.fast import FastEngine  # noqa: E402


def count_syncs(fn) -> tuple[collections.Counter, str]:
    """Synchronizing calls made by ``fn`` by ``file:line``, and the stack of the first one."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    hits = collections.Counter(f"{Path(r.filename).name}:{r.lineno}" for r in rec if "synchroniz" in str(r.message))
    first = ""
    if hits:
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        except RuntimeError:
            first = traceback.format_exc(limit=-8).replace(str(REPO) + "/", "")  # repo-relative paths
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return hits, first


class _Tok:
    eos_id = 2
    stop_ids = frozenset({2})


def engine_probe() -> dict:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=997, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    m = Qwen2ForCausalLM(cfg).to("cuda", torch.bfloat16).eval()

    def reqs(seed: int) -> list[GenRequest]:
        g = torch.Generator().manual_seed(seed)
        return [GenRequest(i, i, i // 4, torch.randint(3, 997, (3 + i % 5,), generator=g).tolist(),
                           max_tokens=4 + i % 7) for i in range(64)]

    eng = FastEngine(m, _Tok(), max_batch=16, max_new_tokens=12, max_seq_len=32, temperature=1.0, top_p=1.0, seed=5)
    eng.generate(reqs(2))
    steps = [0]

    def loop() -> None:
        eng.submit(reqs(1))
        while eng.num_active():
            eng.step()
            steps[0] += 1

    hits, first = count_syncs(loop)
    return {"steps": steps[0], "syncs": dict(hits), "first": first}


def trainer_probe(budgets: list[int], steps: int) -> dict:
    from train_throughput import make_rows

    from areal_hpc.api import TrainBatch
    from areal_hpc.config.schema import TrainerConfig
    from areal_hpc.model.presets import build_random
    from areal_hpc.train.engine import TorchTrainEngine
    from areal_hpc.train.loss import ppo_loss

    model = build_random("qwen2-0.5b", seed=0, dtype=torch.float32, device=torch.device("cuda"), max_positions=4096)
    _, samples = make_rows(8, 2048, model.config.vocab_size, 0)
    rng = np.random.default_rng(0)
    adv = np.where(rng.random(len(samples)) < 0.5, -1.0, 1.0).astype(np.float32)
    weight = np.ones(len(samples), np.float32)
    out = {}
    for budget in budgets:
        cfg = TrainerConfig(lr=1e-6, token_budget=budget, packing="packed", compute_dtype="bfloat16", compile=True)
        eng = TorchTrainEngine(model, cfg, pad_id=0, temperature=1.0)
        eng.prepare()
        for _ in range(3):
            st = eng.train_batch(TrainBatch(samples, adv, weight), ppo_loss(eng.cfg)).as_dict()
        torch.cuda.synchronize()
        walls = []
        for _ in range(steps):
            t = time.perf_counter()
            eng.train_batch(TrainBatch(samples, adv, weight), ppo_loss(eng.cfg)).as_dict()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t)
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            eng.train_batch(TrainBatch(samples, adv, weight), ppo_loss(eng.cfg)).as_dict()
            torch.cuda.synchronize()
            prof_wall = time.perf_counter() - t
        events = prof.events()
        kern = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        dev_s = sum(e.device_time for e in kern) / 1e6 if kern else float("nan")
        span = (max(e.time_range.end for e in kern) - min(e.time_range.start for e in kern)) / 1e6 if kern else 0
        batch = TrainBatch(samples, adv, weight)
        hits, first = count_syncs(lambda e=eng, b=batch: e.train_batch(b, ppo_loss(e.cfg)))  # last: may raise
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60)
        out[str(budget)] = {"n_microbatches": st["n_microbatches"], "wall_s": float(np.median(walls)),
                            "device_busy_s": dev_s, "device_span_s": span, "profiled_wall_s": prof_wall,
                            "kernels": len(kern), "syncs": dict(hits), "first_sync": first, "cpu_table": table}
        print(f"budget {budget}: {st['n_microbatches']} micro-batches, wall {np.median(walls) * 1e3:.1f} ms, "
              f"device busy {dev_s * 1e3:.1f} ms over a {span * 1e3:.1f} ms span, {len(kern)} kernels, "
              f"syncs {dict(hits)}", flush=True)
        print(table, flush=True)
        del eng
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", type=int, nargs="*", default=[16384, 6000])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    res = {"engine": engine_probe()}
    print(f"engine: {res['engine']['steps']} steps, syncs by line {res['engine']['syncs']}", flush=True)
    print(res["engine"]["first"], flush=True)
    res["trainer"] = trainer_probe(args.budgets, args.steps)
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
