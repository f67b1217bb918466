"""Megatron's distributed optimizer in the megatron backend (``trainer.distributed_optimizer``, ``dopt.py``).

On CPU: when it is selected and the one-line errors of the combinations that cannot run (Megatron's distributed
optimizer takes CUDA tensors only, so its step cannot run on CPU even with the CUDA lookups the other Megatron
tests point at the CPU). On two GPUs (two NCCL processes, each with its own batch): data parallel = 2 with the
distributed optimizer against data parallel = 2 without it, two PPO steps: the same loss, gradient norm and
weights within fp32 tolerance; each rank holding half of the AdamW state; a checkpoint taken between the steps
and loaded into fresh engines continuing bit for bit, and also loading into the replicated-state path.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("megatron.core", reason="needs megatron-core: pip install -e '.[megatron]' (CI's dev extra has it)")

WORLD = 2


def test_selection_and_its_errors():
    from areal_hpc.config import load_config
    from areal_hpc.config.fields import ConfigError
    from areal_hpc.train.megatron.dopt import wanted

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    ok = dict(dp=2, tp=1, pp=1, device=cuda, backend="nccl")
    assert wanted("auto", **ok) and wanted("true", **{**ok, "dp": 4})
    # auto stays off wherever it cannot run or has nothing to shard; false is off everywhere
    errors = {
        "needs CUDA .*the trainer is on cpu": dict(device=cpu, backend="gloo"),
        "needs more than one data-parallel replica": dict(dp=1, backend=None),
        "needs NCCL between the data-parallel replicas .*this run has gloo": dict(backend="gloo"),
        "is wired for one rank per model replica only, this run has tensor_parallel=2 pipeline_parallel=1": dict(tp=2),
        "is wired for one rank per model replica only, this run has tensor_parallel=1 pipeline_parallel=2": dict(pp=2),
    }
    for msg, kw in errors.items():
        assert not wanted("auto", **{**ok, **kw})
        with pytest.raises(ValueError, match=rf"^trainer.distributed_optimizer=true {msg}[^\n]*; set "
                                             r"trainer.distributed_optimizer=auto$"):
            wanted("true", **{**ok, **kw})
    assert not wanted("false", **ok)
    with pytest.raises(ValueError, match=r"^trainer.distributed_optimizer='yes' is not one of"):
        wanted("yes", **ok)
    # the key: YAML's bare true/false read as the setting; only the megatron backend has it
    assert load_config(None, ["trainer.backend=megatron", "trainer.distributed_optimizer=true"]) \
        .trainer.distributed_optimizer == "true"
    assert load_config(None, ["trainer.distributed_optimizer=false"]).trainer.distributed_optimizer == "false"
    with pytest.raises(ConfigError, match=r"trainer.distributed_optimizer.*applies to trainer.backend=megatron only"):
        load_config(None, ["trainer.distributed_optimizer=true"])


def _hf(device: torch.device) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=251, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, rope_theta=10000.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                      attention_dropout=0.0)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).float()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every tensor random (HF starts norms at one and biases at zero, hiding a swap)
        for name, p in model.named_parameters():
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.2 * torch.randn(p.shape, generator=g))
    return model.to(device)


def _batch(rank: int, step: int, n: int = 6):
    from areal_hpc.api import TrainBatch
    from areal_hpc.trajectory import Trajectory

    rng = np.random.default_rng(100 * step + rank)
    samples = []
    for i in range(n + rank):
        p, r = int(rng.integers(3, 14)), int(rng.integers(1, 16))
        samples.append(Trajectory(sample_id=100 * rank + i, group_id=i // 2,
                                  prompt_tokens=rng.integers(3, 251, p).astype(np.int32),
                                  response_tokens=rng.integers(3, 251, r).astype(np.int32),
                                  behav_logprobs=(-rng.random(r) * 5 - 1).astype(np.float32),
                                  versions=np.zeros(r, np.int32), reward=float(i % 2)))
    return TrainBatch(samples, rng.standard_normal(len(samples)).astype(np.float32), np.ones(len(samples), np.float32))


def _cfg(setting: str):
    from areal_hpc.config import Config

    cfg = Config()
    cfg.trainer.backend, cfg.trainer.distributed_optimizer = "megatron", setting
    cfg.trainer.compute_dtype, cfg.trainer.token_budget, cfg.model.max_seq_len = "float32", 60, 32
    cfg.trainer.lr, cfg.trainer.grad_clip, cfg.trainer.weight_decay = 1e-3, 0.5, 0.01  # clipping bites
    return cfg


class _NoRngTracker:
    def fork(self, *args, **kwargs):
        return contextlib.nullcontext()

    def add(self, *args, **kwargs):
        pass


class _OnCpu:
    """``torch`` as Megatron's optimizer modules see it on CPU: a tensor asked for on "cuda" is made on the CPU."""

    def __getattr__(self, name: str):
        real = getattr(torch, name)
        if name not in ("tensor", "zeros"):
            return real

        def make(*args, **kwargs):
            if kwargs.get("device") == "cuda":
                kwargs["device"] = "cpu"
            return real(*args, **kwargs)

        return make


