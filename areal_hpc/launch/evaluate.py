"""``areal-hpc eval CHECKPOINT CONFIG [overrides]``: the held-out evaluation of one checkpoint, alone.

The same evaluation a run does at start and end (``rollout/evaluate.py``: the config's task, prompt
format, verifiers and ``eval`` section), on one process, for a checkpoint folder, a GGUF file, a
``pkg:`` path or a run folder (its final policy). Prints a small table; ``--json FILE`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from areal_hpc.config import ConfigError, load_config

HELP = "evaluate a checkpoint on the config's held-out set (pass@1, avg@k, pass@k)"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help=HELP)
    p.add_argument("checkpoint", help="HF checkpoint folder, .gguf file, pkg:package/file, or a run folder")
    p.add_argument("config", help="YAML config whose task, prompt, reward and eval sections apply")
    p.add_argument("overrides", nargs="*", help="dotted overrides such as eval.k=8 eval.n=100")
    p.add_argument("--json", dest="json_out", help="also write the figures to this JSON file")
    p.set_defaults(func=run)
    return p


def checkpoint_of(path: str) -> str:
    """A run folder means its final policy (else its newest checkpoint); anything else is used as given."""
    p = Path(path).expanduser()
    if (p / "config.yaml").is_file() and (p / "checkpoints").is_dir():
        final = p / "checkpoints" / "final"
        if (final / "config.json").is_file():
            return str(final)
        steps = sorted((c for c in (p / "checkpoints").iterdir() if (c / "policy" / "config.json").is_file()),
                       key=lambda c: c.name)
        if steps:
            return str(steps[-1] / "policy")
        raise FileNotFoundError(f"run folder {path} has no checkpoint yet (no checkpoints/final); evaluate it once "
                                f"it has finished, or pass a checkpoint folder")
    return path


def run(args: argparse.Namespace) -> int:
    try:
        policy = checkpoint_of(args.checkpoint)
        cfg = load_config(args.config, [*args.overrides, "model.kind=hf", f"model.path={policy}"])
        figures = evaluate_checkpoint(cfg)
    except ConfigError as e:
        print(f"areal-hpc: config error: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError) as e:
        print(f"areal-hpc eval: {e}", file=sys.stderr)
        return 2
    width = max(len(k) for k in figures)
    for k, v in figures.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"checkpoint": args.checkpoint, **figures}, indent=2) + "\n")
    return 0


def evaluate_checkpoint(cfg) -> dict[str, Any]:
    import time

    import torch

    from areal_hpc.launch.preflight import PreflightError, check_inputs
    from areal_hpc.model.build import load_policy
    from areal_hpc.model.initial import prepare_initial_policy
    from areal_hpc.reward.pool import RewardPool
    from areal_hpc.reward.scorer import build_scorer
    from areal_hpc.rollout.evaluate import evaluate
    from areal_hpc.tasks import build_task
    from areal_hpc.tasks.prompt import PromptBuilder

    try:
        check_inputs(cfg)
    except PreflightError as e:
        raise ValueError(str(e)) from None
    task = build_task(cfg)
    model, tok = load_policy(prepare_initial_policy(cfg, task), cfg.model.dtype, cfg.model.device)
    problems = task.eval_problems[:cfg.eval.n]
    r = cfg.rollout
    t = time.perf_counter()
    with RewardPool(build_scorer(cfg.reward), cfg.reward.workers, cfg.reward.timeout_s) as pool, torch.no_grad():
        out = evaluate(model, tok, PromptBuilder(cfg.prompt, tok), problems, pool, max_new_tokens=r.max_new_tokens,
                       k=cfg.eval.k, temperature=r.temperature, top_p=r.top_p, seed=cfg.run.seed)
    out["seconds"] = time.perf_counter() - t
    return out
