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
the loss are fp32. (Casting the weights to bf16 once per micro-batch, with every activation in bf16,
measured no faster eager and slower compiled: docs/dev/optimizing-trainer.md.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from areal_hpc.model.attention import bottom_right_varlen, causal_varlen, prefix_causal_varlen, varlen_available
from areal_hpc.model.qwen2 import PackedQwen2, Qwen2Shape, check_supported, rms_norm, rope
from areal_hpc.train.head_kernels import grad_logits_, lse_and_target
from areal_hpc.train.nucleus import log_mass, top_k_mass
from areal_hpc.train.packing import PackedMicrobatch, bucket_tokens, pack_sequences

logger = logging.getLogger(__name__)

__all__ = ["LOGITS_CHUNK_BYTES", "PackedLogp", "autocast_for", "resolve_compute_dtype", "resolve_packing",
           "response_logprobs", "set_hf_checkpointing", "split_layer_fn"]

# Rows of one lm_head chunk: chunk_bytes / (4 x vocab), i.e. its bf16 logits plus their bf16 gradient
# (~1700 rows, 1 GiB, at a 152k vocabulary; bigger chunks: fuller matmuls, fewer fp32 weight-grad adds).
LOGITS_CHUNK_BYTES = 1 << 30
# With grad, the forward's logits are kept for backward (one [rows, hidden] x [hidden, vocab] matmul fewer)
# when they take at most this much and a quarter of the free device memory;
# otherwise they are recomputed chunk by chunk.
LOGITS_KEEP_BYTES = 8 << 30

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


@cache
def _mixed_addmm_works(device: torch.device) -> bool:
    """Whether ``addmm(out=fp32, bf16 @ bf16, out_dtype=fp32)`` accumulates in place here (checked once)."""
    if device.type != "cuda":
        return False
    try:
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(64, 96, device=device, generator=g).bfloat16()
        b = torch.randn(96, 80, device=device, generator=g).bfloat16()
        c = torch.randn(64, 80, device=device, generator=g)
        ref = c + a.float() @ b.float()
        torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
        return bool(((c - ref).norm() / ref.norm()) < 1e-3)
    except (RuntimeError, TypeError):
        return False


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with fp32 ``acc``: in the matmul's epilogue (beta=1) where the library can
    write fp32 from bf16 operands, else a separate add."""
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    elif _mixed_addmm_works(acc.device):
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += (a @ b).to(acc.dtype)


class _ChunkedHeadLogp(torch.autograd.Function):
    """``log softmax(h @ (W / T).T)[targets] - log m``: all rows at once with the logits kept for backward
    when they fit (``keep``), else chunk by chunk with each chunk's logits recomputed in backward.

    Why a hand-written backward: autograd through ``token_logprobs`` spends ~10 memory passes per
    chunk on the [rows, vocab] logits (fp32 upcast, logsumexp's max/sub/exp/sum, their grads, casts)
    and re-casts the fp32 lm_head under autocast for every chunk; on a 152k vocabulary that was half
    of a training step. Here a chunk costs, forward, one matmul and one read of its logits (logsumexp
    and the target logit; the fp32 logsumexp per row is saved), and in backward one matmul, one pass
    that turns the logits into their gradient ``g * (onehot - exp(z - lse))`` in the compute dtype, and
    two matmuls; the weight gradient accumulates in fp32 in the matmul (beta = 1) where possible.
    The two passes are Triton kernels on CUDA (``head_kernels.py``), the gradient written in place.
    Kept logits save the recomputing matmul and turn the chunked matmuls into one each.

    ``m`` is the mass of the top-p nucleus (``train/nucleus.py``; 1 at top_p = 1, and not computed). The
    forward finds it from the logits it already has (a top-k of each chunk; the few rows that need a full
    sort get their logits recomputed); backward treats it as a constant, so backward does not change.
    """

    @staticmethod
    def forward(ctx, h: Tensor, w_t: Tensor, targets: Tensor, rows: int, keep: bool, top_p: float) -> Tensor:
        ctx.rows = rows
        if keep:  # one matmul over every row; the logits stay for backward, which overwrites them
            z = h @ w_t.T
            lse, zt = lse_and_target(z, targets)
            ctx.save_for_backward(h, w_t, targets, lse)
            ctx.kept = z
            if top_p < 1.0:
                return zt - lse - log_mass(*top_k_mass(z, lse, top_p), lambda idx: z[idx], z.shape[1], top_p)
            return zt - lse
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        if top_p < 1.0:
            mass = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
            short = torch.empty(h.shape[0], dtype=torch.bool, device=h.device)
        for a in range(0, h.shape[0], rows):
            z = h[a:a + rows] @ w_t.T
            lse_c, zt = lse_and_target(z, targets[a:a + rows])
            lse[a:a + rows] = lse_c
            out[a:a + rows] = zt - lse_c
            if top_p < 1.0:
                mass[a:a + rows], short[a:a + rows] = top_k_mass(z, lse_c, top_p)
        ctx.save_for_backward(h, w_t, targets, lse)
        ctx.kept = None
        if top_p < 1.0:  # the rows whose nucleus the top-k did not settle: their logits recomputed, then sorted
            out -= log_mass(mass, short, lambda idx: h[idx] @ w_t.T, w_t.shape[0], top_p)
        return out

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None, None]:
        # log m (top_p < 1) is a constant: the gradient is that of log softmax, as at top_p = 1.
        with torch.profiler.record_function("prof:head_bwd"):
            return *_ChunkedHeadLogp._backward(ctx, g), None

    @staticmethod
    def _backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:
        h, w_t, targets, lse = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gw = torch.zeros(w_t.shape, dtype=torch.float32, device=w_t.device) if want_w else None
        g = g.float()
        kept, ctx.kept = ctx.kept, None
        if kept is not None:  # the whole [rows, vocab] gradient in place of the logits: two matmuls in all
            gz = grad_logits_(kept, lse, g, targets)
            gh = gz @ w_t if want_h else None
            if gw is not None:
                _accumulate_mm(gw, gz.T, h)
            return gh, (gw.to(w_t.dtype) if gw is not None else None), None, None, None
        gh = torch.empty_like(h) if want_h else None
        for a in range(0, h.shape[0], ctx.rows):
            b = a + ctx.rows
            hc = h[a:b]
            gz = grad_logits_(hc @ w_t.T, lse[a:b], g[a:b], targets[a:b])
            if gh is not None:
                torch.mm(gz, w_t, out=gh[a:b])
            if gw is not None:
                _accumulate_mm(gw, gz.T, hc)
        return gh, (gw.to(w_t.dtype) if gw is not None else None), None, None, None


def _keep_logits(h: Tensor, vocab: int, keep_bytes: int) -> bool:
    """Keep the forward's logits for backward: with grad, within ``keep_bytes`` and a quarter of free memory."""
    if not torch.is_grad_enabled() or not h.requires_grad or keep_bytes <= 0:
        return False
    need = h.shape[0] * vocab * h.element_size()
    if need > keep_bytes:
        return False
    if h.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(h.device)
        return need <= free // 4
    return True


def response_logprobs(h: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                      chunk_bytes: int = LOGITS_CHUNK_BYTES, keep_bytes: int = LOGITS_KEEP_BYTES, *,
                      top_p: float = 1.0) -> Tensor:
    """fp32 ``log softmax(h @ weight.T / temperature)[targets]`` for rows ``h`` [N, H], chunk by chunk, less
    the log of the top-p nucleus mass when ``top_p < 1`` (the distribution the rollout sampled from).

    The matmuls run in ``h``'s dtype (the compute dtype); the temperature is folded into one copy of
    the weight, made once per call. A chunk holds ``chunk_bytes / (4 * vocab)`` rows (a multiple of
    128 when that is >= 512, so the matmul tiles are full): its logits and, in backward, their
    gradient, each in the compute dtype (for fp32, the chunk's logits alone). With grad the logits are
    kept for backward when they take at most ``keep_bytes`` (and a quarter of the free device memory),
    else recomputed there, so memory does not grow with N x vocab.
    """
    if h.shape[0] == 0:
        return h.new_zeros(0, dtype=torch.float32)
    rows = max(1, chunk_bytes // (4 * weight.shape[0]))
    if rows >= 512:
        rows -= rows % 128
    with torch.autocast(h.device.type, enabled=False):
        w_t = (weight / temperature if temperature != 1.0 else weight).to(h.dtype)
        with torch.profiler.record_function("prof:head_fwd"):
            return _ChunkedHeadLogp.apply(h, w_t, targets.long(), rows, _keep_logits(h, weight.shape[0], keep_bytes),
                                          top_p)


def _allow_recompiles(n: int) -> None:
    """Let Dynamo keep ``n`` graphs per compiled function (default 8, after which it falls back to
    eager for good). Process-wide by Dynamo's design; only ever raised here."""
    import torch._dynamo.config as dc

    name = "recompile_limit" if hasattr(dc, "recompile_limit") else "cache_size_limit"
    setattr(dc, name, max(getattr(dc, name), n))


def split_layer_fn(packed: PackedQwen2, *, compile: bool, dynamic: bool | None = True,
                   mode: str | None = None, backend: str = "inductor") -> LayerFn:
    """``PackedQwen2.layer`` as two pure tensor functions around the attention call, optionally compiled.

    Why the split: compiling ``layer`` itself would guard on the layer index (a list index) and on the
    per-micro-batch ``attend`` closure, recompiling 24 times per model and again every micro-batch.
    The pure functions take the weights as arguments, so one compiled graph (dynamic in T, or one
    per stream length with ``dynamic=False``) serves every layer; attention stays eager (flash varlen
    is already one kernel). What compile buys is fusing the RMSNorms, RoPE, SiLU-gate and residual adds.
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
        pre = torch.compile(pre, dynamic=dynamic, mode=mode, backend=backend)
        post = torch.compile(post, dynamic=dynamic, mode=mode, backend=backend)

    def layer(i: int, x: Tensor, cos: Tensor, sin: Tensor, attend: Callable) -> Tensor:
        L = packed.layers[i]
        q, k, v = pre(x, cos, sin, L.ln1, L.wq, L.bq, L.wk, L.bk, L.wv, L.bv)
        return post(x, attend(i, q, k, v), L.wo, L.ln2, L.wg, L.wu, L.wd)

    return layer


def _shared_prompt_attend(mb: PackedMicrobatch) -> Callable[[int, Tensor, Tensor, Tensor], Tensor]:
    """Attention over a ``pack_shared`` stream: prompts (and padding) causally within themselves, then each
    response over its group's prompt rows and its own (gathered keys; backward sums into the prompt's)."""
    L = mb.prefix

    def attend(_i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n = L.n_self
        own = causal_varlen(q[:n], k[:n], v[:n], mb.cu_seqlens, L.max_self, mb.cu_list)
        kk, vv = k.index_select(0, L.kv_index), v.index_select(0, L.kv_index)
        resp = prefix_causal_varlen(q[n:], kk, vv, L.cu_q, L.cu_k, L.max_q, L.max_k, L.cu_q_list, L.cu_k_list)
        return torch.cat([own, resp])

    return attend


class PackedLogp:
    """Response-token log-probs of a ``PackedMicrobatch`` through ``PackedQwen2`` over the model's own
    parameters (the optimizer, checkpoints and weight sync keep seeing ordinary HF parameters)."""

    def __init__(self, model: torch.nn.Module, *, compute_dtype: torch.dtype, checkpointing: bool = False,
                 compile: bool = False, token_bucket: int = 0, max_tokens: int = 0) -> None:
        check_supported(model)
        self.model = model
        self.device = next(model.parameters()).device
        self.compute_dtype = compute_dtype
        self.checkpointing = checkpointing
        if compile and self.device.type != "cuda":
            logger.warning("trainer.compile=true is for CUDA; ignored on %s", self.device.type)
            compile = False
        self.compile = compile
        # token_bucket > 0: the engine pads every micro-batch to a multiple of it, so the compiled
        # layers specialise to those few stream lengths (dynamic=False: one graph per bucket and grad
        # mode, faster kernels than the dynamic-length graph: docs/dev/optimizing-trainer.md).
        self.buckets = [] if token_bucket <= 0 else list(
            range(token_bucket, bucket_tokens(max(max_tokens, 1), token_bucket) + 1, token_bucket))
        self.compile_dynamic: bool | None = token_bucket <= 0
        self.compile_mode: str | None = None  # bench knob: inductor modes
        self.compile_backend = "inductor"  # tests: "eager" checks the graph count without inductor
        self._net: PackedQwen2 | None = None
        self._layer_fn: LayerFn | None = None

    def _ensure(self, max_len: int) -> PackedQwen2:
        """Build (or widen) the RoPE tables lazily: only the packed path pays for them."""
        if self._net is None or self._net.max_positions < max_len:
            n = max(max_len, int(getattr(self.model.config, "max_position_embeddings", 0) or 0))
            self._net = PackedQwen2(self.model, max_positions=n, fuse=False)
            if self.compile and not self.compile_dynamic:  # a graph per bucket and grad mode
                _allow_recompiles(2 * max(len(self.buckets), 8))
            self._layer_fn = split_layer_fn(self._net, compile=True, dynamic=self.compile_dynamic,
                                            mode=self.compile_mode, backend=self.compile_backend) \
                if self.compile else None
        return self._net

    def shared_prompts_fast(self) -> bool:
        """Whether shared-prompt streams run at flash speed here. On CUDA that needs the flash varlen op to
        align causality at the bottom right (checked once); where it does not, the trainer keeps one prompt
        copy per sample rather than attend through the per-segment SDPA fallback. Elsewhere SDPA runs
        either way."""
        if not varlen_available(self.device, self.compute_dtype):
            return True
        s = Qwen2Shape.of(self.model.config)
        ok = bottom_right_varlen(self.device, self.compute_dtype, s.n_heads, s.n_kv_heads, s.head_dim)
        if not ok:
            logger.warning("trainer.share_prompts: off here (flash varlen cannot attend a shared prompt); every "
                           "sample carries its own prompt")
        return ok

    def precompile(self, temperature: float, *, no_grad: bool = True) -> int:
        """Compile every bucket's graphs now (with grad, and without unless ``no_grad=False``) on a dummy
        stream of that length.

        Why: a bucket seen first in the middle of a run would stall that step for the compile (seconds
        per bucket); done here, before the first batch, the run's steps time what they compute. The
        no-grad graphs serve only a separate proximal pass (trainer.proximal_logp=recompute).
        Leaves gradients on the parameters: the caller clears them. Returns the buckets compiled.
        """
        if not (self.compile and self.buckets):
            return 0
        piece = min(512, self._ensure(0).max_positions)
        vocab = self._net.shape.vocab
        rng = np.random.default_rng(0)
        for T in self.buckets:
            lens = [piece] * (T // piece) + ([T % piece] if T % piece else [])
            if len(lens) > 1 and lens[-1] < 2:
                lens[-2:] = [lens[-2] + lens[-1]]
            seqs = [rng.integers(0, vocab, n) for n in lens]
            mb = pack_sequences([x[:1] for x in seqs], [x[1:] for x in seqs], self.device)
            self(mb, temperature).sum().backward()
            if no_grad:
                with torch.no_grad():
                    self(mb, temperature)
        return len(self.buckets)

    def __call__(self, mb: PackedMicrobatch, temperature: float, top_p: float = 1.0) -> Tensor:
        """fp32 log-probs of ``mb.targets`` under the temperature and top-p the rollout sampled with, in
        ``mb.pred_rows`` order; grad flows iff grad mode is on."""
        net = self._ensure(mb.max_len)

        def attend(_i: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return causal_varlen(q, k, v, mb.cu_seqlens, mb.max_len, mb.cu_list)

        if mb.prefix is not None:
            attend = _shared_prompt_attend(mb)
        with autocast_for(self.device, self.compute_dtype):
            cd = None if self.compute_dtype == torch.float32 else self.compute_dtype
            h = net.hidden(mb.ids, mb.pos, attend, compute_dtype=cd, checkpoint=self.checkpointing,
                           layer_fn=self._layer_fn)
            rows = h.index_select(0, mb.pred_rows).to(cd or h.dtype)  # the final norm's output is fp32
            return response_logprobs(rows, net.lm_head, mb.targets, temperature, top_p=top_p)