def _cpu_megatron_optimizer() -> None:
    """In a worker process of the CPU run: megatron's forward on CPU (as in test_megatron_tp.py), and its distributed
    optimizer too: it accepts only parameters whose ``type()`` names a ``torch.cuda`` tensor type and makes a few
    scalars on "cuda", so CPU tensors answer with the CUDA type name and those scalars are made on the CPU. The
    backend's own selection stays CUDA-only (``dopt.wanted``); here it is asked as if on CUDA."""
    from megatron.core import tensor_parallel
    from megatron.core import utils as mutils
    from megatron.core.optimizer import clip_grads
    from megatron.core.optimizer import optimizer as moptimizer
    from megatron.core.tensor_parallel import random as mrandom

    from areal_hpc.train.megatron import dopt, engine

    torch.cuda.current_device = lambda: "cpu"
    tensor_parallel.get_cuda_rng_tracker = lambda *a, **k: _NoRngTracker()
    mrandom.model_parallel_cuda_manual_seed = lambda *a, **k: None
    engine.require_cuda = lambda device: None
    engine.wanted = lambda setting, **kw: dopt.wanted(setting, **{**kw, "device": torch.device("cuda"),
                                                                  "backend": "nccl"})
    moptimizer.torch = clip_grads.torch = mutils.torch = _OnCpu()  # the norm's scalars
    tensor_type = torch.Tensor.type

    def cuda_type_name(self, *args, **kwargs):
        name = tensor_type(self, *args, **kwargs)
        return name.replace("torch.", "torch.cuda.", 1) if not args and not kwargs and self.device.type == "cpu" \
            else name

    torch.Tensor.type = cuda_type_name


