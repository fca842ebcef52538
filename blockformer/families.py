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


def _rope(cfg, params: dict | None = None) -> dict:
    """Rope parameters of `cfg` (or `params`, one layer type's of Gemma 3); variants that vary with length refused."""
    rope = dict(params if params is not None else getattr(cfg, "rope_parameters", None) or {})
    rope.setdefault("rope_type", "default")
    if rope["rope_type"] in ("dynamic", "longrope"):
        raise BlockformerError(f"rope type '{rope['rope_type']}' changes with sequence length; not supported yet")
    return rope


def _layer_windows(cfg) -> list | None:
    """Sliding window of each original layer in tokens (None = global), as transformers applies them.

    Mistral slides in every layer when `sliding_window` is set (its model ignores `layer_types`); Qwen2/3 (with
    `use_sliding_window`, else their config drops the window) and Gemma 2/3 slide in the layers `layer_types` marks
    "sliding_attention". A query at q sees keys k with q - k < window (transformers' sliding_window_overlay).
    """
    window, n = getattr(cfg, "sliding_window", None), cfg.num_hidden_layers
    if window is None:
        return None
    types = (None if cfg.model_type == "mistral" else getattr(cfg, "layer_types", None)) or ["sliding_attention"] * n
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise BlockformerError(f"attention layer types {', '.join(unknown)} are not supported yet")
    windows = [window if t == "sliding_attention" else None for t in types]
    return windows if any(w is not None for w in windows) else None


def _llama_arch(cfg) -> dict:
    bias = getattr(cfg, "attention_bias", False)
    qwen = cfg.model_type == "qwen2"  # Qwen2 has bias on q, k, v but not on o
    return dict(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads,
                head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                intermediate_size=cfg.intermediate_size, norm_type="rms", norm_eps=cfg.rms_norm_eps,
                mlp_type="gated", hidden_act=getattr(cfg, "hidden_act", None) or cfg.hidden_activation,
                qkv_bias=bias or qwen, o_bias=bias and not qwen, mlp_bias=getattr(cfg, "mlp_bias", False),
                rope=_rope(cfg), layer_windows=_layer_windows(cfg))


def _qwen3_arch(cfg) -> dict:
    return {**_llama_arch(cfg), "qk_norm": "head"}  # RMSNorm over head_dim on q and k, before rope


def _olmo2_arch(cfg) -> dict:
    # no norm before the branches; one after each (post); q/k RMSNorm over all heads' channels (full)
    return {**_llama_arch(cfg), "qk_norm": "full", "norm_placement": "post"}


def _gemma_arch(cfg) -> dict:
    """Gemma: (1 + w) RMSNorms, embeddings times sqrt(D). Gemma 2/3 add sandwich norms, query_pre_attn_scalar,
    soft-caps (Gemma 2) and alternating sliding windows; Gemma 3 adds q/k norms and a local rope base."""
    arch = {**_llama_arch(cfg), "norm_offset": 1.0, "embedding_scale": cfg.hidden_size ** 0.5}
    if cfg.model_type == "gemma":
        return arch
    if getattr(cfg, "use_bidirectional_attention", False):
        raise BlockformerError("use_bidirectional_attention (Gemma as an encoder) is not supported: a Block "
                               "Transformer is causal")
    arch.update(norm_placement="sandwich", attn_scale=cfg.query_pre_attn_scalar ** -0.5,
                attn_softcap=cfg.attn_logit_softcapping, final_softcap=cfg.final_logit_softcapping)
    if cfg.model_type == "gemma3_text":  # rope per layer type: global layers' and the windowed layers' own
        arch.update(qk_norm="head", rope=_rope(cfg, cfg.rope_parameters["full_attention"]),
                    local_rope=_rope(cfg, cfg.rope_parameters["sliding_attention"]))
    return arch


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
_QK_NORMS = {f"attn.{x}_norm.weight": (f"self_attn.{x}_norm.weight", None) for x in "qk"}
_ATTN_MLP = {k: v for k, v in _LLAMA_LAYER.items() if not k.startswith("norm")}
_OLMO2_LAYER = {**_ATTN_MLP, **_QK_NORMS, "post_norm1.weight": ("post_attention_layernorm.weight", None),
                "post_norm2.weight": ("post_feedforward_layernorm.weight", None)}
_SANDWICH_LAYER = {**_ATTN_MLP, "norm1.weight": ("input_layernorm.weight", None),  # Gemma 2/3
                   "post_norm1.weight": ("post_attention_layernorm.weight", None),
                   "norm2.weight": ("pre_feedforward_layernorm.weight", None),
                   "post_norm2.weight": ("post_feedforward_layernorm.weight", None)}
