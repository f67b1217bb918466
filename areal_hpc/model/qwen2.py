"""Qwen2-architecture forward (Llama-family checkpoints too) on packed token streams, over an HF model's own
parameters.

Why not HF's forward: it pads every batch into a rectangle, allocates a cache object per call and
launches many small kernels, which is what keeps ``generate()`` far from the memory roofline. This
forward takes tokens of many sequences concatenated (``[T]`` ids with their positions) and an
``attend`` callback, so the same code serves packed training (varlen attention, no padding),
prefill into a KV cache, and single-token decode inside a CUDA graph. It reads the parameters of an
``AutoModelForCausalLM`` by name, so checkpoints, weight sync and the trainer's optimizer see the
ordinary HF parameters.

``fuse=True`` (inference) lays q/k/v and gate/up weights out in one tensor each and re-points the HF
parameters at views of it: one matmul instead of three, and an in-place weight update by HF name
still lands in the fused storage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

# attend(layer, q [T, Hq, D], k [T, Hkv, D], v [T, Hkv, D]) -> [T, Hq, D]
AttendFn = Callable[[int, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class Qwen2Shape:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    rope_theta: float

    @classmethod
    def of(cls, config) -> Qwen2Shape:
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        heads = config.num_attention_heads
        return cls(config.num_hidden_layers, config.hidden_size, heads,
                   getattr(config, "num_key_value_heads", None) or heads,
                   getattr(config, "head_dim", None) or config.hidden_size // heads,
                   config.intermediate_size, config.vocab_size, config.rms_norm_eps, float(theta))

    def matmul_params(self) -> int:
        """Parameters that take part in a matmul per token (the lm_head included, embeddings not)."""
        h, d = self.hidden, self.head_dim
        attn = h * self.n_heads * d * 2 + h * self.n_kv_heads * d * 2
        return self.n_layers * (attn + 3 * h * self.intermediate) + h * self.vocab


SUPPORTED = ("qwen2", "qwen2_5", "llama")  # model_type values this forward implements


def check_supported(model: torch.nn.Module) -> None:
    """Qwen2, and Llama-family checkpoints (SmolLM2, Llama 2/3 without RoPE scaling): the same block with
    q/k/v biases optional. What the forward does not implement (scaled RoPE, o_proj/MLP biases, another
    activation) is named, so a checkpoint never runs silently wrong."""
    config = model.config
    kind = getattr(config, "model_type", "?")
    if kind not in SUPPORTED:
        raise ValueError(
            f"the packed forward implements the Qwen2 and Llama architectures, this model is {kind!r}; "
            "use rollout.engine=hf and trainer.packing=padded for other architectures"
        )
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    unsupported = []
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        unsupported.append(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}")
    if getattr(config, "mlp_bias", False):
        unsupported.append("MLP biases")
    if kind == "llama" and getattr(config, "attention_bias", False):
        unsupported.append("attention biases")
    if getattr(config, "hidden_act", "silu") != "silu":
        unsupported.append(f"activation {config.hidden_act!r}")
    if unsupported:
        raise ValueError(f"the packed forward does not implement this {kind} checkpoint's {', '.join(unsupported)}; "
                         "use rollout.engine=hf and trainer.packing=padded")


class _Layer:
    def __init__(self, p: dict[str, Tensor], i: int) -> None:
        pre = f"model.layers.{i}."
        self.ln1 = p[pre + "input_layernorm.weight"]
        self.ln2 = p[pre + "post_attention_layernorm.weight"]
        a = pre + "self_attn."
        self.wq, self.wk, self.wv = (p[a + f"{n}_proj.weight"] for n in "qkv")
        self.bq, self.bk, self.bv = (p.get(a + f"{n}_proj.bias") for n in "qkv")
        self.wo = p[a + "o_proj.weight"]
        m = pre + "mlp."
        self.wg, self.wu, self.wd = p[m + "gate_proj.weight"], p[m + "up_proj.weight"], p[m + "down_proj.weight"]
        self.w_qkv: Tensor | None = None
        self.b_qkv: Tensor | None = None
        self.w_gu: Tensor | None = None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """As HF Qwen2: normalise in fp32, scale in the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


