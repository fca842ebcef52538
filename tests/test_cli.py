"""`blockformer convert` as a user runs it: end to end per family, and one clear line for each bad input."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from blockformer.cli import main
from tiny import build_original, load_block, tiny_tokenizer


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result, *words):
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [line for line in result.output.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    for w in words:
        assert w in lines[0], lines[0]


def test_convert_end_to_end(tiny_dirs, family, tmp_path):
    r = run("convert", tiny_dirs[family], tmp_path / "out", "--block-length", 2)
    assert r.exit_code == 0, r.output
    assert "parameters" in r.output and "KV cache" in r.output and "wrote" in r.output
    model = load_block(tmp_path / "out")
    assert model.config.block_length == 2 and model.config.provenance["family"] == family
    assert torch.isfinite(model(torch.randint(3, 90, (2, 9))).logits).all()


def test_missing_source(tmp_path):
    one_error_line(run("convert", tmp_path / "nope", tmp_path / "out"), "not found")
    assert not (tmp_path / "out").exists()


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "src").mkdir()
    one_error_line(run("convert", tmp_path / "src", tmp_path / "out"), "not a model folder")


def test_unsupported_family(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM
    OPTForCausalLM(OPTConfig(vocab_size=96, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             ffn_dim=32, word_embed_proj_dim=16)).save_pretrained(tmp_path / "opt")
    one_error_line(run("convert", tmp_path / "opt", tmp_path / "out"), "unsupported architecture 'opt'", "llama")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,words", [
    (["--block-layers", "9"], ["--block-layers", "4 layers"]),
    (["--block-layers", "0"], ["--block-layers"]),
    (["--block-length", "0"], ["--block-length"]),
    (["--prefix-length", "0"], ["--prefix-length"]),
    (["--layer-map", "skip", "--block-layers", "3"], ["skip"]),
])
def test_bad_options(tiny_dirs, tmp_path, args, words):
    one_error_line(run("convert", tiny_dirs["llama"], tmp_path / "out", *args), *words)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept_without_overwrite(tiny_dirs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("precious")
    one_error_line(run("convert", tiny_dirs["llama"], out), "already exists", "--overwrite")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    r = run("convert", tiny_dirs["llama"], out, "--overwrite")
    assert r.exit_code == 0 and (out / "config.json").exists() and not (out / "mine.txt").exists()


def test_corrupt_weights(tmp_path):
    src = tmp_path / "src"
    build_original("llama").save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    one_error_line(run("convert", src, tmp_path / "out"), "could not load the weights")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_help_documents_every_option():
    r = run("convert", "--help")
    assert r.exit_code == 0
    for opt in ("--block-length", "--block-layers", "--layer-map", "--prefix-length", "--dtype", "--overwrite"):
        assert opt in r.output


def test_summary_json_written(tiny_dirs, tmp_path):
    run("convert", tiny_dirs["gpt2"], tmp_path / "out")
    s = json.loads((tmp_path / "out" / "convert.json").read_text())
    assert s["family"] == "gpt2" and s["block_layers_from"] == [0, 1] and s["token_layers_from"] == [2, 3]
