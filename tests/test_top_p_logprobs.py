"""The trainer's log-probs under the top-p distribution the rollout samples from: the nucleus mass against a
brute-force reference, pi_prox / pi_behav = 1 on fresh samples (padded and packed), the gradient unchanged
by the constant log m, and nothing extra computed at top_p = 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from areal_hpc.api import GenRequest, TrainBatch
from areal_hpc.config import Config
from areal_hpc.config.schema import TrainerConfig
from areal_hpc.model.build import build_tiny_model
from areal_hpc.model.tokenizer import CharTokenizer
from areal_hpc.rollout.engine import TorchEngine
from areal_hpc.rollout.sampling import nucleus
from areal_hpc.train import loss as loss_mod
from areal_hpc.train import nucleus as nucleus_mod
from areal_hpc.train import packed as packed_mod
from areal_hpc.train.engine import TorchTrainEngine, from_config
from areal_hpc.train.loss import ppo_loss, token_logprobs
from areal_hpc.train.nucleus import log_nucleus_mass
from areal_hpc.train.packed import response_logprobs
from areal_hpc.trajectory import Trajectory

TOK = CharTokenizer("0123456789+-*= abcdefghijklmnopqrstuvwxyz")
# fp32 forwards of the same weights, the rollout's with a KV cache and the trainer's without: their log-probs
# agree to a few 1e-6 (measured: at most 4e-6); a nucleus mass of 0.9 would be off by 0.1.
ATOL = 2e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def brute_log_mass(z: torch.Tensor, top_p: float) -> torch.Tensor:
    """log of the nucleus mass, one row at a time in float64: tokens in descending probability, each kept
    while the mass before it is < top_p."""
    out = []
    for row in torch.softmax(z.double(), -1):
        before, mass = 0.0, 0.0
        for p in sorted(row.tolist(), reverse=True):
            if before >= top_p:
                break
            mass += p
            before += p
        out.append(np.log(mass))
    return torch.tensor(out)


def logits_rows(vocab: int = 301) -> torch.Tensor:
    """Ties-free rows from peaked to nearly flat, and one exactly flat row (its nucleus is 271 of 301 tokens at
    top_p 0.9, far beyond any modest top-k)."""
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.1, 0.02])
    z = torch.randn(len(scales), vocab, generator=g, dtype=torch.float64) * scales[:, None]
    return torch.cat([z, torch.zeros(1, vocab, dtype=torch.float64)]).float()


# -- the nucleus mass -------------------------------------------------------------------------------
@pytest.mark.parametrize("top_k", [1024, 4])
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.999])
def test_log_nucleus_mass_matches_brute_force(monkeypatch: pytest.MonkeyPatch, top_p: float, top_k: int) -> None:
    monkeypatch.setattr(nucleus_mod, "TOP_K", top_k)  # 4: most rows need the full sort
    z = logits_rows()
    want = brute_log_mass(z, top_p)
    # Chunks of 3 rows, then of 1 row (the full sort's chunk), exercise the chunk boundaries.
    for chunk_bytes in (nucleus_mod.SORT_CHUNK_BYTES, 24 * 301 * 3, 1):
        got = log_nucleus_mass(z, top_p, chunk_bytes=chunk_bytes)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    if top_p == 0.9:
        assert want[-1] == pytest.approx(np.log(271 / 301), abs=1e-9)  # the flat row


def test_log_nucleus_mass_is_the_rollout_rule() -> None:
    """The same nucleus as the rollout's sampler: its renormalised log-prob of the top token (always kept) is
    log_softmax - log m."""
    z = logits_rows()[:-1]  # no ties: the top token is unique
    for top_p in (0.3, 0.9):
        logp = torch.log_softmax(z, -1)
        top = z.argmax(-1, keepdim=True)
        rollout_log_m = (logp - nucleus(logp, top_p)).gather(-1, top).squeeze(-1)
        torch.testing.assert_close(log_nucleus_mass(z, top_p), rollout_log_m, atol=1e-6, rtol=0)


def test_log_nucleus_mass_is_zero_at_top_p_one() -> None:
    z = logits_rows()
    assert torch.equal(log_nucleus_mass(z, 1.0), torch.zeros(len(z)))
    assert log_nucleus_mass(z[:0], 0.9).shape == (0,)


# -- the log-prob functions: values less log m, gradient unchanged ------------------------------------
@pytest.mark.parametrize("top_k", [1024, 2])
def test_token_logprobs_top_p(monkeypatch: pytest.MonkeyPatch, top_k: int) -> None:
    monkeypatch.setattr(nucleus_mod, "TOP_K", top_k)
    temp, top_p = 0.7, 0.9
    z = (logits_rows(40)[:6] * 3).requires_grad_()
    tokens = torch.tensor([0, 5, 9, 3, 39, 17])
    base = token_logprobs(z, tokens, temp, chunk_size=4)
    got = token_logprobs(z, tokens, temp, chunk_size=4, top_p=top_p)
    torch.testing.assert_close(got, base - brute_log_mass(z.detach() / temp, top_p).float(), atol=1e-6, rtol=0)
    (g_base,) = torch.autograd.grad(base.sum(), z)
    (g_top,) = torch.autograd.grad(got.sum(), z)
    assert torch.equal(g_top, g_base)  # log m is a constant of the gradient
    with pytest.raises(ValueError, match="top_p"):
        token_logprobs(z, tokens, temp, top_p=0.0)


@pytest.mark.parametrize("keep_bytes", [1 << 30, 0])  # logits kept for backward, or recomputed chunk by chunk
@pytest.mark.parametrize("top_k", [1024, 2])
def test_response_logprobs_top_p(monkeypatch: pytest.MonkeyPatch, keep_bytes: int, top_k: int) -> None:
    monkeypatch.setattr(nucleus_mod, "TOP_K", top_k)
    temp, top_p, vocab = 0.7, 0.9, 40
    g = torch.Generator().manual_seed(1)
    h = torch.randn(13, 8, generator=g).requires_grad_()
    w = (torch.randn(vocab, 8, generator=g) * 0.8).requires_grad_()
    tgt = torch.randint(0, vocab, (13,), generator=g)
    kw = {"chunk_bytes": 4 * vocab * 5, "keep_bytes": keep_bytes}  # 5 rows a chunk
    base = response_logprobs(h, w, tgt, temp, **kw)
    got = response_logprobs(h, w, tgt, temp, **kw, top_p=top_p)
    want = base - brute_log_mass((h @ w.T / temp).detach(), top_p).float()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    weights = torch.linspace(-1, 1, 13)
    g_base = torch.autograd.grad((base * weights).sum(), (h, w))
    g_top = torch.autograd.grad((got * weights).sum(), (h, w))
    for a, b in zip(g_top, g_base, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# -- pi_prox / pi_behav on fresh samples ----------------------------------------------------------------
def peaked_model() -> torch.nn.Module:
    """The tiny Qwen2 with its matrices redrawn at std 0.3: next-token distributions that depend on context,
    from peaked to broad, so the nucleus at 0.9 ranges from one token to many."""
    model = build_tiny_model(hidden_size=32, n_layers=1, n_heads=2, intermediate_size=64, max_seq_len=48,
                             vocab_size=TOK.vocab_size, seed=0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def fresh_samples(model: torch.nn.Module, temperature: float, top_p: float) -> list[Trajectory]:
    rollout = TorchEngine(model, TOK, max_batch=8, max_new_tokens=12, temperature=temperature, top_p=top_p, seed=5)
    prompts = ["1+2=", "33*4=", "abc", "7=", "hello world", "z", "12-3-4=", "xy zw"]
    gens = rollout.generate([GenRequest(sample_id=i, prompt_id=i, group_id=i // 2,
                                        prompt_tokens=[TOK.bos_id, *TOK.encode(p)]) for i, p in enumerate(prompts)])
    return [Trajectory(sample_id=g.request.sample_id, group_id=g.request.group_id,
                       prompt_tokens=np.asarray(g.request.prompt_tokens, np.int32),
                       response_tokens=np.asarray(g.tokens, np.int32),
                       behav_logprobs=np.asarray(g.logprobs, np.float32),
                       versions=np.asarray(g.versions, np.int32), reward=0.0) for g in gens]


def trainer(model: torch.nn.Module, packing: str, temperature: float, top_p: float) -> TorchTrainEngine:
    return TorchTrainEngine(model, TrainerConfig(token_budget=40, packing=packing), pad_id=TOK.pad_id,
                            temperature=temperature, top_p=top_p)


def log_weights(eng: TorchTrainEngine, samples: list[Trajectory]) -> np.ndarray:
    """log pi_prox / pi_behav of every response token."""
    prox = eng.compute_logp(samples)
    return np.concatenate([p - s.behav_logprobs for p, s in zip(prox, samples, strict=True)])


@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_importance_weight_is_one_on_fresh_samples(temperature: float, top_p: float) -> None:
    model = peaked_model()
    samples = fresh_samples(model, temperature, top_p)
    n_tok = sum(s.n_response for s in samples)
    assert n_tok >= 40 and len({s.n_response for s in samples}) > 1
    for packing in ("padded", "packed"):
        eng = trainer(model, packing, temperature, top_p)
        assert eng.packing == packing
        lw = log_weights(eng, samples)
        assert np.abs(lw).max() <= ATOL, f"{packing}: max |log w| {np.abs(lw).max():.2e}"
    # The log-probs without the truncation (what the trainer computed before): w = m < 1 wherever the nucleus
    # dropped a token, so this test fails without the correction.
    old = log_weights(trainer(model, "padded", temperature, 1.0), samples)
    if top_p < 1.0:
        assert (old < -ATOL).mean() > 0.25 and old.min() < -0.05, np.sort(old)[:5]
    else:
        assert np.abs(old).max() <= ATOL


def test_top_k_fallback_and_train_step_keep_the_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a top-k too small for most rows (the full-sort path) both paths still give w = 1, and a training
    step on fresh on-policy samples sees importance weight 1 and ratio 1."""
    monkeypatch.setattr(nucleus_mod, "TOP_K", 2)
    model = peaked_model()
    samples = fresh_samples(model, 0.7, 0.9)
    for packing in ("padded", "packed"):
        eng = trainer(model, packing, 0.7, 0.9)
        assert np.abs(log_weights(eng, samples)).max() <= ATOL, packing
    eng = trainer(peaked_model(), "packed", 0.7, 0.9)
    adv = np.linspace(-1, 1, len(samples)).astype(np.float32)
    stats = eng.train_batch(TrainBatch(samples, adv, np.ones(len(samples), np.float32), None), ppo_loss(eng.cfg))
    assert stats.loss_stats["importance_weight"] == pytest.approx(1.0, abs=ATOL)
    assert stats.loss_stats["ratio"] == pytest.approx(1.0, abs=1e-6)