def rope_cache(max_positions: int, head_dim: int, theta: float, device: torch.device) -> tuple[Tensor, Tensor]:
    """fp32 cos and sin tables [max_positions, head_dim] in HF's rotate-half layout."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device=device), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def split_qkv_rope(qkv: Tensor, cos: Tensor, sin: Tensor, n_heads: int, n_kv: int,
                   head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """q and k (roped) and v, as [T, heads, head_dim], from a fused q/k/v projection's output [T, ...]."""
    T = qkv.shape[0]
    q, k, v = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], -1)
    return (rope(q.reshape(T, n_heads, head_dim), cos, sin), rope(k.reshape(T, n_kv, head_dim), cos, sin),
            v.reshape(T, n_kv, head_dim))


class PackedQwen2:
    def __init__(self, model: torch.nn.Module, *, max_positions: int, fuse: bool = False) -> None:
        check_supported(model)
        self.model = model
        self.shape = s = Qwen2Shape.of(model.config)
        p = dict(model.named_parameters())
        self.embed = p["model.embed_tokens.weight"]
        self.norm = p["model.norm.weight"]
        self.lm_head = model.get_output_embeddings().weight
        self.layers = [_Layer(p, i) for i in range(s.n_layers)]
        if fuse:
            self._fuse()
        self._cos, self._sin = rope_cache(max_positions, s.head_dim, s.rope_theta, self.embed.device)
        self.max_positions = max_positions

    @torch.no_grad()
    def _fuse(self) -> None:
        for L in self.layers:
            L.w_qkv = torch.cat([L.wq, L.wk, L.wv])
            n = [L.wq.shape[0], L.wk.shape[0], L.wv.shape[0]]
            for w, view in zip((L.wq, L.wk, L.wv), L.w_qkv.split(n)):
                w.data = view
            if L.bq is not None:
                L.b_qkv = torch.cat([L.bq, L.bk, L.bv])
                for b, view in zip((L.bq, L.bk, L.bv), L.b_qkv.split(n)):
                    b.data = view
            L.w_gu = torch.cat([L.wg, L.wu])
            for w, view in zip((L.wg, L.wu), L.w_gu.split([L.wg.shape[0], L.wu.shape[0]])):
                w.data = view

    def rope_tables(self, pos: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return self._cos[pos].to(dtype)[:, None, :], self._sin[pos].to(dtype)[:, None, :]

    def layer(self, i: int, x: Tensor, cos: Tensor, sin: Tensor, attend: AttendFn) -> Tensor:
        s, L = self.shape, self.layers[i]
        T = x.shape[0]
        h = rms_norm(x, L.ln1, s.eps)
        if L.w_qkv is not None:
            qkv = F.linear(h, L.w_qkv, L.b_qkv)
            q, k, v = qkv.split([s.n_heads * s.head_dim, s.n_kv_heads * s.head_dim, s.n_kv_heads * s.head_dim], -1)
        else:
            q, k, v = F.linear(h, L.wq, L.bq), F.linear(h, L.wk, L.bk), F.linear(h, L.wv, L.bv)
        q = rope(q.reshape(T, s.n_heads, s.head_dim), cos, sin)
        k = rope(k.reshape(T, s.n_kv_heads, s.head_dim), cos, sin)
        v = v.reshape(T, s.n_kv_heads, s.head_dim)
        o = attend(i, q, k, v)
        x = x + F.linear(o.reshape(T, s.n_heads * s.head_dim), L.wo)
        h = rms_norm(x, L.ln2, s.eps)
        if L.w_gu is not None:
            g, u = F.linear(h, L.w_gu).chunk(2, dim=-1)
        else:
            g, u = F.linear(h, L.wg), F.linear(h, L.wu)
        return x + F.linear(F.silu(g) * u, L.wd)

    def hidden(self, ids: Tensor, pos: Tensor, attend: AttendFn, *, compute_dtype: torch.dtype | None = None,
               checkpoint: bool = False, layer_fn: Callable | None = None) -> Tensor:
        """Final-norm hidden states [T, H] of packed tokens ``ids`` [T] at positions ``pos`` [T].

        ``layer_fn`` replaces ``self.layer`` (a compiled version of it, say).
        """
        x = F.embedding(ids, self.embed)
        if compute_dtype is not None:
            x = x.to(compute_dtype)
        cos, sin = self.rope_tables(pos, x.dtype)
        fn = layer_fn or self.layer
        for i in range(self.shape.n_layers):
            if checkpoint and torch.is_grad_enabled():
                x = _checkpoint(fn, i, x, cos, sin, attend, use_reentrant=False)
            else:
                x = fn(i, x, cos, sin, attend)
        return rms_norm(x, self.norm, self.shape.eps)

    def logits(self, h: Tensor) -> Tensor:
        return F.linear(h, self.lm_head)
