"""TorchTrainEngine: log-prob alignment with the rollout engine, update direction, and invariance
of the optimizer step to micro-batching and to data-parallel sharding."""

from __future__ import annotations

import io
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from areal_hpc.api import GenRequest, TrainBatch
from areal_hpc.config.schema import TrainerConfig
from areal_hpc.model.build import build_tiny_model
from areal_hpc.model.tokenizer import CharTokenizer
from areal_hpc.rollout.engine import TorchEngine
from areal_hpc.train.engine import TorchTrainEngine
from areal_hpc.train.loss import ppo_loss
from areal_hpc.trajectory import Trajectory

VOCAB = 20
PAD = 0
TEMP = 0.7
ALPHABET = "0123456789+-*= ?!"  # 3 specials + 17 characters = VOCAB


def tiny_model() -> torch.nn.Module:
    return build_tiny_model(
        hidden_size=32,
        n_layers=1,
        n_heads=2,
        intermediate_size=64,
        max_seq_len=32,
        vocab_size=VOCAB,
        seed=0,
    )


def make_engine(
    token_budget: int = 2048,
    lr: float = 1e-3,
    dp_group: dist.ProcessGroup | None = None,
    **kw: float,
) -> TorchTrainEngine:
    cfg = TrainerConfig(lr=lr, token_budget=token_budget, **kw)
    return TorchTrainEngine(
        tiny_model(), cfg, pad_id=PAD, temperature=TEMP, dp_group=dp_group
    )


