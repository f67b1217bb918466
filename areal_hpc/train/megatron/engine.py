"""Megatron-core as the training backend (``trainer.backend: megatron``), behind ``api.TrainEngine``.

The policy is a megatron-core ``GPTModel`` built from the checkpoint's HF config and loaded through the
converter (``convert.py``); the step is the torch trainer's own (``TorchTrainEngine.train_batch``: token-budget
micro-batches, the decoupled PPO loss it is given, gradient all-reduce over the data-parallel replicas,
clipping, AdamW), so the two backends optimise the same objective and only the forward differs.

* Process groups: Megatron's groups span the trainer ranks only (the job's world also holds the rollout
  ranks); they are made with local synchronisation, so the rollout ranks take no part, and handed to the
  model as a ``ProcessGroupCollection`` rather than through Megatron's global ``parallel_state``.
* Tensor parallel (``trainer.tensor_parallel``, ``tp.py``): ``tp`` consecutive trainer ranks hold one replica,
  each its shard of every weight. The trainer loop does not change: each rank still collects its own groups,
  and ``train_batch``/``compute_logp`` all-gather the batches of the replica's ranks so all of them run the
  same forward on the union. The token count is then summed over replicas (not ranks) and gradients are
  all-reduced over the replicas only, so the step is exactly the one-rank step of the same total batch.
* Pipeline parallel (``trainer.pipeline_parallel``): a replica is ``tp * pp`` consecutive trainer ranks, stage
  s its ranks ``s*tp .. s*tp + tp - 1``, each stage a ``GPTModel`` with its share of the layers. The batch is
  the union over the replica; one micro-batch at a time goes forward through the stages (hidden states sent to
  the next stage) and back (their gradients sent to the previous one); the last stage has the log-probs, the
  loss and its stats. No 1F1B schedule: it saves memory, not time. A tied head on the last stage is a copy
  of the embedding whose gradient is summed with the first stage's.
* Log-probs: the model's output layer is bypassed and the response rows of the final hidden states go
  through the torch trainer's chunked head (``train/packed.py::response_logprobs``), or under tensor
  parallelism its vocab-parallel counterpart (``tp.vocab_parallel_logp``): per-token log-probs under the
  rollout's temperature and top-p without materialising full-vocabulary fp32 logits.
* Precision: fp32 parameters and AdamW state with bf16 autocast for the matmuls on CUDA.
* Distributed optimizer (``trainer.distributed_optimizer``, ``dopt.py``): on CUDA with several data-parallel
  replicas of one rank each, Megatron's ZeRO-1 keeps 1/dp of the AdamW state per rank (gradients
  reduce-scattered, the stepped slices all-gathered); the step is the same.
* Attention: the local layer spec (no Transformer Engine) has no variable-length kernel, so micro-batches are
  right-padded rows under the causal mask; padding costs compute in proportion to the length spread of a
  micro-batch.
* Weights out: after each step the shards are gathered on every rank of a stage, converted to HF names,
  broadcast from stage to stage and copied into the HF policy the trainer worker holds (what is evaluated and
  saved), whose parameters the weight sender ships, so every rollout engine loads them unchanged and only the
  sending rank has to call ``parameters_for_sync`` (it makes no collective).
* Checkpoints: ``state_dict`` gathers every rank's shard and optimizer state over the replica (a collective:
  every trainer rank calls it), so one ``trainer_state.pt`` resumes the whole layout; each rank loads its own.
  With the distributed optimizer the AdamW slices are gathered over the replicas into torch's own layout (the
  file resumes either path).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from areal_hpc.api import LossFn, TokenInputs, TrainBatch
from areal_hpc.config import Config
from areal_hpc.model.tokenizer import Tokenizer
from areal_hpc.train.engine import TorchTrainEngine, _validate
from areal_hpc.train.megatron.dopt import DistributedAdamW, wanted
from areal_hpc.train.megatron.shapes import MegatronShape
from areal_hpc.train.packed import autocast_for, resolve_compute_dtype, response_logprobs
from areal_hpc.train.packing import pad_microbatch
from areal_hpc.trajectory import TrainStats, Trajectory

log = logging.getLogger(__name__)

#: The megatron-core releases this backend is tested with (its model-building API changes between them).
SUPPORTED = ((0, 16), (0, 17))
SUPPORTED_TEXT = ">=0.16,<0.17"


def import_megatron() -> Any:
    try:
        import megatron.core as mcore
    except ImportError as e:
        raise RuntimeError(f"trainer.backend=megatron but megatron-core does not import ({e}); install it with "
                           "pip install -e '.[megatron]', or set trainer.backend=torch") from None
    version = getattr(mcore, "__version__", "0")
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        major_minor = (-1, -1)
    if not SUPPORTED[0] <= major_minor < SUPPORTED[1]:
        raise RuntimeError(f"trainer.backend=megatron: megatron-core {version} is not supported (areal_hpc supports "
                           f"{SUPPORTED_TEXT}); pip install -e '.[megatron]' installs the tested release")
    return mcore


def from_config(cfg: Config, model: torch.nn.Module, tok: Tokenizer,
                dp_group: dist.ProcessGroup | None) -> MegatronTrainEngine:
    """The ``megatron`` entry of ``registry.TRAIN_BACKENDS``."""
    return MegatronTrainEngine(model, cfg, pad_id=tok.pad_id, dp_group=dp_group)


def require_cuda(device: torch.device) -> None:
    """megatron-core's forward runs on CUDA only (RoPE tables and its RNG tracker live there)."""
    if device.type != "cuda":
        raise ValueError(f"trainer.backend=megatron needs a CUDA device (megatron-core's forward runs on GPU), the "
                         f"trainer is on {device}; set model.device=cuda, or trainer.backend=torch")


