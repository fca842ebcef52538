"""Conversion: every copied tensor equals its source, the paper's init, layer maps, files, atomic writes."""
from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from blockformer import cli, sources
from blockformer import io as bf_io
from blockformer.convert import ConvertConfig, convert, plan_layers
from blockformer.errors import BlockformerError
from tiny import convert_tiny, load_original, tiny_config

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
    ("partition", 0.8, ([0, 1, 2, 3, 4], [5])), ("partition", 4.0, ([0, 1, 2, 3], [4, 5])),  # a share; a count as float
    ("skip", None, ([0, 2, 4], [0, 2, 4])), ("duplicate", None, (list(range(6)), list(range(6))))])
def test_layer_maps(layer_map, block_layers, want):
    assert plan_layers(6, layer_map, block_layers) == want


@pytest.mark.parametrize("layer_map,block_layers", [("partition", 0), ("partition", 7), ("skip", 2),
                                                    ("duplicate", 3), ("partition", 2.5), ("partition", -0.5)])
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

    written = []

    def boom(self, folder, *a, **k):  # the tokenizer is saved after the weights: the failure is mid-write
        written.extend(p.name for p in Path(folder).iterdir())
        raise RuntimeError("disk full")
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        convert(ConvertConfig(str(tiny_dirs["llama"]), out, overwrite=True))
    assert "model.safetensors" in written
    assert (out / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# ------------------------------------------------------------------ leftovers of killed runs, unwritable outputs
def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped): what a run killed with -9 leaves in folder names."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_next_run_removes_temp_folders_of_dead_runs_only(tiny_dirs, tmp_path):
    out, dead = tmp_path / "b", dead_pid()
    out.mkdir()  # a dead run's `.old` with OUT in place: the swap was complete, it is garbage
    for name in (f".b.tmp-{dead}", f".b.old-{dead}", f".b.probe-{dead}", f".b.tmp-{2**22 + 1}"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 1000)
    live = subprocess.Popen(["sleep", "60"])  # another run still writing: its folder must survive
    try:
        (tmp_path / f".b.tmp-{live.pid}").mkdir()
        (tmp_path / ".b.tmp-x").mkdir()  # not a PID: not ours to judge
        convert(ConvertConfig(str(tiny_dirs["llama"]), out, overwrite=True))
        assert sorted(p.name for p in tmp_path.iterdir()) == [f".b.tmp-{live.pid}", ".b.tmp-x", "b"]
    finally:
        live.kill()
        live.wait()


def test_run_killed_but_not_yet_reaped_counts_as_dead(tmp_path):
    """kill -9 under an init that never reaps leaves a zombie: os.kill(pid, 0) still succeeds for it."""
    victim = subprocess.Popen(["sleep", "60"])
    victim.kill()
    while open(f"/proc/{victim.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        pass  # not reaped (no wait()) until the end of the test
    try:
        (tmp_path / f".b.tmp-{victim.pid}").mkdir()
        bf_io.remove_stale_temps(tmp_path / "b")
        assert list(tmp_path.iterdir()) == []
    finally:
        victim.wait()

def test_folder_of_a_run_killed_mid_swap_is_restored_not_deleted(tiny_dirs, tmp_path):
    """Killed between `OUT -> .OUT.old-PID` and `.OUT.tmp-PID -> OUT`: the user's previous output comes back."""
    dead = dead_pid()
    (tmp_path / f".b.old-{dead}").mkdir()
    (tmp_path / f".b.old-{dead}" / "keep.txt").write_text("user data")
    (tmp_path / f".b.tmp-{dead}").mkdir()
    with pytest.raises(BlockformerError, match="already exists"):  # restored, so not replaced without --overwrite
        convert(ConvertConfig(str(tiny_dirs["llama"]), tmp_path / "b"))
    assert (tmp_path / "b" / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC, errno.EACCES])
