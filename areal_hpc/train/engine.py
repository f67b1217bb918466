"""Training backends: one decoupled-PPO optimizer step per batch.

The proximal policy is the weights before the step. Each batch takes exactly one optimizer step, and
every micro-batch's forward runs before it, so those forwards already compute the proximal log-probs:
a ``TrainBatch`` without ``prox_logp`` uses them (detached), which is exact and saves the separate no-grad
pass that ``compute_logp`` makes (``trainer.proximal_logp: recompute``, the AReaL way, needed once a
batch takes several updates).

The trainer loop talks to an ``api.TrainEngine`` only, and hands it the loss (``api.LossFn``), so a
Megatron-core backend (tensor/pipeline parallel) is another module and a name in ``registry.py``.
``TorchTrainEngine`` (``trainer.backend: torch``) is a plain data-parallel backend: every rank holds the
full model, sees its share of the global batch, and ranks stay bit-identical because they all-reduce the
same gradients and step the same way.

Token alignment: for a sequence ``s = prompt + response`` (lengths P, R) the log-prob of response
token j comes from the logits at position ``P + j - 1``, at the rollout engine's sampling
temperature and under its top-p truncation (``train/nucleus.py``), so it equals what the rollout
engine logged when it sampled that token.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from areal_hpc.api import LossFn, TokenInputs, TrainBatch
from areal_hpc.comm.transfer import to_device
from areal_hpc.config import Config
from areal_hpc.config.schema import TrainerConfig
from areal_hpc.model.tokenizer import Tokenizer
from areal_hpc.train.loss import token_logprobs
from areal_hpc.train.packed import (
    PackedLogp,
    autocast_for,
    resolve_compute_dtype,
    resolve_packing,
    set_hf_checkpointing,
)
from areal_hpc.train.packing import ffd_pack, group_units, pack_sequences, pack_shared, pad_microbatch
from areal_hpc.trajectory import TrainStats, Trajectory

logger = logging.getLogger(__name__)

__all__ = ["TorchTrainEngine", "from_config"]


def from_config(cfg: Config, model: torch.nn.Module, tok: Tokenizer,
                dp_group: dist.ProcessGroup | None) -> TorchTrainEngine:
    """The ``torch`` entry of ``registry.TRAIN_BACKENDS``."""
    return TorchTrainEngine(model, cfg.trainer, pad_id=tok.pad_id, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, dp_group=dp_group)


class TorchTrainEngine:
    """Data-parallel torch backend with token-budget micro-batches and gradient accumulation.

    ``dp_group`` is the torch.distributed group of the data-parallel replicas (None: single
    replica). Every rank of the group must call ``train_batch`` for every step, even with an empty
    share of samples, because the step contains collectives.

    Micro-batches run packed (``cfg.packing``: one token stream, varlen attention, lm_head only at
    response-predicting rows, the stream padded to a multiple of ``cfg.token_bucket``; see
    ``train/packed.py``) or padded (HF forward on right-padded rows), both under
    ``cfg.compute_dtype`` (bf16 = autocast over fp32 master weights and AdamW state).

    ``temperature`` and ``top_p`` are the rollout's: every log-prob (proximal and current) is of the
    distribution the rollout sampled from, so a fresh sample's behaviour weight pi_prox/pi_behav is 1.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        cfg: TrainerConfig,
        *,
        pad_id: int,
        temperature: float,
        top_p: float = 1.0,
        dp_group: dist.ProcessGroup | None = None,
    ) -> None:
        if temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 (logprobs of the sampling policy), got {temperature}"
            )
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (the rollout's rollout.top_p), got {top_p}")
        self.model = model
        self.cfg = cfg
        self.pad_id = pad_id
        self.temperature = temperature
        self.top_p = top_p
        self.dp_group = dp_group
        self.device = next(model.parameters()).device
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.packing = resolve_packing(cfg.packing, model, self.device)
        self.compute_dtype = resolve_compute_dtype(cfg.compute_dtype, self.device)
        self._packed: PackedLogp | None = None
        self._share_ok: bool | None = None  # trainer.share_prompts usable here (asked once, on first use)
        self._stream_tokens = 0  # tokens the last batch's forwards ran on, padding included
        if self.packing == "packed":
            self._packed = PackedLogp(model, compute_dtype=self.compute_dtype,
                                      checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
                                      token_bucket=cfg.token_bucket, max_tokens=cfg.token_budget)
        else:
            if cfg.compile:
                logger.warning("trainer.compile=true applies to the packed path only; ignored with padding")
            if cfg.activation_checkpointing:
                set_hf_checkpointing(model, True)
        if cfg.token_bucket and not (self._packed is not None and self._packed.compile):
            logger.warning("trainer.token_bucket=%d pads micro-batches for static compiled graphs, but the layers "
                           "are not compiled here (trainer.compile on CUDA, packed): the padding only costs compute; "
                           "set trainer.token_bucket=0", cfg.token_bucket)
        logger.info("trainer: %s micro-batches, compute %s, activation checkpointing %s",
                    self.packing, str(self.compute_dtype).removeprefix("torch."), cfg.activation_checkpointing)
        self.optimizer = torch.optim.AdamW(
            self._params,
            lr=cfg.lr,
            betas=(float(cfg.adam_betas[0]), float(cfg.adam_betas[1])),
            eps=cfg.adam_eps,
            weight_decay=cfg.weight_decay,
            # CUDA: one fused kernel over params, grads and both moments (the foreach default makes a
            # dozen passes over ~0.5B fp32 values); same update, fp32 state either way.
            fused=True if self.device.type == "cuda" and all(p.dtype == torch.float32 for p in self._params)
            else None,
        )

    # -- public API -------------------------------------------------------------------------------
    def prepare(self) -> None:
        """Compile every token bucket's layer graphs before the first batch (trainer.token_bucket with
        trainer.compile on CUDA), so no training step stalls on a compile; otherwise nothing."""
        if self._packed is None:
            return
        t0 = time.perf_counter()
        n = self._packed.precompile(self.temperature, no_grad=self.cfg.proximal_logp == "recompute")
        self.optimizer.zero_grad(set_to_none=True)
        if n:
            logger.info("trainer: compiled %d token buckets of %d in %.1f s", n, self.cfg.token_bucket,
                        time.perf_counter() - t0)

    @torch.no_grad()
    def compute_logp(self, samples: list[Trajectory]) -> list[np.ndarray]:
        """Per-sample float32 response log-probs; packing-independent up to float round-off."""
        _validate(samples)
        self.model.eval()  # no dropout: this is the proximal policy, it must be deterministic
        out: list[np.ndarray] = [np.zeros(0, dtype=np.float32) for _ in samples]
        bins = self._bins(samples)
        if not bins:
            return out
        # One copy to the host for the whole batch: a copy per micro-batch would wait for its forward
        # each time, so the next one could not be launched while the GPU runs this one.
        flat = torch.cat([logp.float() for _, logp in self._microbatch_logp(samples, bins)]).cpu().numpy()
        order = [i for idx in bins for i in idx]
        for i, c in zip(order, np.split(flat, np.cumsum([samples[i].n_response for i in order])[:-1]), strict=True):
            out[i] = c.astype(np.float32, copy=True)
        return out

    def train_batch(self, batch: TrainBatch, loss_fn: LossFn) -> TrainStats:
        """Accumulate grads over micro-batches, all-reduce across ``dp_group``, clip, AdamW step.

        ``batch.prox_logp=None`` takes the proximal log-probs from each micro-batch's own forward
        (detached): the weights have not moved yet, so they are the proximal policy's (module docstring).

        The accumulated gradient equals that of ONE ``loss_fn`` token mean over all response tokens of the
        global batch: micro-batch b contributes ``loss_b * n_b / N_global``, where ``N_global`` is the
        all-reduced token count. ``loss`` and the loss stats are global (identical on every rank).
        """
        samples, prox_logp = batch.samples, batch.prox_logp
        _validate(samples)
        n_local = sum(s.n_response for s in samples)
        if self.dp_group is None:
            n_global = n_local
        else:
            n_global = int(self._all_reduce(torch.tensor([n_local], dtype=torch.float64, device=self.device))[0])

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        # Token-weighted loss and the loss stats' (sum, count) pairs, summed over micro-batches. They stay on
        # the device until the step's end: nothing in the loop below waits for the GPU, so the host launches
        # micro-batch k+1 while the GPU still runs micro-batch k.
        names: list[str] = []
        sums: Tensor | None = None
        bins = self._bins(samples) if n_global > 0 else []
        self._stream_tokens = 0
        tokens = self._token_arrays(samples, bins, prox_logp, batch.advantages, batch.sample_weight)
        off = 0
        for idx, logp in self._microbatch_logp(samples, bins):
            n_tok = sum(samples[i].n_response for i in idx)
            cols = tokens[:, off:off + n_tok]
            off += n_tok
            loss_mb, st = loss_fn(TokenInputs(logp=logp, prox_logp=logp.detach() if prox_logp is None else cols[3],
                                              behav_logp=cols[0], advantages=cols[1], sample_weight=cols[2]))
            # loss_fn is a mean over this micro-batch's n_tok tokens; rescale it to this micro-batch's share
            # of the global token mean.
            scaled = loss_mb * (n_tok / n_global)
            with torch.profiler.record_function("prof:backward"):
                scaled.backward()
            names = list(st)
            v = torch.stack([loss_mb.detach().double() * n_tok, *(x for k in names for x in st[k])])
            sums = v if sums is None else sums + v
        n_mb = len(bins)
        if sums is None:  # no tokens here: zeros in the shape the loss would give, for the collective
            names, sums = self._empty_stats(loss_fn)
        sums = self._all_reduce(sums.to(self.device, torch.float64)).cpu()
        grad_norm = self._step() if n_global > 0 else 0.0
        loss_stats = {k: float(sums[1 + 2 * j]) / max(float(sums[2 + 2 * j]), 1.0) for j, k in enumerate(names)}
        stats = TrainStats(loss=float(sums[0]) / max(n_global, 1), grad_norm=grad_norm, n_tokens=n_local,
                           n_tokens_global=n_global, n_microbatches=n_mb, stream_tokens=self._stream_tokens,
                           loss_stats=loss_stats)
        logger.debug("train_batch: %s", stats)
        return stats

    def _empty_stats(self, loss_fn: LossFn) -> tuple[list[str], Tensor]:
        """The loss's stat names with zero sums: a rank with no tokens still joins the stats' all-reduce."""
        z = torch.zeros(1, device=self.device)
        _, st = loss_fn(TokenInputs(z, z, z, z, torch.ones(1, device=self.device)))
        names = list(st)
        return names, torch.zeros(1 + 2 * len(names), dtype=torch.float64)

    def parameters_for_sync(self) -> list[tuple[str, Tensor]]:
        """Detached parameters in ``named_parameters()`` order (tied weights appear once)."""
        return [(name, p.detach()) for name, p in self.model.named_parameters()]

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    # -- internals --------------------------------------------------------------------------------
    def _bins(self, samples: Sequence[Trajectory]) -> list[list[int]]:
        """Sample indices per micro-batch: FFD by stream tokens under ``cfg.token_budget``; samples without
        response tokens contribute nothing and are left out. With shared prompts (packed), FFD places a
        group's samples together (``group_units``), so the prompt is in the stream once per micro-batch."""
        live = [i for i, s in enumerate(samples) if s.n_response > 0]
        if self._shares_prompts():
            units, cost = group_units([samples[i].n_prompt for i in live], [samples[i].n_response for i in live],
                                      [np.asarray(samples[i].prompt_tokens).tobytes() for i in live],
                                      self.cfg.token_budget)
            return [sorted(live[i] for u in bin_ for i in units[u]) for bin_ in ffd_pack(cost, self.cfg.token_budget)]
        lengths = [samples[i].n_prompt + samples[i].n_response for i in live]
        return [[live[b] for b in bin_] for bin_ in ffd_pack(lengths, self.cfg.token_budget)]

    def _shares_prompts(self) -> bool:
        if self._packed is None or not self.cfg.share_prompts:
            return False
        if self._share_ok is None:
            self._share_ok = self._packed.shared_prompts_fast()
        return self._share_ok

    def _token_arrays(self, samples: Sequence[Trajectory], bins: list[list[int]], prox_logp: list[np.ndarray] | None,
                      advantages: np.ndarray, sample_weight: np.ndarray) -> Tensor:
        """``[behav, advantage, sample weight(, prox)]`` per response token, micro-batch by micro-batch,
        as one float32 device tensor made by one copy that does not wait for queued GPU work
        (comm/transfer.py; one plain ``.to(device)`` per array and micro-batch stalled the host on
        every forward)."""
        order = [i for idx in bins for i in idx]
        lens = [samples[i].n_response for i in order]
        rows = [np.concatenate([np.asarray(samples[i].behav_logprobs, np.float32) for i in order] or [np.zeros(0)]),
                np.repeat(advantages[order], lens), np.repeat(sample_weight[order], lens)]
        if prox_logp is not None:
            rows.append(np.concatenate([np.asarray(prox_logp[i], np.float32) for i in order] or [np.zeros(0)]))
        return to_device(torch.from_numpy(np.stack(rows).astype(np.float32, copy=False)), self.device)

    def _microbatch_logp(
        self, samples: Sequence[Trajectory], bins: list[list[int]] | None = None
    ) -> Iterator[tuple[list[int], Tensor]]:
        """Yield ``(sample indices, response log-probs concatenated in that order)`` per micro-batch
        of ``bins`` (default: ``_bins(samples)``). Grad flows iff grad mode is enabled."""
        for idx in self._bins(samples) if bins is None else bins:
            if self._packed is not None:
                pack = pack_shared if self._shares_prompts() else pack_sequences
                mb = pack([samples[i].prompt_tokens for i in idx], [samples[i].response_tokens for i in idx],
                          self.device, pad_to_multiple=self.cfg.token_bucket, pad_id=self.pad_id)
                self._stream_tokens += mb.ids.shape[0]
                with torch.profiler.record_function("prof:forward"):
                    logp = self._packed(mb, self.temperature, self.top_p)
                yield idx, logp
                continue
            self._stream_tokens += len(idx) * max(samples[i].n_prompt + samples[i].n_response for i in idx)
            yield idx, self._padded_logp(samples, idx)

    def _padded_logp(self, samples: Sequence[Trajectory], idx: list[int]) -> Tensor:
        """HF forward on right-padded rows (any architecture); full logits, then the response rows."""
        seqs = [
            torch.from_numpy(np.concatenate([samples[i].prompt_tokens, samples[i].response_tokens]).astype(np.int64))
            for i in idx
        ]
        input_ids, attn = pad_microbatch(seqs, self.pad_id)
        input_ids, attn = input_ids.to(self.device), attn.to(self.device)
        rows = np.concatenate([np.full(samples[i].n_response, r) for r, i in enumerate(idx)])
        cols = np.concatenate(
            [np.arange(samples[i].n_prompt - 1, samples[i].n_prompt - 1 + samples[i].n_response) for i in idx]
        )
        rows_t = torch.from_numpy(rows).to(self.device)
        cols_t = torch.from_numpy(cols).to(self.device)
        with autocast_for(self.device, self.compute_dtype):
            # Right padding: default positions 0..L-1 are correct for every row.
            logits = self.model(input_ids=input_ids, attention_mask=attn, use_cache=False).logits
            return token_logprobs(logits[rows_t, cols_t], input_ids[rows_t, cols_t + 1], self.temperature,
                                  top_p=self.top_p)

    def _all_reduce(self, t: Tensor) -> Tensor:
        if self.dp_group is not None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.dp_group)
        return t

    def _step(self) -> float:
        """All-reduce grads (one flat buffer per dtype/device), clip, AdamW step; return the norm."""
        for p in self._params:
            if (
                p.grad is None
            ):  # unused on this rank: its zero must still join the reduction
                p.grad = torch.zeros_like(p)
        if self.dp_group is not None:
            buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
            for p in self._params:
                buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
            for grads in buckets.values():
                flat = torch.cat([g.reshape(-1) for g in grads])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.dp_group)
                for g, f in zip(
                    grads, torch.split(flat, [g.numel() for g in grads]), strict=True
                ):
                    g.copy_(f.view_as(g))
        with torch.profiler.record_function("prof:optimizer"):
            return self._clip_and_step()

    def _clip_and_step(self) -> float:
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self._params, max_norm))
        if math.isfinite(grad_norm):
            self.optimizer.step()
        else:  # same grads on every rank, so every rank skips together and they stay identical
            logger.warning(
                "non-finite grad norm %s: skipping optimizer step", grad_norm
            )
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm


def _validate(samples: Sequence[Trajectory]) -> None:
    for s in samples:
        if s.n_prompt < 1:
            raise ValueError(
                f"sample {s.sample_id}: empty prompt (response token 0 needs a context)"
            )
        if len(s.behav_logprobs) != s.n_response or len(s.versions) != s.n_response:
            raise ValueError(
                f"sample {s.sample_id}: {s.n_response} response tokens but {len(s.behav_logprobs)} "
                f"behav logprobs and {len(s.versions)} versions"
            )