# ------------------------------------------- fused, parallel and positional families (issue 12): phi3 ... gpt_neo
def _phi_arch(cfg) -> dict:  # Phi-2: attention and MLP in parallel on one LayerNorm, biases, partial rotary
    return dict(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads, intermediate_size=cfg.intermediate_size,
                norm_type="layer", norm_eps=cfg.layer_norm_eps, norm_bias=True, mlp_type="plain",
                hidden_act=cfg.hidden_act, parallel_residual=True, shared_norm=True, qkv_bias=True, o_bias=True,
                mlp_bias=True, lm_head_bias=True, qk_norm="head" if cfg.qk_layernorm else None, rope=_rope(cfg))


def _stablelm_arch(cfg) -> dict:  # LayerNorms, gated MLP, partial rotary; q/k LayerNorms one per head
    return dict(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads, intermediate_size=cfg.intermediate_size,
                norm_type="layer", norm_eps=cfg.layer_norm_eps, norm_bias=True, mlp_type="gated",
                hidden_act=cfg.hidden_act, parallel_residual=cfg.use_parallel_residual, shared_norm=True,
                qkv_bias=cfg.use_qkv_bias, qk_norm="per_head" if cfg.qk_layernorm else None, rope=_rope(cfg))


def _opt_arch(cfg) -> dict:  # learned positions read 2 rows further on, ReLU, biases
    if not cfg.do_layer_norm_before:
        raise BlockformerError("OPT with do_layer_norm_before=False (norms after the branches, as OPT-350m) is not "
                               "supported yet")
    if cfg.word_embed_proj_dim != cfg.hidden_size:
        raise BlockformerError(f"OPT with word_embed_proj_dim={cfg.word_embed_proj_dim} != hidden_size="
                               f"{cfg.hidden_size} (projected embeddings, as OPT-350m) is not supported yet")
    if getattr(cfg, "_remove_final_layer_norm", False) or not cfg.layer_norm_elementwise_affine:
        raise BlockformerError("OPT without a final norm or without norm weights is not supported yet")
    return dict(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
                intermediate_size=cfg.ffn_dim, norm_type="layer", norm_eps=1e-5, norm_bias=True, mlp_type="plain",
                hidden_act=cfg.activation_function, qkv_bias=cfg.enable_bias, o_bias=cfg.enable_bias,
                mlp_bias=cfg.enable_bias, rope=None, learned_positions=True,
                max_position_embeddings=cfg.max_position_embeddings, position_offset=2)


def _falcon_arch(cfg) -> dict:
    """Falcon: rotary, parallel attention + MLP on one norm (7B, multi-query) or two (new_decoder_architecture:
    ln_attn / ln_mlp, grouped kv heads); the classic layout (neither) is sequential or parallel per parallel_attn."""
    if cfg.alibi:
        raise BlockformerError("Falcon with alibi=True (ALiBi attention biases instead of rotary) is not supported yet")
    new, H = cfg.new_decoder_architecture, cfg.num_attention_heads
    return dict(hidden_size=cfg.hidden_size, num_attention_heads=H, head_dim=cfg.hidden_size // H,
                num_key_value_heads=cfg.num_kv_heads if new else 1 if cfg.multi_query else H,
                intermediate_size=cfg.ffn_hidden_size, norm_type="layer", norm_eps=cfg.layer_norm_epsilon,
                norm_bias=True, mlp_type="plain", hidden_act=cfg.activation, parallel_residual=new or cfg.parallel_attn,
                shared_norm=not (new and (cfg.num_ln_in_parallel_attn or 2) == 2), qkv_bias=cfg.bias,
                o_bias=cfg.bias, mlp_bias=cfg.bias, rope=_rope(cfg))


def _gptj_arch(cfg) -> dict:  # parallel on one norm, rotary on interleaved channel pairs of the first rotary_dim
    hd = cfg.n_embd // cfg.n_head
    return dict(hidden_size=cfg.n_embd, num_attention_heads=cfg.n_head, intermediate_size=cfg.n_inner or 4 * cfg.n_embd,
                norm_type="layer", norm_eps=cfg.layer_norm_epsilon, norm_bias=True, mlp_type="plain",
                hidden_act=cfg.activation_function, parallel_residual=True, shared_norm=True, mlp_bias=True,
                lm_head_bias=True, rotary_interleaved=True, max_position_embeddings=cfg.n_positions,
                rope={"rope_type": "default", "rope_theta": 10000.0,  # GPT-J's base is fixed in its code
                      "partial_rotary_factor": (cfg.rotary_dim or hd) / hd})


