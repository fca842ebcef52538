"""Convert a pretrained decoder-only checkpoint into a Block Transformer folder.

    blockformer convert default out/smollm2-block            # the embedded SmolLM2-135M-Instruct, ~30 s on CPU
    blockformer convert EleutherAI/pythia-410m out/pythia-block --block-layers 12 --layer-map partition

Initialisation follows the paper (arXiv 2406.02657, App. P): embedder table <- original embeddings, projection <-
mean of the block's token vectors, expansion layer <- stacked identities, token-decoder embeddings / final norm / LM
head <- original, decoder layers per the layer map.
"""
from __future__ import annotations

import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import sources
from ..costs import block_kv_bytes, kv_bytes_per_position, original_kv_bytes
from ..errors import BlockformerError
from ..families import Family, family_for, map_layer
from ..io import atomic_folder, check_out, ensure_writable, remove_stale_temps
from ..model import BlockTransformerConfig, BlockTransformerForCausalLM
from .card import model_card
from .contextual import INITS, contextual_init, read_calibration

LAYER_MAPS = ("partition", "skip", "duplicate")
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ConvertConfig:
    source: str
    out: Path
    block_length: int = 4
    block_layers: float | None = None  # a count (24), or below 1 a share of the layers (0.8: 24 of 30); default: half
    layer_map: str = "partition"
    prefix_length: int = 2
    dtype: str = "auto"
    overwrite: bool = False
    max_shard_size: str = "2GB"
    init: str = "paper"              # paper | contextual (blockformer/convert/contextual.py)
    calib_data: str = "corpus/gutenberg"  # --init contextual: text whose split-layer states set the new parts
    calib_tokens: int = 65536        # --init contextual: calibration tokens
    embedder_mix: float = 0.0        # --init contextual: weight of the block's other tokens in the embedder (last: 1)
    embedder_layers: int = 0         # the original's lowest layers, run inside each block by the embedder
    embedder_sink: bool = False      # --embedder-layers: a learned vector (init: BOS) opens each block's window
    local_token_inputs: bool = False  # --embedder-layers: token-decoder inputs add a map of the embedder's states

    def check(self) -> None:
        """Value checks, no I/O: run by `validate` and by recipes (so the CLI and YAML share them)."""
        if self.block_length < 1:
            raise BlockformerError(f"--block-length must be at least 1, got {self.block_length}")
        if self.prefix_length < 1:
            raise BlockformerError(f"--prefix-length must be at least 1, got {self.prefix_length}")
        if self.layer_map not in LAYER_MAPS:
            raise BlockformerError(f"--layer-map must be one of {', '.join(LAYER_MAPS)}, got {self.layer_map}")
        if self.dtype not in DTYPES:
            raise BlockformerError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype}")
        if self.init not in INITS:
            raise BlockformerError(f"--init must be one of {', '.join(INITS)}, got {self.init}")
        if self.calib_tokens < 1:
            raise BlockformerError(f"--calib-tokens must be at least 1, got {self.calib_tokens}")
        if not 0 <= self.embedder_mix <= 1:
            raise BlockformerError(f"--embedder-mix must be between 0 and 1, got {self.embedder_mix}")
        if self.embedder_layers < 0:
            raise BlockformerError(f"--embedder-layers must be 0 or more, got {self.embedder_layers}")
        if shard_bytes(self.max_shard_size) < 2**20:
            raise BlockformerError(f"--max-shard-size must be a size of at least 1MB such as 2GB or 500MB, "
                                   f"got {self.max_shard_size!r}")
        if self.embedder_sink and not self.embedder_layers:
            raise BlockformerError("--embedder-sink opens the embedder's local layers; it needs --embedder-layers 1 or more")
        if self.local_token_inputs and not self.embedder_layers:
            raise BlockformerError("--local-token-inputs reads the embedder's local layers; it needs --embedder-layers "
                                   "1 or more")


def layer_count(n: int, block_layers: float | None) -> int | None:
    """--block-layers as a count of the original's n layers: a whole number as it is, a share below 1 rounded (so one
    recipe fits models of any depth); None stays None (the layer map's default)."""
    if block_layers is None or (block_layers >= 1 and float(block_layers).is_integer()):
        return None if block_layers is None else int(block_layers)
    if not 0 < block_layers < 1:
        raise BlockformerError(f"--block-layers must be a whole number of layers or a share between 0 and 1, "
                               f"got {block_layers}")
    return max(1, round(block_layers * n))


