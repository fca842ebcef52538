"""The one place where model families differ: how to read their config and where their weights live.

Each entry maps a Hugging Face `model_type` to
  * `arch(hf_config)` -> the generic layer fields of `BlockTransformerConfig`;
  * the names of the embeddings, final norm, LM head, learned positions and the layer list;
  * `layer`: our per-layer tensor name -> (their per-layer tensor name, transform).
Transforms split fused QKV matrices and undo GPT-2's transposed Conv1D layout.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import BlockformerError


@dataclass(frozen=True)
class Family:
    name: str
    arch: Callable
    layers: str
    embed: str
    final_norm: str
    head: str
    layer: dict = field(default_factory=dict)
    wpe: str | None = None


def _rope(cfg) -> dict:
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    rope.setdefault("rope_type", "default")
    if rope["rope_type"] in ("dynamic", "longrope"):
        raise BlockformerError(f"rope type '{rope['rope_type']}' changes with sequence length; not supported yet")
    return rope


def _check_no_sliding_window(cfg) -> None:
    """Refuse sliding-window attention that would bite: the converted model attends to the whole context.

    Mistral slides in every layer when `sliding_window` is set; Qwen2 only with `use_sliding_window`, and then only
    in the layers transformers marks "sliding_attention" (from `max_window_layers` on). A window at least as long
    as the model's positions never masks anything, so it converts exactly.
    """
    window, n_pos = getattr(cfg, "sliding_window", None), getattr(cfg, "max_position_embeddings", None)
    types = getattr(cfg, "layer_types", None) or ["sliding_attention"] * cfg.num_hidden_layers
    sliding = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if window is None or not sliding or (n_pos is not None and window >= n_pos):
        return
    option = "use_sliding_window and " if hasattr(cfg, "use_sliding_window") else ""
    raise BlockformerError(f"sliding-window attention ({option}sliding_window={window}, shorter than "
                           f"max_position_embeddings={n_pos}, in layers {sliding[0]}-{sliding[-1]}) is not supported "
                           f"yet: the converted model would attend to the whole context")


def _llama_arch(cfg) -> dict:
    _check_no_sliding_window(cfg)
    bias = getattr(cfg, "attention_bias", False)
    qwen = cfg.model_type == "qwen2"  # Qwen2 has bias on q, k, v but not on o
    return dict(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads,
                head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                intermediate_size=cfg.intermediate_size, norm_type="rms", norm_eps=cfg.rms_norm_eps,
                mlp_type="gated", hidden_act=cfg.hidden_act, qkv_bias=bias or qwen, o_bias=bias and not qwen,
                mlp_bias=getattr(cfg, "mlp_bias", False), rope=_rope(cfg))


def _neox_arch(cfg) -> dict:
    return dict(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                intermediate_size=cfg.intermediate_size, norm_type="layer", norm_eps=cfg.layer_norm_eps,
                norm_bias=True, mlp_type="plain", hidden_act=cfg.hidden_act,
                parallel_residual=cfg.use_parallel_residual, qkv_bias=cfg.attention_bias,
                o_bias=cfg.attention_bias, mlp_bias=True, rope=_rope(cfg))


def _gpt2_arch(cfg) -> dict:
    if cfg.scale_attn_by_inverse_layer_idx or not cfg.scale_attn_weights:
        raise BlockformerError("GPT-2 variants with non-standard attention scaling are not supported")
    return dict(hidden_size=cfg.n_embd, num_attention_heads=cfg.n_head,
                intermediate_size=cfg.n_inner or 4 * cfg.n_embd, norm_type="layer",
                norm_eps=cfg.layer_norm_epsilon, norm_bias=True, mlp_type="plain",
                hidden_act=cfg.activation_function, qkv_bias=True, o_bias=True, mlp_bias=True,
                rope=None, learned_positions=True, max_position_embeddings=cfg.n_positions)


def neox_qkv(i: int) -> Callable:
    """GPT-NeoX fuses q, k, v per head: rows are laid out (heads, 3, head_dim)."""
    def take(t, arch):
        n = arch["num_attention_heads"]
        return t.unflatten(0, (n, 3, -1))[:, i].flatten(0, 1)
    return take


def gpt2_qkv(i: int) -> Callable:
    """GPT-2's Conv1D stores (in, out); the fused output is [q | k | v]."""
    return lambda t, arch: t.T.chunk(3, dim=0)[i] if t.dim() == 2 else t.chunk(3)[i]