def test_unwritable_output_fails_in_one_line_before_loading_the_model(tiny_dirs, tmp_path, monkeypatch, err):
    def probe(*a, **k):
        raise OSError(err, os.strerror(err))

    def load_model(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")
    monkeypatch.setattr(bf_io, "_probe", probe)
    monkeypatch.setattr(sources, "load_model", load_model)
    out = tmp_path / "sub" / "b"
    with pytest.raises(BlockformerError) as e:
        convert(ConvertConfig(str(tiny_dirs["llama"]), out))
    msg = str(e.value)
    assert str(out) in msg and os.strerror(err) in msg and "\n" not in msg
    result = CliRunner().invoke(cli.main, ["convert", str(tiny_dirs["llama"]), str(out)])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [f"error: {msg}"]


def test_ensure_writable_probes_and_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "b"
    bf_io.ensure_writable(out)  # creates the parent, probes it, removes the probe
    assert list((tmp_path / "new").iterdir()) == [] and not out.exists()


RUST_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors: no errno


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), Exception(RUST_FULL)])
def test_disk_full_mid_write_is_one_line_and_leaves_nothing(tiny_dirs, tmp_path, monkeypatch, exc):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    import transformers

    def full(*a, **k):
        raise exc
    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", full)
    with pytest.raises(BlockformerError) as e:
        convert(ConvertConfig(str(tiny_dirs["llama"]), out, overwrite=True))
    assert str(out) in str(e.value) and "No space left on device" in str(e.value) and "\n" not in str(e.value)
    assert (out / "keep.txt").read_text() == "user data"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# -------------------------------------------------------------------- layouts the source model cannot hold
def save_tiny(family: str, path, **overrides):
    """A tiny original of `family` with config fields overridden, saved to `path`."""
    from tiny import tiny_tokenizer
    d = {k: v for k, v in tiny_config(family).to_dict().items() if k != "layer_types"}  # derived: recomputed
    cfg = type(tiny_config(family)).from_dict({**d, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # away from init, so that masking differences show
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_block_window_longer_than_the_models_positions_is_refused(tiny_dirs, tmp_path, family):
    """The token decoder's window is prefix + L_B - 1 positions: it must fit the 256 positions of the model."""
    with pytest.raises(BlockformerError, match="--block-length 300 .*256"):
        convert(ConvertConfig(str(tiny_dirs[family]), tmp_path / "b", block_length=300))
    with pytest.raises(BlockformerError, match="--prefix-length 3 .*256"):
        convert(ConvertConfig(str(tiny_dirs[family]), tmp_path / "b", block_length=255, prefix_length=3))
    assert list(tmp_path.iterdir()) == []
    model = convert_tiny(tiny_dirs[family], tmp_path / "b", block_length=255, prefix_length=2)  # just fits
    x = torch.randint(3, 96, (1, 256))
    assert model(x).logits.shape == (1, 256, 96)


@torch.no_grad()
@pytest.mark.parametrize("family,overrides,windows", [
    ("mistral", {"sliding_window": 8}, [8] * 4),                                      # every layer slides
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}, [None, None, 8, 8])])
def test_sliding_window_models_convert_exactly(tmp_path, family, overrides, windows):
    """A window that bites (8 of 48 positions) maps to per-layer windows, and the degenerate split stays exact."""
    src = save_tiny(family, tmp_path / "src", **overrides)
    block = convert_tiny(src, tmp_path / "b", block_length=1, block_layers=4)
    assert block.config.block_windows == windows
    x = torch.randint(3, 96, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = load_original(src)(x).logits
    assert_close(block(x).logits, ref, rtol=1e-5, atol=1e-5)
    from transformers import AutoConfig
    unwindowed = AutoConfig.from_pretrained(src)
    unwindowed.sliding_window, unwindowed.layer_types = None, ["full_attention"] * 4
    global_ = AutoModelForCausalLM.from_pretrained(src, config=unwindowed, dtype=torch.float32).eval()
    assert not torch.allclose(ref, global_(x).logits, atol=1e-3)  # the window really bites


@torch.no_grad()
@pytest.mark.parametrize("family,overrides", [
    ("mistral", {"sliding_window": 256}), ("mistral", {"sliding_window": 1000}),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 4})])  # no layer slides
def test_sliding_window_without_effect_still_converts_exactly(tmp_path, family, overrides):
    src = save_tiny(family, tmp_path / "src", **overrides)
    block = convert_tiny(src, tmp_path / "b", block_length=1, block_layers=4)
    x = torch.randint(3, 96, (2, 48), generator=torch.Generator().manual_seed(0))
    assert_close(block(x).logits, load_original(src)(x).logits, rtol=1e-5, atol=1e-5)
