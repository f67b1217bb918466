"""Trainer step with a group's prompt shared in the stream against one prompt copy per sample, side by side.

Workload: what the rollout delivers in the e2e runs (``configs/gpu-synthetic.yaml`` with the reasoning
overrides): ``--groups`` prompts of ``--prompt-len`` tokens, ``--group-size`` samples each, every sample of a
group as long as the group's target, drawn log-normal (median ``--len-median``, sigma 1, at most ``--max-len``).
Both engines run ``TorchTrainEngine.train_batch`` on the same samples with the GPU config's trainer
(packed, bf16 over fp32 master weights, compiled layers, ``trainer.token_bucket``, ``trainer.token_budget``),
``trainer.share_prompts`` true or false, in alternating order over ``--rounds`` rounds so a drifting clock
hits both alike. Reported: step time, the stream tokens the forwards ran on (prompts and padding
included), micro-batches, and the ratios; the losses and gradient norms of the two, which must agree
within bf16 noise.

    python tools/bench/shared_prompts.py            # CUDA, Qwen2-0.5B shape, random weights
    python tools/bench/shared_prompts.py --quick    # CPU smoke run on a tiny Qwen2
    python tools/bench/shared_prompts.py --profile  # and one profiled step each: where the time goes
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from areal_hpc.api import TrainBatch  # noqa: E402
from areal_hpc.config.schema import TrainerConfig  # noqa: E402
from areal_hpc.model.presets import build_random  # noqa: E402
from areal_hpc.train.engine import TorchTrainEngine
from areal_hpc.train.loss import ppo_loss  # noqa: E402
from areal_hpc.trajectory import Trajectory  # noqa: E402
from tools.bench.common import device_info, write_result  # noqa: E402
from tools.bench.train_throughput import profiled_step, timed, tiny_qwen2  # noqa: E402


def grouped_batch(groups: int, group_size: int, prompt_len: int, len_median: float, max_len: int, vocab: int,
                  seed: int) -> list[Trajectory]:
    """The e2e workload's batch: each group one random prompt and one target length for all its samples."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    out: list[Trajectory] = []
    for g in range(groups):
        prompt = nrng.integers(3, vocab, prompt_len).astype(np.int32)
        n = max(1, min(max_len, round(math.exp(rng.gauss(math.log(len_median), 1.0)))))
        for _ in range(group_size):
            out.append(Trajectory(
                sample_id=len(out), group_id=g, prompt_tokens=prompt.copy(),
                response_tokens=nrng.integers(3, vocab, n).astype(np.int32),
                behav_logprobs=(-math.log(vocab) + 0.1 * nrng.standard_normal(n)).astype(np.float32),
                versions=np.zeros(n, np.int32), reward=float(nrng.integers(0, 2))))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: tiny Qwen2, 4 groups, fp32, no compile")
    ap.add_argument("--preset", default="qwen2-0.5b")
    ap.add_argument("--groups", type=int, default=32)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--len-median", type=float, default=256.0)
    ap.add_argument("--max-len", type=int, default=3072)
    ap.add_argument("--token-budget", type=int, default=16384)
    ap.add_argument("--token-bucket", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; each times --steps steps per engine")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true",
                    help="after the timed rounds, one profiled step per engine: where the step's time goes "
                         "(CUDA kernels by device time; ATen ops by CPU time on CPU)")
    ap.add_argument("--out", default="shared_prompts.json", help="result JSON (default: in the current folder)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    if args.quick:
        args.groups, args.group_size, args.prompt_len, args.len_median, args.max_len = 4, 4, 16, 24.0, 64
        args.token_budget, args.token_bucket, args.rounds, args.steps = 256, 64, 1, 1
        make = lambda: tiny_qwen2(args.seed, "cpu")  # noqa: E731
        compute, compile_ = "float32", False
    else:
        if device.type != "cuda":
            raise SystemExit("the full benchmark needs CUDA; use --quick for a CPU smoke run")
        make = lambda: build_random(args.preset, seed=args.seed, dtype=torch.float32, device=device,  # noqa: E731
                                    max_positions=args.prompt_len + args.max_len)
        compute, compile_ = "bfloat16", True
    batch = None
    engines = {}
    for share in (True, False):  # one model each: the step moves its weights
        model = make()
        batch = batch or grouped_batch(args.groups, args.group_size, args.prompt_len, args.len_median, args.max_len,
                                       model.config.vocab_size, args.seed)
        cfg = TrainerConfig(lr=1e-6, token_budget=args.token_budget, packing="packed", compute_dtype=compute,
                            compile=compile_, token_bucket=args.token_bucket, share_prompts=share)
        eng = TorchTrainEngine(model, cfg, pad_id=0, temperature=1.0)
        eng.prepare()
        engines[share] = eng
    rng = np.random.default_rng(0)
    adv = np.where(rng.random(len(batch)) < 0.5, -1.0, 1.0).astype(np.float32)
    weight = np.ones(len(batch), np.float32)
    times: dict[bool, list[float]] = {True: [], False: []}
    stats: dict[bool, dict] = {}
    for eng in engines.values():  # first (compiling) steps, untimed
        eng.train_batch(TrainBatch(batch, adv, weight), ppo_loss(eng.cfg)).as_dict()
    for rnd in range(args.rounds):
        for share in ((True, False) if rnd % 2 == 0 else (False, True)):
            eng = engines[share]
            def step(e: TorchTrainEngine = eng, s: bool = share) -> None:
                stats[s] = e.train_batch(TrainBatch(batch, adv, weight), ppo_loss(e.cfg)).as_dict()

            times[share] += timed(step, args.steps, 0, device)
            gc.collect()
    profiles = {}
    if args.profile:  # after the timing, so the profiler's overhead touches no timed step
        for share in (True, False):
            name = "shared" if share else "separate"
            profiles[name] = profiled_step(lambda e=engines[share]: e.train_batch(TrainBatch(batch, adv, weight),
                                                                                ppo_loss(e.cfg)),
                                           f"{name} prompts", device)
    rows = {}
    for share in (True, False):
        st = stats[share]
        rows["shared" if share else "separate"] = {
            "share_prompts": share, "step_s": float(np.median(times[share])), "step_s_all": times[share],
            "stream_tokens": st["stream_tokens"], "n_microbatches": st["n_microbatches"], "loss": st["loss"],
            "grad_norm": st["grad_norm"]}
    sh, sep = rows["shared"], rows["separate"]
    response = sum(s.n_response for s in batch)
    ratio = {"step_speedup": sep["step_s"] / sh["step_s"],
             "stream_token_ratio": sh["stream_tokens"] / sep["stream_tokens"], "response_tokens": response,
             "response_tokens_per_s_shared": response / sh["step_s"],
             "response_tokens_per_s_separate": response / sep["step_s"]}
    print(f"{device.type}: {args.groups} groups x {args.group_size} samples, prompt {args.prompt_len}, "
          f"{response} response tokens per step, budget {args.token_budget}, bucket {args.token_bucket}")
    print(f"{'prompts':9} {'step ms':>8} {'stream tok':>10} {'micro-b':>7} {'resp tok/s':>11} {'loss':>10} "
          f"{'grad norm':>9}")
    for name, r in rows.items():
        print(f"{name:9} {r['step_s'] * 1e3:>8.1f} {r['stream_tokens']:>10.0f} {r['n_microbatches']:>7.0f} "
              f"{response / r['step_s']:>11.0f} {r['loss']:>10.5f} {r['grad_norm']:>9.4f}")
    print(f"shared vs separate: step {ratio['step_speedup']:.3f}x faster, "
          f"stream tokens x{ratio['stream_token_ratio']:.3f}")
    for text in profiles.values():
        print(text)
    result = {**device_info(device), "model": "tiny-qwen2" if args.quick else args.preset, "args": vars(args),
              "runs": rows, **ratio, **({"profiles": profiles} if profiles else {})}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
