"""The shared decoder layers of every family (litgpt style): one layer class, options per family.

The options are fields of `BlockTransformerConfig` (blockformer/model.py), set per family by the adapter table in
blockformer/families.py. `model.py` builds the Block Transformer's three parts from these layers.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

if TYPE_CHECKING:
    from .model import BlockTransformerConfig


class RMSNorm(nn.Module):
    """RMS norm scaled by `offset + weight`: Gemma stores w - 1 (offset 1), everyone else w (offset 0)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight, self.eps, self.offset = nn.Parameter(torch.ones(dim) - offset), eps, offset

    def forward(self, x):
        # float32 statistics, as every Llama-family reference does, so bf16 runs match them
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:  # Gemma scales in float32, then casts (transformers PR 29402)
            return (h * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: BlockTransformerConfig, dim: int | None = None, bias: bool | None = None) -> nn.Module:
    """The family's norm over `dim` channels (default: hidden size); q/k norms pass head sizes."""
    dim = dim or cfg.hidden_size
    if cfg.norm_type == "rms":
        return RMSNorm(dim, cfg.norm_eps, cfg.norm_offset)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.norm_bias if bias is None else bias)


class PerHeadNorm(nn.Module):
    """StableLM's qk_layernorm: a LayerNorm without bias per head, its gains stacked as `weight` (H, hd)."""

    def __init__(self, cfg: BlockTransformerConfig, n_heads: int):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(n_heads, cfg.head_dim)), cfg.norm_eps

    def forward(self, x):  # (B, H, T, hd)
        return F.layer_norm(x, x.shape[-1:], eps=self.eps) * self.weight[:, None, :]


def make_qk_norms(cfg: BlockTransformerConfig):
    """(q_norm, k_norm) of `cfg.qk_norm`: head = one norm over head_dim shared by the heads (Qwen3, Gemma 3, Phi);
    full = over all heads' channels before the head split (OLMo2); per_head = a norm per head (StableLM)."""
    nq, nk, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    if cfg.qk_norm is None:
        return None, None
    if cfg.qk_norm == "head":
        return make_norm(cfg, hd), make_norm(cfg, hd)
    if cfg.qk_norm == "full":
        return make_norm(cfg, nq * hd), make_norm(cfg, nk * hd)
    if cfg.qk_norm == "per_head":
        return PerHeadNorm(cfg, nq), PerHeadNorm(cfg, nk)
    raise ValueError(f"unknown qk_norm {cfg.qk_norm!r}")


class Rotary(nn.Module):
    """cos/sin tables for rotary embeddings; `rotary_dim` may cover only part of a head (GPT-NeoX)."""

    def __init__(self, cfg: BlockTransformerConfig, local: bool = False):
        super().__init__()
        self.local = local  # tables of `cfg.local_rope` (windowed layers of Gemma 3)
        inv_freq, self.scale = rope_inv_freq(cfg, local)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.interleaved = cfg.rotary_interleaved

    def forward(self, pos: torch.Tensor, dtype):  # pos: (B, T) -> cos, sin: (B, 1, T, rotary_dim)
        freqs = pos[..., None].float() * self.inv_freq.to(pos.device)
        # GPT-J rotates channel pairs (2i, 2i+1): frequency i repeats in place instead of in two halves
        emb = (freqs.repeat_interleave(2, -1) if self.interleaved else torch.cat((freqs, freqs), dim=-1))[:, None]
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def rope_inv_freq(cfg: BlockTransformerConfig, local: bool = False):
    rope = cfg.local_rope if local else cfg.rope
    dim = int(cfg.head_dim * rope.get("partial_rotary_factor", 1.0))
    if rope.get("rope_type", "default") == "default":
        return 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
    # scaled variants (llama3, linear, yarn, ...): let transformers compute them from the original config
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    base = AutoConfig.for_model(**cfg.base_config)
    if "full_attention" in (getattr(base, "rope_parameters", None) or {}):  # rope per layer type (Gemma 3)
        return ROPE_INIT_FUNCTIONS[rope["rope_type"]](base, layer_type="sliding_attention" if local else
                                                      "full_attention")
    return ROPE_INIT_FUNCTIONS[rope["rope_type"]](base)


