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
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        # float32 statistics, as every Llama-family reference does, so bf16 runs match them
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: BlockTransformerConfig) -> nn.Module:
    if cfg.norm_type == "rms":
        return RMSNorm(cfg.hidden_size, cfg.norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps, bias=cfg.norm_bias)


class Rotary(nn.Module):
    """cos/sin tables for rotary embeddings; `rotary_dim` may cover only part of a head (GPT-NeoX)."""

    def __init__(self, cfg: BlockTransformerConfig):
        super().__init__()
        inv_freq, self.scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, pos: torch.Tensor, dtype):  # pos: (B, T) -> cos, sin: (B, 1, T, rotary_dim)
        freqs = pos[..., None].float() * self.inv_freq.to(pos.device)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def rope_inv_freq(cfg: BlockTransformerConfig):
    rope = cfg.rope
    dim = int(cfg.head_dim * rope.get("partial_rotary_factor", 1.0))
    if rope.get("rope_type", "default") == "default":
        return 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
    # scaled variants (llama3, linear, yarn, ...): let transformers compute them from the original config
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    base = AutoConfig.for_model(**cfg.base_config)
    return ROPE_INIT_FUNCTIONS[rope["rope_type"]](base)


def apply_rotary(x, cos, sin):  # x: (B, H, T, hd); rotates the first rotary_dim channels
    rd = cos.shape[-1]
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    x1, x2 = x_rot[..., : rd // 2], x_rot[..., rd // 2:]
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
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

    def forward(self, x, rope, mask, cache_at=None):  # x: (B, T, D); mask: (B, 1, T, S) bool, True = attend
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)    # (B, H_kv, T, hd)
        v = self.v(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache_at is not None:  # (slots to write, slots to attend): generation's preallocated cache
            k, v = self.cache.update(cache_at[0], k, v)
            k, v = k[:, :, : cache_at[1]], v[:, :, : cache_at[1]]        # (B, H_kv, S, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_head)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))


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
    def __init__(self, cfg: BlockTransformerConfig):
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = make_norm(cfg), Attention(cfg), make_norm(cfg), MLP(cfg)
        self.parallel = cfg.parallel_residual

    def forward(self, x, rope, mask, cache_at=None):
        a = self.attn(self.norm1(x), rope, mask, cache_at)
        if self.parallel:  # GPT-NeoX: both branches read the same input
            return x + a + self.mlp(self.norm2(x))
        x = x + a
        return x + self.mlp(self.norm2(x))


class Stack(nn.Module):
    """Decoder layers plus the position scheme of the family (rotary or learned absolute)."""

    def __init__(self, cfg: BlockTransformerConfig, n_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(n_layers))
        self.rotary = Rotary(cfg) if cfg.rope else None
        self.wpe = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size) if cfg.learned_positions else None

    def run(self, x, pos, mask, cache_at=None):  # x: (B, T, D); pos: (B, T)
        rope = self.rotary(pos, x.dtype) if self.rotary is not None else None
        return self.run_layers(x, rope, mask, cache_at)

    def run_layers(self, x, rope, mask, cache_at=None):
        for layer in self.layers:
            x = layer(x, rope, mask, cache_at)
        return x


def causal_mask(valid: torch.Tensor) -> torch.Tensor:
    """(B, T) key validity -> (B, 1, T, T) causal mask; the diagonal stays open so pad queries never NaN."""
    T = valid.shape[-1]
    tri = torch.ones(T, T, dtype=torch.bool, device=valid.device).tril()
    return ((tri & valid[:, None, :]) | torch.eye(T, dtype=torch.bool, device=valid.device))[:, None]