@dataclass(frozen=True)
class _Groups:
    """This trainer rank's place in the layout and the torch.distributed groups that go with it."""

    pgc: Any  # megatron's ProcessGroupCollection
    tp: dist.ProcessGroup  # this pipeline stage's tensor-parallel ranks
    pp: dist.ProcessGroup  # this shard's pipeline stages, in stage order
    mp: dist.ProcessGroup  # the whole model replica (tp * pp ranks)
    dp: dist.ProcessGroup | None  # the same place in every replica (None: one replica)
    pp_ranks: list[int]  # global ranks of ``pp``, stage by stage


def _groups(tp: int, pp: int, dp_group: dist.ProcessGroup | None) -> _Groups:
    """Megatron's process groups over the trainer ranks (``tp.layout``): ``dp_group`` holds every trainer rank
    (the worker's data-parallel group; None with one trainer).

    Groups are made with local synchronisation, so the rollout ranks (in the same world) take no part; every
    trainer rank walks the whole layout in the same order, as torch requires for overlapping groups made that
    way (a rank outside a group returns at once)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from areal_hpc.train.megatron.tp import layout

    trainers = dist.get_process_group_ranks(dp_group) if dp_group is not None else [dist.get_rank()]
    lay = layout(len(trainers), tp, pp)
    from megatron.core import parallel_state

    # The local spec's attention takes its scratch tensors from Megatron's process-wide buffer, which
    # initialize_model_parallel would create; that call builds groups over the whole job (rollout ranks too).
    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()
    me = dist.get_rank()
    own = dist.new_group([me], use_local_synchronization=True)

    def mine(groups: list[list[int]]) -> tuple[dist.ProcessGroup, list[int]]:
        if len(groups[0]) == 1:  # a group of this rank alone
            return own, [me]
        found: tuple[dist.ProcessGroup, list[int]] | None = None
        for members in groups:
            ranks = [trainers[i] for i in members]
            g = dist.new_group(ranks, use_local_synchronization=True)
            found = (g, ranks) if me in ranks else found
        assert found is not None
        return found

    tp_group, pp_group, mp_group = mine(lay.tp)[0], mine(lay.pp), mine(lay.mp)[0]
    if len(lay.dp[0]) == 1:
        dp = None
    else:
        dp = dp_group if tp * pp == 1 else mine(lay.dp)[0]
    pgc = ProcessGroupCollection()
    # A tied head on several stages is kept as two weights whose gradients the engine sums (``_tie_grads``), so
    # Megatron's own embedding group (a CUDA-only all-reduce at build time) is not used.
    for name in ("cp", "embd", "pos_embd", "ep"):
        setattr(pgc, name, own)
    for name in ("tp", "tp_cp", "expt_tp", "tp_ep"):
        setattr(pgc, name, tp_group)
    pgc.pp = pp_group[0]
    pgc.mp = pgc.tp_ep_pp = mp_group
    pgc.dp = pgc.dp_cp = pgc.intra_dp_cp = pgc.expt_dp = dp if dp is not None else own
    return _Groups(pgc=pgc, tp=tp_group, pp=pp_group[0], mp=mp_group, dp=dp, pp_ranks=pp_group[1])


class MegatronTrainEngine(TorchTrainEngine):
    """``api.TrainEngine`` on a megatron-core ``GPTModel``; ``model`` stays the HF policy (evaluated, saved)."""

    def __init__(self, model: torch.nn.Module, cfg: Config, *, pad_id: int,
                 dp_group: dist.ProcessGroup | None = None) -> None:
        import_megatron()
        from megatron.core.models.gpt import GPTModel
        from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

        from areal_hpc.train.megatron import convert

        tc, r = cfg.trainer, cfg.rollout
        device = next(model.parameters()).device
        require_cuda(device)
        convert.check_supported(model.config)
        if not dist.is_initialized():
            raise RuntimeError("trainer.backend=megatron needs torch.distributed (started by the trainer worker)")
        self.model, self.cfg, self.pad_id = model, tc, pad_id
        self.temperature, self.top_p, self.dp_group, self.device = r.temperature, r.top_p, dp_group, device
        self.packing = "padded"
        self.compute_dtype = resolve_compute_dtype(tc.compute_dtype, device)
        self._packed, self._share_ok, self._stream_tokens = None, False, 0
        hf_cfg = model.config
        # The module decides whether the head is tied, not config.json alone: a checkpoint can say tied and still
        # load with its own lm_head tensor, which then trains on its own.
        out, emb = model.get_output_embeddings(), model.get_input_embeddings()
        tied = out is not None and out.weight is emb.weight
        if bool(getattr(hf_cfg, "tie_word_embeddings", False)) != tied:
            hf_cfg = copy.deepcopy(hf_cfg)
            hf_cfg.tie_word_embeddings = tied
        self._hf_cfg = hf_cfg
        check_model_layout(hf_cfg, tc.tensor_parallel, tc.pipeline_parallel)
        groups = _groups(tc.tensor_parallel, tc.pipeline_parallel, dp_group)
        tp, pp = tc.tensor_parallel, tc.pipeline_parallel
        self._tp, self._pp, self._mp = groups.tp, groups.pp, groups.mp
        self._tp_size, self._tp_rank = tp, dist.get_rank(groups.tp)
        self._pp_size, self._pp_rank, self._pp_ranks = pp, dist.get_rank(groups.pp), groups.pp_ranks
        self._mp_size, self._mp_rank = tp * pp, dist.get_rank(groups.mp)
        self._first, self._last = self._pp_rank == 0, self._pp_rank == pp - 1
        self.dp_group = groups.dp  # gradients and token counts are summed over the replicas only
        model_parallel_cuda_manual_seed(cfg.run.seed, tp_rank=self._tp_rank, ep_rank=0, etp_rank=self._tp_rank)
        # Selective recompute of core attention: the local spec's unfused attention keeps [b, heads, L, L] scores
        # per layer for backward, which dominates memory at reasoning lengths; recomputing them costs little.
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
            if tc.activation_checkpointing else dict(recompute_granularity="selective")
        if device.type != "cuda":  # megatron's recompute saves and restores the CUDA RNG state
            recompute = {}
        mcfg = convert.model_config(hf_cfg, params_dtype=torch.float32, tp_size=tp, pp_size=pp,
                                    gradient_accumulation_fusion=False, **recompute)
        kwargs = convert.gpt_kwargs(hf_cfg, tp_size=tp, max_sequence_length=cfg.model.max_seq_len)
        # a tied head on another stage than the embedding is its own weight here, its gradient summed with the
        # embedding's (``_tie_grads``): the converter writes it from the HF embedding either way
        kwargs["share_embeddings_and_output_weights"] = tied and pp == 1
        self.gpt = GPTModel(config=mcfg, transformer_layer_spec=convert.layer_spec(), pg_collection=groups.pgc,
                            pre_process=self._first, post_process=self._last, **kwargs).to(device)
        self.gpt.load_state_dict(convert.hf_to_megatron(model.state_dict(), hf_cfg, tp_size=tp, tp_rank=self._tp_rank,
                                                        pp_size=pp, pp_rank=self._pp_rank), strict=True)
        if self._last:  # the output layer is bypassed: the response rows of the hidden states go through the head
            self.gpt.output_layer.forward = lambda x, *a, **k: (x, None)
        self._tied = tied
        self._vocab = int(hf_cfg.vocab_size)
        self._hidden = int(hf_cfg.hidden_size)
        # this rank's rows of the (padded) vocabulary; rows past the HF vocabulary are never sampled
        per_rank = MegatronShape.of(hf_cfg).padded_vocab(tp) // tp
        self._vocab_start, self._vocab_width = self._tp_rank * per_rank, per_rank
        self._vocab_rows = max(0, min(per_rank, self._vocab - self._vocab_start))
        named = [(name, p) for name, p in self.gpt.named_parameters() if p.requires_grad]
        self._params = [p for _, p in named]
        split = convert.split_names(hf_cfg, pp_size=pp, pp_rank=self._pp_rank) if tp > 1 else set()
        copy_of_embedding = "output_layer.weight" if tied and pp > 1 and self._last else None
        self._kinds = ["copy" if name == copy_of_embedding else "split" if name in split else "replicated"
                       for name, _ in named]
        self._hf_stage = {name: stage_of(name, hf_cfg, pp) for name, _ in model.named_parameters()}
        self.optimizer = torch.optim.AdamW(self._params, lr=tc.lr, betas=(float(tc.adam_betas[0]),
                                           float(tc.adam_betas[1])), eps=tc.adam_eps, weight_decay=tc.weight_decay,
                                           fused=device.type == "cuda")
        self._dopt: DistributedAdamW | None = None
        dp_size = 1 if groups.dp is None else dist.get_world_size(groups.dp)
        if wanted(tc.distributed_optimizer, dp=dp_size, tp=tp, pp=pp, device=device,
                  backend=None if groups.dp is None else dist.get_backend(groups.dp)):
            # ZeRO-1 over the replicas: each keeps 1/dp of the AdamW state (dopt.py); the step is the same
            self._dopt = DistributedAdamW(self.gpt, mcfg, groups.pgc, groups.dp, lr=tc.lr,
                                          betas=(float(tc.adam_betas[0]), float(tc.adam_betas[1])), eps=tc.adam_eps,
                                          weight_decay=tc.weight_decay)
            self.optimizer = self._dopt  # type: ignore[assignment]  # zero_grad, state_dict, load_state_dict
        self._hf_names = [n for n, _ in model.named_parameters()]
        n = sum(p.numel() for p in self._params)
        log.info("trainer: megatron-core GPTModel (%s, %.1fM parameters on this rank, tensor parallel %d, pipeline "
                 "parallel %d, padded micro-batches, compute %s)", type(hf_cfg).__name__, n / 1e6, tp, pp,
                 str(self.compute_dtype).removeprefix("torch."))

    # -- api.TrainEngine ------------------------------------------------------------------------------
    def prepare(self) -> None:
        pass  # eager modules: nothing to compile ahead

    @torch.no_grad()
    def compute_logp(self, samples: list[Trajectory]) -> list[np.ndarray]:
        """This rank's samples' log-probs; under model parallelism the forward runs on the union of the replica's
        samples (every rank of a replica must run the same forward), and each rank keeps its own."""
        if self._mp_size == 1:
            return super().compute_logp(samples)
        parts = self._gather_objects(samples)
        union = [s for p in parts for s in p]
        out = super().compute_logp(union) if self._pp_size == 1 else self._pipeline_logp(union)
        a = sum(len(p) for p in parts[:self._mp_rank])
        return out[a:a + len(samples)]

    def train_batch(self, batch: TrainBatch, loss_fn: LossFn) -> TrainStats:
        """The torch trainer's step (token-mean loss over the global batch, gradients summed over the
        data-parallel replicas), on the union of the model replica's batches: each trainer rank still collects
        its own groups, and a replica trains on all of its ranks' groups at once. The global token count is then
        summed over replicas, not ranks, so the loss is exactly the one-rank loss of the same total batch.
        Afterwards the new weights are gathered into the HF policy on every rank (``parameters_for_sync``)."""
        own = sum(s.n_response for s in batch.samples)
        if self._mp_size > 1:
            parts = self._gather_objects(batch)
            batch = TrainBatch([s for p in parts for s in p.samples],
                               np.concatenate([p.advantages for p in parts]),
                               np.concatenate([p.sample_weight for p in parts]),
                               None if parts[0].prox_logp is None else [x for p in parts for x in p.prox_logp])
        stats = super().train_batch(batch, loss_fn) if self._pp_size == 1 else self._pipeline_train(batch, loss_fn)
        self._publish()
        return dataclasses.replace(stats, n_tokens=own)

    def parameters_for_sync(self) -> list[tuple[str, Tensor]]:
        """The HF policy's parameters, which hold the trained weights (gathered from the shards and stages after
        every step, ``_publish``): no collective here, so only the rank that sends needs to call it."""
        params = dict(self.model.named_parameters())
        return [(name, params[name].detach()) for name in self._hf_names]

    def state_dict(self) -> dict[str, Any]:
        """This rank's Megatron tensors and optimizer state; under model parallelism every rank's of the replica,
        gathered (a collective over the replica: every trainer rank calls it), so one trainer_state.pt resumes
        the whole layout."""
        own = {"megatron": self._megatron_state(), "optimizer": self.optimizer.state_dict()}
        if self._mp_size == 1:
            return own
        return {"model_parallel": self._gather_objects(_to_cpu(own)),
                "sizes": {"tensor_parallel": self._tp_size, "pipeline_parallel": self._pp_size}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sizes = state.get("sizes", {"tensor_parallel": 1, "pipeline_parallel": 1})
        if sizes != {"tensor_parallel": self._tp_size, "pipeline_parallel": self._pp_size}:
            raise ValueError(f"trainer_state.pt was saved with trainer.tensor_parallel={sizes['tensor_parallel']} "
                             f"trainer.pipeline_parallel={sizes['pipeline_parallel']}, this run has "
                             f"{self._tp_size} and {self._pp_size}; resume with the sizes the run was started with")
        if self._mp_size > 1:
            state = state["model_parallel"][self._mp_rank]
        # The saved state leaves out Megatron's empty ``_extra_state`` entries; anything else missing is an error.
        missing, unexpected = self.gpt.load_state_dict(state["megatron"], strict=False)
        bad = [k for k in missing if not k.endswith("._extra_state")] + list(unexpected)
        if bad:
            raise ValueError(f"trainer_state.pt does not fit this megatron model ({bad[0]!r} and {len(bad) - 1} more); "
                             "resume with the model.* settings the run was started with")
        self.optimizer.load_state_dict(state["optimizer"])
        self._publish()

    # -- model parallel ---------------------------------------------------------------------------------
    def _gather_objects(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self._mp_size
        dist.all_gather_object(out, obj, group=self._mp)
        return out

    @torch.no_grad()
    def _publish(self) -> None:
        """The Megatron weights in HF names, copied into the HF policy (what is sent, evaluated and saved) on every
        rank: a stage's shards are all-gathered over its tensor-parallel group, and each stage's HF tensors are
        broadcast to the other stages, name by name."""
        from areal_hpc.train.megatron import convert
        from areal_hpc.train.megatron.tp import all_gather_tensor

        own = self._megatron_state()
        shards = [own] if self._tp_size == 1 else \
            [dict(zip(own, ts, strict=True)) for ts in zip(*(all_gather_tensor(t, self._tp) for t in own.values()),
                                                            strict=True)]
        hf = convert.megatron_to_hf(shards, self._hf_cfg, pp_size=self._pp_size, pp_rank=self._pp_rank)
        params = dict(self.model.named_parameters())
        for name in self._hf_names:
            stage = self._hf_stage[name]
            if stage == self._pp_rank:
                params[name].copy_(hf[name])
            if self._pp_size > 1:
                dist.broadcast(params[name].data, src=self._pp_ranks[stage], group=self._pp)

    def _step(self) -> float:
        if self._dopt is None:
            return super()._step()
        return self._dopt.step(self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf)

    def _clip_and_step(self) -> float:
        if self._mp_size == 1:
            return super()._clip_and_step()
        from areal_hpc.train.megatron.tp import clip_grad_norm_tp

        if self._tied and self._pp_size > 1:
            self._tie_grads()
        grad_norm = clip_grad_norm_tp(self._params, self._kinds,
                                      self.cfg.grad_clip if self.cfg.grad_clip > 0 else math.inf,
                                      self._tp if self._tp_size > 1 else None,
                                      self._pp if self._pp_size > 1 else None)
        if math.isfinite(grad_norm):
            self.optimizer.step()
        else:  # the same norm on every rank of the layout: all skip together
            log.warning("non-finite grad norm %s: skipping optimizer step", grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _tie_grads(self) -> None:
        """A tied head on the last stage is a copy of the first stage's embedding: both take the sum of their
        gradients, so both copies take the same step (what Megatron's embedding group does). Summed over the
        whole pipeline group, middle stages adding zeros, so no extra group is needed."""
        if self._first:
            g = self.gpt.embedding.word_embeddings.weight.grad
        elif self._last:
            g = self.gpt.output_layer.weight.grad
        else:
            g = torch.zeros(self._vocab_width, self._hidden, device=self.device)
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=self._pp)

    # -- pipeline parallel ------------------------------------------------------------------------------
    def _pipeline_logp(self, samples: list[Trajectory]) -> list[np.ndarray]:
        """``compute_logp`` through the stages: the last one has the log-probs and broadcasts them."""
        _validate(samples)
        out: list[np.ndarray] = [np.zeros(0, dtype=np.float32) for _ in samples]
        bins = self._bins(samples)
        order = [i for idx in bins for i in idx]
        lens = [samples[i].n_response for i in order]
        flat = torch.empty(sum(lens), dtype=torch.float32, device=self.device)
        parts = []
        for idx in bins:
            y, _ = self._stage_forward(samples, idx)
            if self._last:
                parts.append(y.float())
            else:
                self._send(y, +1)
        if self._last and parts:
            flat = torch.cat(parts)
        dist.broadcast(flat, src=self._pp_ranks[-1], group=self._pp)
        for i, c in zip(order, np.split(flat.cpu().numpy(), np.cumsum(lens)[:-1]), strict=True):
            out[i] = c.astype(np.float32, copy=True)
        return out

    def _pipeline_train(self, batch: TrainBatch, loss_fn: LossFn) -> TrainStats:
        """``TorchTrainEngine.train_batch`` through the stages, one micro-batch at a time: stage s runs its
        forward, hands its output to s+1, and runs its backward when s+1 hands back that output's gradient; the
        last stage has the log-probs, the loss and its stats, and broadcasts the stats. No two micro-batches are
        in flight at once (no 1F1B schedule): a stage waits while the others compute, so pipeline parallelism
        here buys memory (each rank holds 1/pp of the layers and their optimizer state), not speed."""
        samples, prox_logp = batch.samples, batch.prox_logp
        _validate(samples)
        n_local = sum(s.n_response for s in samples)
        n_global = n_local if self.dp_group is None else \
            int(self._all_reduce(torch.tensor([n_local], dtype=torch.float64, device=self.device))[0])
        self.optimizer.zero_grad(set_to_none=True)
        bins = self._bins(samples) if n_global > 0 else []
        self._stream_tokens = 0
        tokens = self._token_arrays(samples, bins, prox_logp, batch.advantages, batch.sample_weight) \
            if self._last else None
        names, sums = self._empty_stats(loss_fn)
        sums = sums.to(self.device)
        off = 0
        for idx in bins:
            self._stream_tokens += len(idx) * max(samples[i].n_prompt + samples[i].n_response for i in idx)
            y, x = self._stage_forward(samples, idx)
            if self._last:
                n_tok = sum(samples[i].n_response for i in idx)
                cols = tokens[:, off:off + n_tok]
                off += n_tok
                loss_mb, st = loss_fn(TokenInputs(logp=y, prox_logp=y.detach() if prox_logp is None else cols[3],
                                                  behav_logp=cols[0], advantages=cols[1], sample_weight=cols[2]))
                (loss_mb * (n_tok / n_global)).backward()
                sums += torch.stack([loss_mb.detach().double() * n_tok, *(v for k in names for v in st[k])]).double()
            else:
                self._send(y, +1)
                y.backward(self._recv(y.shape, +1).to(y.dtype))
            if x is not None:
                self._send(x.grad, -1)
        sums = self._all_reduce(sums)
        dist.broadcast(sums, src=self._pp_ranks[-1], group=self._pp)
        sums = sums.cpu()
        grad_norm = self._step() if n_global > 0 else 0.0
        loss_stats = {k: float(sums[1 + 2 * j]) / max(float(sums[2 + 2 * j]), 1.0) for j, k in enumerate(names)}
        return TrainStats(loss=float(sums[0]) / max(n_global, 1), grad_norm=grad_norm, n_tokens=n_local,
                          n_tokens_global=n_global, n_microbatches=len(bins), stream_tokens=self._stream_tokens,
                          loss_stats=loss_stats)

    def _send(self, t: Tensor, step: int) -> None:
        dist.send(t.detach().float().contiguous(), dst=self._pp_ranks[self._pp_rank + step], group=self._pp)

    def _recv(self, shape: torch.Size | tuple[int, ...], step: int) -> Tensor:
        t = torch.empty(shape, dtype=torch.float32, device=self.device)
        dist.recv(t, src=self._pp_ranks[self._pp_rank + step], group=self._pp)
        return t

    # -- the forward --------------------------------------------------------------------------------------
    def _microbatch_logp(self, samples: Sequence[Trajectory],
                         bins: list[list[int]] | None = None) -> Iterator[tuple[list[int], Tensor]]:
        """The inherited step's forward (one pipeline stage: the whole model)."""
        for idx in self._bins(samples) if bins is None else bins:
            self._stream_tokens += len(idx) * max(samples[i].n_prompt + samples[i].n_response for i in idx)
            yield idx, self._stage_forward(samples, idx)[0]

    def _stage_forward(self, samples: Sequence[Trajectory], idx: list[int]) -> tuple[Tensor, Tensor | None]:
        """This stage's forward of micro-batch ``idx``: (the response log-probs on the last stage, else the hidden
        states [L, b, H] for the next stage; the input received from the previous stage, or None on the first).
        Every rank of the replica holds the same micro-batch, so the shapes that cross stages are known."""
        seqs = [torch.from_numpy(np.concatenate([samples[i].prompt_tokens, samples[i].response_tokens])
                                 .astype(np.int64)) for i in idx]
        input_ids, _ = pad_microbatch(seqs, self.pad_id)
        input_ids = input_ids.to(self.device)
        b, length = input_ids.shape
        # Right padding under the causal mask: a real token never sees a pad (pads come after it), so the mask
        # is the causal one alone; RoPE positions 0..L-1 are every row's own.
        position_ids = torch.arange(length, device=self.device).expand(b, length)
        mask = torch.ones(length, length, dtype=torch.bool, device=self.device).triu(1)[None, None]
        x = None
        if not self._first:
            x = self._recv((length, b, self._hidden), -1).requires_grad_(torch.is_grad_enabled())
            self.gpt.set_input_tensor(x)
        self.gpt.train(torch.is_grad_enabled())
        with autocast_for(self.device, self.compute_dtype):
            h = self.gpt(input_ids=input_ids if self._first else None, position_ids=position_ids,
                         attention_mask=mask)  # [b, L, H] on the last stage, [L, b, H] before it
        if not self._last:
            return h, x
        rows = torch.from_numpy(np.concatenate([np.full(samples[i].n_response, r) for r, i in enumerate(idx)]))
        cols = torch.from_numpy(np.concatenate([np.arange(samples[i].n_prompt - 1,
                                                          samples[i].n_prompt - 1 + samples[i].n_response)
                                                for i in idx]))
        rows, cols = rows.to(self.device), cols.to(self.device)
        weight = self.gpt.shared_embedding_or_output_weight() if self._tied else self.gpt.output_layer.weight
        # rows past the HF vocabulary pad the tensor-parallel split: never sampled, left out of every softmax
        weight = weight[: self._vocab_rows]
        h_resp = h[rows, cols].to(self.compute_dtype)
        targets = input_ids[rows, cols + 1]
        if self._tp_size == 1:
            return response_logprobs(h_resp, weight, targets, self.temperature, top_p=self.top_p), x
        from areal_hpc.train.megatron.tp import vocab_parallel_logp

        return vocab_parallel_logp(h_resp, weight, targets, vocab_start=self._vocab_start, width=self._vocab_width,
                                   temperature=self.temperature, top_p=self.top_p, group=self._tp), x

    def _megatron_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.gpt.state_dict().items() if not k.endswith("._extra_state")}


