"""Bad input across the commands (found by a user's-eye audit): one line and a non-zero exit, nothing of the user's
destroyed, no value silently ignored."""
from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from blockformer.cli import main
from test_cli import one_error_line
from tiny import convert_tiny, write_synthetic_tasks


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def blk(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("guards") / "blk"
    convert_tiny(tiny_dirs["llama"], out)
    return out


# ------------------------------------------------------------------ --overwrite never destroys what a run reads
def test_convert_into_its_own_source_or_a_folder_holding_it_is_refused(tiny_dirs, tmp_path):
    src = tmp_path / "outer" / "src"
    shutil.copytree(tiny_dirs["llama"], src)
    before = sorted(p.name for p in src.iterdir())
    one_error_line(run("convert", src, src, "--overwrite"), "is or holds")
    one_error_line(run("convert", src, tmp_path / "outer", "--overwrite"), "is or holds")
    assert sorted(p.name for p in src.iterdir()) == before
    one_error_line(run("convert", src, "", "--overwrite"), "must be named")


def test_convert_into_the_current_folder_is_refused(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("mine")
    one_error_line(run("convert", tiny_dirs["llama"], ".", "--overwrite"), "must be named")
    one_error_line(run("convert", tiny_dirs["llama"], tmp_path, "--overwrite"), "current folder")
    assert (tmp_path / "keep.txt").read_text() == "mine"


def test_uptrain_and_eval_refuse_an_output_holding_their_inputs(blk, corpus, tmp_path):
    one_error_line(run("uptrain", blk, "--data", corpus, "--out", blk, "--overwrite", "--max-steps", 1), "is or holds")
    one_error_line(run("eval", blk, "--out", blk.parent, "--overwrite", "--tasks", "piqa"), "is or holds")
    assert (blk / "model.safetensors").exists()


def test_bench_keeps_earlier_results_unless_overwrite(blk, tmp_path):
    args = ["bench", blk, "--prompt-len", 8, "--gen-len", 4, "--batch-sizes", 1, "--repeats", 1, "--out", tmp_path / "b"]
    assert run(*args).exit_code == 0
    stamp = os.stat(tmp_path / "b" / "bench.json").st_mtime_ns
    one_error_line(run(*args), "already exists", "--overwrite")
    assert os.stat(tmp_path / "b" / "bench.json").st_mtime_ns == stamp
    assert run(*args, "--overwrite").exit_code == 0
    (tmp_path / "f").write_text("x")
    one_error_line(run(*args[:-1], tmp_path / "f", "--overwrite"), "not a folder")


@pytest.mark.parametrize("extra, words", [
    (["--batch-sizes", ""], ["--batch-sizes"]),
    (["--batch-sizes", "1,1"], ["distinct"]),
    (["--scenario", "decode-heavy"], ["custom scenario"]),
    (["--device", "banana"], ["not a device"]),
])
def test_bench_refuses_options_it_would_ignore(blk, tmp_path, extra, words):
    one_error_line(run("bench", blk, "--prompt-len", 8, "--gen-len", 4, "--repeats", 1, "--out", tmp_path / "b",
                       *extra), *words)
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------ values that crashed or were silently accepted
@pytest.mark.parametrize("extra, words", [
    (["--max-length", 1], ["--max-length", "at least 2"]),
    (["--max-length", 0], ["--max-length"]),
    (["--max-length", 100000], ["context of 256"]),
    (["--max-length", 5], ["does not fit the scoring window"]),  # was scored silently wrong
    (["--batch-tokens", 0], ["--batch-tokens"]),
    (["--batch-tokens", -5], ["--batch-tokens"]),
    (["--device", "banana"], ["not a device"]),
])
def test_eval_refuses_bad_numbers_and_devices(blk, tmp_path, extra, words):
    write_synthetic_tasks(tmp_path / "tasks")
    one_error_line(run("eval", blk, "--data-dir", tmp_path / "tasks", "--tasks", "piqa", "--limit", 3, *extra), *words)


@pytest.mark.parametrize("extra, words", [
    (["--sample", "--temperature", "nan"], ["--temperature"]),
    (["--sample", "--temperature", 0], ["--temperature"]),
    (["--sample", "--top-k", -5], ["--top-k"]),
    (["--sample", "--top-p", 2], ["--top-p"]),
    (["--sample", "--top-p", "nan"], ["--top-p"]),
    (["--top-k", 5], ["--sample"]),
    (["--seed", 5], ["--sample"]),
])
def test_generate_refuses_bad_sampling(blk, extra, words):
    one_error_line(run("generate", blk, "w5 w6 w7", "--max-new-tokens", 2, *extra), *words)


def test_convert_refuses_a_bad_shard_size_and_an_empty_token_decoder(tiny_dirs, tmp_path):
    for size in ("banana", "0"):
        one_error_line(run("convert", tiny_dirs["llama"], tmp_path / "a", "--max-shard-size", size), "--max-shard-size")
    one_error_line(run("convert", tiny_dirs["llama"], tmp_path / "b", "--block-layers", 4), "no layer", "at most 3")
    assert run("convert", tiny_dirs["llama"], tmp_path / "c", "--block-layers", 4, "--block-length", 1).exit_code == 0
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_recipe_with_a_bad_shard_size_fails_validation(tmp_path):
    from blockformer.errors import BlockformerError
    from blockformer.pipeline.recipe import load_recipe
    (tmp_path / "r.yaml").write_text("source: default\nout: o\nconvert:\n  max_shard_size: banana\n")
    with pytest.raises(BlockformerError, match=r"convert\.max_shard_size"):
        load_recipe(str(tmp_path / "r.yaml"))


# ------------------------------------------------------------------ data
def test_training_text_must_be_text(blk, tmp_path):
    from blockformer.errors import BlockformerError
    from blockformer.uptrain.data import read_documents
    (tmp_path / "n.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in ("w5 w6", None, "w7")))
    assert read_documents(str(tmp_path / "n.jsonl")) == ["w5 w6", "w7"]  # null: an empty document, dropped
    (tmp_path / "five.jsonl").write_text(json.dumps({"text": "w5"}) + "\n" + json.dumps({"text": 5}) + "\n")
    with pytest.raises(BlockformerError, match=r"five\.jsonl:2: field 'text' holds int"):
        read_documents(str(tmp_path / "five.jsonl"))
    (tmp_path / "bad.parquet").write_bytes(os.urandom(256))
    one_error_line(run("uptrain", blk, "--data", tmp_path / "bad.parquet", "--out", tmp_path / "u", "--max-steps", 1),
                   "not a readable parquet file")
    assert not (tmp_path / "u").exists()


def test_synth_refuses_to_write_past_the_context(tiny_dirs, tmp_path):
    one_error_line(run("synth", tiny_dirs["llama"], "--tokens", 16, "--batch-size", 2, "--max-new-tokens", 100000,
                       "--out", tmp_path / "s.jsonl"), "context of 256")
    assert not (tmp_path / "s.jsonl").exists()


def test_synth_writes_json_lines_only_to_a_jsonl_name(tiny_dirs, tmp_path):
    one_error_line(run("synth", tiny_dirs["llama"], "--tokens", 16, "--out", tmp_path / "s.txt"), "*.jsonl")
