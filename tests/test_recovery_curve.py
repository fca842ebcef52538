"""bench/recovery_curve.py: the share of above-chance accuracy kept, checkpoint export, outputs and resume."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from blockformer.uptrain import UptrainConfig, uptrain
from tiny import VOCAB, convert_tiny, load_block

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("recovery_curve", ROOT / "bench" / "recovery_curve.py")
curve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(curve)


def test_kept_is_the_share_of_the_originals_margin_over_chance():
    original = {"piqa": {"acc": 0.62}, "arc_easy": {"acc": 0.45}, "wikitext": {"word_perplexity": 40.0}}
    model = {"piqa": {"acc": 0.56, "acc_stderr": 0.024}, "arc_easy": {"acc": 0.20, "acc_stderr": 0.02},
             "wikitext": {"word_perplexity": 400.0}}
    k = curve.kept(model, original)
    assert k["piqa"] == pytest.approx((56 - 50) / (62 - 50))
    assert k["arc_easy"] == pytest.approx((20 - 25) / (45 - 25))          # below chance counts as negative
    assert k["mean"] == pytest.approx((0.5 - 0.25) / 2) and "wikitext" not in k
    assert k["mean_stderr"] == pytest.approx(((2.4 / 12) ** 2 + (2 / 20) ** 2) ** 0.5 / 2, abs=1e-3)


@pytest.fixture(scope="module")
def run(tiny_dirs, corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("curve")
    convert_tiny(tiny_dirs["llama"], root / "block")
    uptrain(UptrainConfig(str(root / "block"), str(corpus), root / "up", seq_len=32, batch_size=2, max_steps=2,
                          save_every=1, eval_every=2, warmup_steps=1))
    return root


def test_an_exported_checkpoint_is_the_model_of_that_step(run):
    folder = curve.export_checkpoint(run / "up" / "checkpoints" / "step-2", run / "block")
    x = torch.randint(3, VOCAB, (2, 13))
    torch.testing.assert_close(load_block(folder)(x).logits, load_block(run / "up" / "model")(x).logits,
                               rtol=0, atol=0)
    assert not torch.equal(load_block(folder)(x).logits, load_block(run / "block")(x).logits)


def test_curve_writes_table_json_plot_and_resumes_without_rescoring(run, tiny_dirs, monkeypatch, tmp_path):
    args = ["--original", str(tiny_dirs["llama"]), "--point", f"0={run / 'block'}",
            "--point", f"64={run / 'up' / 'checkpoints' / 'step-1'}", "--tasks", "piqa,lambada_openai",
            "--limit", "4", "--lambada-limit", "4", "--out", str(tmp_path)]
    res = CliRunner().invoke(curve.main, args)
    assert res.exit_code == 0, res.output
    last = json.loads(res.output.strip().splitlines()[-1])
    data = json.loads((tmp_path / "curve.json").read_text())["points"]
    assert set(data) == {"original", "0 tokens", "64 tokens"} and (tmp_path / "curve.png").stat().st_size > 0
    assert last["kept_mean"]["0 tokens"] == data["0 tokens"]["kept"]["mean"]
    assert data["64 tokens"]["spec"].endswith("model-step-1") and "| 64 tokens | 64 |" in (tmp_path / "curve.md").read_text()
    # LAMBADA under the paper's anchoring too, for every point but the original (the same under both anchors)
    first = data["0 tokens"]["metrics"]["lambada_openai@first"]
    ref = curve.evaluate(curve.EvalConfig(model=str(run / "block"), tasks=("lambada_openai",), limit=4, anchor="first"))
    assert first["perplexity"] == pytest.approx(ref["tasks"]["lambada_openai"]["metrics"]["model"]["perplexity"])
    assert first["perplexity"] != pytest.approx(data["0 tokens"]["metrics"]["lambada_openai"]["perplexity"])
    assert "lambada_openai@first" not in data["original"]["metrics"] and "anchor first" in (tmp_path / "curve.md").read_text()
    calls = []
    monkeypatch.setattr(curve, "score", lambda *a, **k: calls.append(a) or {})
    assert CliRunner().invoke(curve.main, args).exit_code == 0 and calls == []
    saved = json.loads((tmp_path / "curve.json").read_text())   # a point missing one task: only that one is scored
    del saved["points"]["64 tokens"]["metrics"]["lambada_openai@first"]
    (tmp_path / "curve.json").write_text(json.dumps(saved))
    assert CliRunner().invoke(curve.main, args).exit_code == 0
    assert [(c[1], c[2]) for c in calls] == [("64 tokens", ["lambada_openai@first"])]


def bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def notes_file(tmp_path):
    """Calibration text for tiny models: 300 lines of 12 tiny-vocabulary words."""
    notes = tmp_path / "notes.txt"
    notes.write_text("\n".join(" ".join(f"w{(i * 7 + j) % 90 + 4}" for j in range(12)) for i in range(300)))
    return notes


@pytest.mark.parametrize("block_layers,block_length", [(None, 4), (3, 2)])
def test_window_oracle_variants_share_what_they_should(tiny_dirs, tmp_path, block_layers, block_length):
    """bench/window_oracle.py on a tiny model, at the default split and block and others: the first position
    of a block sees only the prefix, so the variants that share a prefix agree there, and the ones whose token
    inputs differ do not agree after it."""
    oracle, notes = bench_module("window_oracle"), notes_file(tmp_path)
    split = (["--block-layers", str(block_layers)] if block_layers else []) + ["--block-length", str(block_length)]
    res = CliRunner().invoke(oracle.main, ["--source", str(tiny_dirs["llama"]), "--tokens", "256", "--rows", "64",
                                           "--calib-tokens", "1024", "--calib-data", str(notes), *split,
                                           "--json-out", str(tmp_path / "o.json")])
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "o.json").read_text())
    layers = json.loads((tiny_dirs["llama"] / "config.json").read_text())["num_hidden_layers"]
    assert out["split_layer"] == (block_layers or layers // 2)
    v = out["variants"]
    assert len(v["model"]["per_position"]) == block_length
    assert v["model"]["per_position"][0] == pytest.approx(v["true tokens"]["per_position"][0], abs=1e-5)
    assert v["true prefix"]["per_position"][0] == pytest.approx(v["true both"]["per_position"][0], abs=1e-5)
    assert v["model"]["per_position"][1] != pytest.approx(v["true tokens"]["per_position"][1], abs=1e-3)


def test_window_oracle_probes_a_saved_model_with_its_own_token_decoder(tiny_dirs, tmp_path):
    """--model: the oracle reads the folder's Block Transformer (not a fresh conversion). Two folders that differ
    only in the embedder and the prefix expansion give the same oracle variants (the token decoder fed the
    original's states) and different model ones."""
    from tiny import perturb_new_parts
    oracle = bench_module("window_oracle")
    convert_tiny(tiny_dirs["llama"], tmp_path / "a", block_length=4, block_layers=1)
    perturb_new_parts(load_block(tmp_path / "a")).save_pretrained(tmp_path / "b")
    out = {}
    for name in ("a", "b"):
        res = CliRunner().invoke(oracle.main, ["--source", str(tiny_dirs["llama"]), "--model", str(tmp_path / name),
                                               "--tokens", "256", "--rows", "64", "--json-out", str(tmp_path / "o.json")])
        assert res.exit_code == 0, res.output
        out[name] = json.loads((tmp_path / "o.json").read_text())
    assert out["a"]["split_layer"] == 1 and out["b"]["model"] == str(tmp_path / "b")
    va, vb = out["a"]["variants"], out["b"]["variants"]
    for v in ("original", "true prefix", "true both"):
        assert va[v]["per_position"] == pytest.approx(vb[v]["per_position"], abs=1e-5), v
    assert va["model"]["nll"] != pytest.approx(vb["model"]["nll"], abs=1e-3)


def test_window_oracle_rope_stride_moves_the_block_decoder_only(tiny_dirs, tmp_path):
    """--block-rope-stride: stride 1 is the model itself; stride 4 changes the context embeddings (the block
    decoder's positions) and leaves the token decoder alone, which reads no rotary positions of the block decoder."""
    from tiny import VOCAB, convert_tiny
    oracle = bench_module("window_oracle")
    blk = convert_tiny(tiny_dirs["llama"], tmp_path / "b", block_length=4)
    ids = torch.randint(4, VOCAB, (2, 32))
    x, pos = torch.randn(3, 6, blk.config.hidden_size), torch.arange(6).expand(3, -1)
    with torch.no_grad():
        ctx, local = blk.final_hidden(ids, with_context=True)[1], blk.token_decoder.run(x, pos, None)
        oracle.stretch_block_positions(blk, 1)
        torch.testing.assert_close(blk.final_hidden(ids, with_context=True)[1], ctx, rtol=0, atol=0)
        oracle.stretch_block_positions(blk, 4)
        moved = blk.final_hidden(ids, with_context=True)[1]
    assert (moved - ctx)[:, 1:].abs().max() > 1e-4               # block 0 attends only to itself: no distance
    torch.testing.assert_close(moved[:, 0], ctx[:, 0])
    with torch.no_grad():
        torch.testing.assert_close(blk.token_decoder.run(x, pos, None), local, rtol=0, atol=0)


def test_points_of_several_methods_at_one_budget_stay_apart(tmp_path):
    assert curve.resolve_point(f"16384/books={tmp_path}") == (16384, str(tmp_path), "books")
    assert curve.resolve_point(f"0={tmp_path}") == (0, str(tmp_path), "")
    metrics = {"piqa": {"acc": 0.6, "acc_stderr": 0.02}}
    points = {"original": {"tokens": None, "method": "", "metrics": metrics, "kept": {"mean": 1.0, "mean_stderr": 0}},
             **{f"16384 tokens ({m})": {"tokens": 16384, "method": m, "metrics": metrics,
                                        "kept": {"mean": 0.2, "mean_stderr": 0.05}} for m in ("books", "teacher")}}
    curve.plot(points, tmp_path / "c.png")   # one line per method; equal budgets must not be compared as dicts
    assert (tmp_path / "c.png").stat().st_size > 0


@pytest.mark.parametrize("extra", [[], ["--features", "ctx+prev", "--block-layers", "1", "--embedder-mix", "0.3"]])
def test_conditioned_inputs_probe_fits_and_reduces_to_the_init(tiny_dirs, tmp_path, extra):
    """bench/conditioned_inputs.py: an infinite ridge leaves the contextual init's NLL; a weak one changes it."""
    probe, notes = bench_module("conditioned_inputs"), notes_file(tmp_path)
    res = CliRunner().invoke(probe.main, ["--source", str(tiny_dirs["llama"]), "--tokens", "256", "--rows", "64",
                                          "--calib-tokens", "1024", "--calib-data", str(notes), "--lambdas", "1e12,1e-3",
                                          *extra, "--json-out", str(tmp_path / "c.json")])
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "c.json").read_text())
    assert r["features"] == ("ctx+prev" if extra else "ctx")
    if extra:
        assert r["split_layer"] == 1 and r["embedder_mix"] == 0.3
    assert r["conditioned"]["1e+12"] == pytest.approx(r["contextual"], abs=1e-3)
    assert r["conditioned"]["0.001"] != pytest.approx(r["contextual"], abs=1e-3)
