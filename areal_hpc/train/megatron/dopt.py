"""Megatron's distributed optimizer for the megatron backend (``trainer.distributed_optimizer``): ZeRO-1 over the
data-parallel replicas.

Each data-parallel rank owns a contiguous slice of Megatron's flat gradient buffer and keeps the AdamW moments
(``exp_avg``, ``exp_avg_sq``) of that slice only; the gradients are reduce-scattered (summed) into the slices,
each rank steps its slice of the fp32 weights, and the updated slices are all-gathered back into every replica.
The step is the one ``TorchTrainEngine`` takes: the loss the engine is given with its token-weighted
normalisation (the gradients are summed over replicas, not averaged, so ``n_tok / N_global`` stays the scale),
the gradient norm over the whole model (the slices' squares summed over the replicas), clipping by it, a
non-finite norm skipping the step on every rank, and AdamW with the trainer's hyper-parameters on every weight
(Megatron's default of no weight decay on biases and norms is not applied, so the two paths agree).

The weights stay fp32 with bf16 autocast for the matmuls (``trainer.compute_dtype``), as on the other path:
they are the master weights, and the slices the optimizer steps are views into them. Megatron's bf16 mode (bf16
weights with separate fp32 master slices) would halve the weights' memory but change the forward's numerics
against the torch trainer, so it is not used.

Megatron's optimizer is built directly rather than through ``get_megatron_optimizer``, whose parameter
grouping gathers over the default (whole-job) group, which holds the rollout ranks too. It needs CUDA: it
accepts only ``torch.cuda`` tensor types and makes its norm on the current GPU.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

log = logging.getLogger(__name__)

SETTINGS = ("auto", "true", "false")


def wanted(setting: str, *, dp: int, tp: int, pp: int, device: torch.device, backend: str | None) -> bool:
    """Whether the distributed optimizer runs: ``auto`` wherever it shards something (CUDA, more than one
    data-parallel replica over NCCL, one rank per replica), ``true`` there or a one-line error, ``false`` never.
    ``backend`` is the data-parallel group's (None: no group)."""
    if setting not in SETTINGS:
        raise ValueError(f"trainer.distributed_optimizer={setting!r} is not one of {SETTINGS}; set "
                         "trainer.distributed_optimizer=auto")
    if setting == "false":
        return False
    why = None
    if device.type != "cuda":
        why = f"needs CUDA (Megatron's distributed optimizer takes CUDA tensors only), the trainer is on {device}"
    elif dp < 2:
        why = "needs more than one data-parallel replica (cluster.n_trainer / (tensor_parallel * " \
              "pipeline_parallel) >= 2): with one there is nothing to shard"
    elif backend != "nccl":
        why = f"needs NCCL between the data-parallel replicas (its gradient reduce-scatter runs there), this " \
              f"run has {backend} (trainer ranks that share a GPU talk over gloo)"
    elif tp * pp > 1:
        why = f"is wired for one rank per model replica only, this run has tensor_parallel={tp} " \
              f"pipeline_parallel={pp}"
    if why is None:
        return True
    if setting == "true":
        raise ValueError(f"trainer.distributed_optimizer=true {why}; set trainer.distributed_optimizer=auto")
    return False