def _gpt_neo_arch(cfg) -> dict:
    """GPT-Neo: learned positions, unscaled attention logits, alternating global and local layers; a local layer
    lets q see k when 0 <= q - k < window_size (its mask: tril(ones) xor tril(ones, -window_size))."""
    kinds = set(cfg.attention_layers) - {"global", "local"}
    if kinds:
        raise BlockformerError(f"GPT-Neo attention types {', '.join(sorted(kinds))} are not supported")
    return dict(hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_heads,
                intermediate_size=cfg.intermediate_size or 4 * cfg.hidden_size, norm_type="layer",
                norm_eps=cfg.layer_norm_epsilon, norm_bias=True, mlp_type="plain", hidden_act=cfg.activation_function,
                o_bias=True, mlp_bias=True, rope=None, learned_positions=True, attn_scale=1.0,
                max_position_embeddings=cfg.max_position_embeddings,
                layer_windows=[cfg.window_size if t == "local" else None for t in cfg.attention_layers])


def split_qkv(i: int) -> Callable:
    """Phi-3's fused rows: [q (heads * head_dim) | k (kv heads * head_dim) | v]."""
    def take(t, arch):
        q, kv = arch["num_attention_heads"] * arch["head_dim"], arch["num_key_value_heads"] * arch["head_dim"]
        return t.split([q, kv, kv])[i]
    return take


def grouped_qkv(i: int) -> Callable:
    """Falcon's fused rows: per kv group, the group's queries then its key and value. Multi-query is one group,
    the classic layout one group per head (heads, 3, head_dim), new_decoder_architecture num_kv_heads groups."""
    def take(t, arch):
        g = t.unflatten(0, (arch["num_key_value_heads"], -1, arch["head_dim"]))
        return (g[:, :-2], g[:, -2:-1], g[:, -1:])[i].flatten(0, 2)
    return take


def half(i: int) -> Callable:  # Phi-3's gate_up_proj: [gate | up]
    return lambda t, arch: t.chunk(2)[i]


def _wb(ours: str, theirs, fn=None) -> dict:
    """Rules for weight and bias; `theirs` may be a tuple of alternative names."""
    alt = lambda w: tuple(f"{t}.{w}" for t in theirs) if isinstance(theirs, tuple) else f"{theirs}.{w}"  # noqa: E731
    return {f"{ours}.{w}": (alt(w), fn) for w in ("weight", "bias")}


def _layer(norms: dict, attn: str, qkv: str, o: str, up: str, down: str) -> dict:
    """Rules of a layer with separate q, k, v (`qkv` holds `{x}`) and a plain MLP, all with optional biases."""
    rules = {k: v for ours, theirs in norms.items() for k, v in _wb(ours, theirs).items()}
    for x in "qkv":
        rules.update(_wb(f"attn.{x}", f"{attn}.{qkv.format(x=x)}"))
    return {**rules, **_wb("attn.o", f"{attn}.{o}"), **_wb("mlp.up", up), **_wb("mlp.down", down)}


_PHI3_LAYER = {**{k: v for k, v in _LLAMA_LAYER.items() if k.startswith(("norm", "attn.o", "mlp.down"))},
               **{f"attn.{x}.weight": ("self_attn.qkv_proj.weight", split_qkv(i)) for i, x in enumerate("qkv")},
               **{f"mlp.{x}.weight": ("mlp.gate_up_proj.weight", half(i)) for i, x in enumerate(("gate", "up"))}}
_PHI_LAYER = {**_layer({"norm1": "input_layernorm"}, "self_attn", "{x}_proj", "dense", "mlp.fc1", "mlp.fc2"),
              **_wb("attn.q_norm", "self_attn.q_layernorm"), **_wb("attn.k_norm", "self_attn.k_layernorm")}
_STABLELM_LAYER = {**_LLAMA_LAYER, **_wb("norm1", "input_layernorm"), **_wb("norm2", "post_attention_layernorm"),
                   **{f"attn.{x}_norm.weight": (f"self_attn.{x}_layernorm.norms.{{h}}.weight", None) for x in "qk"}}
_OPT_LAYER = _layer({"norm1": "self_attn_layer_norm", "norm2": "final_layer_norm"}, "self_attn", "{x}_proj", "out_proj",
                    "fc1", "fc2")
_FALCON_LAYER = {**_wb("norm1", ("input_layernorm", "ln_attn")), **_wb("norm2", ("post_attention_layernorm", "ln_mlp")),
                 **{k: v for i, x in enumerate("qkv")
                    for k, v in _wb(f"attn.{x}", "self_attention.query_key_value", grouped_qkv(i)).items()},
                 **_wb("attn.o", "self_attention.dense"), **_wb("mlp.up", "mlp.dense_h_to_4h"),
                 **_wb("mlp.down", "mlp.dense_4h_to_h")}