def _worker(rank: int, world: int, init_file: str, out_dir: str, device: str) -> None:
    if device == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
        _cpu_megatron_optimizer()
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
        from areal_hpc.train.loss import ppo_loss
        from areal_hpc.train.megatron.engine import MegatronTrainEngine

        trainers = dist.new_group(list(range(world)))
        loss = ppo_loss(_cfg("false").trainer)
        before = {n: p.detach().clone() for n, p in _hf(dev).named_parameters()}
        rep = MegatronTrainEngine(_hf(dev), _cfg("false"), pad_id=0, dp_group=trainers)
        dis = MegatronTrainEngine(_hf(dev), _cfg("true"), pad_id=0, dp_group=trainers)
        r: dict = {"dopt": (rep._dopt is None, dis._dopt is not None)}
        s1 = [e.train_batch(_batch(rank, 1), loss) for e in (rep, dis)]
        state = dis.state_dict()  # a collective: both ranks
        resumed = MegatronTrainEngine(_hf(dev), _cfg("true"), pad_id=0, dp_group=trainers)
        resumed.load_state_dict(copy.deepcopy(state))
        crossed = MegatronTrainEngine(_hf(dev), _cfg("false"), pad_id=0, dp_group=trainers)
        crossed.load_state_dict(copy.deepcopy(state))  # the gathered state is torch's AdamW layout
        s2 = [e.train_batch(_batch(rank, 2), loss) for e in (rep, dis, resumed, crossed)]
        r["steps"] = [[(s.loss, s.grad_norm) for s in s1], [(s.loss, s.grad_norm) for s in s2]]
        w = [dict(e.parameters_for_sync()) for e in (rep, dis, resumed, crossed)]
        r["weights"] = {n: float((w[1][n] - w[0][n]).abs().max()) for n in w[0]}
        r["resumed"] = max(float((w[2][n] - w[1][n]).abs().max()) for n in w[1])
        r["crossed"] = max(float((w[3][n] - w[1][n]).abs().max()) for n in w[1])
        r["moved"] = max(float((w[1][n].cpu() - before[n].cpu()).abs().max()) for n in w[1])
        r["state"] = (dis._dopt.state_numel(),
                      sum(t.numel() for st in rep.optimizer.state.values() for k, t in st.items()
                          if k in ("exp_avg", "exp_avg_sq")))
        r["saved_state"] = sum(st["exp_avg"].numel() + st["exp_avg_sq"].numel()
                               for st in state["optimizer"]["state"].values())
        torch.save(r, Path(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                    reason="needs two CUDA GPUs (one NCCL rank on each)")


def _run(device: str, tmp: Path) -> list[dict]:
    # CPU: forked from this process, which has imported megatron-core already (importing it takes most of the
    # run otherwise); CUDA: spawned, as CUDA requires
    ctx = mp.start_processes(_worker, args=(WORLD, str(tmp / "rdzv"), str(tmp), device), nprocs=WORLD, join=False,
                             start_method="fork" if device == "cpu" else "spawn")
    deadline = time.monotonic() + 300
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("distributed-optimizer workers timed out")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, 9)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=needs_two_gpus)])
def results(request, tmp_path_factory) -> list[dict]:
    return _run(request.param, tmp_path_factory.mktemp(f"megatron_dopt_{request.param}"))


def test_distributed_optimizer_takes_the_replicated_step(results):
    for r in results:
        assert r["dopt"] == (True, True)  # false: the replicated path; true: Megatron's distributed optimizer
        for step in r["steps"]:
            (l_rep, n_rep), (l_dis, n_dis) = step[:2]
            assert l_dis == pytest.approx(l_rep, rel=1e-5, abs=1e-7)
            assert n_dis == pytest.approx(n_rep, rel=1e-5)
        assert r["steps"][0][0][1] > _cfg("false").trainer.grad_clip  # the clip was applied
        worst = max(r["weights"].items(), key=lambda kv: kv[1])
        assert worst[1] < 2e-5, f"{worst[0]} differs by {worst[1]:.2e} after two steps"
        assert r["moved"] > 1e-3


def test_each_rank_holds_half_of_the_adamw_state(results):
    total = results[0]["state"][1]  # the replicated path: both moments of every weight on every rank
    assert all(r["state"][1] == total for r in results)
    assert sum(r["state"][0] for r in results) == total  # every element's moments on exactly one rank
    for r in results:
        assert abs(r["state"][0] / total - 0.5) < 0.02, r["state"]
        assert r["saved_state"] == total  # the checkpoint gathers the whole state


def test_checkpoint_resumes_bit_for_bit(results):
    for r in results:
        _, (l_dis, n_dis), (l_res, n_res), (l_x, n_x) = r["steps"][1]
        assert (l_res, n_res) == (l_dis, n_dis)
        assert r["resumed"] == 0.0
        # the replicated path resumes from the same file (its all-reduce sums in another order: fp32 tolerance)
        assert l_x == pytest.approx(l_dis, rel=1e-5) and n_x == pytest.approx(n_dis, rel=1e-5)
        assert r["crossed"] < 2e-5
