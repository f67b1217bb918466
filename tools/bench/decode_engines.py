"""Rollout engines side by side: vLLM vs our hf engine (and the fast engine on CUDA), same model and lengths.

``areal-hpc bench decode --engine vllm [--engine hf ...]`` lands here. Every engine generates the same
requests (random prompts, a fixed number of new tokens, no stop token) from the same random-weight
policy, through the ``InferenceEngine`` interface the rollout loop uses, one after the other in one
process; the table gives each one's generated tokens/s and its ratio to the first engine listed. Engine
start (vLLM's process, graph capture) is timed apart, outside the runs. On CPU the preset is shrunk
(``--layers``) so the run takes seconds; vLLM's CPU backend needs a head size of 32 or more.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from areal_hpc.config.vllm import VllmConfig  # noqa: E402
from areal_hpc.model.presets import build_random  # noqa: E402
from tools.bench.common import device_info, write_result  # noqa: E402
from tools.bench.decode_throughput import requests, time_engine  # noqa: E402


class _NoStop:
    """A tokenizer stand-in with no stop token: every request runs to its length."""

    stop_ids: tuple[int, ...] = ()
    pad_id = 0


def build(kind: str, model: torch.nn.Module, path: str, batch: int, max_len: int, new: int):
    common = dict(max_batch=batch, max_new_tokens=new, temperature=1.0, top_p=1.0, seed=0)
    if kind == "hf":
        from areal_hpc.rollout.engine import TorchEngine

        return TorchEngine(model, _NoStop(), **common)
    if kind == "fast":
        from areal_hpc.rollout.fast import FastEngine

        return FastEngine(model, _NoStop(), max_seq_len=max_len, **common)
    if kind == "vllm":
        from areal_hpc.rollout.vllm_engine import VLLMEngine

        device = next(model.parameters()).device
        return VLLMEngine(path, (), params=list(model.named_parameters()), tied_embedding="model.embed_tokens.weight",
                          device=device, dtype=next(model.parameters()).dtype, max_model_len=max_len,
                          interrupt="keep", opts=VllmConfig(), **common)
    raise SystemExit(f"--engine {kind}: choose hf, fast or vllm")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", action="append", required=True, help="vllm, hf, fast (repeat; vllm adds hf)")
    ap.add_argument("--preset", default="qwen2-0.5b")
    ap.add_argument("--layers", type=int, default=0, help="keep this many layers (0: all; CPU default 2)")
    ap.add_argument("--batch", type=int, nargs="+", default=None, help="sequences in flight (CPU 16, CUDA 64 256)")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=None, help="tokens per sequence (CPU 32, CUDA 256)")
    ap.add_argument("--out", default="decode_engines.json")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    kinds = list(dict.fromkeys(args.engine + (["hf"] if args.engine == ["vllm"] else [])))
    if cuda and "fast" not in kinds and args.engine == ["vllm"]:
        kinds.append("fast")
    batches = args.batch or ([64, 256] if cuda else [16])
    new = args.new or (256 if cuda else 32)
    layers = args.layers or (0 if cuda else 2)
    dtype = torch.bfloat16 if cuda else torch.float32
    max_len = args.prompt + new + 8
    shrink = {"num_hidden_layers": layers, "layer_types": ["full_attention"] * layers} if layers else None
    model = build_random(args.preset, seed=0, dtype=dtype, device=dev, max_positions=max_len, shrink=shrink).eval()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        for kind in kinds:
            t = time.perf_counter()
            eng = build(kind, model, tmp, max(batches), max_len, new)
            start_s = time.perf_counter() - t + eng.warm_up()
            for B in batches:
                time_engine(eng, requests(min(B, 4), args.prompt, [4] * min(B, 4), model.config.vocab_size, seed=1))
                secs, n_tok = time_engine(eng, requests(B, args.prompt, [new] * B, model.config.vocab_size, seed=2))
                rows.append({"engine": kind, "batch": B, "tokens": n_tok, "seconds": round(secs, 3),
                             "tok_per_s": round(n_tok / secs, 1), "start_s": round(start_s, 1)})
            if hasattr(eng, "close"):
                eng.close()
    for r in rows:
        base = next(x for x in rows if x["engine"] == kinds[0] and x["batch"] == r["batch"])
        r[f"vs_{kinds[0]}"] = round(r["tok_per_s"] / base["tok_per_s"], 3)
    print(f"{args.preset}{f' ({layers} layers)' if layers else ''}, {dtype}, prompt {args.prompt}, {new} new tokens, "
          f"{device_info(dev).get('gpu', 'CPU')}")
    print(f"{'engine':8} {'batch':>5} {'tok/s':>9} {'vs ' + kinds[0]:>8} {'start s':>8}")
    for r in rows:
        print(f"{r['engine']:8} {r['batch']:5d} {r['tok_per_s']:9.1f} {r[f'vs_{kinds[0]}']:8.3f} {r['start_s']:8.1f}")
    result = {"bench": "decode_engines", "preset": args.preset, "layers": layers or None, "dtype": str(dtype),
              "prompt": args.prompt, "new": new, "device": device_info(dev), "rows": rows}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
