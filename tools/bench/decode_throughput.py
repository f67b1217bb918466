"""Decode throughput of the fast engine vs HF ``generate()`` and vs the HBM roofline, in one run.

Qwen2-0.5B shape, random bf16 weights, 128 prompt tokens, 256 sampled tokens per sequence
(temperature 1, no EOS: a random model's lengths are set by the workload). For each batch size:

* ``ours``: the FastEngine (continuous batching, CUDA-graph decode, fused sampler), B requests, timed
  over the whole generate (one packed prefill of every prompt, then decode). One-time work is kept
  out of it and reported on its own: the engine's build (the attention split's tuning), its
  ``warm_up()`` (every decode and prefill graph captured, the compiled pieces compiled) and one
  untimed generate of the same workload (the first real steps);
* ``decode``: the same requests again, timed over the decode phase alone (after the prefill), in the
  same step loop with its host bookkeeping: what the per-step roofline below models. ``whole/decode``
  is the ratio of the two: the prefill's share, or one-time work that still landed in the timed run;
* ``hf``: ``model.generate()`` with the default cache, same prompts (``--hf-new`` tokens, fewer than
  256 by default to save device time: its per-token rate barely depends on the length);
* ``roofline``: B / (bytes read per decode step / copy bandwidth measured in this run), the bytes
  being every weight once plus the KV cache of the average context (prompt + 128) once;
* ``tail``: a long-tailed workload (log-normal lengths, median 48, max 256) of 4B requests through
  the same engine with continuous batching vs in waves of B (each wave waits for its longest).

    python tools/bench/decode_throughput.py --batch 64 256 --out tools/bench/results/decode_h100.json
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from areal_hpc.api import GenRequest  # noqa: E402
from areal_hpc.model.presets import build_random  # noqa: E402
from areal_hpc.model.qwen2 import Qwen2Shape  # noqa: E402
from areal_hpc.rollout.fast import FastEngine, decode_buckets  # noqa: E402
from tools.bench.common import copy_bandwidth, device_info, sync, write_result  # noqa: E402


class _NoEos:
    eos_id = -1
    pad_id = 0
    stop_ids = frozenset()


def requests(n: int, prompt_len: int, lengths: list[int], vocab: int, seed: int) -> list[GenRequest]:
    rng = np.random.default_rng(seed)
    return [GenRequest(i, i, i, rng.integers(3, vocab, prompt_len).tolist(), max_tokens=int(lengths[i]))
            for i in range(n)]


def time_engine(engine: FastEngine, reqs: list[GenRequest], wave: int = 0) -> tuple[float, int]:
    """Seconds and tokens to finish ``reqs``; ``wave`` > 0 submits them in waves (static batching)."""
    sync()
    t = time.perf_counter()
    groups = [reqs[i:i + wave] for i in range(0, len(reqs), wave)] if wave else [reqs]
    n_tok = 0
    for grp in groups:
        engine.submit(grp)
        while engine.num_active():
            for g in engine.step():
                n_tok += len(g.tokens)
    sync()
    return time.perf_counter() - t, n_tok


def time_decode_phase(engine: FastEngine, reqs: list[GenRequest]) -> tuple[float, int]:
    """Seconds and tokens of the decode phase alone, in the real loop (host bookkeeping included).

    The first ``step()`` admits every request (one packed prefill) and launches decode step 1; the
    clock starts once that is done. Tokens counted: all but the prefill's first token and step 1's.
    """
    engine.submit(reqs)
    n_tok = sum(len(g.tokens) for g in engine.step())
    assert engine.slots.live == len(reqs), "the prefill budget must admit the whole batch at once"
    sync()
    t = time.perf_counter()
    while engine.num_active():
        for g in engine.step():
            n_tok += len(g.tokens)
    sync()
    return time.perf_counter() - t, n_tok - 2 * len(reqs)


@contextmanager
def hold_context(engine: FastEngine, B: int, ctx: int) -> Iterator[None]:
    """Pin every (idle) slot at position ``ctx`` without advancing, so back-to-back replays each read
    ``ctx`` cached keys per slot. After a run the engine has parked its finished slots at position 0
    (no cache read): profiling that state would leave the attention's real cost out. The slots are
    parked again afterwards."""
    assert not engine.num_active(), "profile an idle engine"
    engine.slots.pos[:B].fill_(ctx)
    try:
        yield
    finally:
        engine.slots.pos[:B].zero_()


def profile(engine: FastEngine, B: int, prompt: int, vocab: int, ctx: int) -> dict:
    """Device time of one decode step alone (graph replays back to back, every slot at context ``ctx``),
    and of one prefill burst."""
    n = 50
    graph = engine.graphs.graphs.get(B)
    step = graph.replay if graph is not None else (lambda: engine.decode(B))
    with hold_context(engine, B, ctx):
        step()
        sync()
        t = time.perf_counter()
        for _ in range(n):
            step()
        sync()
    decode_ms = 1e3 * (time.perf_counter() - t) / n
    k = max(1, B // 16)
    seqs = [r.prompt_tokens for r in requests(k, prompt, [1] * k, vocab, seed=5)]
    engine.prefill.run(list(range(k)), seqs, [(i, i) for i in range(k)])
    sync()
    t = time.perf_counter()
    for _ in range(5):
        engine.prefill.run(list(range(k)), seqs, [(i, i) for i in range(k)])
    sync()
    return {"device_decode_ms": decode_ms, "device_decode_context": ctx,
            "prefill_ms": 1e3 * (time.perf_counter() - t) / 5, "prefill_prompts": k}


def partial_batches(engine: FastEngine, ctx: int, fractions: tuple[float, ...] = (0.375, 0.625)) -> list[dict]:
    """Device ms of a decode step with part of the slots live at context ``ctx`` (the rest idle, as an
    asynchronous rollout held by the staleness gate runs), in the bucket the engine picks and in the
    bucket max_batch's halves alone would give: what ``rollout.batch_bucket_step`` saves, side by side."""
    rows = []
    for frac in fractions:
        live = max(1, int(engine.max_batch * frac))
        fine = next(b for b in engine.graphs.buckets if b >= live)
        halves = next(b for b in decode_buckets(engine.max_batch, 0) if b >= live)
        if fine == halves:
            continue
        ms = {}
        for n in (fine, halves):
            graph = engine.graphs.graphs.get(n)
            step = graph.replay if graph is not None else (lambda n=n: engine.decode(n))
            engine.slots.pos[:live].fill_(ctx)  # live slots read ctx keys; the idle rest (position 0) read none
            try:
                step()
                sync()
                t = time.perf_counter()
                for _ in range(30):
                    step()
                sync()
            finally:
                engine.slots.pos.zero_()
            ms[n] = 1e3 * (time.perf_counter() - t) / 30
        rows.append({"live": live, "context": ctx, "bucket": fine, "ms": ms[fine], "halves_bucket": halves,
                     "halves_ms": ms[halves], "speedup": ms[halves] / ms[fine]})
    return rows