def transposed(t, arch):
    return t.T if t.dim() == 2 else t


_LLAMA_LAYER = {
    "norm1.weight": ("input_layernorm.weight", None), "norm2.weight": ("post_attention_layernorm.weight", None),
    **{f"attn.{x}.{w}": (f"self_attn.{x}_proj.{w}", None) for x in "qkvo" for w in ("weight", "bias")},
    **{f"mlp.{x}.{w}": (f"mlp.{x}_proj.{w}", None) for x in ("gate", "up", "down") for w in ("weight", "bias")},
}
_NEOX_LAYER = {
    **{f"norm1.{w}": (f"input_layernorm.{w}", None) for w in ("weight", "bias")},
    **{f"norm2.{w}": (f"post_attention_layernorm.{w}", None) for w in ("weight", "bias")},
    **{f"attn.{x}.{w}": (f"attention.query_key_value.{w}", neox_qkv(i)) for i, x in enumerate("qkv")
       for w in ("weight", "bias")},
    **{f"attn.o.{w}": (f"attention.dense.{w}", None) for w in ("weight", "bias")},
    **{f"mlp.up.{w}": (f"mlp.dense_h_to_4h.{w}", None) for w in ("weight", "bias")},
    **{f"mlp.down.{w}": (f"mlp.dense_4h_to_h.{w}", None) for w in ("weight", "bias")},
}
_GPT2_LAYER = {
    **{f"norm1.{w}": (f"ln_1.{w}", None) for w in ("weight", "bias")},
    **{f"norm2.{w}": (f"ln_2.{w}", None) for w in ("weight", "bias")},
    **{f"attn.{x}.{w}": (f"attn.c_attn.{w}", gpt2_qkv(i)) for i, x in enumerate("qkv") for w in ("weight", "bias")},
    **{f"attn.o.{w}": (f"attn.c_proj.{w}", transposed) for w in ("weight", "bias")},
    **{f"mlp.up.{w}": (f"mlp.c_fc.{w}", transposed) for w in ("weight", "bias")},
    **{f"mlp.down.{w}": (f"mlp.c_proj.{w}", transposed) for w in ("weight", "bias")},
}

_LLAMA = dict(arch=_llama_arch, layers="model.layers", embed="model.embed_tokens.weight", final_norm="model.norm",
              head="lm_head.weight", layer=_LLAMA_LAYER)
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", **_LLAMA),
    "mistral": Family("mistral", **_LLAMA),
    "qwen2": Family("qwen2", **_LLAMA),
    "gpt_neox": Family("gpt_neox", _neox_arch, "gpt_neox.layers", "gpt_neox.embed_in.weight",
                       "gpt_neox.final_layer_norm", "lm_head.weight", _NEOX_LAYER),
    "gpt2": Family("gpt2", _gpt2_arch, "transformer.h", "transformer.wte.weight", "transformer.ln_f",
                   "lm_head.weight", _GPT2_LAYER, wpe="transformer.wpe.weight"),
}


def family_for(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise BlockformerError(f"unsupported architecture '{model_type}'; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def map_layer(fam: Family, sd: dict, src_idx: int, dst_prefix: str, arch: dict) -> dict[str, torch.Tensor]:
    """Our tensors for one layer, taken from layer `src_idx` of the original state dict `sd`."""
    out = {}
    for ours, (theirs, fn) in fam.layer.items():
        key = f"{fam.layers}.{src_idx}.{theirs}"
        if key in sd:
            t = sd[key]
            out[f"{dst_prefix}.{ours}"] = fn(t, arch) if fn else t
    return out
