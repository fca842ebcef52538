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
    from transformers import BloomConfig, BloomForCausalLM  # ALiBi positions: none of the supported families
    BloomForCausalLM(BloomConfig(vocab_size=96, hidden_size=16, n_layer=2, n_head=2)).save_pretrained(tmp_path / "m")
    one_error_line(run("convert", tmp_path / "m", tmp_path / "out"), "unsupported architecture 'bloom'", "llama")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,words", [
    (["--block-layers", "9"], ["--block-layers", "4 layers"]),
    (["--block-layers", "0"], ["--block-layers"]),
    (["--block-layers", "2.5"], ["--block-layers", "share"]),
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


# ------------------------------------------------------------------ a source without a tokenizer (issue 12)
def test_convert_without_tokenizer_warns_and_writes_a_complete_folder(tmp_path):
    """The tokenizer is not needed to convert: one warning line, the model folder is complete and runs."""
    src = tmp_path / "src"
    build_original("llama").save_pretrained(src)
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "no tokenizer" in warnings[0] and warnings[0].rstrip().endswith("."), r.stderr
    assert "Traceback" not in r.output and "wrote" in r.stdout
    model = load_block(tmp_path / "out")
    assert torch.isfinite(model(torch.randint(3, 90, (2, 9))).logits).all()
    assert json.loads((tmp_path / "out" / "convert.json").read_text())["tokenizer"] is None
    assert "tokenizer: none" in (tmp_path / "out" / "README.md").read_text()


def test_contextual_init_without_tokenizer_is_one_line(tmp_path):
    src = tmp_path / "src"
    build_original("llama").save_pretrained(src)
    one_error_line(run("convert", src, tmp_path / "out", "--init", "contextual"), "--init contextual", "no tokenizer")
    assert not (tmp_path / "out").exists()


def test_convert_copies_the_tokenizer_files_that_exist(tmp_path):
    """A partial tokenizer (config without vocabulary) cannot be loaded, but what exists is copied as it is."""
    src = tmp_path / "src"
    build_original("llama").save_pretrained(src)
    (src / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    r = CliRunner().invoke(main, ["convert", str(src), str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "out" / "tokenizer_config.json").read_text() == (src / "tokenizer_config.json").read_text()
    load_block(tmp_path / "out")


@pytest.mark.parametrize("command", [["generate", "{out}", "w5 w6"], ["eval", "{out}", "--tasks", "piqa",
                                                                       "--limit", "2"]])
def test_folder_without_tokenizer_is_one_clear_line_later(tmp_path, command):
    src = tmp_path / "src"
    build_original("llama").save_pretrained(src)
    assert run("convert", src, tmp_path / "out").exit_code == 0
    r = run(*[c.format(out=tmp_path / "out") for c in command])
    one_error_line(r, "no tokenizer", str(tmp_path / "out"))
    line = [x for x in r.output.splitlines() if x.startswith("error:")][0]
    assert not line.rstrip().endswith(":"), line  # a complete sentence, not one cut after its first line
