"""`blockformer bench` and `blockformer generate` end to end on tiny models (speed itself is measured in bench/)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from blockformer import costs
from blockformer.cli import main
from tiny import convert_tiny, load_block


@pytest.fixture(scope="module")
def pair(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "block"
    convert_tiny(tiny_dirs["llama"], out)
    return out, tiny_dirs["llama"]


def test_bench_cli_writes_table_json_and_plot(pair, tmp_path):
    block, orig = pair
    r = CliRunner().invoke(main, ["bench", str(block), "--baseline", str(orig), "--prompt-len", "12", "--gen-len", "6",
                                  "--batch-sizes", "1,2", "--repeats", "2", "--device", "cpu",
                                  "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    last = json.loads(r.output.strip().splitlines()[-1])
    assert [p["batch"] for p in last["points"]] == [1, 2] and all(p["speedup"] > 0 for p in last["points"])
    res = json.loads((tmp_path / "b" / "bench.json").read_text())
    p = res["points"][0]
    # KV bytes at batch 1 after 12 + 6 tokens: the original caches 18 positions in each of its 4 layers; the block
    # model ceil(18 / 4) = 5 block positions in its 2 lower layers and its window (prefix 2 + 4 - 1) in the 2 upper
    model = load_block(block)
    c, per_pos = model.config, 2 * 2 * 8 * 4   # K and V, 2 KV heads of dim 8, float32
    assert (c.num_block_layers, c.num_token_layers, c.block_length, c.prefix_length) == (2, 2, 4, 2)
    assert p["batch"] == 1 and p["original"]["kv_cache_bytes"] == per_pos * 4 * 18
    assert p["block"]["kv_cache_bytes"] == per_pos * (2 * 5 + 2 * (2 + 4 - 1))
    model.setup_caches(1, 5)  # the accounting is what generation allocates
    allocated = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith((".k", ".v")))
    model.release_caches()
    assert allocated == p["block"]["kv_cache_bytes"]
    for role in ("original", "original_static", "original_same_engine"):  # the three baselines, same run
        assert p[role]["tokens_per_s"] > 0 and p[f"speedup_vs_{role}"] > 0, role
    assert p["measured_over_predicted"] == pytest.approx(p["speedup_vs_original_same_engine"] / p["predicted"]["speedup"])
    assert "original (our decoder)" in r.output and "original (HF static cache)" in r.output
    assert res["machine"]["device"] == "cpu"
    assert p["predicted"]["speedup"] > 0 and p["block"]["ttft_s"] > 0
    assert (tmp_path / "b" / "throughput.png").stat().st_size > 1000


def test_engines_are_timed_in_alternating_rounds_and_compared_within_them(monkeypatch):
    """Each round times every engine once, the order reversing from round to round; the speed-up is the median of
    the within-round ratios, so a machine that slows down between rounds does not bias it (the ratio of the two
    medians would: 1.5 here instead of 3)."""
    from blockformer import bench
    calls, clock = [], {"block": iter([9, 9, 9, 1, 2, 3]), "orig": iter([9, 9, 9, 3, 3, 9])}  # 3 TTFT, 3 full each
    gens = {role: (lambda n, role=role: calls.append((role, n))) for role in ("block", "orig")}
    monkeypatch.setattr(bench, "_timed", lambda fn, device: (fn(), next(clock[calls[-1][0]]))[1])
    res = bench.measure(gens, 1, 4, bench.BenchConfig("m", repeats=3))
    assert calls[:2] == [("block", 2), ("orig", 2)]                          # warm-ups
    full = [role for role, n in calls if n == 4]
    assert full == ["block", "orig", "orig", "block", "block", "orig"]
    assert res["block"]["seconds_all"] == [1, 2, 3] and res["orig"]["seconds_all"] == [3, 3, 9]
    assert bench.paired_speedup(res["block"]["seconds_all"], res["orig"]["seconds_all"]) == 3
    assert res["orig"]["seconds"] / res["block"]["seconds"] == 1.5


@pytest.mark.parametrize("args,msg", [(["--prompt-len", "300", "--gen-len", "10"], "context"),
                                      (["--prompt-len", "5"], "--prompt-len and --gen-len"),
                                      (["--batch-sizes", "0"], "--batch-sizes"),
                                      (["--baselines", "hf,vllm"], "baselines must be some of")])
def test_bench_bad_input(pair, args, msg):
    r = CliRunner().invoke(main, ["bench", str(pair[0]), *args])
    assert r.exit_code != 0 and msg in r.output and "Traceback" not in r.output


def test_generate_cli_prints_prompt_then_every_generated_token(pair):
    """Greedy: stdout is exactly the prompt followed by the decoded new tokens (none dropped)."""
    from tiny import load_block, tiny_tokenizer
    prompt, tok = "w5 w6 w7", tiny_tokenizer()
    r = CliRunner().invoke(main, ["generate", str(pair[0]), prompt, "--max-new-tokens", "9"])
    assert r.exit_code == 0, r.output
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = load_block(pair[0]).generate(ids, max_new_tokens=9)
    new = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert new.strip() and r.stdout == prompt + new + "\n"
    assert f"[{out.shape[1] - ids.shape[1]} tokens in" in r.stderr


def test_generate_cli_rejects_empty_prompt(pair):
    r = CliRunner().invoke(main, ["generate", str(pair[0]), ""])
    assert r.exit_code != 0 and "empty prompt" in r.output


def test_cost_model_prefers_the_block_model_at_long_prompts(pair):
    from tiny import load_block
    cfg = load_block(pair[0]).config
    short = costs.predict(cfg, 16, 16, 1, 4, 1e11, 2e10)["speedup"]
    long = costs.predict(cfg, 2048, 128, 8, 4, 1e11, 2e10)["speedup"]
    assert long > short and long > 1


@pytest.mark.parametrize("k, rates, want", [
    # D 2, I 4, one head of 2, gated MLP: 40 parameters a layer; head 2 x 10, embedder projection 2 x 2 x 2; 1 byte
    # compute-bound (time = FLOPs): original 808 prefill + 2 x 280 decoding steps; block 208 prefill + one block of
    # 116 (block step) + 124 (prefix -> first token) + 136 (second token)
    (0, (1.0, 1e30, None), (808 + 2 * 280, 208 + 116 + 124 + 136)),
    # with 1 local layer and a sink: 3 original layers; the embedder's layer on 3 positions: 552 for the prompt's two
    # blocks, 276 per finished block
    (1, (1.0, 1e30, None), (1192 + 2 * 400, 208 + 552 + 116 + 276 + 124 + 136)),
    # bandwidth-bound (time = bytes / rate; decoding steps at the skinny rate 0.5): weights 40 a layer + KV 4 a
    # position + the extra matrix
    (0, (1e30, 1.0, 0.5), (148 + 2 * 148 / 0.5, 60 + (62 + 66 + 72) / 0.5)),
])
def test_cost_model_matches_a_hand_computation(k, rates, want):
    from types import SimpleNamespace
    cfg = SimpleNamespace(hidden_size=2, intermediate_size=4, num_attention_heads=1, num_key_value_heads=1,
                          head_dim=2, vocab_size=10, block_length=2, prefix_length=1, num_block_layers=1,
                          num_token_layers=1, embedder_layers=k, embedder_sink=bool(k), local_token_inputs=False)
    got = costs.predict(cfg, 4, 2, 1, 1, *rates)
    assert (got["original_s"], got["block_s"]) == pytest.approx(want, rel=1e-12)
    assert got["speedup"] == pytest.approx(want[0] / want[1], rel=1e-12)


def test_slower_decoding_steps_lower_the_predicted_decode_heavy_time_share(pair):
    """Skinny decoding products stream weights slower than a copy: with a lower decode bandwidth every decoding
    phase costs more, the prompt's prefill does not, and the default is the copy bandwidth."""
    from tiny import load_block
    cfg = load_block(pair[0]).config
    same = costs.predict(cfg, 64, 32, 4, 4, 1e11, 2e10)
    assert costs.predict(cfg, 64, 32, 4, 4, 1e11, 2e10, 2e10) == same
    slow = costs.predict(cfg, 64, 32, 4, 4, 1e11, 2e10, 2e9)
    assert slow["original_s"] > same["original_s"] and slow["block_s"] > same["block_s"]
    prefill_only = costs.predict(cfg, 64, 0, 4, 4, 1e11, 2e10, 2e9)
    assert prefill_only["original_s"] == costs.predict(cfg, 64, 0, 4, 4, 1e11, 2e10)["original_s"]


