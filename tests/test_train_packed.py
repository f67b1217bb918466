"""Packed trainer path: same log-probs and same update as the padded HF path, invariance to the token
budget, bf16 autocast within a stated tolerance, clear errors; on CUDA, flash varlen really used."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from areal_hpc.api import TrainBatch
from areal_hpc.config.schema import TrainerConfig
from areal_hpc.model import attention
from areal_hpc.model.qwen2 import PackedQwen2
from areal_hpc.train.engine import TorchTrainEngine
from areal_hpc.train.loss import ppo_loss
from areal_hpc.train.packed import response_logprobs, split_layer_fn
from areal_hpc.train.packing import group_units, pack_sequences, pack_shared
from areal_hpc.trajectory import Trajectory

VOCAB = 40
PAD = 0
TEMP = 0.7
CUDA = torch.cuda.is_available()


def qwen2(seed: int = 0, device: str = "cpu") -> torch.nn.Module:
    """Two layers, GQA (4 query heads on 2 KV heads), q/k/v biases: the Qwen2 features that matter."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=PAD, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(cfg).to(device)


def engine(model: torch.nn.Module | None = None, **kw) -> TorchTrainEngine:
    kw.setdefault("token_budget", 4096)
    kw.setdefault("lr", 1e-3)
    return TorchTrainEngine(model if model is not None else qwen2(), TrainerConfig(**kw), pad_id=PAD,
                            temperature=TEMP)


def samples(n: int = 10, seed: int = 0) -> list[Trajectory]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, r = int(rng.integers(1, 12)), int(rng.integers(0 if i == 3 else 1, 14))  # sample 3 may be empty
        out.append(Trajectory(
            sample_id=i, group_id=i // 2,
            prompt_tokens=rng.integers(3, VOCAB, p).astype(np.int32),
            response_tokens=rng.integers(1, VOCAB, r).astype(np.int32),
            behav_logprobs=(-3.5 + 0.3 * rng.standard_normal(r)).astype(np.float32),
            versions=np.zeros(r, dtype=np.int32), reward=float(rng.integers(0, 2))))
    return out


def sgd_step(eng: TorchTrainEngine, batch: list[Trajectory], seed: int = 1) -> dict[str, float]:
    """One train_batch with plain SGD (lr 1): parameters move by exactly the (clipped) gradient, so
    comparing them compares gradients; AdamW would turn round-off in near-zero grads into +-lr."""
    eng.optimizer = torch.optim.SGD(eng._params, lr=1.0)
    rng = np.random.default_rng(seed)
    prox = eng.compute_logp(batch)
    adv = rng.standard_normal(len(batch)).astype(np.float32)
    return eng.train_batch(TrainBatch(batch, adv, np.ones(len(batch), np.float32), prox), ppo_loss(eng.cfg)).as_dict()


def params(eng: TorchTrainEngine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in eng.model.named_parameters()}


def close_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")


def test_pack_sequences_layout() -> None:
    mb = pack_sequences([np.array([5, 6]), np.array([7])], [np.array([8, 9, 10]), np.array([11, 12])])
    assert mb.ids.tolist() == [5, 6, 8, 9, 10, 7, 11, 12]
    assert mb.pos.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert mb.cu_seqlens.tolist() == mb.cu_list == [0, 5, 8] and mb.cu_seqlens.dtype == torch.int32
    assert mb.max_len == 5
    assert mb.pred_rows.tolist() == [1, 2, 3, 5, 6]  # position c + P - 1 + j predicts response token j
    assert mb.targets.tolist() == [8, 9, 10, 11, 12]


def test_auto_rules_on_cpu() -> None:
    eng = engine()
    assert (eng.packing, eng.compute_dtype) == ("padded", torch.float32)
    eng = engine(packing="packed", compute_dtype="bfloat16")
    assert (eng.packing, eng.compute_dtype) == ("packed", torch.bfloat16)