def stage_of(hf_name: str, hf_config: Any, pp: int) -> int:
    """The pipeline stage that holds HF tensor ``hf_name`` (``shapes.layer_range``'s even split)."""
    if hf_name == "model.embed_tokens.weight":
        return 0
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"]:
        return int(parts[2]) // (int(hf_config.num_hidden_layers) // pp)
    return pp - 1  # the final norm and an untied head


def check_model_layout(hf_config: Any, tp: int, pp: int) -> None:
    """The parallel sizes against the checkpoint's shape, named by their config keys: Megatron splits attention by
    query groups (and so by heads) and the MLP by columns across tensor-parallel ranks, and layers evenly across
    pipeline stages."""
    s = MegatronShape.of(hf_config)
    for what, n in (("num_attention_heads", s.n_heads), ("num_key_value_heads", s.n_groups),
                    ("intermediate_size", s.ffn)):
        if n % tp:
            ok = [d for d in range(1, s.n_groups + 1) if not (s.n_groups % d or s.n_heads % d or s.ffn % d)]
            raise ValueError(f"trainer.tensor_parallel={tp} does not divide this checkpoint's {what}={n}; set "
                             f"trainer.tensor_parallel to one of {ok}")
    if s.n_layers % pp:
        ok = [d for d in range(1, s.n_layers + 1) if not s.n_layers % d]
        raise ValueError(f"trainer.pipeline_parallel={pp} does not divide this checkpoint's num_hidden_layers="
                         f"{s.n_layers}; set trainer.pipeline_parallel to one of {ok}")


def _to_cpu(obj: Any) -> Any:
    """A state dict's tensors on the host, so gathering it pickles no device tensors."""
    if isinstance(obj, Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