class DistributedAdamW:
    """AdamW over ``module``'s parameters with its state sharded over ``dp_group`` (Megatron's DDP wrapper for the
    gradient buffer and reduce-scatter, Megatron's ``DistributedOptimizer`` for the slices and the all-gather).

    The engine keeps calling ``module`` itself, not the DDP wrapper: the wrapper's hooks on the parameters put
    every backward's gradients into its flat buffer either way, and its parameters become views into the flat
    weight buffer the all-gather fills."""

    def __init__(self, module: Any, model_config: Any, pg_collection: Any, dp_group: dist.ProcessGroup, *,
                 lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        self.dp_group = dp_group
        # calculate_per_token_loss: the buffer sums the replicas' gradients (the engine already divides by the
        # global token count) instead of averaging them over the replicas.
        ddp_model_cfg = dataclasses.replace(model_config, calculate_per_token_loss=True)
        ddp_cfg = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True,
                                                overlap_grad_reduce=False, overlap_param_gather=False)
        self.ddp = DistributedDataParallel(ddp_model_cfg, ddp_cfg, module, pg_collection=pg_collection)
        self.params = [p for p in module.parameters() if p.requires_grad]
        inner = torch.optim.AdamW([{"params": self.params}], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                  fused=True)
        self._hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        ocfg = OptimizerConfig(optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=betas[0],
                               adam_beta2=betas[1], adam_eps=eps, bf16=False, fp16=False,
                               params_dtype=torch.float32, use_distributed_optimizer=True, clip_grad=0.0)
        self.opt = DistributedOptimizer(inner, ocfg, None, None, model_chunks=[self.ddp],
                                        per_model_buffers={0: self.ddp.buffers}, data_parallel_group=dp_group,
                                        data_parallel_group_gloo=None, data_parallel_group_idx=0,
                                        distributed_optimizer_instance_id=0)
        self.opt.grad_stats_parallel_group = dp_group  # the norm's squares summed over every slice
        self.opt.tp_group = pg_collection.tp

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffer (the engine's ``optimizer.zero_grad`` at the start of a step)."""
        self.ddp.zero_grad_buffer()
        self.opt.zero_grad(set_to_none=True)

    def step(self, max_norm: float) -> float:
        """Reduce-scatter the accumulated gradients, clip this rank's slice by the global norm, step it and
        all-gather the weights; the norm is returned on every rank (all skip a non-finite one together)."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        self.ddp.finish_grad_sync()
        self.opt.prepare_grads()  # this rank's slice of the summed buffer becomes its slices' .grad
        grad_norm = float(self.opt.get_grad_norm())
        if math.isfinite(grad_norm):
            if math.isfinite(max_norm):
                clip_grad_by_total_norm_fp32(self.opt.get_parameters(), max_norm, grad_norm)
            self.opt.step_with_ready_grads()
        else:
            log.warning("non-finite grad norm %s: skipping optimizer step", grad_norm)
        self.zero_grad()
        return grad_norm

    # -- checkpoints: the whole AdamW state in torch's own layout -----------------------------------------------
    def _slices(self) -> list[tuple[int, int, int, int]]:
        """(parameter index, start, end, index in the inner optimizer) of every slice this rank owns."""
        offsets, n = [], 0
        for g in self.opt.optimizer.param_groups:
            offsets.append(n)
            n += len(g["params"])
        out = []
        for i, p in enumerate(self.params):
            if p not in self.opt.model_param_group_index_map:
                continue
            gi, go = self.opt.model_param_group_index_map[p]
            r = self.opt._get_model_param_range_map(p)["param"]
            out.append((i, r.start, r.end, offsets[gi] + go))
        return out

    def state_dict(self) -> dict[str, Any]:
        """The AdamW state of every parameter, whole, as ``torch.optim.AdamW(params).state_dict()`` has it (so a
        run resumes with or without the distributed optimizer, on any number of replicas): the slices are
        gathered over the replicas (a collective: every trainer rank calls it)."""
        inner = self.opt.optimizer.state_dict()["state"]
        own = [(i, a, b, inner[k]["exp_avg"].view(-1).cpu(), inner[k]["exp_avg_sq"].view(-1).cpu(),
                float(inner[k]["step"])) for i, a, b, k in self._slices() if k in inner]
        parts: list[Any] = [None] * dist.get_world_size(self.dp_group)
        dist.all_gather_object(parts, own, group=self.dp_group)
        state: dict[int, dict[str, Tensor]] = {}
        for i, a, b, m, v, step in (s for part in parts for s in part):
            p = self.params[i]
            st = state.setdefault(i, {"step": torch.tensor(step, dtype=torch.float32),
                                      "exp_avg": torch.zeros(p.numel()), "exp_avg_sq": torch.zeros(p.numel())})
            st["exp_avg"][a:b], st["exp_avg_sq"][a:b] = m, v
        for i, st in state.items():
            st["exp_avg"] = st["exp_avg"].view_as(self.params[i])
            st["exp_avg_sq"] = st["exp_avg_sq"].view_as(self.params[i])
        # the hyper-parameters as the other path's fused AdamW saves them, so either path loads the file
        template = torch.optim.AdamW([{"params": self.params}], fused=True, **self._hyper).state_dict()
        return {"state": state, "param_groups": template["param_groups"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This rank's slices of a whole AdamW state (``state_dict``'s layout)."""
        saved = state["state"]
        if saved and len(state["param_groups"][0]["params"]) != len(self.params):
            raise ValueError(f"trainer_state.pt's optimizer holds {len(state['param_groups'][0]['params'])} "
                             f"parameters, this model {len(self.params)}; resume with the model.* settings the run "
                             "was started with")
        inner = self.opt.optimizer
        groups = inner.state_dict()["param_groups"]
        own: dict[int, dict[str, Tensor]] = {}
        for i, a, b, k in self._slices():
            if i in saved:
                st = saved[i]
                own[k] = {"step": st["step"].detach().clone().float().reshape(()),
                          "exp_avg": st["exp_avg"].reshape(-1)[a:b].clone(),
                          "exp_avg_sq": st["exp_avg_sq"].reshape(-1)[a:b].clone()}
        inner.load_state_dict({"state": own, "param_groups": groups})

    def state_numel(self) -> int:
        """Elements of AdamW state this rank holds (both moments)."""
        return sum(t.numel() for st in self.opt.optimizer.state.values() for k, t in st.items()
                   if k in ("exp_avg", "exp_avg_sq"))
