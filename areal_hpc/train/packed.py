"""Packed micro-batch log-probs for the trainer: varlen attention, no padding, lm_head only where it counts.

Why: the padded HF forward computes every pad token and the full ``[B, L, V]`` logits, although the
loss needs logits only at the positions that predict response tokens. With a 152k vocabulary the
logits alone cost as much memory as the rest of a 0.5B model's activations. Here the sequences of a
micro-batch run as one token stream through ``PackedQwen2`` (positions restart per sequence,
``causal_varlen`` keeps them apart), the hidden rows that predict response tokens are gathered, and
the lm_head plus log-softmax run on those rows in chunks. With grad, each chunk's logits are
recomputed in backward (a hand-written autograd function), so at most one chunk of logits is alive.

Mixed precision: parameters and AdamW state stay fp32 ("master weights"); the forward runs under
``torch.autocast(bfloat16)`` with a bf16 residual stream, as a bf16 checkpoint would; log-probs and
the loss are fp32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from areal_hpc.model.attention import causal_varlen
from areal_hpc.model.qwen2 import PackedQwen2, check_supported, rms_norm, rope
from areal_hpc.train.packing import PackedMicrobatch

logger = logging.getLogger(__name__)

__all__ = ["LOGITS_CHUNK_BYTES", "PackedLogp", "autocast_for", "resolve_compute_dtype", "resolve_packing",
           "response_logprobs", "set_hf_checkpointing", "split_layer_fn"]

# Upper bound on one chunk of fp32 logits (rows x vocab x 4 bytes): ~430 rows at a 152k vocabulary.
LOGITS_CHUNK_BYTES = 256 << 20

LayerFn = Callable[[int, Tensor, Tensor, Tensor, Callable], Tensor]


def resolve_packing(packing: str, model: torch.nn.Module, device: torch.device) -> str:
    """``auto``: packed on CUDA (padded if the architecture is not Qwen2), padded elsewhere."""
    if packing == "padded":
        return "padded"
    if packing == "auto":
        if device.type != "cuda":
            return "padded"
        try:
            check_supported(model)
        except ValueError as e:
            logger.info("trainer.packing=auto: using padded micro-batches (%s)", e)
            return "padded"
        return "packed"
    if packing != "packed":
        raise ValueError(f"trainer.packing must be auto, packed or padded, got {packing!r}")
    try:
        check_supported(model)
    except ValueError as e:
        kind = getattr(getattr(model, "config", None), "model_type", "?")
        raise ValueError(
            f"trainer.packing=packed needs a Qwen2-architecture model, this one is {kind!r}; "
            f"set trainer.packing=padded (or auto) for other architectures ({e})"
        ) from None
    return "packed"


def resolve_compute_dtype(compute_dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA (tensor cores), fp32 elsewhere (CPU bf16 matmuls are rarely faster)."""
    if compute_dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if compute_dtype not in table:
        raise ValueError(f"trainer.compute_dtype must be auto, float32 or bfloat16, got {compute_dtype!r}")
    return table[compute_dtype]


def autocast_for(device: torch.device, dtype: torch.dtype) -> AbstractContextManager:
    """Autocast to ``dtype`` for a low-precision compute dtype; no-op for fp32 (params stay as they are)."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_hf_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """HF activation checkpointing (non-reentrant) on or off, by this transformers version's spelling."""
    if enabled:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


class _ChunkedHeadLogp(torch.autograd.Function):
    """``log softmax(h @ (W / T).T)[targets]`` chunk by chunk, logits recomputed in backward.

    Why a hand-written backward: autograd through ``token_logprobs`` spends ~10 memory passes per
    chunk on the [rows, vocab] logits (fp32 upcast, logsumexp's max/sub/exp/sum, their grads, casts)
    and re-casts the fp32 lm_head under autocast for every chunk; on a 152k vocabulary that was half
    of a training step. Here a chunk costs one matmul and one log_softmax forward, and in backward one
    matmul, log_softmax, exp, the one-hot add and two matmuls; the weight gradient is summed in fp32.
    """

    @staticmethod
    def forward(ctx, h: Tensor, w_t: Tensor, targets: Tensor, rows: int) -> Tensor:
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for a in range(0, h.shape[0], rows):
            z = h[a:a + rows] @ w_t.T
            out[a:a + rows] = torch.log_softmax(z, -1, dtype=torch.float32).gather(
                -1, targets[a:a + rows, None]).squeeze(-1)
        ctx.save_for_backward(h, w_t, targets)
        ctx.rows = rows
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        h, w_t, targets = ctx.saved_tensors
        gh = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        gw = torch.zeros(w_t.shape, dtype=torch.float32, device=w_t.device) if ctx.needs_input_grad[1] else None
        for a in range(0, h.shape[0], ctx.rows):
            hc, gc, tc = h[a:a + ctx.rows], g[a:a + ctx.rows].float()[:, None], targets[a:a + ctx.rows, None]
            # d logp_t / d z = onehot(t) - softmax(z)
            gz = torch.log_softmax(hc @ w_t.T, -1, dtype=torch.float32).exp_().mul_(-gc)
            gz = gz.scatter_add_(-1, tc, gc).to(h.dtype)
            if gh is not None:
                gh[a:a + ctx.rows] = gz @ w_t
            if gw is not None:
                gw += gz.T @ hc
        return gh, (gw.to(w_t.dtype) if gw is not None else None), None, None