def test_top_p_one_computes_nothing_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """At top_p = 1 the nucleus code is never reached (no top-k, no sort, no sync), forward or step."""
    def boom(*_a: object, **_k: object) -> None:
        raise AssertionError("nucleus mass computed at top_p = 1")

    for mod in (loss_mod, packed_mod):
        monkeypatch.setattr(mod, "top_k_mass", boom)
        monkeypatch.setattr(mod, "log_mass", boom)
    samples = fresh_samples(peaked_model(), 0.7, 1.0)
    for packing in ("padded", "packed"):
        eng = trainer(peaked_model(), packing, 0.7, 1.0)  # its own copy: the step moves the weights
        assert np.abs(log_weights(eng, samples)).max() <= ATOL
        eng.train_batch(TrainBatch(samples, np.ones(len(samples), np.float32), np.ones(len(samples), np.float32),
                                   None), ppo_loss(eng.cfg))


def test_engine_takes_the_rollouts_top_p() -> None:
    cfg = Config()
    cfg.rollout.temperature, cfg.rollout.top_p = 0.7, 0.9
    eng = from_config(cfg, peaked_model(), TOK, None)
    assert (eng.temperature, eng.top_p) == (0.7, 0.9)
    with pytest.raises(ValueError, match="rollout.top_p"):
        trainer(peaked_model(), "padded", 1.0, 1.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("flat", [False, True])  # True: every row's nucleus is past the top-k (the full sort)
def test_cuda_response_logprobs_top_p_bf16(flat: bool) -> None:
    """The bf16 head on CUDA (Triton logsumexp): minus log m of its own bf16 logits, against a float64 sort of
    them; kept and recomputed logits agree; the gradient is that of top_p = 1."""
    torch.manual_seed(0)
    n, hid, vocab, temp, top_p = 700, 64, 3000, 0.7, 0.9
    h = torch.randn(n, hid, device="cuda").bfloat16().requires_grad_()
    w = (torch.randn(vocab, hid, device="cuda") * (0.005 if flat else 0.3)).requires_grad_()
    tgt = torch.randint(0, vocab, (n,), device="cuda")
    kw = {"chunk_bytes": 4 * vocab * 128}  # 128 rows a chunk
    base = response_logprobs(h, w, tgt, temp, **kw)
    got = response_logprobs(h, w, tgt, temp, **kw, top_p=top_p)
    got2 = response_logprobs(h, w, tgt, temp, **kw, keep_bytes=0, top_p=top_p)
    torch.testing.assert_close(got, got2, atol=1e-6, rtol=0)
    z = (h @ (w / temp).bfloat16().T).double()
    p = torch.softmax(z, -1).sort(-1, descending=True).values
    cum = p.cumsum(-1)
    want = torch.where(cum - p < top_p, p, 0.0).sum(-1).log()
    if flat:
        assert (cum[:, nucleus_mod.TOP_K - 1] < top_p).all()
    # On the flat rows (p ~ 1/3000 each) the nucleus boundary can fall within fp32 rounding of a token's prefix
    # sum, as it can for the rollout's own fp32 sort: including that token or not moves log m by its p / m ~ 4e-4.
    torch.testing.assert_close((base - got).double(), want, atol=1e-3 if flat else 1e-4, rtol=0)
    g = torch.randn(n, device="cuda")
    for a, b in zip(torch.autograd.grad((got * g).sum(), (h, w)), torch.autograd.grad((base * g).sum(), (h, w)),
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
