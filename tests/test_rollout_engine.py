"""TorchEngine and sample_tokens: token bookkeeping, exact behaviour logprobs (left padding, cache row
selection, re-prefill on admission), interruption by new weights in both modes, continuous admission."""

from __future__ import annotations

import math

import pytest
import torch

from areal_hpc.api import GenRequest
from areal_hpc.model.build import build_tiny_model
from areal_hpc.model.tokenizer import CharTokenizer
from areal_hpc.rollout.engine import TorchEngine, sample_tokens

TOK = CharTokenizer("0123456789+-*= ")
ATOL = 1e-4
# Prompts of different lengths, so every batch is left-padded.
PROMPTS = ["12+34=", "5*6=", "987-1=", "3=", "44+4=", "1-2=", "7", "123*456="]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int) -> torch.nn.Module:
    """The tiny Qwen2 model, with its matrices redrawn at a larger scale.

    At the default init (std 0.02) every next-token distribution is nearly uniform, so logprobs under
    two different models, or under wrong positions/padding, agree to ~1e-3 and a mistake could hide
    inside the tolerance. With std 0.3 the distributions depend strongly on context and weights; the
    doubled eos embedding makes eos common enough that rows finish at different steps.
    """
    model = build_tiny_model(hidden_size=32, n_layers=1, n_heads=2, intermediate_size=64, max_seq_len=32,
                             vocab_size=TOK.vocab_size, seed=seed)
    g = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.get_input_embeddings().weight[TOK.eos_id] *= 2.0  # (tied) eos logit: lengths vary
    return model.eval()


def reference_logprobs(model: torch.nn.Module, prompt: list[int], tokens: list[int], temperature: float,
                       top_p: float = 1.0) -> list[float]:
    """log p(token_j | prompt + tokens[:j]) from one plain, unpadded, cache-free forward pass."""
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    logp = torch.log_softmax(logits / temperature, -1)
    out = []
    for j, t in enumerate(tokens):
        row = logp[len(prompt) - 1 + j]
        if top_p < 1.0:  # independent nucleus: smallest prefix of the sorted distribution with mass >= top_p
            probs, order = row.exp().sort(descending=True)
            n_keep = int((probs.cumsum(0) < top_p).sum()) + 1
            kept = order[:n_keep].tolist()
            assert t in kept, "engine sampled a token outside the nucleus"
            out.append(float(row[t] - torch.logsumexp(row[kept], 0)))
        else:
            out.append(float(row[t]))
    return out


def reference_greedy(model: torch.nn.Module, prompt: list[int], tokens: list[int]) -> list[int]:
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    return [int(logits[len(prompt) - 1 + j].argmax()) for j in range(len(tokens))]


def make_requests(prompts: list[str], first_id: int = 100) -> list[GenRequest]:
    return [GenRequest(sample_id=first_id + i, prompt_id=i, group_id=i // 2, prompt_tokens=TOK.encode(p))
            for i, p in enumerate(prompts)]


def make_engine(model: torch.nn.Module, **kw) -> TorchEngine:
    args = {"max_batch": 8, "max_new_tokens": 10, "temperature": 1.0, "top_p": 1.0, "interrupt": "recompute",
            "seed": 3}
    args.update(kw)
    return TorchEngine(model, TOK, **args)


def assert_close_list(got: list[float], want: list[float], what: str) -> None:
    assert len(got) == len(want)
    for j, (a, b) in enumerate(zip(got, want)):
        assert abs(a - b) <= ATOL, f"{what}: token {j}: engine logprob {a:.6f} != reference {b:.6f}"


# -- sample_tokens ----------------------------------------------------------------------------------
def test_sample_tokens_top_p_renormalises_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]], dtype=torch.float64)
    logits = probs.log().repeat(1000, 1)  # rows alternate between the two distributions
    g = torch.Generator().manual_seed(0)
    tok, logp = sample_tokens(logits, temperature=1.0, top_p=0.7, generator=g)
    assert tok.shape == (2000,) and logp.shape == (2000,)
    even, odd = tok[0::2], tok[1::2]
    assert set(even.tolist()) == {0, 1}  # nucleus of [.5 .3 .15 .05] at p=0.7 is the first two
    assert set(odd.tolist()) == {3, 2}
    expected = {0: math.log(0.5 / 0.8), 1: math.log(0.3 / 0.8)}
    for t, lp in zip(even.tolist(), logp[0::2].tolist()):
        assert lp == pytest.approx(expected[t], abs=1e-5)
    expected = {3: math.log(0.5 / 0.8), 2: math.log(0.3 / 0.8)}
    for t, lp in zip(odd.tolist(), logp[1::2].tolist()):
        assert lp == pytest.approx(expected[t], abs=1e-5)
    # Sampling follows the renormalised distribution: P(top) = 0.625 (1000 draws, sd ~0.015).
    assert (even == 0).float().mean().item() == pytest.approx(0.625, abs=0.06)