_GPTJ_LAYER = _layer({"norm1": "ln_1"}, "attn", "{x}_proj", "out_proj", "mlp.fc_in", "mlp.fc_out")
_GPT_NEO_LAYER = _layer({"norm1": "ln_1", "norm2": "ln_2"}, "attn.attention", "{x}_proj", "out_proj", "mlp.c_fc",
                        "mlp.c_proj")
_TRANSFORMER = dict(layers="transformer.h", final_norm="transformer.ln_f", head="lm_head.weight")
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", **_LLAMA),
    "mistral": Family("mistral", **_LLAMA),
    "qwen2": Family("qwen2", **_LLAMA),
    "qwen3": Family("qwen3", **{**_LLAMA, "arch": _qwen3_arch, "layer": {**_LLAMA_LAYER, **_QK_NORMS}}),
    "olmo2": Family("olmo2", **{**_LLAMA, "arch": _olmo2_arch, "layer": _OLMO2_LAYER}),
    "gemma": Family("gemma", **{**_LLAMA, "arch": _gemma_arch}),
    "gemma2": Family("gemma2", **{**_LLAMA, "arch": _gemma_arch, "layer": _SANDWICH_LAYER}),
    "gemma3_text": Family("gemma3_text", **{**_LLAMA, "arch": _gemma_arch, "layer": {**_SANDWICH_LAYER, **_QK_NORMS}}),
    "gpt_neox": Family("gpt_neox", _neox_arch, "gpt_neox.layers", "gpt_neox.embed_in.weight",
                       "gpt_neox.final_layer_norm", "lm_head.weight", _NEOX_LAYER),
    "gpt2": Family("gpt2", _gpt2_arch, "transformer.h", "transformer.wte.weight", "transformer.ln_f",
                   "lm_head.weight", _GPT2_LAYER, wpe="transformer.wpe.weight"),
    "phi3": Family("phi3", **{**_LLAMA, "layer": _PHI3_LAYER}),  # Llama with fused qkv / gate_up and a window
    "phi": Family("phi", _phi_arch, "model.layers", "model.embed_tokens.weight", "model.final_layernorm",
                  "lm_head.weight", _PHI_LAYER),
    "stablelm": Family("stablelm", _stablelm_arch, "model.layers", "model.embed_tokens.weight", "model.norm",
                       "lm_head.weight", _STABLELM_LAYER),
    "opt": Family("opt", _opt_arch, "model.decoder.layers", "model.decoder.embed_tokens.weight",
                  "model.decoder.final_layer_norm", "lm_head.weight", _OPT_LAYER,
                  wpe="model.decoder.embed_positions.weight"),
    "falcon": Family("falcon", _falcon_arch, embed="transformer.word_embeddings.weight", layer=_FALCON_LAYER,
                     **_TRANSFORMER),
    "gptj": Family("gptj", _gptj_arch, embed="transformer.wte.weight", layer=_GPTJ_LAYER, **_TRANSFORMER),
    "gpt_neo": Family("gpt_neo", _gpt_neo_arch, embed="transformer.wte.weight", layer=_GPT_NEO_LAYER,
                      wpe="transformer.wpe.weight", **_TRANSFORMER),
}


def family_for(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise BlockformerError(f"unsupported architecture '{model_type}'; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def map_layer(fam: Family, sd: dict, src_idx: int, dst_prefix: str, arch: dict,
              used: set | None = None) -> dict[str, torch.Tensor]:
    """Our tensors for one layer, taken from layer `src_idx` of the original state dict `sd`.

    A rule's source may be a tuple of alternative names (the first the checkpoint has wins: Falcon's norms differ
    by layout) and may contain `{h}`: one tensor per head, stacked (StableLM's per-head q/k norms). The names read
    are added to `used`, so that the converter can tell which source tensors no rule consumed.
    """
    out, used = {}, used if used is not None else set()
    for ours, (theirs, fn) in fam.layer.items():
        for name in theirs if isinstance(theirs, tuple) else (theirs,):
            keys = _source_keys(sd, f"{fam.layers}.{src_idx}.{name}")
            if keys:
                used.update(keys)
                t = sd[keys[0]] if "{h}" not in name else torch.stack([sd[k] for k in keys])
                out[f"{dst_prefix}.{ours}"] = fn(t, arch) if fn else t
                break
    return out


def _source_keys(sd: dict, key: str) -> list[str]:
    if "{h}" not in key:
        return [key] if key in sd else []
    keys, h = [], 0
    while key.format(h=h) in sd:
        keys.append(key.format(h=h))
        h += 1
    return keys