def kernel_profile(engine: FastEngine, B: int, top: int = 18) -> list[dict]:
    """Top device kernels of one decode step (the compiled body run eagerly, 10 times)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    engine.decode(B)
    sync()
    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            engine.decode(B)
        sync()
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if dev_us > 0:
            rows.append({"name": e.key[:90], "us_per_step": dev_us / 10, "calls_per_step": e.count / 10})
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    print(f"device kernels per decode step: {total:.0f} us in {sum(r['calls_per_step'] for r in rows):.0f} launches")
    for r in rows[:top]:
        print(f"  {r['us_per_step']:8.1f} us {r['calls_per_step']:6.0f}x  {r['name']}")
    return rows[:top]


def hf_generate(model, reqs: list[GenRequest], new: int) -> float:
    ids = torch.tensor([r.prompt_tokens for r in reqs], device=model.device)
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
              pad_token_id=0, attention_mask=torch.ones_like(ids))
    model.generate(ids[:, :8], **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
    sync()
    t = time.perf_counter()
    model.generate(ids, **kw)
    sync()
    return len(reqs) * new / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--engine" or a.startswith("--engine=") for a in argv):  # engines side by side (vLLM)
        from tools.bench.decode_engines import main as engines_main

        return engines_main(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2-0.5b")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--hf-new", type=int, default=64)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-tail", action="store_true")
    ap.add_argument("--no-graph", action="store_true", help="eager decode (to measure what the graph saves)")
    ap.add_argument("--eager-layers-too", action="store_true",
                    help="also time each batch with the uncompiled layer inside the graph (what torch.compile buys)")
    ap.add_argument("--profile", action="store_true", help="print the top kernels of a decode step per batch")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny sizes")
    ap.add_argument("--decode-attention", default="auto",
                    help="split of the fused decode attention: auto (timed at engine start) or CHUNKxWARPS, e.g. 64x4")
    ap.add_argument("--out", default="decode.json", help="result JSON (default: in the current folder)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if args.quick:
        args.batch, args.prompt, args.new, args.hf_new = [4], 16, 16, 8
    # --quick: two layers and a 4k vocab exercise every path on a CPU with the preset's head shapes (the
    # full 152k-vocab head alone took ~30 s of the CPU smoke run)
    shrink = {"num_hidden_layers": 2, "vocab_size": 4096} if args.quick else None
    model = build_random(args.preset, seed=0, dtype=dtype, device=dev, max_positions=args.prompt + args.new + 8,
                         shrink=shrink)
    shape = Qwen2Shape.of(model.config)
    bw = copy_bandwidth(dev)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_per_token = shape.n_layers * 2 * shape.n_kv_heads * shape.head_dim * torch.finfo(dtype).bits // 8
    rows = []
    variants = [(B, True) for B in args.batch] + ([(B, False) for B in args.batch] if args.eager_layers_too else [])
    for B, compiled in variants:
        t_build = time.perf_counter()
        eng = FastEngine(model, _NoEos(), max_batch=B, max_new_tokens=args.new, max_seq_len=args.prompt + args.new,
                         temperature=1.0, top_p=1.0, cuda_graphs=not args.no_graph, seed=1, compile_decode=compiled,
                         prefill_token_budget=max(16384, B * args.prompt), decode_attention=args.decode_attention)
        sync()
        build_s = time.perf_counter() - t_build  # the attention split's tuning
        warmup_s = eng.warm_up()  # every graph captured, the compiled pieces compiled
        reqs = requests(B, args.prompt, [args.new] * B, shape.vocab, seed=B)
        # The same workload once untimed: whatever one-time work the warm-up could not do (and the GPU's
        # clocks rising from idle after a CPU-bound build) lands here, not in the timed run.
        first_s, _ = time_engine(eng, requests(B, args.prompt, [args.new] * B, shape.vocab, seed=99))
        lazy0 = eng.stats()["capture_s_in_steps"]
        steps0 = eng.decode_steps
        secs, n_tok = time_engine(eng, reqs)
        steps = eng.decode_steps - steps0
        lazy_s = eng.stats()["capture_s_in_steps"] - lazy0  # one-time work inside the timed run: should be 0
        ours = n_tok / secs
        d_secs, d_tok = time_decode_phase(eng, reqs)
        avg_ctx = args.prompt + args.new / 2
        step_bytes = weight_bytes + B * avg_ctx * kv_per_token
        roof = B / (step_bytes / (bw * 1e9))
        st = eng.stats()
        row = {"batch": B, "compiled_layer": compiled, "build_s": build_s, "warmup_s": warmup_s,
               "first_steps_s": first_s, "setup_s": build_s + warmup_s + first_s, "lazy_in_timed_s": lazy_s,
               "decode_graphs": st["decode_graphs"], "prefill_graphs": st["prefill_graphs"],
               "attention": eng.decode.attention_name, "ours_tok_s": ours, "roofline_tok_s": roof,
               "fraction_of_roofline": ours / roof,
               "decode_phase_tok_s": d_tok / d_secs, "decode_phase_fraction_of_roofline": d_tok / d_secs / roof,
               "whole_over_decode": ours / (d_tok / d_secs),
               "seconds": secs, "tokens": n_tok, "decode_steps": steps,
               "step_ms": 1e3 * secs / max(steps, 1), "bytes_per_step": step_bytes,
               **{k: v for k, v in st.items() if k.startswith("decode_attention")}}
        print(f"batch {B}: build {build_s:.1f} s, warm-up {warmup_s:.1f} s ({row['decode_graphs']} decode and "
              f"{row['prefill_graphs']} prefill graphs), first steps {first_s:.2f} s, one-time work in the timed "
              f"run {lazy_s:.2f} s; whole generate {ours:.0f} tok/s, decode phase {d_tok / d_secs:.0f}: "
              f"ratio {row['whole_over_decode']:.2f}", flush=True)
        if "decode_attention" in row:
            print(f"batch {B}: decode attention {row['decode_attention']}, us per call of each split tried: "
                  f"{ {k: round(v, 1) for k, v in row.get('decode_attention_us', {}).items()} }", flush=True)
        row.update(profile(eng, B, args.prompt, shape.vocab, int(avg_ctx)))
        row["partial"] = partial_batches(eng, int(avg_ctx))
        for p in row["partial"]:
            print(f"batch {B}, {p['live']} live at context {p['context']}: {p['ms']:.2f} ms in the {p['bucket']} "
                  f"bucket, {p['halves_ms']:.2f} ms in the {p['halves_bucket']} one (halves only): "
                  f"{p['speedup']:.2f}x", flush=True)
        if args.profile and dev.type == "cuda":
            with hold_context(eng, B, int(avg_ctx)):
                row["kernels"] = kernel_profile(eng, B)
        if not args.no_hf and compiled:  # baselines once per batch, not per variant
            hf = hf_generate(model, reqs, args.hf_new)
            row.update(hf_tok_s=hf, speedup_vs_hf=ours / hf)
        if not args.no_tail and compiled:
            rng = np.random.default_rng(7)
            lens = np.clip(np.round(np.exp(rng.normal(math.log(48), 1.0, 4 * B))), 1, args.new).astype(int)
            tail = requests(4 * B, args.prompt, lens.tolist(), shape.vocab, seed=3 * B)
            s_cont, t_cont = time_engine(eng, tail)
            s_wave, t_wave = time_engine(eng, tail, wave=B)
            row.update(tail_continuous_tok_s=t_cont / s_cont, tail_waves_tok_s=t_wave / s_wave,
                       tail_speedup=(t_cont / s_cont) / (t_wave / s_wave), tail_tokens=t_cont)
        rows.append(row)
        del eng
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print("ours: whole generate (prefill of every prompt + decode); decode: the decode phase alone, same loop;")
    print("whole/decode: their ratio (the prefill's share; if it differs between runs of one batch size, one-time "
          "work landed in a timed run);")
    print("setup s: engine build + warm-up + an untimed first generate, all outside the timed runs")
    print(f"{'batch':>5} {'layer':>8} {'setup s':>7} {'warm-up s':>9} {'ours tok/s':>11} {'HF tok/s':>9} {'vs HF':>7} "
          f"{'roofline':>9} {'of roof':>8} "
          f"{'decode tok/s':>12} {'of roof':>8} {'whole/decode':>12} "
          f"{'step ms':>8} {'gpu ms':>7} {'prefill ms':>10} {'tail cont/waves':>16}")
    for r in rows:
        layer = "compiled" if r["compiled_layer"] else "eager"
        print(f"{r['batch']:>5} {layer:>8} {r['setup_s']:>7.1f} {r['warmup_s']:>9.1f} {r['ours_tok_s']:>11.0f} "
              f"{r.get('hf_tok_s', float('nan')):>9.0f} "
              f"{r.get('speedup_vs_hf', float('nan')):>6.1f}x {r['roofline_tok_s']:>9.0f} "
              f"{r['fraction_of_roofline']:>7.1%} {r['decode_phase_tok_s']:>12.0f} "
              f"{r['decode_phase_fraction_of_roofline']:>7.1%} {r['whole_over_decode']:>12.2f} "
              f"{r['step_ms']:>8.2f} {r['device_decode_ms']:>7.2f} "
              f"{r['prefill_ms']:>10.2f} {r.get('tail_speedup', float('nan')):>15.2f}x")
    result = {**device_info(dev), "preset": args.preset, "prompt": args.prompt, "new": args.new,
              "hf_new": args.hf_new, "cuda_graphs": not args.no_graph, "copy_GBps": bw,
              "weight_bytes": weight_bytes, "kv_bytes_per_token": kv_per_token, "rows": rows}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
