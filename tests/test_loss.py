"""Decoupled PPO loss and token log-probs against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from areal_hpc.train.loss import decoupled_ppo_loss, token_logprobs

F64 = torch.float64
EPS = 0.2


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


# Case "clip": w = 1 (behav = prox), eps = 0.2, so clip range [0.8, 1.2].
#   t | u    A  | u*A   clip(u)*A | min    | which
#   0 | 1.5 +1  | 1.5   1.2       | 1.2    | clipped  (u > 1+eps, A > 0)
#   1 | 0.5 -1  | -0.5  -0.8      | -0.8   | clipped  (u < 1-eps, A < 0)
#   2 | 1.5 -1  | -1.5  -1.2      | -1.5   | unclipped (u > 1+eps but A < 0)
#   3 | 0.5 +1  | 0.5   0.8       | 0.5    | unclipped (u < 1-eps but A > 0)
#   J = (1.2 - 0.8 - 1.5 + 0.5) / 4 = -0.6 / 4 = -0.15  ->  loss = +0.15
CLIP_U = [1.5, 0.5, 1.5, 0.5]
CLIP_A = [1.0, -1.0, -1.0, 1.0]
CLIP_PROX = [-1.0, -2.0, -0.5, -3.0]


def clip_case() -> tuple[torch.Tensor, ...]:
    prox = t(CLIP_PROX)
    logp = (prox + torch.log(t(CLIP_U))).requires_grad_()
    return logp, prox, prox.clone(), t(CLIP_A), torch.ones(4, dtype=torch.bool)


def test_clip_and_min_cases() -> None:
    logp, prox, behav, adv, mask = clip_case()
    loss, stats = decoupled_ppo_loss(logp, prox, behav, adv, mask, EPS, 5.0)
    assert loss.item() == pytest.approx(0.15)
    assert stats["clip_frac"] == pytest.approx(2 / 4)  # tokens 0 and 1
    assert stats["cap_frac"] == 0.0
    assert stats["importance_weight"] == pytest.approx(1.0)
    assert stats["ratio"] == pytest.approx((1.5 + 0.5 + 1.5 + 0.5) / 4)
    # k3 with rho = u (w = 1): (rho - 1) - log rho
    k3 = [(u - 1) - math.log(u) for u in CLIP_U]  # 0.0945, 0.1931, 0.0945, 0.1931
    assert stats["approx_kl"] == pytest.approx(sum(k3) / 4)


def test_gradient_by_hand_and_only_through_logp() -> None:
    # d(u A)/d logp = u A (du/dlogp = u); a token whose clipped term wins has zero gradient.
    # dloss/dlogp_t = -w_t u_t A_t / 4 on unclipped tokens:
    #   t0, t1: clipped -> 0;  t2: -(1.5 * -1)/4 = +0.375;  t3: -(0.5 * +1)/4 = -0.125
    logp, prox, behav, adv, mask = clip_case()
    prox.requires_grad_()
    behav.requires_grad_()
    loss, _ = decoupled_ppo_loss(logp, prox, behav, adv, mask, EPS, 5.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, t([0.0, 0.0, 0.375, -0.125]))
    assert prox.grad is None  # prox and behav are constants of the objective
    assert behav.grad is None


# Case "cap": eps = 0.2, cap = 2, one padding token.
#   t | m | w = exp(prox-behav)     | u   | A   | w * min(uA, clip(u)A)
#   0 | 1 | 1.5                     | 1.0 | 2   | 1.5 * min(2, 2)        = 3.0
#   1 | 1 | 3.0 > cap -> 0          | 1.0 | 1   | 0 (still in the divisor)
#   2 | 1 | 0.5                     | 1.1 | -1  | 0.5 * min(-1.1, -1.1)  = -0.55
#   3 | 0 | exp(999) = inf (garbage)| huge| 100 | excluded, not in the divisor
#   J = (3.0 + 0 - 0.55) / 3 = 2.45 / 3  ->  loss = -0.81666...
def cap_case() -> tuple[torch.Tensor, ...]:
    behav = t([-2.0, -3.0, -1.0, -1000.0])
    prox = behav + torch.log(t([1.5, 3.0, 0.5, 1.0])) + t([0.0, 0.0, 0.0, 999.0])
    logp = (prox + torch.log(t([1.0, 1.0, 1.1, 1.0])) + t([0, 0, 0, 500.0])).requires_grad_()
    return logp, prox, behav, t([2.0, 1.0, -1.0, 100.0]), t([1.0, 1.0, 1.0, 0.0])


def test_cap_masking_and_loss_mask() -> None:
    logp, prox, behav, adv, mask = cap_case()
    loss, stats = decoupled_ppo_loss(logp, prox, behav, adv, mask, EPS, 2.0)
    assert loss.item() == pytest.approx(-2.45 / 3)
    assert stats["cap_frac"] == pytest.approx(1 / 3)
    assert stats["clip_frac"] == 0.0
    assert stats["importance_weight"] == pytest.approx((1.5 + 0.5) / 2)  # kept tokens only
    assert stats["ratio"] == pytest.approx((1.0 + 1.0 + 1.1) / 3)
    # gradient: -w u A / 3 -> t0: -1.5*1*2/3 = -1;  t1: capped -> 0;  t2: -0.5*1.1*-1/3;  t3: 0
    loss.backward()
    torch.testing.assert_close(logp.grad, t([-1.0, 0.0, 0.55 / 3, 0.0]))
    assert all(math.isfinite(v) for v in stats.values())


def test_cap_disabled_with_inf() -> None:
    # Same as the cap case but nothing dropped: J = (3.0 + 3.0*1*1 - 0.55) / 3
    logp, prox, behav, adv, mask = cap_case()
    loss, stats = decoupled_ppo_loss(logp, prox, behav, adv, mask, EPS, math.inf)
    assert loss.item() == pytest.approx(-(3.0 + 3.0 - 0.55) / 3)
    assert stats["cap_frac"] == 0.0


def test_sample_weight() -> None:
    # Clip case with s = [1, 0.5, 2, 0]:
    #   J = (1.2*1 + (-0.8)*0.5 + (-1.5)*2 + 0.5*0) / 4 = (1.2 - 0.4 - 3.0) / 4 = -0.55
    logp, prox, behav, adv, mask = clip_case()
    s = t([1.0, 0.5, 2.0, 0.0])
    loss, _ = decoupled_ppo_loss(logp, prox, behav, adv, mask, EPS, 5.0, sample_weight=s)
    assert loss.item() == pytest.approx(0.55)


def test_any_shape_and_dtype() -> None:
    # [2, 2] and bf16/fp32 inputs give the same loss as the flat fp64 case.
    logp, prox, behav, adv, mask = clip_case()
    ref, _ = decoupled_ppo_loss(logp, prox, behav, adv, mask, EPS, 5.0)
    args = [x.detach().reshape(2, 2) for x in (logp, prox, behav, adv, mask)]
    loss2d, _ = decoupled_ppo_loss(*args, EPS, 5.0)
    assert loss2d.item() == pytest.approx(ref.item())
    loss32, _ = decoupled_ppo_loss(*[a.float() for a in args[:4]], args[4], EPS, 5.0)
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(ref.item(), rel=1e-5)


def test_empty_mask_is_zero_not_nan() -> None:
    logp, prox, behav, adv, _ = clip_case()
    loss, stats = decoupled_ppo_loss(logp, prox, behav, adv, torch.zeros(4), EPS, 5.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logp.grad, torch.zeros(4, dtype=F64))
    assert all(v == 0.0 for v in stats.values())


def test_shape_mismatch_raises() -> None:
    logp, prox, behav, adv, mask = clip_case()
    with pytest.raises(ValueError, match="advantages"):
        decoupled_ppo_loss(logp, prox, behav, adv[:3], mask, EPS, 5.0)


def test_token_logprobs_by_hand() -> None:
    # logits [0, ln 2, ln 5] -> probs 1/8, 2/8, 5/8; at T = 2: exp(z/2) = 1, sqrt2, sqrt5.
    logits = t([[0.0, math.log(2), math.log(5)]] * 2)
    tokens = torch.tensor([2, 0])
    expected = t([math.log(5 / 8), math.log(1 / 8)])
    torch.testing.assert_close(token_logprobs(logits, tokens), expected)
    z = 1 + math.sqrt(2) + math.sqrt(5)
    torch.testing.assert_close(
        token_logprobs(logits, tokens, temperature=2.0),
        t([math.log(math.sqrt(5) / z), math.log(1 / z)]),
    )


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("chunk_size", [1, 5, 4096])
def test_token_logprobs_matches_log_softmax(temperature: float, chunk_size: int) -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=g, dtype=F64).requires_grad_()
    tokens = torch.randint(0, 11, (2, 7), generator=g)
    ref = torch.log_softmax(logits / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
    got = token_logprobs(logits, tokens, temperature, chunk_size=chunk_size)
    torch.testing.assert_close(got, ref)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    torch.testing.assert_close(g_got, g_ref)


def test_token_logprobs_bf16_upcasts() -> None:
    logits = torch.randn(3, 5, 16).bfloat16()
    tokens = torch.randint(0, 16, (3, 5))
    got = token_logprobs(logits, tokens)
    assert got.dtype == torch.float32
    ref = torch.log_softmax(logits.float(), -1).gather(-1, tokens[..., None]).squeeze(-1)
    torch.testing.assert_close(got, ref)