def make_samples(n: int = 8, seed: int = 0) -> list[Trajectory]:
    """Ragged samples; behav logprobs are noise around a typical value (off-policy)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        p, r = int(rng.integers(1, 9)), int(rng.integers(1, 10))
        out.append(
            Trajectory(
                sample_id=i,
                group_id=i // 4,
                prompt_tokens=rng.integers(3, VOCAB, p).astype(np.int32),
                response_tokens=rng.integers(1, VOCAB, r).astype(np.int32),
                behav_logprobs=(-3.0 + 0.3 * rng.standard_normal(r)).astype(np.float32),
                versions=np.zeros(r, dtype=np.int32),
                reward=float(rng.integers(0, 2)),
            )
        )
    return out


def reference_logp(
    model: torch.nn.Module, s: Trajectory, temperature: float
) -> np.ndarray:
    """Full single-sequence forward, log_softmax at the temperature, read at positions P-1+j."""
    seq = torch.from_numpy(
        np.concatenate([s.prompt_tokens, s.response_tokens]).astype(np.int64)
    )
    with torch.no_grad():
        logits = model.eval()(input_ids=seq[None]).logits[0].double()
    logp = torch.log_softmax(logits / temperature, -1)
    pos = torch.arange(s.n_prompt - 1, s.n_prompt - 1 + s.n_response)
    return logp[pos, seq[pos + 1]].numpy()


def params(engine: TorchTrainEngine) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in engine.parameters_for_sync()}


def assert_params_close(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float
) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        torch.testing.assert_close(
            v, b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}"
        )


def test_compute_logp_matches_full_forward_across_microbatches() -> None:
    samples = make_samples(9) + [
        replace(
            make_samples(1, seed=5)[0],
            sample_id=99,
            response_tokens=np.zeros(0, np.int32),
            behav_logprobs=np.zeros(0, np.float32),
            versions=np.zeros(0, np.int32),
        )
    ]
    engine = make_engine(token_budget=20)
    got = engine.compute_logp(samples)
    assert len(got) == len(samples)
    for s, g in zip(samples, got, strict=True):
        assert g.dtype == np.float32 and g.shape == (s.n_response,)
        np.testing.assert_allclose(
            g, reference_logp(engine.model, s, TEMP), atol=2e-5, rtol=0
        )
    # One micro-batch gives the same values as many.
    single = make_engine(token_budget=4096).compute_logp(samples)
    for a, b in zip(got, single, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


def test_compute_logp_matches_rollout_engine_sampling_logprobs() -> None:
    """The trainer's log-probs of freshly sampled tokens equal those the rollout engine logged."""
    tok = CharTokenizer(ALPHABET)
    assert tok.vocab_size == VOCAB
    model = tiny_model()
    rollout = TorchEngine(
        model, tok, max_batch=8, max_new_tokens=7, temperature=TEMP, top_p=1.0, seed=3
    )
    prompts = ["1+2=", "33*4=", "7=", "12-3-4=", "9?", "0"]
    reqs = [
        GenRequest(
            sample_id=i,
            prompt_id=i,
            group_id=i,
            prompt_tokens=[tok.bos_id, *tok.encode(p)],
        )
        for i, p in enumerate(prompts)
    ]
    gens = rollout.generate(reqs)
    samples = [
        Trajectory(
            sample_id=g.request.sample_id,
            group_id=g.request.group_id,
            prompt_tokens=np.asarray(g.request.prompt_tokens, np.int32),
            response_tokens=np.asarray(g.tokens, np.int32),
            behav_logprobs=np.asarray(g.logprobs, np.float32),
            versions=np.asarray(g.versions, np.int32),
            reward=0.0,
        )
        for g in gens
    ]
    engine = TorchTrainEngine(
        model, TrainerConfig(token_budget=16), pad_id=tok.pad_id, temperature=TEMP
    )
    for s, got in zip(samples, engine.compute_logp(samples), strict=True):
        np.testing.assert_allclose(got, s.behav_logprobs, atol=2e-5, rtol=0)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_train_batch_moves_logprob_in_advantage_direction(sign: float) -> None:
    engine = make_engine(token_budget=24, lr=1e-3)
    samples = make_samples(6)
    target = 2
    before = engine.compute_logp(samples)
    samples = [
        replace(s, behav_logprobs=lp) for s, lp in zip(samples, before, strict=True)
    ]
    adv = np.zeros(len(samples), np.float32)
    adv[target] = sign
    batch = TrainBatch(samples, adv, np.ones(len(samples), np.float32), before)
    stats = engine.train_batch(batch, ppo_loss(engine.cfg)).as_dict()
    after = engine.compute_logp(samples)
    delta = float(after[target].sum() - before[target].sum())
    assert sign * delta > 0, delta
    # On-policy first step: u = w = 1, nothing clipped or capped, loss = -mean(A) over tokens.
    n_tok = sum(s.n_response for s in samples)
    assert stats["loss"] == pytest.approx(
        -sign * samples[target].n_response / n_tok, abs=1e-6
    )
    assert stats["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert stats["importance_weight"] == pytest.approx(1.0, abs=1e-6)
    assert stats["clip_frac"] == 0.0 and stats["cap_frac"] == 0.0
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert stats["n_tokens"] == n_tok and stats["n_microbatches"] > 1
    assert stats["grad_norm"] > 0


def _step(engine: TorchTrainEngine, samples: list[Trajectory]) -> dict[str, float]:
    """One off-policy step: prox = current weights, behav = the samples' noisy logprobs."""
    ids = np.array([s.sample_id for s in samples])
    # Per-sample functions of the id, not of the position: sharding must not change them.
    adv = np.sin(1.7 * ids + 0.3).astype(np.float32)
    weight = np.where(ids % 3 == 0, 0.5, 1.0).astype(np.float32)
    batch = TrainBatch(samples, adv, weight, engine.compute_logp(samples))
    return engine.train_batch(batch, ppo_loss(engine.cfg)).as_dict()


def test_microbatching_does_not_change_the_update() -> None:
    samples = make_samples(10)
    small, large = make_engine(token_budget=18), make_engine(token_budget=4096)
    s_small, s_large = _step(small, samples), _step(large, samples)
    assert s_small["n_microbatches"] > 3 and s_large["n_microbatches"] == 1
    assert_params_close(params(small), params(large), atol=1e-6)
    for k in (
        "loss",
        "grad_norm",
        "ratio",
        "importance_weight",
        "approx_kl",
        "cap_frac",
    ):
        assert s_small[k] == pytest.approx(s_large[k], rel=1e-5, abs=1e-7), k
    assert params(small).keys() == dict(tiny_model().named_parameters()).keys()


@pytest.mark.parametrize("packing", ["padded", "packed"])
def test_proximal_from_the_step_forward_equals_a_recompute(packing: str) -> None:
    """prox_logp=None (the step's own forward, detached) gives the update and the stats of a separate
    no-grad recompute: one optimizer step per batch, so both see the same weights. Off-policy behaviour
    log-probs, a token budget that splits the batch, and the cap in play, so every term is exercised."""
    samples = make_samples(10)
    samples[4] = replace(samples[4], behav_logprobs=samples[4].behav_logprobs - 3.0)  # w > cap: dropped
    ids = np.array([s.sample_id for s in samples])
    adv = np.sin(1.7 * ids + 0.3).astype(np.float32)
    weight = np.where(ids % 3 == 0, 0.5, 1.0).astype(np.float32)
    for moved in (False, True):  # also from weights an earlier step has moved
        rec, fwd = make_engine(token_budget=18, packing=packing), make_engine(token_budget=18, packing=packing)
        if moved:
            for e in (rec, fwd):
                e.train_batch(TrainBatch(samples, -adv, weight), ppo_loss(e.cfg)).as_dict()
        batch = TrainBatch(samples, adv, weight, rec.compute_logp(samples))
        s_rec = rec.train_batch(batch, ppo_loss(rec.cfg)).as_dict()
        s_fwd = fwd.train_batch(TrainBatch(samples, adv, weight), ppo_loss(fwd.cfg)).as_dict()
        assert s_fwd["n_microbatches"] > 3 and s_fwd["cap_frac"] > 0
        assert s_fwd["ratio"] == 1.0 and s_fwd["clip_frac"] == 0.0  # exactly the proximal weights
        for k in ("loss", "grad_norm", "ratio", "importance_weight", "approx_kl", "cap_frac", "clip_frac"):
            assert s_fwd[k] == pytest.approx(s_rec[k], rel=1e-5, abs=1e-6), k
        assert_params_close(params(fwd), params(rec), atol=1e-6)


def test_state_dict_round_trip_reproduces_the_next_step() -> None:
    samples = make_samples(6)
    a = make_engine()
    _step(a, samples)
    b = make_engine()
    # Through serialisation, as a checkpoint would: no tensors shared between a and b.
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    _step(a, samples)
    _step(b, samples)
    assert_params_close(params(a), params(b), atol=0)


# -- data parallel -------------------------------------------------------------------------------


def _dp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Step 1: interleaved shards. Step 2: rank 0 holds everything, the others nothing."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        engine = make_engine(token_budget=24, dp_group=dist.group.WORLD)
        samples = make_samples(10)
        out = {"stats1": _step(engine, samples[rank::world]), "params1": params(engine)}
        out["stats2"] = _step(engine, samples if rank == 0 else [])
        out["params2"] = params(engine)
        torch.save(out, Path(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank tears gloo down while its peer still talks to it (a rare SIGABRT in CI)
    finally:
        dist.destroy_process_group()


def test_data_parallel_two_ranks_match_one_rank(tmp_path: Path) -> None:
    world = 2
    ctx = mp.spawn(
        _dp_worker,
        args=(world, str(tmp_path / "rdzv"), str(tmp_path)),
        nprocs=world,
        join=False,
    )
    deadline = time.monotonic() + 90
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("data-parallel workers timed out")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                os.kill(p.pid, 9)

    single = make_engine(token_budget=24)
    ref = {"stats1": _step(single, make_samples(10)), "params1": params(single)}
    ref["stats2"] = _step(single, make_samples(10))
    ref["params2"] = params(single)

    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(world))
    for step in ("1", "2"):
        # Ranks are bit-identical, and equal to one rank holding the whole batch.
        assert_params_close(r0["params" + step], r1["params" + step], atol=0)
        assert_params_close(r0["params" + step], ref["params" + step], atol=1e-6)
        for k in ("loss", "grad_norm", "ratio", "approx_kl", "n_tokens_global"):
            got, want = r0["stats" + step][k], ref["stats" + step][k]
            assert got == pytest.approx(want, rel=1e-5, abs=1e-7), (step, k)
            assert got == r1["stats" + step][k]
    assert (
        r0["stats1"]["n_tokens"] + r1["stats1"]["n_tokens"] == ref["stats1"]["n_tokens"]
    )
    assert r1["stats2"]["n_tokens"] == 0 and r1["stats2"]["n_microbatches"] == 0
