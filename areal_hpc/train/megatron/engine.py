"""Megatron-core as the training backend (``trainer.backend: megatron``), behind ``api.TrainEngine``.

The policy is a megatron-core ``GPTModel`` built from the checkpoint's HF config and loaded through the
converter (``convert.py``); the step is the torch trainer's own (``TorchTrainEngine.train_batch``: token-budget
micro-batches, the decoupled PPO loss it is given, gradient all-reduce over the data-parallel trainer ranks,
clipping, AdamW), so the two backends optimise the same objective and only the forward differs.

* Process groups: Megatron's groups span the trainer ranks only (the job's world also holds the rollout
  ranks); they are made with local synchronisation, so the rollout ranks take no part, and handed to the
  model as a ``ProcessGroupCollection`` rather than through Megatron's global ``parallel_state``.
* Log-probs: the model's output layer is bypassed and the response rows of the final hidden states go
  through the torch trainer's chunked head (``train/packed.py::response_logprobs``): per-token log-probs
  under the rollout's temperature and top-p without materialising full-vocabulary fp32 logits.
* Precision: fp32 parameters and AdamW state with bf16 autocast for the matmuls on CUDA.
* Attention: the local layer spec (no Transformer Engine) has no variable-length kernel, so micro-batches are
  right-padded rows under the causal mask; padding costs compute in proportion to the length spread of a
  micro-batch.
* Weights out: after each step the weights are converted to HF names and copied into the HF policy the
  trainer worker holds (what is evaluated and saved), whose parameters the weight sender ships, so every
  rollout engine loads them unchanged.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from areal_hpc.config import Config
from areal_hpc.model.tokenizer import Tokenizer
from areal_hpc.train.engine import TorchTrainEngine
from areal_hpc.train.packed import autocast_for, resolve_compute_dtype, response_logprobs
from areal_hpc.train.packing import pad_microbatch
from areal_hpc.trajectory import Trajectory

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


def _groups(tp: int, pp: int, dp_group: dist.ProcessGroup | None) -> Any:
    """Megatron's process groups over this trainer rank (model parallel of size 1, the job's trainer DP group)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    if tp != 1 or pp != 1:
        raise ValueError(f"trainer.tensor_parallel={tp} trainer.pipeline_parallel={pp}: the megatron backend runs one "
                         "model replica per trainer rank for now (data parallel over the trainer ranks); set "
                         "trainer.tensor_parallel=1 trainer.pipeline_parallel=1")
    from megatron.core import parallel_state

    # The local spec's attention takes its scratch tensors from Megatron's process-wide buffer, which
    # initialize_model_parallel would create; that call builds groups over the whole job (rollout ranks too).
    if parallel_state._GLOBAL_MEMORY_BUFFER is None:
        parallel_state._set_global_memory_buffer()
    own = dist.new_group([dist.get_rank()], use_local_synchronization=True)
    pgc = ProcessGroupCollection()
    for name in ("tp", "pp", "mp", "cp", "tp_cp", "embd", "pos_embd", "ep", "expt_tp", "tp_ep", "tp_ep_pp",
                 "expt_dp"):
        setattr(pgc, name, own)
    pgc.dp = pgc.dp_cp = pgc.intra_dp_cp = dp_group if dp_group is not None else own
    return pgc


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
        pgc = _groups(tc.tensor_parallel, tc.pipeline_parallel, dp_group)
        model_parallel_cuda_manual_seed(cfg.run.seed, tp_rank=0, ep_rank=0, etp_rank=0)
        hf_cfg = model.config
        # The module decides whether the head is tied, not config.json alone: a checkpoint can say tied and still
        # load with its own lm_head tensor, which then trains on its own.
        out, emb = model.get_output_embeddings(), model.get_input_embeddings()
        tied = out is not None and out.weight is emb.weight
        if bool(getattr(hf_cfg, "tie_word_embeddings", False)) != tied:
            hf_cfg = copy.deepcopy(hf_cfg)
            hf_cfg.tie_word_embeddings = tied
        self._hf_cfg = hf_cfg
        # Selective recompute of core attention: the local spec's unfused attention keeps [b, heads, L, L] scores
        # per layer for backward, which dominates memory at reasoning lengths; recomputing them costs little.
        recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1) \
            if tc.activation_checkpointing else dict(recompute_granularity="selective")
        if device.type != "cuda":  # megatron's recompute saves and restores the CUDA RNG state
            recompute = {}
        mcfg = convert.model_config(hf_cfg, params_dtype=torch.float32, gradient_accumulation_fusion=False,
                                    **recompute)
        self.gpt = GPTModel(config=mcfg, transformer_layer_spec=convert.layer_spec(), pg_collection=pgc,
                            **convert.gpt_kwargs(hf_cfg, max_sequence_length=cfg.model.max_seq_len)).to(device)
        self.gpt.load_state_dict(convert.hf_to_megatron(model.state_dict(), hf_cfg), strict=True)
        # The output layer is bypassed: the response rows of the hidden states go through the chunked head.
        self.gpt.output_layer.forward = lambda x, *a, **k: (x, None)
        self._tied = tied
        self._vocab = int(hf_cfg.vocab_size)
        self._params = [p for p in self.gpt.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self._params, lr=tc.lr, betas=(float(tc.adam_betas[0]),
                                           float(tc.adam_betas[1])), eps=tc.adam_eps, weight_decay=tc.weight_decay,
                                           fused=device.type == "cuda")
        self._hf_names = [n for n, _ in model.named_parameters()]
        n = sum(p.numel() for p in self._params)
        log.info("trainer: megatron-core GPTModel (%s, %.1fM parameters, padded micro-batches, compute %s)",
                 type(hf_cfg).__name__, n / 1e6, str(self.compute_dtype).removeprefix("torch."))

    # -- api.TrainEngine ------------------------------------------------------------------------------
    def prepare(self) -> None:
        pass  # eager modules: nothing to compile ahead

    @torch.no_grad()
    def parameters_for_sync(self) -> list[tuple[str, Tensor]]:
        """The Megatron weights in HF names, copied into the HF policy first (what eval and checkpoints read)."""
        from areal_hpc.train.megatron import convert

        hf = convert.megatron_to_hf([self._megatron_state()], self._hf_cfg)
        params = dict(self.model.named_parameters())
        for name in self._hf_names:
            params[name].copy_(hf[name])
        return [(name, params[name].detach()) for name in self._hf_names]

    def state_dict(self) -> dict[str, Any]:
        return {"megatron": self._megatron_state(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The saved state leaves out Megatron's empty ``_extra_state`` entries; anything else missing is an error.
        missing, unexpected = self.gpt.load_state_dict(state["megatron"], strict=False)
        bad = [k for k in missing if not k.endswith("._extra_state")] + list(unexpected)
        if bad:
            raise ValueError(f"trainer_state.pt does not fit this megatron model ({bad[0]!r} and {len(bad) - 1} more); "
                             "resume with the model.* settings the run was started with")
        self.optimizer.load_state_dict(state["optimizer"])
        self.parameters_for_sync()

    # -- the forward the inherited step calls -------------------------------------------------------------
    def _microbatch_logp(self, samples: Sequence[Trajectory],
                         bins: list[list[int]] | None = None) -> Iterator[tuple[list[int], Tensor]]:
        for idx in self._bins(samples) if bins is None else bins:
            self._stream_tokens += len(idx) * max(samples[i].n_prompt + samples[i].n_response for i in idx)
            yield idx, self._megatron_logp(samples, idx)

    def _megatron_logp(self, samples: Sequence[Trajectory], idx: list[int]) -> Tensor:
        seqs = [torch.from_numpy(np.concatenate([samples[i].prompt_tokens, samples[i].response_tokens])
                                 .astype(np.int64)) for i in idx]
        input_ids, _ = pad_microbatch(seqs, self.pad_id)
        input_ids = input_ids.to(self.device)
        b, length = input_ids.shape
        # Right padding under the causal mask: a real token never sees a pad (pads come after it), so the mask
        # is the causal one alone; RoPE positions 0..L-1 are every row's own.
        position_ids = torch.arange(length, device=self.device).expand(b, length)
        mask = torch.ones(length, length, dtype=torch.bool, device=self.device).triu(1)[None, None]
        rows = torch.from_numpy(np.concatenate([np.full(samples[i].n_response, r) for r, i in enumerate(idx)]))
        cols = torch.from_numpy(np.concatenate([np.arange(samples[i].n_prompt - 1,
                                                          samples[i].n_prompt - 1 + samples[i].n_response)
                                                for i in idx]))
        rows, cols = rows.to(self.device), cols.to(self.device)
        self.gpt.train(torch.is_grad_enabled())
        with autocast_for(self.device, self.compute_dtype):
            h = self.gpt(input_ids=input_ids, position_ids=position_ids, attention_mask=mask)  # [b, L, H]
        weight = self.gpt.shared_embedding_or_output_weight() if self._tied else self.gpt.output_layer.weight
        weight = weight[: self._vocab]  # rows past the HF vocabulary pad the tensor-parallel split: never sampled
        h_resp = h[rows, cols].to(self.compute_dtype)
        return response_logprobs(h_resp, weight, input_ids[rows, cols + 1], self.temperature, top_p=self.top_p)

    def _megatron_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.gpt.state_dict().items() if not k.endswith("._extra_state")}
