"""Conversion: every copied tensor equals its source, the paper's init, layer maps, files, atomic writes."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from blockformer.convert import ConvertConfig, convert, plan_layers
from blockformer.errors import BlockformerError
from tiny import load_original

# our per-layer name -> the original's per-layer name, for tensors copied as they are
PLAIN = {
    "llama": {"norm1.weight": "input_layernorm.weight", "norm2.weight": "post_attention_layernorm.weight",
              "attn.q.weight": "self_attn.q_proj.weight", "attn.k.weight": "self_attn.k_proj.weight",
              "attn.v.weight": "self_attn.v_proj.weight", "attn.o.weight": "self_attn.o_proj.weight",
              "mlp.gate.weight": "mlp.gate_proj.weight", "mlp.up.weight": "mlp.up_proj.weight",
              "mlp.down.weight": "mlp.down_proj.weight"},
    "gpt_neox": {"norm1.weight": "input_layernorm.weight", "norm1.bias": "input_layernorm.bias",
                 "attn.o.weight": "attention.dense.weight", "attn.o.bias": "attention.dense.bias",
                 "mlp.up.weight": "mlp.dense_h_to_4h.weight", "mlp.down.bias": "mlp.dense_4h_to_h.bias"},
    "gpt2": {"norm1.weight": "ln_1.weight", "norm2.bias": "ln_2.bias", "attn.o.bias": "attn.c_proj.bias",
             "mlp.up.bias": "mlp.c_fc.bias"},
}
PLAIN["mistral"] = PLAIN["qwen2"] = PLAIN["llama"]
LAYERS = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers",
          "gpt_neox": "gpt_neox.layers", "gpt2": "transformer.h"}
EMBED = {"gpt_neox": "gpt_neox.embed_in.weight", "gpt2": "transformer.wte.weight"}


def fused_from_ours(family: str, t: dict, p: str, n_head: int) -> torch.Tensor:
    """Rebuild the original's fused QKV weight from our q, k, v (the inverse of the converter's split)."""
    q, k, v = (t[f"{p}.attn.{x}.weight"] for x in "qkv")
    if family == "gpt2":
        return torch.cat([q, k, v]).T
    return torch.stack([w.unflatten(0, (n_head, -1)) for w in (q, k, v)], 1).flatten(0, 2)


def test_copied_tensors_equal_their_sources(tiny_dirs, family, tmp_path):
    convert(ConvertConfig(str(tiny_dirs[family]), tmp_path / "b"))
    ours = load_file(tmp_path / "b" / "model.safetensors")
    theirs = load_original(tiny_dirs[family]).state_dict()
    embed = theirs[EMBED.get(family, "model.embed_tokens.weight")]
    assert torch.equal(ours["embedder.embed.weight"], embed)
    assert torch.equal(ours["token_decoder.embed.weight"], embed)
    assert torch.equal(ours.get("lm_head.weight", embed), theirs["lm_head.weight"])
    for part, src_layers in (("block_decoder", [0, 1]), ("token_decoder", [2, 3])):
        for i, src in enumerate(src_layers):
            p, q = f"{part}.layers.{i}", f"{LAYERS[family]}.{src}"
            for mine, orig in PLAIN[family].items():
                assert torch.equal(ours[f"{p}.{mine}"], theirs[f"{q}.{orig}"]), (p, mine)
            if family in ("gpt2", "gpt_neox"):
                fused = theirs[f"{q}.attn.c_attn.weight" if family == "gpt2" else f"{q}.attention.query_key_value.weight"]
                assert torch.equal(fused_from_ours(family, ours, p, 4), fused)


def test_new_parts_get_the_papers_init(tiny_dirs, tmp_path):
    convert(ConvertConfig(str(tiny_dirs["llama"]), tmp_path / "b", block_length=4, prefix_length=3))
    t = load_file(tmp_path / "b" / "model.safetensors")
    eye = torch.eye(32)
    assert torch.equal(t["embedder.proj.weight"], torch.cat([eye / 4] * 4, 1))  # mean of the 4 token vectors
    assert torch.equal(t["token_decoder.expand.weight"], torch.cat([eye] * 3, 0))  # 3 copies of the context
    assert not t["embedder.proj.bias"].any() and not t["token_decoder.expand.bias"].any()


@pytest.mark.parametrize("layer_map,block_layers,want", [
    ("partition", None, ([0, 1, 2], [3, 4, 5])), ("partition", 4, ([0, 1, 2, 3], [4, 5])),
    ("skip", None, ([0, 2, 4], [0, 2, 4])), ("duplicate", None, (list(range(6)), list(range(6))))])
def test_layer_maps(layer_map, block_layers, want):
    assert plan_layers(6, layer_map, block_layers) == want


@pytest.mark.parametrize("layer_map,block_layers", [("partition", 0), ("partition", 7), ("skip", 2),
                                                    ("duplicate", 3)])
def test_layer_maps_reject_splits_that_do_not_fit(layer_map, block_layers):
    with pytest.raises(BlockformerError):
        plan_layers(6, layer_map, block_layers)


def test_skip_map_copies_every_other_layer(tiny_dirs, tmp_path):
    convert(ConvertConfig(str(tiny_dirs["llama"]), tmp_path / "b", layer_map="skip"))
    ours = load_file(tmp_path / "b" / "model.safetensors")
    theirs = load_original(tiny_dirs["llama"]).state_dict()
    for part in ("block_decoder", "token_decoder"):
        assert torch.equal(ours[f"{part}.layers.1.attn.q.weight"], theirs["model.layers.2.self_attn.q_proj.weight"])


def test_output_folder_contents_and_summary(tiny_dirs, tmp_path):
    s = convert(ConvertConfig(str(tiny_dirs["qwen2"]), tmp_path / "b", dtype="bfloat16"))
    names = {p.name for p in (tmp_path / "b").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md", "convert.json"} <= names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert cfg["model_type"] == "block_transformer" and cfg["dtype"] == "bfloat16"
    assert s["parameters"]["total"] == sum(v for k, v in s["parameters"].items() if k != "total")
    kv = s["kv_bytes_per_sequence_at_2048"]
    assert kv["original"] > 6 * kv["converted"]
    card = (tmp_path / "b" / "README.md").read_text()
    assert str(tiny_dirs["qwen2"]) in card and "block decoder <- original layers 0-1" in card


def test_failed_write_leaves_nothing_and_keeps_old_output(tiny_dirs, tmp_path, monkeypatch):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    import transformers

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        convert(ConvertConfig(str(tiny_dirs["llama"]), out, overwrite=True))
    assert (out / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
