"""Trainer throughput: our packed bf16 path against the HF padded reference, tokens/s and MFU in one run.

Workload per optimizer step: ``rows x row_len`` tokens (default 8 x 2048 = 16384) made of
variable-length sequences whose lengths sum to ``row_len`` in every row (log-normal, median 256).
Each sequence is a one-token prompt plus a response, so the loss covers every token but the first of
each sequence. Ours: ``TorchTrainEngine.train_batch`` with the decoupled PPO loss (AdamW, grad clip),
token budget ``rows x row_len`` (one packed micro-batch), bf16 autocast over fp32 master weights, in
four variants (activation checkpointing off/on x torch.compile off/on) and the compiled ones with
static shapes, token buckets or other inductor modes; forward-only ``compute_logp`` is timed too.
Reference: HF ``model(input_ids, labels=input_ids)`` on the same rows as 8 padded-free 2048-token
rows (cross-entropy loss, gradient checkpointing, the same autocast and AdamW).

    MFU = (6 * N_matmul * tokens + attention) / step time / peak
    attention = 6 * n_layers * n_heads * head_dim * sum(L^2)     (causal QK^T and PV, fwd + 2x bwd)

N_matmul counts the matmul parameters with the lm_head (``Qwen2Shape.matmul_params``); L runs over
the sequences each variant attends over (ours: the packed sequences; HF: the 2048-token rows).
Recomputation (checkpointing, the chunked loss head) is not counted: this is model FLOPs utilisation.
Peak is a bf16 8192^3 matmul measured in the same run. Forward-only MFU uses 2x instead of 6x.

    python tools/bench/train_throughput.py                 # CUDA, Qwen2-0.5B shape, random weights
    python tools/bench/train_throughput.py --quick         # CPU smoke run on a tiny Qwen2
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from areal_hpc.api import TrainBatch
from areal_hpc.config.schema import TrainerConfig
from areal_hpc.model.presets import build_random
from areal_hpc.model.qwen2 import Qwen2Shape
from areal_hpc.train.engine import TorchTrainEngine
from areal_hpc.train.loss import ppo_loss
from areal_hpc.train.packed import autocast_for, set_hf_checkpointing
from areal_hpc.trajectory import Trajectory


@dataclass(frozen=True)
class Variant:
    name: str
    checkpointing: bool = False
    compile: bool = False
    dynamic: bool = True  # False: compiled graphs specialised to the micro-batch's token count
    mode: str | None = None  # torch.compile mode (e.g. max-autotune-no-cudagraphs)
    bucket: int = 0  # trainer.token_bucket: streams padded to a multiple, static graphs per bucket (the loop's way)

    @property
    def key(self) -> str:
        parts = [self.name.replace("ours ", "")] + [k for k, on in (("ckpt", self.checkpointing),
                                                                    ("compile", self.compile)) if on]
        if not self.dynamic:
            parts.append("static")
        if self.bucket:
            parts.append(f"bucket{self.bucket}")
        if self.mode:
            parts.append(self.mode)
        return "+".join(parts)


OURS = (Variant("ours packed"), Variant("ours packed", checkpointing=True), Variant("ours packed", compile=True),
        Variant("ours packed", checkpointing=True, compile=True),
        Variant("ours packed", compile=True, dynamic=False),
        Variant("ours packed", compile=True, bucket=1024),
        Variant("ours packed", compile=True, dynamic=False, mode="max-autotune-no-cudagraphs"),
        Variant("ours packed", compile=True, dynamic=False, mode="reduce-overhead"))


def tiny_qwen2(seed: int, device: str) -> torch.nn.Module:
    """--quick: a Qwen2 small enough for a CPU smoke run (same code paths as the 0.5B preset)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).to(device)


def row_lengths(rng: np.random.Generator, row_len: int, median: float, min_len: int = 16) -> list[int]:
    """Log-normal lengths that sum exactly to ``row_len`` (a short tail joins the previous sequence)."""
    out: list[int] = []
    left = row_len
    while left > 0:
        n = int(np.clip(rng.lognormal(np.log(median), 0.6), min_len, left))
        if left - n < min_len:
            n = left
        out.append(n)
        left -= n
    return out