def test_sample_tokens_top_p_single_dominant_token() -> None:
    logits = torch.tensor([[0.9, 0.05, 0.05]]).log().repeat(50, 1)
    tok, logp = sample_tokens(logits, temperature=1.0, top_p=0.5, generator=torch.Generator().manual_seed(1))
    assert tok.tolist() == [0] * 50
    assert torch.allclose(logp, torch.zeros(50), atol=1e-6)


def test_sample_tokens_temperature_without_top_p() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).repeat(400, 1)
    tok, logp = sample_tokens(logits, temperature=0.5, top_p=1.0, generator=torch.Generator().manual_seed(2))
    ref = torch.log_softmax(logits[0] / 0.5, -1)
    torch.testing.assert_close(logp, ref[tok], atol=1e-6, rtol=0)
    assert len(set(tok.tolist())) >= 3  # full support: not truncated


def test_sample_tokens_greedy_is_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, -2.0, 2.9], [5.0, 1.0, 1.0, 1.0], [-1.0, -2.0, -3.0, -0.5]])
    tok, logp = sample_tokens(logits, temperature=0.0, top_p=0.5, generator=None)
    assert tok.tolist() == [1, 0, 3]
    assert torch.isfinite(logp).all() and (logp <= 0).all()


# -- bookkeeping --------------------------------------------------------------------------------------
def test_generations_carry_versions_logprobs_and_stop_on_eos_or_length() -> None:
    eng = make_engine(make_model(0), max_new_tokens=6, version=5, seed=11)
    reqs = make_requests(PROMPTS * 2)
    out = eng.generate(reqs)
    assert [g.request.sample_id for g in out] == [r.sample_id for r in reqs]
    by_eos = by_length = 0
    for g in out:
        n = len(g.tokens)
        assert 1 <= n <= 6
        assert len(g.logprobs) == n and len(g.versions) == n
        assert g.versions == [5] * n
        assert all(math.isfinite(lp) and lp <= 0 for lp in g.logprobs)
        assert g.finished and g.t_end >= g.t_start and g.interruptions == 0
        if TOK.eos_id in g.tokens:
            assert g.tokens.index(TOK.eos_id) == n - 1, "generation continued past eos"
            by_eos += 1
        else:
            assert n == 6, "generation stopped before max_new_tokens without eos"
            by_length += 1
    assert by_eos > 0 and by_length > 0  # both stopping rules were exercised
    assert eng.tokens_generated == sum(len(g.tokens) for g in out)
    assert eng.num_active() == 0 and eng.free_slots() == eng.max_batch


def test_greedy_generate_is_argmax_and_restores_temperature() -> None:
    model = make_model(0)
    eng = make_engine(model, temperature=0.7)
    out = eng.generate(make_requests(PROMPTS), greedy=True)
    assert eng.temperature == 0.7
    for g in out:
        assert g.tokens == reference_greedy(model, g.request.prompt_tokens, g.tokens)
    again = make_engine(model, temperature=0.7, seed=99).generate(make_requests(PROMPTS), greedy=True)
    assert [g.tokens for g in again] == [g.tokens for g in out]  # greedy ignores the sampling seed