def test_rates_are_measured_on_the_bench_device(pair, monkeypatch, tmp_path):
    """The roofline's matmul rate and bandwidth come from the device the models run on, not from the CPU."""
    from blockformer.bench import BenchConfig, run_bench
    seen = []

    def fake_rates(dtype, device="<not passed>", seconds=1.0):
        seen.append((dtype, str(device)))
        return 1e12, 1e11
    monkeypatch.setattr(costs, "machine_rates", fake_rates)
    monkeypatch.setattr(costs, "skinny_bandwidth", lambda rows, dtype, device="<not passed>", seconds=0.5:
                        seen.append(("skinny", rows, str(device))) or 5e10)
    monkeypatch.setattr(costs.torch.cuda, "is_available", lambda: True)  # a CUDA machine benching on "cpu"
    monkeypatch.setattr(costs.torch.cuda, "get_device_name", lambda *a: "Fake GPU")
    res = run_bench(BenchConfig(str(pair[0]), None, {"t": (8, 4), "u": (6, 2)}, (1,), 1, dtype="float32",
                                device="cpu"), log=lambda s: None)
    assert seen == [(costs.torch.float32, "cpu"), ("skinny", 1, "cpu")]  # two scenarios, one batch: measured once
    assert res["machine"]["decode_gbs_by_batch"] == {1: 50.0}
    assert res["machine"]["matmul_gflops"] == 1000 and res["machine"]["device"] == "cpu"
    assert res["machine"]["cuda"] is None   # the bench ran on the CPU, so no GPU name is reported


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_machine_rates_run_on_the_given_device(device, monkeypatch):
    """Every tensor of the measurement lives on the device asked for, and the clock waits for it."""
    made, synced = [], []
    real_randn, real_empty = costs.torch.randn, costs.torch.empty
    monkeypatch.setattr(costs.torch, "randn", lambda *a, **k: made.append(k.get("device")) or real_randn(*a, **k))
    monkeypatch.setattr(costs.torch, "empty", lambda *a, **k: made.append(k.get("device")) or real_empty(*a, **k))
    monkeypatch.setattr(costs, "synchronize", lambda d: synced.append(str(d)))
    flops, bw = costs.machine_rates(costs.torch.float32, device, seconds=0.01)
    assert made and all(str(d) == device for d in made) and flops > 0 and bw > 0
    assert synced and set(synced) == {device}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_same_engine_baseline_is_the_original_exactly(tiny_dirs, family):
    """The bench's 'our decoder' baseline computes the original's logits and greedy tokens, so its ratio to the
    block model is the architecture's alone."""
    import torch
    from blockformer.convert.convert import same_engine
    from tiny import load_original
    original = load_original(tiny_dirs[family])
    ours = same_engine(original)
    x = torch.randint(3, 96, (2, 30), generator=torch.Generator().manual_seed(2))  # a seed whose greedy run hits EOS
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, original(x).logits, rtol=1e-5, atol=1e-5)
    # the bench's HF runs force min_new_tokens (which bans EOS), so compare plain greedy decoding here
    hf = original.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False,
                           eos_token_id=None, pad_token_id=0)
    assert torch.equal(ours.generate(x, max_new_tokens=12, eos_token_id=None), hf)