def test_packed_logp_matches_padded_fp32() -> None:
    batch = samples()
    padded = engine(packing="padded").compute_logp(batch)
    packed = engine(packing="packed").compute_logp(batch)
    assert [len(x) for x in packed] == [s.n_response for s in batch]
    for a, b in zip(padded, packed, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


def test_packed_step_matches_padded_fp32() -> None:
    batch = samples()
    e_pad, e_pack = engine(packing="padded"), engine(packing="packed")
    before = params(e_pack)
    st_pad, st_pack = sgd_step(e_pad, batch), sgd_step(e_pack, batch)
    assert st_pack["loss"] == pytest.approx(st_pad["loss"], rel=1e-5, abs=1e-7)
    assert st_pack["grad_norm"] == pytest.approx(st_pad["grad_norm"], rel=1e-4)
    after = params(e_pack)
    assert any(not torch.equal(before[n], after[n]) for n in before)  # the step moved something
    close_params(after, params(e_pad), rtol=1e-4, atol=1e-7)


def test_packed_invariant_to_token_budget() -> None:
    batch = samples()
    big, small = engine(packing="packed", token_budget=4096), engine(packing="packed", token_budget=25)
    for a, b in zip(big.compute_logp(batch), small.compute_logp(batch), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    st_big, st_small = sgd_step(big, batch), sgd_step(small, batch)
    assert st_small["n_microbatches"] > st_big["n_microbatches"] == 1
    close_params(params(small), params(big), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("packing", ["packed", "padded"])
def test_bf16_autocast_cpu_within_tolerance(packing: str) -> None:
    """bf16 matmuls (8-bit mantissa): on this model the log-probs stay within 5e-2 of fp32."""
    batch = samples()
    ref = engine(packing=packing).compute_logp(batch)
    eng = engine(packing=packing, compute_dtype="bfloat16")
    got = eng.compute_logp(batch)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(ref, got, strict=True) if len(a))
    assert 0 < diff < 5e-2  # > 0: bf16 really ran
    assert all(x.dtype == np.float32 for x in got)
    ones = np.ones(len(batch), np.float32)
    eng.train_batch(TrainBatch(batch, ones, ones, got), ppo_loss(eng.cfg))
    assert all(p.dtype == torch.float32 for p in eng.model.parameters())  # fp32 master weights
    state = [t for s in eng.optimizer.state.values() for t in s.values() if t.ndim > 0]
    assert state and all(t.dtype == torch.float32 for t in state)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_response_logprobs_bf16_against_fp64() -> None:
    """Chunked bf16 head (compiled logsumexp / logit-gradient passes, fp32 weight-grad accumulation in
    the matmul) against float64: log-probs within 8e-2 absolute (3e-2 seen on CPU), grads within 2e-2 relative norm."""
    torch.manual_seed(0)
    n, hid, vocab = 700, 64, 3000
    h = torch.randn(n, hid, device="cuda")
    w = torch.randn(vocab, hid, device="cuda") * 0.2
    tgt = torch.randint(0, vocab, (n,), device="cuda")
    g = torch.randn(n, device="cuda")
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    full = torch.log_softmax(h64 @ w64.T / TEMP, -1).gather(-1, tgt[:, None]).squeeze(-1)
    gh, gw = torch.autograd.grad((full * g.double()).sum(), (h64, w64))
    hb, wf = h.bfloat16().requires_grad_(), w.clone().requires_grad_()
    out = response_logprobs(hb, wf, tgt, TEMP, chunk_bytes=4 * vocab * 128)  # 128 rows a chunk: 6 chunks
    ch, cw = torch.autograd.grad((out * g).sum(), (hb, wf))
    out2 = response_logprobs(hb, wf, tgt, TEMP, chunk_bytes=4 * vocab * 128, keep_bytes=0)  # recompute path
    ch2, cw2 = torch.autograd.grad((out2 * g).sum(), (hb, wf))
    assert torch.equal(out, out2) and torch.equal(ch, ch2)
    assert (cw - cw2).norm() / cw2.norm() < 1e-3  # one matmul over all rows vs chunks accumulated in fp32
    assert out.dtype == torch.float32 and cw.dtype == torch.float32 and ch.dtype == torch.bfloat16
    assert (out.double() - full.detach()).abs().max() < 8e-2
    for a, b in ((ch, gh), (cw, gw)):
        assert torch.isfinite(a).all() and (a.double() - b).norm() / b.norm() < 2e-2


def llama(seed: int = 0, **kw) -> torch.nn.Module:
    """SmolLM2's architecture at a toy size: no q/k/v biases, GQA, tied embeddings, RoPE base 1e5."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rope_theta=1e5,
                      tie_word_embeddings=True, pad_token_id=PAD, attn_implementation="sdpa", **kw)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def test_packed_llama_matches_padded_fp32() -> None:
    """Llama-family checkpoints (SmolLM2) take the packed path: same log-probs and step as HF's forward."""
    batch = samples()
    padded = engine(llama(), packing="padded").compute_logp(batch)
    packed = engine(llama(), packing="packed").compute_logp(batch)
    for a, b in zip(padded, packed, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    st_pad = sgd_step(engine(llama(), packing="padded"), batch)
    st_pack = sgd_step(engine(llama(), packing="packed"), batch)
    assert st_pack["loss"] == pytest.approx(st_pad["loss"], rel=1e-5, abs=1e-7)


def test_packed_names_what_it_does_not_implement() -> None:
    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="trainer.packing=padded"):
        engine(mistral, packing="packed")
    eng = engine(mistral, packing="auto")  # CPU: padded, any architecture
    assert eng.packing == "padded" and len(eng.compute_logp(samples(3))) == 3
    with pytest.raises(ValueError, match="does not implement this llama checkpoint's attention biases"):
        engine(llama(attention_bias=True), packing="packed")
    scaled = llama(rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="RoPE scaling 'linear'"):
        engine(scaled, packing="packed")


def test_split_layer_and_checkpointing_match() -> None:
    """The layer the compiled path uses (run here uncompiled) and activation checkpointing change nothing."""
    batch = samples()
    ref = engine(packing="packed")
    ckpt = engine(packing="packed", activation_checkpointing=True)
    split = engine(packing="packed")
    split._packed._ensure(64)
    split._packed._layer_fn = split_layer_fn(split._packed._net, compile=False)
    for e in (ckpt, split):
        for a, b in zip(ref.compute_logp(batch), e.compute_logp(batch), strict=True):
            np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
    for e in (ref, ckpt, split):
        sgd_step(e, batch)
    close_params(params(ckpt), params(ref), rtol=1e-5, atol=1e-7)
    close_params(params(split), params(ref), rtol=1e-5, atol=1e-7)


def test_token_bucket_without_compile_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        engine(packing="packed", token_budget=256, token_bucket=64)
    assert "trainer.token_bucket=64" in caplog.text and "trainer.token_bucket=0" in caplog.text


def test_compile_ignored_on_cpu_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        eng = engine(packing="packed", compile=True)
    assert "compile" in caplog.text and eng._packed.compile is False


@pytest.mark.parametrize("keep_bytes", [0, 1 << 30], ids=["recompute", "keep"])
def test_response_logprobs_chunks_and_grads(keep_bytes: int) -> None:
    """Chunked lm_head + log-softmax (logits recomputed in backward, or kept from the forward) equals
    the one-shot computation."""
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(VOCAB, 16, requires_grad=True)
    tgt = torch.randint(0, VOCAB, (37,))
    full = torch.log_softmax(h @ w.T / TEMP, -1).gather(-1, tgt[:, None]).squeeze(-1)
    gh, gw = torch.autograd.grad(full.sum() * 3, (h, w))
    chunked = response_logprobs(h, w, tgt, TEMP, chunk_bytes=4 * VOCAB * 5, keep_bytes=keep_bytes)  # 5 rows a chunk
    ch, cw = torch.autograd.grad(chunked.sum() * 3, (h, w))
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(ch, gh)
    torch.testing.assert_close(cw, gw)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_packed_bf16_varlen_close_to_padded_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flash varlen in bf16 vs the HF forward in fp32: max |dlogp| < 5e-2, mean < 1e-2 on this model."""
    op = attention._varlen_op()
    assert op is not None and attention.varlen_available(torch.device("cuda"), torch.bfloat16)
    calls = []

    def spy(*a, **k):
        calls.append(a[0].shape)
        return op[0](*a, **k)

    monkeypatch.setattr(attention, "_varlen_op", lambda: (spy, *op[1:]))
    batch = samples(16)
    ref = engine(qwen2(device="cuda"), packing="padded", compute_dtype="float32").compute_logp(batch)
    eng = engine(qwen2(device="cuda"), packing="packed", compute_dtype="bfloat16")
    got = eng.compute_logp(batch)
    assert calls, "the packed path did not reach flash varlen"
    d = np.concatenate([np.abs(a - b) for a, b in zip(ref, got, strict=True)])
    assert d.max() < 5e-2 and d.mean() < 1e-2, (d.max(), d.mean())
    n = len(calls)
    ones = np.ones(len(batch), np.float32)
    st = eng.train_batch(TrainBatch(batch, ones, ones, got), ppo_loss(eng.cfg)).as_dict()
    assert len(calls) > n and np.isfinite(st["grad_norm"]) and st["grad_norm"] > 0  # varlen backward ran


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_compile_and_checkpointing_match_eager() -> None:
    """Compiled layers and activation checkpointing on CUDA bf16: same log-probs and grads up to bf16 noise."""
    batch = samples(16)
    eager = engine(qwen2(device="cuda"), packing="packed")
    fast = engine(qwen2(device="cuda"), packing="packed", compile=True, activation_checkpointing=True)
    for a, b in zip(eager.compute_logp(batch), fast.compute_logp(batch), strict=True):
        np.testing.assert_allclose(b, a, atol=2e-2, rtol=0)
    st_e, st_f = sgd_step(eager, batch), sgd_step(fast, batch)
    assert st_f["grad_norm"] == pytest.approx(st_e["grad_norm"], rel=5e-2)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_token_bucket_static_compile_matches_eager() -> None:
    """The loop's bucketed path on CUDA (streams padded to 64, inductor graphs per bucket compiled in
    prepare()): log-probs within 2e-2 of eager bf16 and the grad norm within 5%."""
    batch = samples(24)
    eager = engine(qwen2(device="cuda"), packing="packed", token_budget=256)
    fast = engine(qwen2(device="cuda"), packing="packed", token_budget=256, compile=True, token_bucket=64)
    fast.prepare()
    assert fast._packed.compile and fast._packed.compile_dynamic is False
    for a, b in zip(eager.compute_logp(batch), fast.compute_logp(batch), strict=True):
        np.testing.assert_allclose(b, a, atol=2e-2, rtol=0)
    st_e, st_f = sgd_step(eager, batch), sgd_step(fast, batch)
    assert st_f["n_microbatches"] > 1 and st_f["grad_norm"] == pytest.approx(st_e["grad_norm"], rel=5e-2)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_train_step_syncs_do_not_grow_with_microbatches() -> None:
    """Nothing inside the micro-batch loop waits for the GPU (torch's sync debug mode counts every
    synchronizing call): a step over many micro-batches syncs as often as a step over one, so the
    host launches micro-batch k+1 while the GPU runs micro-batch k."""
    import warnings

    batch = samples(24)
    adv, w = np.linspace(-1, 1, len(batch)).astype(np.float32), np.ones(len(batch), np.float32)
    counts, n_mb = {}, {}
    for budget in (4096, 40):
        eng = engine(qwen2(device="cuda"), packing="packed", token_budget=budget)
        eng.train_batch(TrainBatch(batch, adv, w), ppo_loss(eng.cfg))  # first-call work out of the count
        eng.compute_logp(batch)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                n_mb[budget] = eng.train_batch(TrainBatch(batch, adv, w), ppo_loss(eng.cfg)).as_dict()["n_microbatches"]
                eng.compute_logp(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[budget] = sum("synchroniz" in str(r.message) for r in rec)
    assert n_mb[40] > 4 * n_mb[4096]
    assert counts[40] <= counts[4096], counts


def test_packed_qwen2_rope_widens_for_long_sequences() -> None:
    """Sequences longer than max_position_embeddings still work: the RoPE tables grow."""
    eng = engine(packing="packed")
    rng = np.random.default_rng(0)
    s = Trajectory(0, 0, rng.integers(3, VOCAB, 50).astype(np.int32), rng.integers(1, VOCAB, 30).astype(np.int32),
                    np.full(30, -3.0, np.float32), np.zeros(30, np.int32), 1.0)
    ref = engine(packing="padded").compute_logp([s])[0]
    np.testing.assert_allclose(eng.compute_logp([s])[0], ref, atol=1e-5, rtol=0)
    assert isinstance(eng._packed._net, PackedQwen2) and eng._packed._net.max_positions >= 80


def test_pack_sequences_pads_to_bucket() -> None:
    """Padding sequences bring the stream to the bucket; they predict nothing, and none is longer than the
    longest real sequence, so max_len and the highest position stay those of the real ones."""
    mb = pack_sequences([np.array([5, 6]), np.array([7])], [np.array([8, 9, 10]), np.array([11, 12])],
                        pad_to_multiple=16, pad_id=0)
    assert mb.ids.tolist() == [5, 6, 8, 9, 10, 7, 11, 12] + [0] * 8
    assert mb.pos.tolist() == [0, 1, 2, 3, 4, 0, 1, 2] + [0, 1, 2, 3, 4, 0, 1, 2]
    assert mb.cu_seqlens.tolist() == mb.cu_list == [0, 5, 8, 13, 16] and mb.max_len == 5
    assert mb.pred_rows.tolist() == [1, 2, 3, 5, 6] and mb.targets.tolist() == [8, 9, 10, 11, 12]
    exact = pack_sequences([np.array([5, 6, 7, 8])], [np.array([9, 10, 11, 12])], pad_to_multiple=8)
    assert exact.cu_list == [0, 8] and len(exact.ids) == 8  # already a multiple: no padding sequence


def attended_rows(eng: TorchTrainEngine, batch: list[Trajectory]) -> tuple[list[int], list[np.ndarray]]:
    """The rows of every ``causal_varlen`` call (a stream's self-attending part) of ``eng.compute_logp(batch)``,
    and its log-probs."""
    seen: list[int] = []
    real = attention.causal_varlen

    def spy(q, k, v, cu, max_len, cu_list=None):
        seen.append(q.shape[0])
        return real(q, k, v, cu, max_len, cu_list)

    mp = pytest.MonkeyPatch()
    mp.setattr("areal_hpc.train.packed.causal_varlen", spy)
    try:
        out = eng.compute_logp(batch)
    finally:
        mp.undo()
    return seen, out


def test_token_bucket_padding_changes_nothing() -> None:
    """Streams padded to a multiple of 128: same log-probs and the same update as unpadded (fp32). The
    bucket is wider than the model's 64 positions: the padding must not widen the RoPE tables (that would
    rebuild, and so recompile, the trainer's layers)."""
    batch = samples(12)
    plain = engine(packing="packed", token_budget=60, share_prompts=False)
    bucketed = engine(packing="packed", token_budget=60, token_bucket=128, share_prompts=False)
    seen, got = attended_rows(bucketed, batch)
    assert seen and all(t % 128 == 0 for t in seen)  # every stream really was padded
    net = bucketed._packed._net
    assert net.max_positions == 64
    for a, b in zip(plain.compute_logp(batch), got, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=0)
    sgd_step(plain, batch), sgd_step(bucketed, batch)
    close_params(params(bucketed), params(plain), rtol=1e-5, atol=1e-7)
    assert bucketed._packed._net is net  # never rebuilt


def test_token_bucket_compiles_each_bucket_once_before_training() -> None:
    """Static-shape compile per bucket (Dynamo's eager backend here, inductor on CUDA): prepare() compiles
    every bucket with and without grad, past Dynamo's default limit of 8 graphs, and training steps on
    batches of any length then compile nothing more. Without buckets the graph is dynamic in length."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eng = engine(packing="packed", token_budget=640, token_bucket=64)  # 10 buckets: 20 graphs a function
    assert eng._packed.buckets == list(range(64, 641, 64)) and eng._packed.compile_dynamic is False
    eng._packed.compile, eng._packed.compile_backend = True, "eager"  # compile is CUDA-only otherwise
    eng.cfg.proximal_logp = "recompute"  # the no-grad graphs too: sgd_step runs compute_logp
    eng.prepare()
    assert all(p.grad is None for p in eng._params)  # the dummy passes leave no gradient behind
    compiled = counters["stats"]["unique_graphs"]
    assert compiled >= 2 * 2 * 10  # pre and post, each bucket, with and without grad
    for seed in range(3):
        sgd_step(eng, samples(40, seed=seed))
    assert counters["stats"]["unique_graphs"] == compiled
    torch._dynamo.reset()


def test_token_bucket_precompiles_only_grad_graphs_with_forward_proximal() -> None:
    """trainer.proximal_logp=forward (the default) never runs a no-grad pass: prepare() compiles half."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eng = engine(packing="packed", token_budget=256, token_bucket=64)
    eng._packed.compile, eng._packed.compile_backend = True, "eager"
    eng.prepare()
    compiled = counters["stats"]["unique_graphs"]
    assert 2 * 4 <= compiled < 2 * 2 * 4
    batch = samples(20)
    ones = np.ones(len(batch), np.float32)
    eng.train_batch(TrainBatch(batch, ones, ones), ppo_loss(eng.cfg))
    assert counters["stats"]["unique_graphs"] == compiled
    torch._dynamo.reset()


def grouped_samples(groups: int = 4, n: int = 3, seed: int = 0) -> list[Trajectory]:
    """``groups`` prompts with ``n`` responses each, as the rollout delivers them (members share the prompt)."""
    rng = np.random.default_rng(seed)
    out = []
    for g in range(groups):
        prompt = rng.integers(3, VOCAB, int(rng.integers(1, 12))).astype(np.int32)
        for j in range(n):
            r = int(rng.integers(1, 14))
            out.append(Trajectory(
                sample_id=g * n + j, group_id=g, prompt_tokens=prompt.copy(),
                response_tokens=rng.integers(1, VOCAB, r).astype(np.int32),
                behav_logprobs=(-3.5 + 0.3 * rng.standard_normal(r)).astype(np.float32),
                versions=np.zeros(r, dtype=np.int32), reward=float(rng.integers(0, 2))))
    return out


def test_pack_shared_layout() -> None:
    """Each distinct prompt once, then padding, then the responses; a response's keys are its prompt's rows and
    its own; its first token is predicted by the prompt's last row."""
    p, q = np.array([5, 6]), np.array([7])
    mb = pack_shared([p, p, q], [np.array([8, 9, 10]), np.array([11]), np.array([12, 13])], pad_to_multiple=12)
    assert mb.ids.tolist() == [5, 6, 7, 0, 0, 0, 8, 9, 10, 11, 12, 13]
    assert mb.pos.tolist() == [0, 1, 0, 0, 1, 2, 2, 3, 4, 2, 1, 2]
    assert mb.cu_list == [0, 2, 3, 6] and mb.max_len == 5  # padding: one sequence, no longer than the longest
    L = mb.prefix
    assert (L.n_self, L.max_self, L.max_q, L.max_k) == (6, 3, 3, 5)
    assert L.kv_index.tolist() == [0, 1, 6, 7, 8, 0, 1, 9, 2, 10, 11]
    assert L.cu_q_list == [0, 3, 4, 6] and L.cu_k_list == [0, 5, 8, 11]
    assert mb.pred_rows.tolist() == [1, 6, 7, 1, 2, 10] and mb.targets.tolist() == [8, 9, 10, 11, 12, 13]
    with pytest.raises(ValueError, match="at least one token"):
        pack_shared([np.array([], dtype=np.int64)], [np.array([1])])


def test_group_units_split_a_group_at_the_budget() -> None:
    units, cost = group_units([4, 4, 4, 2], [3, 5, 6, 1], ["a", "a", "a", "b"], token_budget=12)
    assert units == [[0, 1], [2], [3]] and cost == [12, 10, 3]  # 4 + 3 + 5; then 4 + 6 (the prompt again)


@pytest.mark.parametrize("budget", [4096, 30], ids=["one-microbatch", "split-groups"])
def test_shared_prompts_give_the_same_logp_and_step_fp32(budget: int) -> None:
    """Sharing a group's prompt changes the stream (fewer tokens), not the function: the same log-probs and
    the same update as every sample carrying its prompt, also when a group is split across micro-batches
    and streams are padded."""
    batch = grouped_samples()
    own = engine(packing="packed", token_budget=budget, share_prompts=False)
    shared = engine(packing="packed", token_budget=budget, share_prompts=True, token_bucket=16)
    assert shared._shares_prompts() and not own._shares_prompts()
    bins = shared._bins(batch)
    assert sorted(i for b in bins for i in b) == list(range(len(batch)))
    if budget > 100:
        assert len(bins) == 1
    else:
        assert any(len({batch[i].group_id for i in b}) < len(b) for b in bins)  # some bin shares a prompt
        assert len({batch[i].group_id for b in bins for i in b}) == 4
    tokens = [sum(batch[i].n_response for i in b) + sum({batch[i].group_id: batch[i].n_prompt for i in b}.values())
              for b in bins]
    assert max(tokens) <= max(budget, max(s.n_prompt + s.n_response for s in batch))
    for a, b in zip(own.compute_logp(batch), shared.compute_logp(batch), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)
    st_own, st_shared = sgd_step(own, batch), sgd_step(shared, batch)
    assert st_shared["loss"] == pytest.approx(st_own["loss"], rel=1e-5, abs=1e-7)
    close_params(params(shared), params(own), rtol=1e-4, atol=1e-7)
    real = sum(s.n_prompt + s.n_response for s in batch)
    assert st_own["stream_tokens"] == real  # no bucket: every sample with its prompt
    assert st_shared["stream_tokens"] % 16 == 0
    if len(bins) == 1:  # one stream: padded to 16, and still shorter than every prompt copied
        assert st_shared["stream_tokens"] < real


def test_shared_prompts_turn_off_where_flash_cannot_attend_them(monkeypatch, caplog) -> None:
    """A CUDA build whose flash varlen misaligns (or lacks) more keys than queries: the trainer keeps one prompt
    copy per sample (full speed) instead of attending through the per-segment SDPA fallback."""
    monkeypatch.setattr("areal_hpc.train.packed.varlen_available", lambda device, dtype: True)
    monkeypatch.setattr("areal_hpc.train.packed.bottom_right_varlen", lambda *a: False)
    eng = engine(packing="packed", compute_dtype="bfloat16")
    with caplog.at_level(logging.WARNING):
        assert not eng._shares_prompts()
    assert "share_prompts: off here" in caplog.text
    batch = grouped_samples()
    assert eng._bins(batch) == engine(packing="packed", share_prompts=False)._bins(batch)


def test_shared_prompt_stream_is_shorter() -> None:
    batch = grouped_samples(groups=2, n=8)
    seen, _ = attended_rows(engine(packing="packed"), batch)
    prompts = sum(len(batch[i].prompt_tokens) for i in (0, 8))
    assert set(seen) == {prompts}  # the prompts' own attention: each prompt once, not once per sample


def test_prefix_attention_equals_causal_attention_over_prompt_plus_response() -> None:
    """The bottom-right causal form (fallback path) against plain causal attention over the whole sequence."""
    g = torch.Generator().manual_seed(0)
    P, R, H, Hk, D = 5, 4, 4, 2, 8
    q = torch.randn(P + R, H, D, generator=g)
    k, v = torch.randn(P + R, Hk, D, generator=g), torch.randn(P + R, Hk, D, generator=g)
    full = attention.causal_varlen(q, k, v, torch.tensor([0, P + R]), P + R, [0, P + R])
    got = attention.prefix_causal_varlen(q[P:], k, v, torch.tensor([0, R]), torch.tensor([0, P + R]), R, P + R,
                                         [0, R], [0, P + R])
    torch.testing.assert_close(got, full[P:], atol=1e-6, rtol=0)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_shared_prompts_use_flash_and_match_separate_prompts_bf16() -> None:
    """On CUDA the flash varlen op must align causality at the bottom right (or the shared-prompt path would
    fall back to SDPA); bf16 log-probs and gradients of shared and separate prompts agree."""
    assert attention.bottom_right_varlen(torch.device("cuda", torch.cuda.current_device()), torch.bfloat16, 14, 2,
                                          64)
    batch = grouped_samples(groups=6, n=8)
    own = engine(qwen2(device="cuda"), packing="packed", compute_dtype="bfloat16", share_prompts=False)
    shared = engine(qwen2(device="cuda"), packing="packed", compute_dtype="bfloat16")
    for a, b in zip(own.compute_logp(batch), shared.compute_logp(batch), strict=True):
        np.testing.assert_allclose(b, a, atol=3e-2, rtol=0)
    st_own, st_shared = sgd_step(own, batch), sgd_step(shared, batch)
    assert st_shared["loss"] == pytest.approx(st_own["loss"], rel=2e-2, abs=1e-3)
    assert st_shared["grad_norm"] == pytest.approx(st_own["grad_norm"], rel=2e-2)