# -- logprob exactness --------------------------------------------------------------------------------
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_behaviour_logprobs_match_full_forward_left_padded(top_p: float) -> None:
    model = make_model(0)
    eng = make_engine(model, temperature=0.7, top_p=top_p, max_new_tokens=12, seed=5)
    reqs = make_requests(PROMPTS)
    assert len({len(r.prompt_tokens) for r in reqs}) >= 5  # genuinely ragged, left-padded batch
    out = eng.generate(reqs)
    assert len(out) == len(reqs)
    assert len({len(g.tokens) for g in out}) > 1  # rows left the batch at different steps
    for g in out:
        ref = reference_logprobs(model, g.request.prompt_tokens, g.tokens, 0.7, top_p)
        assert_close_list(g.logprobs, ref, f"sample {g.request.sample_id}")
    if top_p < 1.0:  # truncation really happened somewhere (renormalised logprob > full logprob)
        full = [lp for g in out for lp in reference_logprobs(model, g.request.prompt_tokens, g.tokens, 0.7)]
        got = [lp for g in out for lp in g.logprobs]
        assert any(a > b + 1e-3 for a, b in zip(got, full))


# -- interruption -------------------------------------------------------------------------------------
def _run_interrupted(mode: str, steps_before: int = 3):
    old, new = make_model(0), make_model(1)
    engine_model = make_model(0)
    eng = make_engine(engine_model, interrupt=mode, max_new_tokens=12, temperature=1.0)
    reqs = make_requests(PROMPTS)
    eng.submit(reqs)
    before: list = []
    for _ in range(steps_before):
        before.extend(eng.step())
    prefill_at_update = eng.prefill_tokens
    eng.update_weights(list(new.named_parameters()), 1)
    assert eng.version == 1
    after_first_step = eng.step()
    prefill_after_first = eng.prefill_tokens
    after = after_first_step
    while eng.num_active():
        after.extend(eng.step())
    for n, p in new.named_parameters():  # the engine really holds the new weights
        assert torch.equal(dict(engine_model.named_parameters())[n], p)
    return old, new, eng, reqs, before, after, prefill_at_update, prefill_after_first


def test_interrupt_recompute_switches_version_and_recomputes_under_new_weights() -> None:
    old, new, eng, reqs, before, after, p0, p1 = _run_interrupted("recompute")
    assert sorted(g.request.sample_id for g in before + after) == [r.sample_id for r in reqs]
    for g in before:  # finished before the update: untouched
        assert set(g.versions) == {0} and g.interruptions == 0
    spanning = [g for g in after if 0 in g.versions]
    assert len(spanning) >= 3
    expected_prefill = 0
    for g in spanning:
        n0 = g.versions.count(0)
        assert g.versions == [0] * n0 + [1] * (len(g.versions) - n0)  # monotone, spans both
        assert 0 < n0 < len(g.versions)
        assert g.interruptions == 1
        prompt = g.request.prompt_tokens
        ref_old = reference_logprobs(old, prompt, g.tokens, 1.0)
        ref_new = reference_logprobs(new, prompt, g.tokens, 1.0)
        assert_close_list(g.logprobs[:n0], ref_old[:n0], f"sample {g.request.sample_id} before update")
        assert_close_list(g.logprobs[n0:], ref_new[n0:], f"sample {g.request.sample_id} after update")
        # the two models disagree, so matching the new one is informative
        assert max(abs(a - b) for a, b in zip(g.logprobs[n0:], ref_old[n0:])) > 1e-2
        expected_prefill += len(prompt) + n0
    # exactly one re-prefill of prompt + tokens so far for every in-flight row, then none
    assert p1 - p0 == expected_prefill
    assert eng.prefill_tokens == p1