def plan_layers(n: int, layer_map: str, block_layers: float | None) -> tuple[list[int], list[int]]:
    """Original layer indices for the block decoder and the token decoder."""
    block_layers = layer_count(n, block_layers)
    if layer_map == "partition":
        nb = n // 2 if block_layers is None else block_layers
        if not 1 <= nb <= n:
            raise BlockformerError(f"--block-layers must be between 1 and {n} (the model has {n} layers), got {nb}")
        return list(range(nb)), list(range(nb, n))
    chosen = list(range(0, n, 2)) if layer_map == "skip" else list(range(n))
    if block_layers is not None and block_layers != len(chosen):
        raise BlockformerError(f"--layer-map {layer_map} gives each decoder {len(chosen)} of the {n} layers; "
                               f"--block-layers {block_layers} does not fit")
    return chosen, list(chosen)


def split_embedder_layers(block_src: list[int], k: int) -> tuple[list[int], list[int]]:
    """The block decoder's k lowest layers go to the embedder (run per block, at token level); at least one stays."""
    if k >= len(block_src):
        raise BlockformerError(f"--embedder-layers {k} leaves the block decoder no layer (it has {len(block_src)}); "
                               f"use at most {len(block_src) - 1}")
    return block_src[:k], block_src[k:]


def plan_parts(cfg: ConvertConfig, n: int) -> tuple[list[int], list[int], list[int]]:
    """Original layer indices for the embedder's local layers, the block decoder and the token decoder."""
    block_src, token_src = plan_layers(n, cfg.layer_map, cfg.block_layers)
    if not token_src and cfg.block_length > 1:  # only the degenerate L_B = 1 conversion (the original) may do that
        raise BlockformerError(f"--block-layers {len(block_src)} leaves the token decoder no layer; with "
                               f"--block-length {cfg.block_length} use at most {n - 1}")
    return (*split_embedder_layers(block_src, cfg.embedder_layers), token_src)


def assemble(cfg: ConvertConfig, hf_cfg, arch: dict, src, original, fam: Family,
             parts: tuple[list[int], list[int], list[int]]) -> BlockTransformerForCausalLM:
    """The Block Transformer's config and weights from the original, for the layers `plan_parts` chose."""
    local_src, block_src, token_src = parts
    config = block_config(cfg, hf_cfg, arch, src, block_src, token_src, local_src)
    return build_block_model(original, fam, config, arch, block_src, token_src, local_src)


def validate(cfg: ConvertConfig) -> None:
    cfg.check()
    check_out(Path(cfg.out), cfg.overwrite, [cfg.source, cfg.calib_data])


def shard_bytes(size) -> int:
    """Hugging Face's size strings ('2GB', '500MB', '1GiB') or a byte count; -1 when it is not one."""
    from transformers.utils.hub import convert_file_size_to_int
    try:
        return -1 if isinstance(size, bool) else int(convert_file_size_to_int(size))
    except (ValueError, TypeError):
        return -1