def apply_rotary(x, cos, sin, interleaved=False):  # x: (B, H, T, hd); rotates the first rotary_dim channels
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    if interleaved:  # GPT-J: pairs (2i, 2i+1) -> (-x_{2i+1}, x_{2i})
        turned = torch.stack((-x_rot[..., 1::2], x_rot[..., 0::2]), dim=-1).flatten(-2)
    else:
        turned = torch.cat((-x_rot[..., rd // 2:], x_rot[..., : rd // 2]), dim=-1)
    rotated = x_rot * cos + turned * sin
    return torch.cat((rotated, x_pass), dim=-1) if x_pass.shape[-1] else rotated


class KVCache(nn.Module):
    """Preallocated per-layer cache written in place at `pos` (gpt-fast style): no reallocation per step."""

    def __init__(self, batch: int, n_kv: int, length: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, pos: torch.Tensor, k, v):  # pos: (T,) absolute slots, shared by the batch
        self.k.index_copy_(2, pos, k)
        self.v.index_copy_(2, pos, v)
        return self.k, self.v


class Attention(nn.Module):
    def __init__(self, cfg: BlockTransformerConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q = nn.Linear(cfg.hidden_size, self.n_head * self.hd, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o = nn.Linear(self.n_head * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        self.cache: KVCache | None = None
        self.interleaved = cfg.rotary_interleaved
        self.q_norm, self.k_norm = make_qk_norms(cfg)
        self.qk_full = cfg.qk_norm == "full"
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else self.hd ** -0.5
        self.softcap = cfg.attn_softcap

    def forward(self, x, rope, mask, cache_at=None):  # x: (B, T, D); mask: (B, 1, T, S) bool, True = attend; None:
        #                                               causal (T = S)
        B, T, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.qk_full:  # OLMo2: over all heads' channels, before the head split
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv, self.hd).transpose(1, 2)    # (B, H_kv, T, hd)
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if self.q_norm is not None and not self.qk_full:  # over head_dim (head) or one norm per head (per_head)
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope, self.interleaved), apply_rotary(k, *rope, self.interleaved)
        if cache_at is not None:  # (slots to write, slots to attend): generation's preallocated cache
            k, v = self.cache.update(cache_at[0], k, v)
            k, v = k[:, :, : cache_at[1]], v[:, :, : cache_at[1]]        # (B, H_kv, S, hd)
        if mask is None:  # plain causal over a square window (a full forward or a prefill from slot 0)
            assert q.shape[2] == k.shape[2], "a mask of None means causal attention over the same positions"
        if self.softcap is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                               enable_gqa=self.n_kv != self.n_head)
        else:
            if mask is None:
                mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
            y = softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


def softcapped_attention(q, k, v, mask, scale: float, cap: float):
    """Eager attention whose scores become cap * tanh(scores / cap) before the mask (Gemma 2); SDPA cannot cap."""
    rep = q.shape[1] // k.shape[1]  # grouped-query heads: query head h reads kv head h // rep
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * scale
    s = (cap * torch.tanh(s / cap)).masked_fill(~mask, float("-inf"))
    return s.softmax(-1, dtype=torch.float32).to(q.dtype) @ v


class MLP(nn.Module):
    def __init__(self, cfg: BlockTransformerConfig):
        super().__init__()
        D, I, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gated = cfg.mlp_type == "gated"
        if self.gated:
            self.gate, self.up = nn.Linear(D, I, bias=bias), nn.Linear(D, I, bias=bias)
        else:
            self.up = nn.Linear(D, I, bias=bias)
        self.down, self.act = nn.Linear(I, D, bias=bias), ACT2FN[cfg.hidden_act]

    def forward(self, x):
        h = self.act(self.gate(x)) * self.up(x) if self.gated else self.act(self.up(x))
        return self.down(h)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: BlockTransformerConfig, window: int | None = None, local: bool = False):
        super().__init__()
        # this layer's sliding window (in its stack's positions; None = global) and rope tables (local or global)
        self.window, self.local = window, local
        pre, post = cfg.norm_placement != "post", cfg.norm_placement in ("sandwich", "post")
        self.norm1, self.attn, self.mlp = make_norm(cfg) if pre else nn.Identity(), Attention(cfg), MLP(cfg)
        # Phi, GPT-J, Falcon-7B: the parallel branches read one norm, so there is no second one
        self.norm2 = None if cfg.parallel_residual and cfg.shared_norm else make_norm(cfg) if pre else nn.Identity()
        # Gemma 2/3 (sandwich) and OLMo2 (post): each branch's output is normalised before the residual add
        self.post_norm1, self.post_norm2 = (make_norm(cfg), make_norm(cfg)) if post else (nn.Identity(), nn.Identity())
        self.parallel = cfg.parallel_residual

    def forward(self, x, rope, mask, cache_at=None):
        h = self.norm1(x)
        a = self.post_norm1(self.attn(h, rope, mask, cache_at))
        if self.parallel:  # GPT-NeoX: both branches read the same input
            return x + a + self.post_norm2(self.mlp(h if self.norm2 is None else self.norm2(x)))
        x = x + a
        return x + self.post_norm2(self.mlp(self.norm2(x)))


class Stack(nn.Module):
    """Decoder layers plus the position scheme of the family (rotary or learned absolute)."""

    def __init__(self, cfg: BlockTransformerConfig, n_layers: int, windows: list | None = None):
        super().__init__()
        windows = list(windows or [None] * n_layers)  # per layer, in this stack's positions
        if len(windows) != n_layers:
            raise ValueError(f"{len(windows)} sliding windows for {n_layers} layers")
        local = bool(cfg.rope and cfg.local_rope)      # windowed layers use their own rope (Gemma 3)
        self.layers = nn.ModuleList(DecoderLayer(cfg, w, local and w is not None) for w in windows)
        self.rotary = Rotary(cfg) if cfg.rope else None
        self.local_rotary = Rotary(cfg, local=True) if local and any(w is not None for w in windows) else None
        self.wpe = Positions(cfg) if cfg.learned_positions else None
        self.kv_heads, self.head_dim = cfg.num_key_value_heads, cfg.head_dim

    def run(self, x, pos, mask, cache_at=None):  # x: (B, T, D); pos: (B, T)
        return self.run_layers(x, self.ropes(pos, x.dtype), self.masks(mask, pos, pos), cache_at)

    def ropes(self, pos, dtype) -> dict:
        """{local?: (cos, sin) or None}: the rope tables of global and windowed layers at positions `pos`."""
        return {False: self.rotary(pos, dtype) if self.rotary is not None else None,
                True: self.local_rotary(pos, dtype) if self.local_rotary is not None else None}

    def masks(self, mask, qpos, kpos) -> dict:
        """{window: mask}: `mask` (B, 1, T, S) narrowed to q - k < window, once per distinct window (not per layer).

        qpos (B or 1, T) and kpos (B or 1, S) are the positions of queries and keys; the diagonal stays open."""
        out = {None: mask}
        for w in {layer.window for layer in self.layers} - {None}:
            dist = qpos[:, None, :, None] - kpos[:, None, None, :]
            out[w] = (dist >= 0 if mask is None else mask) & (dist < w)  # None: plain causal, made explicit here
        return out

    def setup_cache(self, batch: int, length: int, dtype, device) -> None:
        """Preallocate every layer's KV cache for `length` slots (generation); `release_cache` drops them."""
        for layer in self.layers:
            layer.attn.cache = KVCache(batch, self.kv_heads, length, self.head_dim, dtype, device)

    def release_cache(self) -> None:
        for layer in self.layers:
            layer.attn.cache = None

    def run_layers(self, x, ropes: dict, masks: dict, cache_at=None):
        for layer in self.layers:
            x = layer(x, ropes[layer.local], masks[layer.window], cache_at)
        return x


class Positions(nn.Embedding):
    """Learned absolute positions; position p reads row p + position_offset (OPT keeps 2 unused rows first)."""

    def __init__(self, cfg: BlockTransformerConfig):
        self.offset = cfg.position_offset
        super().__init__(cfg.max_position_embeddings + self.offset, cfg.hidden_size)

    def forward(self, pos):
        return super().forward(pos + self.offset)

    def rows(self, start: int, n: int):  # positions start .. start + n - 1
        return self.weight[self.offset + start: self.offset + start + n]


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, T) key validity -> (B, 1, T, T) causal mask; the diagonal stays open so pad queries never NaN."""
    T = valid.shape[-1]
    tri = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    return ((tri & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=valid.device))[:, None]
