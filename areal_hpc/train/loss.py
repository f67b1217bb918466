"""Decoupled PPO objective (AReaL, arXiv 2505.24298, eq. 5) and token log-probabilities.

Three policies appear in asynchronous RL:

* ``pi_theta`` (``logp``): the policy being optimised, with gradient.
* ``pi_prox`` (``prox_logp``): the proximal policy, i.e. the trainer's weights before this
  step (recomputed by the trainer, or, with one optimizer step per batch, the step's own forward
  detached). PPO's trust region is centred here.
* ``pi_behav`` (``behav_logp``): the (possibly several versions stale) policy that the rollout
  engine sampled with; its log-probabilities are recorded at generation time.

Decoupling the two roles lets stale samples be used off-policy (corrected by ``w``) while the
clip keeps each update close to the latest weights (``u``), which is what keeps learning stable
for large staleness eta.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from areal_hpc.api import LossStats, TokenInputs
from areal_hpc.config.schema import TrainerConfig
from areal_hpc.train.nucleus import log_mass, top_k_mass

__all__ = ["STAT_NAMES", "DecoupledPPOLoss", "decoupled_ppo_loss", "ppo_loss", "token_logprobs"]

STAT_NAMES = ("clip_frac", "cap_frac", "importance_weight", "ratio", "approx_kl")


def decoupled_ppo_loss(
    logp: Tensor,
    prox_logp: Tensor,
    behav_logp: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    eps_clip: float,
    behav_imp_weight_cap: float,
    sample_weight: Tensor | None = None,
    *,
    sync_stats: bool = True,
) -> tuple[Tensor, dict[str, float] | Tensor]:
    r"""Decoupled PPO loss, token-mean over the loss mask.

    With per-token

        u_t = exp(logp_t - prox_logp_t)           (pi_theta / pi_prox, carries the gradient)
        w_t = exp(prox_logp_t - behav_logp_t)     (pi_prox / pi_behav, detached)
        w_t = 0 where w_t > behav_imp_weight_cap  (too off-policy: drop the token)

    the objective is

        J = sum_t m_t s_t w_t min(u_t A_t, clip(u_t, 1 - eps, 1 + eps) A_t) / sum_t m_t,
        loss = -J,

    with m the loss mask and s the optional ``sample_weight`` (1 if None). The divisor is the
    original mask count, so capped tokens still count: dropping a token must not up-weight the
    others. ``prox_logp`` and ``behav_logp`` are treated as constants (detached); the gradient
    flows only through ``logp``. Set ``behav_imp_weight_cap=math.inf`` to disable the cap.

    All token tensors share one shape (``[B, T]``, packed ``[N]``, ...). Positions outside the mask
    may hold any finite or infinite garbage: log-ratios are zeroed there before ``exp`` so neither
    the loss nor its gradient becomes NaN.

    Returns ``(loss, stats)``; stats are Python floats over the loss-mask tokens:
    ``clip_frac`` (the clipped term was strictly smaller, so the token has no gradient),
    ``cap_frac`` (dropped by the cap), ``importance_weight`` (mean w over tokens kept by the cap),
    ``ratio`` (mean u), ``approx_kl`` (k3 estimate of KL(pi_behav || pi_theta):
    E_behav[(rho - 1) - log rho], rho = pi_theta / pi_behav; unbiased and >= 0).
    ``sync_stats=False`` returns them instead as one device tensor in ``STAT_NAMES`` order, without the
    device sync that reading them costs (the trainer sums them over a step and reads them once).
    """
    shape = logp.shape
    for name, t in (
        ("prox_logp", prox_logp),
        ("behav_logp", behav_logp),
        ("advantages", advantages),
        ("loss_mask", loss_mask),
        ("sample_weight", sample_weight),
    ):
        if t is not None and t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if eps_clip < 0:
        raise ValueError(f"eps_clip must be >= 0, got {eps_clip}")

    # Compute in at least fp32: ratios of bf16 log-probs are far too coarse.
    dtype = torch.promote_types(logp.dtype, torch.float32)
    mask = loss_mask.bool()
    logp = logp.to(dtype)
    prox_logp = prox_logp.detach().to(dtype)
    behav_logp = behav_logp.detach().to(dtype)
    A = advantages.detach().to(dtype)
    zero = torch.zeros((), dtype=dtype, device=logp.device)

    # Mask the log-ratios before exp: exp(garbage) on padding would give inf * 0 = NaN.
    u = torch.exp(torch.where(mask, logp - prox_logp, zero))
    w = torch.exp(torch.where(mask, prox_logp - behav_logp, zero))
    capped = mask & (w > behav_imp_weight_cap)
    w = torch.where(capped, zero, w)

    unclipped = u * A
    clipped = torch.clamp(u, 1.0 - eps_clip, 1.0 + eps_clip) * A
    surrogate = w * torch.minimum(unclipped, clipped)
    if sample_weight is not None:
        surrogate = surrogate * sample_weight.detach().to(dtype)
    surrogate = torch.where(mask, surrogate, zero)

    n_tokens = mask.sum()
    J = surrogate.sum() / n_tokens.clamp(min=1)
    loss = -J

    with torch.no_grad():
        kept = mask & ~capped
        log_rho = torch.where(mask, logp - behav_logp, zero)  # log pi_theta / pi_behav
        k3 = torch.expm1(log_rho) - log_rho
        n = n_tokens.clamp(min=1)
        values = torch.stack(
            [
                (kept & (clipped < unclipped)).sum() / n,
                capped.sum() / n,
                torch.where(kept, w, zero).sum() / kept.sum().clamp(min=1),
                torch.where(mask, u, zero).sum() / n,
                torch.where(mask, k3, zero).sum() / n,
            ]
        )
    if not sync_stats:
        return loss, values
    return loss, dict(zip(STAT_NAMES, values.tolist(), strict=True))  # one device sync for all stats


@dataclass(frozen=True)
class DecoupledPPOLoss:
    """``decoupled_ppo_loss`` as the ``LossFn`` a train engine is given (``api.py``).

    Each stat is reported as (sum, count) so the engine's global mean is exact: the fractions, the ratio
    and the KL are means over all tokens; the importance weight is a mean over the tokens the cap kept.
    """

    eps_clip: float
    behav_imp_weight_cap: float

    def __call__(self, t: TokenInputs) -> tuple[Tensor, LossStats]:
        loss, v = decoupled_ppo_loss(
            t.logp, prox_logp=t.prox_logp, behav_logp=t.behav_logp, advantages=t.advantages,
            loss_mask=torch.ones(t.logp.shape, dtype=torch.bool, device=t.logp.device), eps_clip=self.eps_clip,
            behav_imp_weight_cap=self.behav_imp_weight_cap, sample_weight=t.sample_weight, sync_stats=False)
        v = v.double()
        # A fill kernel, not torch.tensor(...): copying a host scalar to the device would wait for the GPU
        # once per micro-batch.
        n = torch.full((), float(t.logp.numel()), dtype=torch.float64, device=v.device)
        kept = n * (1.0 - v[1])
        stats = {name: (v[i] * n, n) for i, name in enumerate(STAT_NAMES) if name != "importance_weight"}
        stats["importance_weight"] = (v[2] * kept, kept)
        return loss, stats


def token_logprobs(
    logits: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    chunk_size: int = 4096,
    top_p: float = 1.0,
) -> Tensor:
    """Log-probability of ``tokens`` under softmax(logits / temperature) truncated to its top-p nucleus and
    renormalised, in fp32 (at least):

        logp_t = z_t[tokens_t] - logsumexp(z_t) - log m_t,  z_t = logits_t / temperature

    with m_t the mass of the nucleus (``train/nucleus.py``; m_t = 1, and nothing extra computed, at
    top_p = 1). ``log m_t`` is a constant of the gradient, so the gradient is that of log softmax.

    ``logits`` is ``[..., V]`` and ``tokens`` is ``[...]`` (same leading shape). The temperature and top_p
    must equal those the rollout engine sampled with, otherwise u and w are biased.

    Memory: the full ``[..., V]`` log_softmax is never built. Rows are processed ``chunk_size``
    at a time, so the fp32 temporaries of a forward without grad (e.g. recomputing prox_logp)
    are bounded by ``chunk_size * V``. With grad, autograd keeps one fp32 copy of the
    (scaled) logits per chunk for backward; at temperature 1 with fp32 logits it keeps none.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} differ in leading dims"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_tokens = tokens.reshape(-1, 1).long()
    out, masses = [], []
    for start in range(0, flat_logits.shape[0], chunk_size):
        z = flat_logits[start : start + chunk_size].to(dtype)
        if temperature != 1.0:
            z = z / temperature
        picked = z.gather(-1, flat_tokens[start : start + chunk_size]).squeeze(-1)
        lse = torch.logsumexp(z, dim=-1)
        out.append(picked - lse)
        if top_p < 1.0:
            masses.append(top_k_mass(z, lse, top_p))
    if not out:  # zero tokens
        return flat_logits.new_zeros(tokens.shape, dtype=dtype)
    logp = torch.cat(out)
    if masses:
        mass, short = (torch.cat(x) for x in zip(*masses, strict=True))
        logp = logp - log_mass(mass, short, lambda idx: flat_logits[idx].to(dtype) / temperature,
                               flat_logits.shape[-1], top_p)
    return logp.reshape(tokens.shape)


def ppo_loss(cfg: TrainerConfig) -> DecoupledPPOLoss:
    """The decoupled PPO loss with the trainer config's clip range and importance-weight cap."""
    return DecoupledPPOLoss(eps_clip=cfg.eps_clip, behav_imp_weight_cap=cfg.behav_imp_weight_cap)