def make_rows(rows: int, row_len: int, vocab: int, seed: int) -> tuple[list[list[np.ndarray]], list[Trajectory]]:
    rng = np.random.default_rng(seed)
    median = max(16.0, row_len / 8)
    seqs = [[rng.integers(0, vocab, n).astype(np.int32) for n in row_lengths(rng, row_len, median)]
            for _ in range(rows)]
    samples = []
    for row in seqs:
        for s in row:
            r = len(s) - 1
            samples.append(Trajectory(
                sample_id=len(samples), group_id=len(samples), prompt_tokens=s[:1], response_tokens=s[1:],
                behav_logprobs=(-np.log(vocab) + 0.1 * rng.standard_normal(r)).astype(np.float32),
                versions=np.zeros(r, np.int32), reward=0.0))
    return seqs, samples


def timed(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> list[float]:
    """Seconds per call after ``warmup`` calls; CUDA events bracket each call, then synchronize."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return out


def peak_flops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Measured dense matmul rate (FLOP/s) of an n^3 product: the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = timed(lambda: a @ b, steps=10, warmup=3, device=device)
    return 2 * n**3 / float(np.median(times))


def attn_flops(shape: Qwen2Shape, lengths: list[int], fwd_only: bool) -> float:
    per = 2 if fwd_only else 6
    return per * shape.n_layers * shape.n_heads * shape.head_dim * float(sum(n * n for n in lengths))


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def run_ours(model: torch.nn.Module, v: Variant, samples: list[Trajectory], budget: int, compute_dtype: str,
             steps: int, warmup: int) -> dict:
    device = next(model.parameters()).device
    cfg = TrainerConfig(lr=1e-6, token_budget=budget, packing="packed", compute_dtype=compute_dtype,
                        activation_checkpointing=v.checkpointing, compile=v.compile, token_bucket=v.bucket)
    eng = TorchTrainEngine(model, cfg, pad_id=0, temperature=1.0)
    eng._packed.compile_dynamic = v.dynamic and not v.bucket
    eng._packed.compile_mode = v.mode
    t0 = time.perf_counter()
    eng.prepare()  # the bucket variant compiles every bucket here, as the trainer does before step 1
    prepare_s = time.perf_counter() - t0
    return time_train_engine(eng, samples, steps, warmup, device, prepare_s)


def time_train_engine(eng, samples: list[Trajectory], steps: int, warmup: int, device: torch.device,
                      prepare_s: float) -> dict:
    """Median optimizer-step and no-grad log-prob seconds of a ``TrainEngine`` on ``samples`` (PPO loss)."""
    rng = np.random.default_rng(0)
    adv = np.where(rng.random(len(samples)) < 0.5, -1.0, 1.0).astype(np.float32)
    weight = np.ones(len(samples), np.float32)
    prox = eng.compute_logp(samples)  # also the first (compiling) forward
    stats: dict = {}

    def step() -> None:
        stats.update(eng.train_batch(TrainBatch(samples, adv, weight, prox), ppo_loss(eng.cfg)).as_dict())

    t_step = timed(step, steps, warmup, device)
    t_logp = timed(lambda: eng.compute_logp(samples), max(2, steps // 2), 1, device)
    return dict(step_s=float(np.median(t_step)), logp_s=float(np.median(t_logp)), peak_mem_gib=peak_gib(device),
                loss=stats["loss"], grad_norm=stats["grad_norm"], n_microbatches=stats["n_microbatches"],
                stream_tokens=stats.get("stream_tokens"), prepare_s=prepare_s)


def run_megatron(model: torch.nn.Module, samples: list[Trajectory], budget: int, compute_dtype: str, steps: int,
                 warmup: int) -> dict:
    """The megatron backend (``trainer.backend: megatron``) on the same samples and loss as ``run_ours``."""
    import torch.distributed as dist

    from areal_hpc.config import Config
    from areal_hpc.train.megatron.engine import MegatronTrainEngine

    device = next(model.parameters()).device
    if not dist.is_initialized():  # the backend's process groups hang off the job's world: a world of one here
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    cfg = Config()
    cfg.trainer.lr, cfg.trainer.token_budget, cfg.trainer.compute_dtype = 1e-6, budget, compute_dtype
    cfg.model.max_seq_len = max(len(s.prompt_tokens) + len(s.response_tokens) for s in samples)
    t0 = time.perf_counter()
    eng = MegatronTrainEngine(model, cfg, pad_id=0)
    return time_train_engine(eng, samples, steps, warmup, device, time.perf_counter() - t0)


def profile_step(model: torch.nn.Module, v: Variant, samples: list[Trajectory], budget: int, compute_dtype: str,
                 top: int = 40) -> str:
    """Top CUDA kernels of one optimizer step (after two warm-up steps), by device time, as a table."""
    cfg = TrainerConfig(lr=1e-6, token_budget=budget, packing="packed", compute_dtype=compute_dtype,
                        activation_checkpointing=v.checkpointing, compile=v.compile)
    eng = TorchTrainEngine(model, cfg, pad_id=0, temperature=1.0)
    eng._packed.compile_dynamic, eng._packed.compile_mode = v.dynamic, v.mode
    rng = np.random.default_rng(0)
    adv = np.where(rng.random(len(samples)) < 0.5, -1.0, 1.0).astype(np.float32)
    weight = np.ones(len(samples), np.float32)
    prox = eng.compute_logp(samples)
    for _ in range(2):
        eng.train_batch(TrainBatch(samples, adv, weight, prox), ppo_loss(eng.cfg)).as_dict()
    batch = TrainBatch(samples, adv, weight, prox)
    return profiled_step(lambda: eng.train_batch(batch, ppo_loss(eng.cfg)), str(v), torch.device("cuda"), top)


def profiled_step(step, label: str, device: torch.device, top: int = 40) -> str:
    """Profile one call of ``step``: its top CUDA kernels by device time, grouped (GEMM, attention, ...).

    On CPU (the benches' smoke runs) the table lists the ATen ops by self CPU time instead: there are no
    kernels, and it keeps the path under test."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    kernels, ranges = [], []
    for e in prof.key_averages():
        if not cuda:
            if e.key.startswith("aten::") and e.self_cpu_time_total > 0:
                kernels.append((e.self_cpu_time_total, e.count, e.key))
            continue
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = e.self_cuda_time_total
        tot = getattr(e, "device_time_total", None)
        if tot is None:
            tot = e.cuda_time_total
        if t > 0 and not e.key.startswith(("aten::", "prof:", "Optimizer.", "autograd::", "Torch-Compiled",
                                            "CompiledFunction", "## ", "cudaGraph")):
            kernels.append((t, e.count, e.key))  # device kernels only (ops would count their kernels twice)
        elif e.key.startswith("prof:") and tot > 0:
            ranges.append((tot, e.count, e.key))
    kernels.sort(reverse=True)
    total = max(sum(k[0] for k in kernels), 1e-9)
    what = ("device time", "kernel launches") if cuda else ("CPU time", "op calls")
    lines = [f"profile {label}: {total / 1e3:.1f} ms {what[0]} in {sum(k[1] for k in kernels)} {what[1]}"]
    lines.append(f"{'ms':>8} {'%':>5} {'calls':>6}  {'kernel' if cuda else 'op'}")
    for t, n, name in kernels[:top]:
        lines.append(f"{t / 1e3:>8.2f} {t / total:>5.1%} {n:>6}  {name[:110]}")
    groups: dict[str, float] = {}
    for t, _, name in kernels:
        low = name.lower()
        g = ("gemm" if any(x in low for x in ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas", "aten::mm",
                                                "aten::addmm", "aten::bmm")) else
             "attention" if any(x in low for x in ("flash", "fmha", "attention")) else
             "triton" if low.startswith("triton") else
             "optimizer" if "adam" in low or "multi_tensor" in low else "other elementwise/reduce")
        groups[g] = groups.get(g, 0.0) + t
    lines.append("by group: " + ", ".join(f"{g} {t / 1e3:.1f} ms ({t / total:.0%})"
                                          for g, t in sorted(groups.items(), key=lambda x: -x[1])))
    for t, n, name in sorted(ranges, reverse=True):
        lines.append(f"range {name}: {t / 1e3:.1f} ms device time ({n} calls)")
    return "\n".join(lines)


def run_hf(model: torch.nn.Module, seqs: list[list[np.ndarray]], compute_dtype: torch.dtype, steps: int,
           warmup: int) -> dict:
    device = next(model.parameters()).device
    ids = torch.from_numpy(np.stack([np.concatenate(r) for r in seqs]).astype(np.int64)).to(device)
    set_hf_checkpointing(model, True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    loss_box: list[float] = []

    def step() -> None:
        with autocast_for(device, compute_dtype):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_box.append(float(loss.detach()))

    t_step = timed(step, steps, warmup, device)
    set_hf_checkpointing(model, False)
    model.eval()
    return dict(step_s=float(np.median(t_step)), peak_mem_gib=peak_gib(device), loss=loss_box[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny Qwen2, 2 x 128 tokens, fp32")
    ap.add_argument("--preset", default="qwen2-0.5b")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--row-len", type=int, default=2048)
    ap.add_argument("--token-budget", type=int, default=0, help="micro-batch token budget (0: rows x row_len)")
    ap.add_argument("--steps", type=int, default=5, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip the HF reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="",
                    help="result JSON (default: train_throughput_<device>.json in the current folder)")
    ap.add_argument("--variants", nargs="*", default=None,
                    help="only these of our variants, by key (e.g. packed+compile packed+compile+static)")
    ap.add_argument("--backend", choices=("torch", "megatron"), default="torch",
                    help="megatron: also time the megatron backend (padded micro-batches) on the same samples")
    ap.add_argument("--profile", action="store_true",
                    help="also print the top CUDA kernels of one step (eager and compiled, no checkpointing)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if args.quick:
        args.rows, args.row_len, args.steps, args.warmup = 2, 128, 2, 1
        model, dtype_name, peak_n = tiny_qwen2(args.seed, "cpu"), "float32", 1024
    else:
        if device.type != "cuda":
            raise SystemExit("the full benchmark needs CUDA; use --quick for a CPU smoke run")
        model = build_random(args.preset, seed=args.seed, dtype=torch.float32, device=device,
                             max_positions=max(args.row_len, 4096))
        dtype_name, peak_n = "bfloat16", 8192
    compute_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    shape = Qwen2Shape.of(model.config)
    n_matmul = shape.matmul_params()
    budget = args.token_budget or args.rows * args.row_len
    seqs, samples = make_rows(args.rows, args.row_len, shape.vocab, args.seed)
    tokens = args.rows * args.row_len
    lengths = [len(s) for row in seqs for s in row]
    peak = peak_flops(device, compute_dtype, peak_n)

    results = []
    for v in OURS:
        if args.variants is not None and v.key not in args.variants:
            continue
        if v.compile and device.type != "cuda":
            continue  # compile is CUDA-only (ignored with a warning on CPU): nothing new to time
        free_memory(device)
        t0 = time.perf_counter()
        try:
            r = run_ours(model, v, samples, budget, dtype_name, args.steps, args.warmup)
        except Exception as e:  # an experimental compile mode must not cost the other variants' figures
            print(f"variant {v.key} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            results.append(dict(variant=v.name, key=v.key, failed=f"{type(e).__name__}: {str(e)[:300]}"))
            continue
        flops = 6 * n_matmul * tokens + attn_flops(shape, lengths, fwd_only=False)
        flops_fwd = 2 * n_matmul * tokens + attn_flops(shape, lengths, fwd_only=True)
        results.append(dict(variant=v.name, key=v.key, checkpointing=v.checkpointing, compile=v.compile,
                            dynamic=v.dynamic, mode=v.mode, **r,
                            tokens_per_s=tokens / r["step_s"], mfu=flops / r["step_s"] / peak,
                            logp_tokens_per_s=tokens / r["logp_s"], logp_mfu=flops_fwd / r["logp_s"] / peak,
                            wall_s=time.perf_counter() - t0))
    if args.backend == "megatron":
        free_memory(device)
        t0 = time.perf_counter()
        r = run_megatron(model, samples, budget, dtype_name, args.steps, args.warmup)
        flops = 6 * n_matmul * tokens + attn_flops(shape, lengths, fwd_only=False)
        flops_fwd = 2 * n_matmul * tokens + attn_flops(shape, lengths, fwd_only=True)
        results.append(dict(variant="megatron padded", key="megatron padded", checkpointing=False, compile=False,
                            **r, tokens_per_s=tokens / r["step_s"], mfu=flops / r["step_s"] / peak,
                            logp_tokens_per_s=tokens / r["logp_s"], logp_mfu=flops_fwd / r["logp_s"] / peak,
                            wall_s=time.perf_counter() - t0))
    if not args.no_hf:
        free_memory(device)
        t0 = time.perf_counter()
        r = run_hf(model, seqs, compute_dtype, args.steps, args.warmup)
        flops = 6 * n_matmul * tokens + attn_flops(shape, [args.row_len] * args.rows, fwd_only=False)
        results.append(dict(variant="hf padded", checkpointing=True, compile=False, **r,
                            tokens_per_s=tokens / r["step_s"], mfu=flops / r["step_s"] / peak,
                            wall_s=time.perf_counter() - t0))
    profiles = []
    if args.profile and device.type == "cuda":
        for v in (Variant("ours packed", compile=True), Variant("ours packed", compile=True, dynamic=False)):
            free_memory(device)
            profiles.append(profile_step(model, v, samples, budget, dtype_name))
            print(profiles[-1], flush=True)
    hf = next((r for r in results if r["variant"] == "hf padded"), None)
    failed = [r for r in results if r.get("failed")]
    results = [r for r in results if not r.get("failed")]
    for r in results:
        r["speedup_vs_hf"] = r["tokens_per_s"] / hf["tokens_per_s"] if hf else float("nan")

    print(f"{device.type}: {torch.cuda.get_device_name() if device.type == 'cuda' else platform.machine()}, "
          f"{tokens} tokens/step in {len(lengths)} sequences, compute {dtype_name}, "
          f"peak {peak / 1e12:.3g} TFLOP/s ({dtype_name} {peak_n}^3 matmul)")
    print(f"{'variant':40} {'step ms':>8} {'tokens/s':>10} {'MFU':>6} "
          f"{'vs HF':>6} {'mem GiB':>7} {'fwd tok/s':>10} {'fwd MFU':>7}")
    for r in results:
        fwd = (f"{r['logp_tokens_per_s']:>10.0f} {r['logp_mfu']:>7.1%}" if "logp_s" in r else f"{'-':>10} {'-':>7}")
        print(f"{r.get('key', r['variant']):40} "
              f"{r['step_s'] * 1e3:>8.1f} {r['tokens_per_s']:>10.0f} {r['mfu']:>6.1%} {r['speedup_vs_hf']:>5.2f}x "
              f"{r['peak_mem_gib']:>7.1f} {fwd}")

    result = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"), machine=platform.platform(),
        torch=torch.__version__, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        model=("tiny-qwen2" if args.quick else args.preset), matmul_params=n_matmul, compute_dtype=dtype_name,
        rows=args.rows, row_len=args.row_len, tokens_per_step=tokens, n_sequences=len(lengths),
        token_budget=budget, steps=args.steps, warmup=args.warmup, peak_flops=peak, peak_matmul_n=peak_n,
        loss="ours: decoupled PPO over all tokens but each sequence's first; hf: next-token cross-entropy",
        flops_formula="6*matmul_params*tokens + 6*n_layers*n_heads*head_dim*sum(L^2) (fwd-only: 2x, 2x)",
        runs=results, failed=failed, **({"profiles": profiles} if profiles else {}))
    out = Path(args.out or f"train_throughput_{'cpu_quick' if args.quick else device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