def convert(cfg: ConvertConfig) -> dict:
    """Run the conversion; return the summary (also written as `convert.json` in the output folder)."""
    t0 = time.perf_counter()
    remove_stale_temps(Path(cfg.out))  # what killed runs left (maybe gigabytes), before the space is probed
    validate(cfg)
    src = sources.resolve(cfg.source)
    hf_cfg = sources.load_config(src)
    fam = family_for(hf_cfg.model_type)
    arch = fam.arch(hf_cfg)
    n = getattr(hf_cfg, "num_hidden_layers", None) or hf_cfg.n_layer
    parts = plan_parts(cfg, n)
    check_window_fits(cfg, max_positions(hf_cfg, arch))
    ensure_writable(Path(cfg.out))  # a read-only or full disk fails now, not after loading the model
    calib = read_calibration(cfg.calib_data) if cfg.init == "contextual" else None
    tokenizer = optional_tokenizer(src, needed=cfg.init == "contextual")
    original = sources.load_model(src, DTYPES[cfg.dtype])
    model = assemble(cfg, hf_cfg, arch, src, original, fam, parts)
    init = {"init": "paper"}
    if cfg.init == "contextual":
        init = contextual_init(model, original, fam, tokenizer, cfg.calib_data, calib, cfg.calib_tokens,
                               embedder_mix=cfg.embedder_mix)
    model.config.provenance["init"] = init
    summary = {**describe(model, original, cfg, src, time.perf_counter() - t0), **init,
               "tokenizer": "copied" if tokenizer is not None else None}
    with atomic_folder(Path(cfg.out), cfg.overwrite) as tmp:
        model.save_pretrained(tmp, max_shard_size=cfg.max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        else:  # whatever pieces exist travel with the model, untouched
            for f in sources.tokenizer_files(src):
                shutil.copy2(f, tmp / f.name)
        original.generation_config.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(summary))
        (tmp / "convert.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def optional_tokenizer(src, needed: bool):
    """The source's tokenizer, or None with one warning line: converting needs only the weights."""
    try:
        return sources.load_tokenizer(src)
    except BlockformerError as e:
        if needed:
            raise BlockformerError(f"--init contextual reads calibration text, which needs a tokenizer: {e}") from e
        print(f"warning: converting without a tokenizer ({e}); the output folder gets no loadable tokenizer, so "
              f"eval, uptrain and generate need one copied into it first.", file=sys.stderr)
        return None


def same_engine(original) -> BlockTransformerForCausalLM:
    """The original itself run by our decoder: the degenerate conversion (L_B = 1, every layer in the block decoder,
    one prefix slot, no token-decoder layer) computes the original's logits exactly, so timing it against the
    Block Transformer isolates what the architecture buys from what the engine buys."""
    hf = original.config
    fam = family_for(hf.model_type)
    arch = fam.arch(hf)
    n = getattr(hf, "num_hidden_layers", None) or hf.n_layer
    cfg = ConvertConfig("(in memory)", Path("-"), block_length=1, prefix_length=1, block_layers=n)
    src = sources.Source("(in memory)", "(in memory)", kind="memory")
    config = block_config(cfg, hf, arch, src, list(range(n)), [])
    device = next(original.parameters()).device
    return build_block_model(original, fam, config, arch, list(range(n)), []).to(device)


def max_positions(hf_cfg, arch: dict) -> int:
    return arch.get("max_position_embeddings") or getattr(hf_cfg, "max_position_embeddings", 2048)


def check_window_fits(cfg: ConvertConfig, n_pos: int) -> None:
    """The token decoder's window (prefix + the block's first L_B - 1 tokens) must fit the model's positions.

    Learned positions (GPT-2) index a table of `n_pos` rows: a longer window crashes at the first forward pass.
    Rotary models would run, but on positions the layers never saw, with blocks longer than the context that
    generation and evaluation allow. The block decoder needs no check: N <= n_pos blocks for n_pos tokens.
    """
    window = cfg.prefix_length + cfg.block_length - 1
    if window > n_pos:
        raise BlockformerError(f"--block-length {cfg.block_length} with --prefix-length {cfg.prefix_length} needs a "
                               f"token-decoder window of {window} positions; the model has {n_pos}")


def block_config(cfg: ConvertConfig, hf_cfg, arch: dict, src, block_src, token_src,
                 local_src=()) -> BlockTransformerConfig:
    base = hf_cfg.to_dict()
    base.pop("quantization_config", None)
    arch = {**arch, "max_position_embeddings": max_positions(hf_cfg, arch)}
    windows = arch.pop("layer_windows", None)  # per ORIGINAL layer (None = global): follow the layer map
    if windows is not None:
        arch["block_windows"], arch["token_windows"] = [windows[i] for i in block_src], [windows[i] for i in token_src]
        arch["embedder_windows"] = [windows[i] for i in local_src] or None
    return BlockTransformerConfig(
        vocab_size=hf_cfg.vocab_size, block_length=cfg.block_length, prefix_length=cfg.prefix_length,
        num_block_layers=len(block_src), num_token_layers=len(token_src), embedder_layers=len(local_src),
        embedder_sink=cfg.embedder_sink, local_token_inputs=cfg.local_token_inputs,
        base_config=base,
        tie_word_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)),
        bos_token_id=hf_cfg.bos_token_id, eos_token_id=hf_cfg.eos_token_id,
        pad_token_id=getattr(hf_cfg, "pad_token_id", None),
        provenance={"source": cfg.source, "source_kind": src.kind, "family": hf_cfg.model_type,
                    "layer_map": cfg.layer_map, "block_layers_from": block_src, "token_layers_from": token_src,
                    **({"embedder_layers_from": list(local_src)} if local_src else {})},
        **arch)


