"""Flat weight buckets: plan_buckets packing rules and the _Buckets fill/view round trip (no process group)."""

from __future__ import annotations

import itertools

import pytest
import torch

from areal_hpc.model.build import build_tiny_model
from areal_hpc.model.tokenizer import CharTokenizer
from areal_hpc.weights.broadcast import _Buckets, plan_buckets

TOK = CharTokenizer("0123456789+-*= ")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def mixed_params(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    specs = [((4, 5), torch.float32), ((7,), torch.float32), ((3, 3), torch.bfloat16), ((2,), torch.bfloat16),
             ((100,), torch.float32), ((1,), torch.float32), ((6, 2), torch.float16), ((5,), torch.float32),
             ((2, 2, 2), torch.float32), ((30,), torch.bfloat16), ((3,), torch.float32)]
    return [(f"p{i}", torch.randn(shape, generator=g).to(dt)) for i, (shape, dt) in enumerate(specs)]


def tiny_model(seed: int) -> torch.nn.Module:
    return build_tiny_model(hidden_size=32, n_layers=1, n_heads=2, intermediate_size=64, max_seq_len=32,
                            vocab_size=TOK.vocab_size, seed=seed)


def check_plan(params: list[tuple[str, torch.Tensor]], plan: list[list[int]], bucket_bytes: int) -> None:
    # every parameter exactly once, in order
    assert [i for b in plan for i in b] == list(range(len(params)))
    assert all(b for b in plan)
    for b in plan:
        assert len({params[i][1].dtype for i in b}) == 1, f"bucket {b} mixes dtypes"
        size = sum(nbytes(params[i][1]) for i in b)
        assert size <= bucket_bytes or len(b) == 1, f"bucket {b} has {size} > {bucket_bytes} bytes"
    # greedy: a bucket is closed only by a dtype change or because the next parameter would overflow it
    for b, nxt in itertools.pairwise(plan):
        first = params[nxt[0]][1]
        size = sum(nbytes(params[i][1]) for i in b)
        assert first.dtype != params[b[-1]][1].dtype or size + nbytes(first) > bucket_bytes


@pytest.mark.parametrize("bucket_bytes", [1, 16, 64, 100, 200, 401, 10**6])
def test_plan_buckets_rules(bucket_bytes: int) -> None:
    params = mixed_params()
    check_plan(params, plan_buckets(params, bucket_bytes), bucket_bytes)


def test_plan_buckets_examples() -> None:
    def f32(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.float32)

    params = [("a", f32(4)), ("b", f32(4)), ("c", f32(4)), ("d", torch.zeros(8, dtype=torch.bfloat16)),
              ("e", f32(100)), ("f", f32(1))]
    # 16 B each; 32 B buckets: [a b] [c] | dtype change [d] | e alone (oversized) | [f]
    assert plan_buckets(params, 32) == [[0, 1], [2], [3], [4], [5]]
    assert plan_buckets(params, 48) == [[0, 1, 2], [3], [4], [5]]
    assert plan_buckets(params, 10**6) == [[0, 1, 2], [3], [4, 5]]
    assert plan_buckets([], 64) == []


def test_plan_buckets_real_model() -> None:
    params = list(tiny_model(0).named_parameters())
    for bucket_bytes in (1 << 10, 1 << 14, 1 << 20):
        plan = plan_buckets(params, bucket_bytes)
        check_plan(params, plan, bucket_bytes)
    assert len(plan_buckets(params, 1 << 20)) == 1  # the whole tiny model fits one MiB


@pytest.mark.parametrize("bucket_bytes", [1, 64, 401, 10**6])
def test_buckets_fill_and_views_round_trip(bucket_bytes: int) -> None:
    params = mixed_params(seed=1)
    buckets = _Buckets(params, bucket_bytes, torch.device("cpu"))
    assert buckets.plan == plan_buckets(params, bucket_bytes)
    assert len(buckets.flat) == len(buckets.plan)
    assert buckets.nbytes == sum(nbytes(p) for _, p in params)
    for b, flat in zip(buckets.plan, buckets.flat):
        assert flat.dtype == params[b[0]][1].dtype and flat.dim() == 1
    buckets.fill_from(params)
    views = list(buckets.views())
    assert [n for n, _ in views] == [n for n, _ in params]
    for (n, v), (_, p) in zip(views, params):
        assert v.shape == p.shape and v.dtype == p.dtype
        assert torch.equal(v, p), n
    # views alias the flat buffers (what the broadcast fills is what the engine reads)
    for flat in buckets.flat:
        flat.fill_(0)
    assert all(torch.count_nonzero(v) == 0 for _, v in buckets.views())
    # refilling with other values overwrites every slice; views do not alias the sources
    other = mixed_params(seed=2)
    buckets.fill_from(other)
    for (_, v), (_, p) in zip(buckets.views(), other):
        assert torch.equal(v, p)
    assert not torch.equal(next(buckets.views())[1], params[0][1])


def test_buckets_transfer_model_weights() -> None:
    """Trainer-side fill, flat buffers 'sent', receiver-side views copied into another model."""
    src, dst = tiny_model(0), tiny_model(1)
    src_params, dst_params = list(src.named_parameters()), dict(dst.named_parameters())
    assert any(not torch.equal(p, dst_params[n]) for n, p in src_params)
    send = _Buckets(src_params, 4096, torch.device("cpu"))
    recv = _Buckets(list(dst.named_parameters()), 4096, torch.device("cpu"))
    assert len(send.flat) > 1
    with torch.no_grad():
        send.fill_from(src_params)
        for s, r in zip(send.flat, recv.flat):  # stands in for dist.broadcast of each bucket
            r.copy_(s)
        for n, t in recv.views():
            dst_params[n].copy_(t)
    for n, p in src_params:
        assert torch.equal(p, dst_params[n]), n
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(src(input_ids=ids).logits, dst(input_ids=ids).logits)
