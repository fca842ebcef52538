"""`blockformer bench` and `blockformer generate` end to end on tiny models (speed itself is measured in bench/)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from blockformer import costs
from blockformer.cli import main
from tiny import convert_tiny


@pytest.fixture(scope="module")
def pair(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "block"
    convert_tiny(tiny_dirs["llama"], out)
    return out, tiny_dirs["llama"]


def test_bench_cli_writes_table_json_and_plot(pair, tmp_path):
    block, orig = pair
    r = CliRunner().invoke(main, ["bench", str(block), "--baseline", str(orig), "--prompt-len", "12", "--gen-len", "6",
                                  "--batch-sizes", "1,2", "--repeats", "2", "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    last = json.loads(r.output.strip().splitlines()[-1])
    assert [p["batch"] for p in last["points"]] == [1, 2] and all(p["speedup"] > 0 for p in last["points"])
    res = json.loads((tmp_path / "b" / "bench.json").read_text())
    p = res["points"][0]
    assert p["block"]["kv_cache_bytes"] < p["original"]["kv_cache_bytes"] or p["prompt"] + p["generate"] < 64
    assert p["predicted"]["speedup"] > 0 and p["block"]["ttft_s"] > 0
    assert (tmp_path / "b" / "throughput.png").stat().st_size > 1000


@pytest.mark.parametrize("args,msg", [(["--prompt-len", "300", "--gen-len", "10"], "context"),
                                      (["--prompt-len", "5"], "--prompt-len and --gen-len"),
                                      (["--batch-sizes", "0"], "--batch-sizes")])
def test_bench_bad_input(pair, args, msg):
    r = CliRunner().invoke(main, ["bench", str(pair[0]), *args])
    assert r.exit_code != 0 and msg in r.output and "Traceback" not in r.output


def test_generate_cli_streams_text(pair):
    r = CliRunner().invoke(main, ["generate", str(pair[0]), "w5 w6 w7", "--max-new-tokens", "5"])
    assert r.exit_code == 0, r.output
    assert "w5 w6 w7" in r.output and "5 tokens in" in r.output


def test_generate_cli_rejects_empty_prompt(pair):
    r = CliRunner().invoke(main, ["generate", str(pair[0]), ""])
    assert r.exit_code != 0 and "empty prompt" in r.output


def test_cost_model_prefers_the_block_model_at_long_prompts(pair):
    from tiny import load_block
    cfg = load_block(pair[0]).config
    short = costs.predict(cfg, 16, 16, 1, 4, 1e11, 2e10)["speedup"]
    long = costs.predict(cfg, 2048, 128, 8, 4, 1e11, 2e10)["speedup"]
    assert long > short and long > 1