def build_block_model(original, fam: Family, config, arch, block_src, token_src,
                      local_src=()) -> BlockTransformerForCausalLM:
    sd = original.state_dict()
    dtype = next(original.parameters()).dtype
    used = {fam.embed, fam.head} if config.tie_word_embeddings else {fam.embed}  # a tied head is the embedding
    take = lambda name: used.add(name) or sd[name]  # noqa: E731
    ours = {"embedder.embed.weight": sd[fam.embed], "token_decoder.embed.weight": sd[fam.embed],
            "lm_head.weight": sd[fam.embed] if config.tie_word_embeddings else take(fam.head)}
    if config.lm_head_bias:
        ours["lm_head.bias"] = take(fam.head.removesuffix(".weight") + ".bias")
    for w in ("weight", "bias"):
        if f"{fam.final_norm}.{w}" in sd:
            ours[f"token_decoder.norm.{w}"] = take(f"{fam.final_norm}.{w}")
    if fam.wpe:
        ours["block_decoder.wpe.weight"] = ours["token_decoder.wpe.weight"] = take(fam.wpe)
        if local_src:
            ours["embedder.local.wpe.weight"] = sd[fam.wpe]
    if config.embedder_sink:  # what opens a text in training: BOS where the family has one, else token 0
        bos = config.bos_token_id if config.bos_token_id is not None else 0
        ours["embedder.sink"] = sd[fam.embed][bos] * (config.embedding_scale or 1.0)
    for part, indices in (("embedder.local", local_src), ("block_decoder", block_src), ("token_decoder", token_src)):
        for i, src_idx in enumerate(indices):
            ours.update(map_layer(fam, sd, src_idx, f"{part}.layers.{i}", arch, used))
    check_all_used(original, fam, sd, used, set(block_src) | set(token_src) | set(local_src))
    model = BlockTransformerForCausalLM(config).to(dtype)  # new parts get the paper's init in __init__
    missing, unexpected = model.load_state_dict(ours, strict=False)
    new_parts = {"embedder.proj.weight", "embedder.proj.bias", "token_decoder.expand.weight",
                 "token_decoder.expand.bias", "token_decoder.bridge.weight"}
    if unexpected or set(missing) - new_parts:
        raise BlockformerError(f"weight mapping mismatch: missing {sorted(set(missing) - new_parts)[:5]}, "
                               f"unexpected {sorted(unexpected)[:5]}")
    return model.eval()


def check_all_used(original, fam: Family, sd: dict, used: set, kept_layers: set) -> None:
    """Stop at the first source tensor no rule consumed: a dropped weight (a q_norm the adapter forgot) would give a
    model that runs but is not the original. Layers the layer map leaves out, and buffers, are not weights."""
    buffers = {name for name, _ in original.named_buffers()}
    layer = re.compile(rf"{re.escape(fam.layers)}\.(\d+)\.")
    for name in sd:
        m = layer.match(name)
        if name in used or name in buffers or (m and int(m.group(1)) not in kept_layers):
            continue
        raise BlockformerError(f"the '{fam.name}' adapter (blockformer/families.py) has no rule for the original's "
                               f"tensor {name}: converting would drop it, so the model would not be the original")


def describe(model, original, cfg: ConvertConfig, src, seconds: float) -> dict:
    c = model.config
    bytes_el = next(model.parameters()).element_size()
    per_layer = kv_bytes_per_position(c, bytes_el)
    return {
        "source": cfg.source, "family": c.provenance["family"], "out": str(cfg.out),
        "block_length": c.block_length, "prefix_length": c.prefix_length, "layer_map": cfg.layer_map,
        "block_layers_from": c.provenance["block_layers_from"], "token_layers_from": c.provenance["token_layers_from"],
        "embedder_layers_from": c.provenance.get("embedder_layers_from", []),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "parameters": model.parameter_counts(),
        "parameters_original": sum(p.numel() for p in original.parameters()),
        "kv_bytes_per_token": {
            "original": original_kv_bytes(original.config, 1, bytes_el),
            "block_decoder": c.num_block_layers * per_layer / c.block_length,
            "token_decoder_window_per_sequence": block_kv_bytes(c, 0, bytes_el),
        },
        "kv_bytes_per_sequence_at_2048": {"original": original_kv_bytes(original.config, 2048, bytes_el),
                                          "converted": block_kv_bytes(c, 2048, bytes_el)},
        "convert_seconds": round(seconds, 1),
    }