def test_interrupt_keep_switches_version_without_reprefill() -> None:
    old, new, eng, reqs, before, after, p0, p1 = _run_interrupted("keep")
    assert sorted(g.request.sample_id for g in before + after) == [r.sample_id for r in reqs]
    assert p1 == p0 and eng.prefill_tokens == p0  # no re-prefill at any point after the update
    spanning = [g for g in after if 0 in g.versions]
    assert len(spanning) >= 3
    stale_seen = False
    for g in spanning:
        n0 = g.versions.count(0)
        assert g.versions == [0] * n0 + [1] * (len(g.versions) - n0)
        assert 0 < n0 < len(g.versions)
        assert g.interruptions == 1
        prompt = g.request.prompt_tokens
        assert_close_list(g.logprobs[:n0], reference_logprobs(old, prompt, g.tokens, 1.0)[:n0], "before update")
        ref_new = reference_logprobs(new, prompt, g.tokens, 1.0)
        # tokens decoded on top of the old KV cache differ from a fresh forward under the new weights
        stale_seen |= any(abs(a - b) > 1e-3 for a, b in zip(g.logprobs[n0 + 1:], ref_new[n0 + 1:]))
    assert stale_seen


def test_interrupt_keep_first_token_after_update_is_tagged_with_the_version_that_sampled_it() -> None:
    """In 'keep' mode the token sampled right after an update comes from logits the OLD weights
    computed; it must carry the old version and the old model's logprob."""
    old, new, _, _, _, after, _, _ = _run_interrupted("keep", steps_before=3)
    spanning = [g for g in after if 0 in g.versions and 1 in g.versions]
    assert spanning
    for g in spanning:
        assert g.versions[:4] == [0, 0, 0, 0]  # 3 tokens before the update + the one from old logits
        ref_old = reference_logprobs(old, g.request.prompt_tokens, g.tokens[:4], 1.0)
        assert abs(g.logprobs[3] - ref_old[3]) <= ATOL


def test_update_weights_while_idle_counts_no_interruption() -> None:
    model, new = make_model(0), make_model(1)
    eng = make_engine(model, max_new_tokens=4)
    eng.update_weights(list(new.named_parameters()), 3)
    out = eng.generate(make_requests(PROMPTS[:3]))
    for g in out:
        assert g.interruptions == 0 and set(g.versions) == {3}
        assert_close_list(g.logprobs, reference_logprobs(new, g.request.prompt_tokens, g.tokens, 1.0), "idle")


# -- continuous admission -----------------------------------------------------------------------------
def test_continuous_admission_finishes_every_request_once() -> None:
    model = make_model(0)
    eng = make_engine(model, max_batch=4, max_new_tokens=8, temperature=1.0, seed=7)
    ids = [17, 3, 42, 8, 99, 0, 5, 23]
    reqs = [GenRequest(sample_id=s, prompt_id=1000 + i, group_id=i // 2, prompt_tokens=TOK.encode(PROMPTS[i]))
            for i, s in enumerate(ids)]
    eng.submit(reqs)
    assert eng.num_active() == 8
    done, per_step, remaining = [], [], []
    while eng.num_active():
        t = eng.tokens_generated
        finished = eng.step()
        done.extend(finished)
        per_step.append(eng.tokens_generated - t)  # one token per live row
        remaining.append(per_step[-1] - len(finished))
        assert len(per_step) < 200
    assert max(per_step) == 4 and all(0 < k <= 4 for k in per_step)
    # newcomers joined rows that were still decoding (not two separate batches of 4)
    assert any(remaining[k - 1] > 0 and per_step[k] > remaining[k - 1] for k in range(1, len(per_step)))
    assert sorted(g.request.sample_id for g in done) == sorted(ids)
    by_id = {r.sample_id: r for r in reqs}
    for g in done:
        r = by_id[g.request.sample_id]
        assert (g.request.prompt_id, g.request.group_id, g.request.prompt_tokens) == \
            (r.prompt_id, r.group_id, r.prompt_tokens)
        assert g.finished
        # rows joined by re-prefill and left by cache row selection: logprobs still exact
        assert_close_list(g.logprobs, reference_logprobs(model, r.prompt_tokens, g.tokens, 1.0), f"id {r.sample_id}")
    assert eng.num_active() == 0 and eng.free_slots() == 4