def response_logprobs(h: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                      chunk_bytes: int = LOGITS_CHUNK_BYTES) -> Tensor:
    """fp32 ``log softmax(h @ weight.T / temperature)[targets]`` for rows ``h`` [N, H], chunk by chunk.

    The matmuls run in ``h``'s dtype (the compute dtype); the temperature is folded into one copy of
    the weight, made once per call. No chunk of fp32 logits exceeds ``chunk_bytes``; with grad the
    logits are recomputed in backward instead of kept, so memory does not grow with N x vocab.
    """
    if h.shape[0] == 0:
        return h.new_zeros(0, dtype=torch.float32)
    rows = max(1, chunk_bytes // (4 * weight.shape[0]))
    with torch.autocast(h.device.type, enabled=False):
        w_t = (weight / temperature if temperature != 1.0 else weight).to(h.dtype)
        return _ChunkedHeadLogp.apply(h, w_t, targets.long(), rows)


def split_layer_fn(packed: PackedQwen2, *, compile: bool) -> LayerFn:
    """``PackedQwen2.layer`` as two pure tensor functions around the attention call, optionally compiled.

    Why the split: compiling ``layer`` itself would guard on the layer index (a list index) and on the
    per-micro-batch ``attend`` closure, recompiling 24 times per model and again every micro-batch.
    The pure functions take the weights as arguments, so one compiled graph (dynamic in T) serves
    every layer; attention stays eager (flash varlen is already one kernel). What compile buys is
    fusing the RMSNorms, RoPE, SiLU-gate and residual adds.
    """
    s = packed.shape
    if any(L.w_qkv is not None for L in packed.layers):
        raise ValueError("split_layer_fn expects an unfused PackedQwen2 (fuse=False), as the trainer builds it")

    def pre(x: Tensor, cos: Tensor, sin: Tensor, ln: Tensor, wq: Tensor, bq: Tensor | None, wk: Tensor,
            bk: Tensor | None, wv: Tensor, bv: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        T = x.shape[0]
        h = rms_norm(x, ln, s.eps)
        q = rope(F.linear(h, wq, bq).reshape(T, s.n_heads, s.head_dim), cos, sin)
        k = rope(F.linear(h, wk, bk).reshape(T, s.n_kv_heads, s.head_dim), cos, sin)
        return q, k, F.linear(h, wv, bv).reshape(T, s.n_kv_heads, s.head_dim)

    def post(x: Tensor, o: Tensor, wo: Tensor, ln: Tensor, wg: Tensor, wu: Tensor, wd: Tensor) -> Tensor:
        x = x + F.linear(o.reshape(x.shape[0], s.n_heads * s.head_dim), wo)
        h = rms_norm(x, ln, s.eps)
        return x + F.linear(F.silu(F.linear(h, wg)) * F.linear(h, wu), wd)

    if compile:
        pre = torch.compile(pre, dynamic=True)
        post = torch.compile(post, dynamic=True)

    def layer(i: int, x: Tensor, cos: Tensor, sin: Tensor, attend: Callable) -> Tensor:
        L = packed.layers[i]
        q, k, v = pre(x, cos, sin, L.ln1, L.wq, L.bq, L.wk, L.bk, L.wv, L.bv)
        return post(x, attend(i, q, k, v), L.wo, L.ln2, L.wg, L.wu, L.wd)

    return layer


class PackedLogp:
    """Response-token log-probs of a ``PackedMicrobatch`` through ``PackedQwen2`` over the model's own
    parameters (the optimizer, checkpoints and weight sync keep seeing ordinary HF parameters)."""

    def __init__(self, model: torch.nn.Module, *, compute_dtype: torch.dtype, checkpointing: bool = False,
                 compile: bool = False) -> None:
        check_supported(model)
        self.model = model
        self.device = next(model.parameters()).device
        self.compute_dtype = compute_dtype
        self.checkpointing = checkpointing
        if compile and self.device.type != "cuda":
            logger.warning("trainer.compile=true is for CUDA; ignored on %s", self.device.type)
            compile = False
        self.compile = compile
        self._net: PackedQwen2 | None = None
        self._layer_fn: LayerFn | None = None

    def _ensure(self, max_len: int) -> PackedQwen2:
        """Build (or widen) the RoPE tables lazily: only the packed path pays for them."""
        if self._net is None or self._net.max_positions < max_len:
            n = max(max_len, int(getattr(self.model.config, "max_position_embeddings", 0) or 0))
            self._net = PackedQwen2(self.model, max_positions=n, fuse=False)
            self._layer_fn = split_layer_fn(self._net, compile=True) if self.compile else None
        return self._net

    def __call__(self, mb: PackedMicrobatch, temperature: float) -> Tensor:
        """fp32 log-probs of ``mb.targets``, in ``mb.pred_rows`` order; grad flows iff grad mode is on."""
        net = self._ensure(mb.max_len)

        def attend(_i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return causal_varlen(q, k, v, mb.cu_seqlens, mb.max_len, mb.cu_list)

        with autocast_for(self.device, self.compute_dtype):
            cd = None if self.compute_dtype == torch.float32 else self.compute_dtype
            h = net.hidden(mb.ids, mb.pos, attend, compute_dtype=cd, checkpoint=self.checkpointing,
                           layer_fn=self._layer_fn)
            rows = h.index_select(0, mb.pred_rows).to(cd or h.dtype)  # the final norm's output is fp32
            return response_logprobs(rows, net.lm_head, mb.targets, temperature)
