"""`blockformer run`: the whole pipeline on a tiny model (seconds), resumable stages, recipes, the HTML report."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from blockformer.cli import main
from blockformer.convert import plan_layers
from blockformer.errors import BlockformerError
from blockformer.pipeline import RunConfig, load_recipe, run
from blockformer.pipeline.recipe import RECIPES, build, section_defaults
from tiny import VOCAB, write_synthetic_tasks

STAGE_MARKERS = ("convert", "uptrain", "eval-original", "eval-converted", "eval-uptrained", "bench")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = write_synthetic_tasks(tmp_path_factory.mktemp("data"), n=8)
    rng = random.Random(0)
    (root / "corpus").mkdir()
    for i in range(2):
        (root / "corpus" / f"book{i}.txt").write_text("\n".join(
            " ".join(f"w{rng.randrange(4, VOCAB - 4)}" for _ in range(rng.randint(3, 12))) for _ in range(150)))
    return root


def tiny_recipe(path: Path, src, data_dir, **changes) -> Path:
    r = {"source": str(src), "out": str(path.parent / "run"), "data_dir": str(data_dir),
         "convert": {"block_length": 4, "embedder_layers": 2},  # the recipe's 4 would leave the tiny model none
         "uptrain": {"data": "corpus", "seq_len": 32, "batch_size": 2, "max_tokens": None, "max_steps": 4,
                     "save_every": 2, "eval_every": 2, "warmup_steps": 1, "lr": 1e-3, "val_rows": 4},
         "eval": {"tasks": ["piqa", "arc_easy", "lambada_openai"], "limit": 6},
         "bench": {"scenarios": {"tiny": [12, 6]}, "batch_sizes": [2], "repeats": 1}}
    for k, v in changes.items():
        section, _, key = k.partition("__")
        (r[section].__setitem__(key, v) if key else r.__setitem__(section, v))
    path.write_text(yaml.safe_dump(r))
    return path


@pytest.fixture(scope="module")
def finished(tiny_dirs, data_dir, tmp_path_factory):
    """One complete run, shared by the tests that only read it."""
    d = tmp_path_factory.mktemp("pipe")
    recipe = tiny_recipe(d / "recipe.yaml", tiny_dirs["llama"], data_dir)
    logs = []
    results = run(RunConfig(str(recipe)), log=logs.append)
    return d / "run", results, recipe, logs


def test_pipeline_writes_every_stage_and_the_report(finished):
    root, results, _, logs = finished
    for f in ("converted/config.json", "converted/model.safetensors", "uptrained/model/model.safetensors",
              "uptrained/loss.png", "eval/original/results.json", "eval/converted/results.json",
              "eval/uptrained/results.json", "bench/bench.json", "report.md", "report.html", "results.json",
              "recipe.yaml", "figures/loss.png", "figures/accuracy.png", "figures/throughput.png"):
        assert (root / f).exists(), f
    assert all((root / "stages" / f"{m}.json").exists() for m in STAGE_MARKERS)
    saved = json.loads((root / "results.json").read_text())
    assert set(saved["eval"]) == {"original", "converted", "uptrained"}
    assert saved["uptrain"]["steps"] == 4 and saved["bench"]["points"][0]["speedup"] > 0
    # the report shows the measured numbers, not placeholders
    md = (root / "report.md").read_text()
    piqa = saved["eval"]["uptrained"]["metrics"]["piqa"]["acc"]
    assert f"{100 * piqa:.2f}" in md and "| piqa | acc |" in md
    assert f"{saved['bench']['points'][0]['block']['tokens_per_s']:.1f}" in md
    assert md.count("![") == 3
    # the recipe's layout on the tiny 4-layer model: 2 layers in the embedder, 1 in each decoder
    assert "block length 4, 2 (embedder) + 1+1 layers" in md
    for block in md.split("\n\n"):
        if block.startswith("|"):
            assert len({line.count("|") for line in block.splitlines()}) == 1, block  # every row as wide as its head


def test_eval_stage_scores_the_same_items_for_every_model(finished):
    root = finished[0]
    items = [json.loads((root / "eval" / r / "results.json").read_text())["tasks"]["piqa"]["source"]
             for r in ("original", "converted", "uptrained")]
    assert items[0] == items[1] == items[2]
    orig = json.loads((root / "eval/original/results.json").read_text())["models"]["original"]
    assert orig["model_type"] == "llama"  # the original really is the vanilla model


def test_rerun_skips_unchanged_stages_and_redoes_changed_ones(finished, tmp_path):
    root, _, recipe, _ = finished
    stamps = {m: (root / "stages" / f"{m}.json").stat().st_mtime_ns for m in STAGE_MARKERS}
    logs = []
    run(RunConfig(str(recipe)), log=logs.append)
    assert sum("up to date" in x for x in logs) == len(STAGE_MARKERS)
    assert stamps == {m: (root / "stages" / f"{m}.json").stat().st_mtime_ns for m in STAGE_MARKERS}
    # a changed eval option redoes only the eval stages
    changed = yaml.safe_load(recipe.read_text())
    changed["eval"]["limit"] = 5
    other = tmp_path / "changed.yaml"
    other.write_text(yaml.safe_dump(changed))
    logs = []
    res = run(RunConfig(str(other)), log=logs.append)
    redone = {x.split("]")[0][1:] for x in logs if x.endswith("running")}
    assert redone == {"eval-original", "eval-converted", "eval-uptrained"}
    assert res["eval"]["converted"]["items"]["piqa"] == 5
    logs = []
    run(RunConfig(str(other), force=True), log=logs.append)
    assert {x.split("]")[0][1:] for x in logs if x.endswith("running")} == set(STAGE_MARKERS)


def test_interrupted_run_continues_where_it_stopped(tiny_dirs, data_dir, tmp_path):
    recipe = tiny_recipe(tmp_path / "recipe.yaml", tiny_dirs["llama"], data_dir, eval__enabled=False,
                         bench__enabled=False)
    cmd = [sys.executable, "-m", "blockformer.cli", "run", str(recipe)]
    killed = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "BLOCKFORMER_CRASH_AFTER_STEP": "3"})
    assert killed.returncode != 0
    root = tmp_path / "run"
    assert (root / "stages/convert.json").exists() and not (root / "stages/uptrain.json").exists()
    assert not (root / "report.html").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "[convert] up to date" in again.stderr and "resuming from" in again.stderr and "step-2" in again.stderr
    steps = [json.loads(x)["step"] for x in (root / "uptrained/metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert (root / "report.html").exists()


def test_report_renders_in_headless_chromium(finished, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install chromium (see .ci/run)")
        pytest.skip("no chromium here")
    html = finished[0] / "report.html"
    # a copy alone in an empty folder: the report must not need any file beside it
    (tmp_path / "alone").mkdir()
    shutil.copy(html, tmp_path / "alone" / "report.html")
    out = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                          "--disable-background-networking", "--disable-component-update", "--disable-sync",
                          f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", "--dump-dom",
                          (tmp_path / "alone" / "report.html").as_uri()], capture_output=True, text=True, timeout=120)
    assert 'data-images="3/3"' in out.stdout, out.stdout[:500] + out.stderr[-1000:]
    assert "<table>" in out.stdout and "Generation throughput" in out.stdout


def test_shipped_recipes_validate_and_document_every_key():
    shipped = sorted(RECIPES.glob("*.yaml"))
    assert {p.stem for p in shipped} >= {"smollm2-135m-cpu", "pythia-410m-gpu", "qwen2.5-0.5b-gpu", "llama-3.2-1b-gpu"}
    for p in shipped:
        load_recipe(str(p))
    default = yaml.safe_load((RECIPES / "smollm2-135m-cpu.yaml").read_text())
    for stage in ("convert", "synth", "uptrain", "eval", "bench"):
        assert set(default[stage]) == set(section_defaults(stage)), stage
    for line in (RECIPES / "smollm2-135m-cpu.yaml").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and not line.rstrip().endswith(":"):
            assert "#" in line or line.startswith("    "), f"key without a comment: {line}"
    # the default recipe shows the defaults: leaving every key out gives the same job
    shown, implied = load_recipe("smollm2-135m-cpu"), build({}, Path("no-keys.yaml"))
    for k in ("source", "out", "data_dir", "convert", "synth", "uptrain", "eval", "bench"):
        assert getattr(shown, k) == getattr(implied, k), k


@pytest.mark.parametrize("text,msg", [
    ("sorce: default\n", "unknown key 'sorce'"),
    ("uptrain:\n  max_stepz: 3\n", "unknown key 'uptrain.max_stepz'"),
    ("uptrain:\n  lr: fast\n", "'uptrain.lr' must be float"),
    ("eval:\n  limit: true\n", "'eval.limit' must be int"),
    ("bench:\n  scenarios: {x: [0, 4]}\n", "bench.scenarios.x"),
    ("convert: [1, 2]\n", "'convert' must be a mapping"),
    ("uptrain:\n  lr: [\n", "not valid YAML"),
])
def test_bad_recipes_are_one_line_errors(text, msg, tmp_path, tiny_dirs):
    p = tmp_path / "r.yaml"
    p.write_text(f"source: {tiny_dirs['llama']}\nout: {tmp_path / 'o'}\n" + text if "sorce" not in text else text)
    r = CliRunner().invoke(main, ["run", str(p)])
    assert r.exit_code == 1 and msg in r.output and "Traceback" not in r.output, r.output


def test_missing_recipe_and_foreign_out_folder(tmp_path, tiny_dirs, data_dir):
    r = CliRunner().invoke(main, ["run", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 1 and "smollm2-135m-cpu" in r.output
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep")
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_dirs["llama"], data_dir)
    r = CliRunner().invoke(main, ["run", str(recipe), "--out", str(mine)])
    assert r.exit_code == 1 and "not a blockformer run folder" in r.output
    assert (mine / "precious.txt").read_text() == "keep"
    with pytest.raises(BlockformerError, match="not found"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_synth_stage_feeds_uptraining_and_is_reused(tiny_dirs, data_dir, tmp_path):
    synth = {"tokens": 30, "batch_size": 3, "max_new_tokens": 6}
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_dirs["llama"], data_dir, synth=synth, uptrain__data="synth",
                         uptrain__val_fraction=0.2, eval={"enabled": False}, bench={"enabled": False})
    results = run(RunConfig(str(recipe)), log=lambda *_: None)
    written = tmp_path / "run" / "synth" / "teacher.jsonl"
    assert results["synth"]["tokens"] >= 30 and results["uptrain"]["data"] == str(written)
    assert "Teacher-written training text" in (tmp_path / "run" / "report.md").read_text()
    logs = []
    run(RunConfig(str(recipe)), log=logs.append)
    assert any("[synth] up to date" in line for line in logs) and any("[uptrain] up to date" in line for line in logs)


def test_synth_pooled_with_another_source(tiny_dirs, data_dir, tmp_path):
    """uptrain.data as a list: the synth stage runs because the list names it, and both sources are trained on."""
    synth = {"tokens": 20, "batch_size": 2, "max_new_tokens": 5}
    recipe = tiny_recipe(tmp_path / "r.yaml", tiny_dirs["llama"], data_dir, synth=synth,
                         uptrain__data=["synth", "corpus"], uptrain__val_fraction=0.2,
                         eval={"enabled": False}, bench={"enabled": False})
    results = run(RunConfig(str(recipe)), log=lambda *_: None)
    assert list(results["uptrain"]["data"]) == [str(tmp_path / "run" / "synth" / "teacher.jsonl"), str(data_dir / "corpus")]
    assert "`teacher.jsonl` + `corpus`" in (tmp_path / "run" / "report.md").read_text()


def test_synth_runs_only_when_uptraining_reads_it(finished):
    root, results, _, _ = finished          # its recipe trains on the bundled corpus
    assert results["synth"] is None and not (root / "synth").exists()
    assert "enabled" not in section_defaults("synth")



@pytest.mark.parametrize("convert,share,block", [({}, 0.8, 24), ({"block_layers": 12}, 12, 12),
                                                 ({"layer_map": "skip"}, None, 15), ({"layer_map": "duplicate"}, None, 30),
                                                 ({"block_layers": None}, None, 15)])
def test_the_recipes_layer_share_applies_to_partitions_only(convert, share, block):
    """The default recipe splits SmolLM2's 30 layers 24 + 6 (a share, 0.8); a recipe that picks skip or duplicate
    gets that map's own split instead of an error, and an explicit block_layers always wins."""
    c = build({"convert": convert}, Path("r.yaml")).convert
    assert c["block_layers"] == share
    assert len(plan_layers(30, c["layer_map"], c["block_layers"])[0]) == block


def test_report_on_the_default_model_shows_the_measured_curve_and_the_lab(tmp_path):
    """Issue 11 §2: the report of a run on the default model carries the longer-training curve and the lab's plot."""
    from blockformer.pipeline import report
    figs = tmp_path / "figures"
    figs.mkdir()
    doc = report.measured({"recipe": {"source": "default"}}, figs)
    images = [b[1] for b in doc if b[0] == "img"]
    assert [p.name for p in images] == ["recovery-curve-256k.png", "recovery-lab-full-2m.png"]
    assert all(p.parent == figs and p.read_bytes() == (report.DOCS / p.name).read_bytes() for p in images)
    assert "27% ± 6 at 256k" in report.to_markdown(doc, tmp_path) and "did not uptrain" in doc[1][1]
    assert "on 32,768 tokens" in report.measured({"recipe": {"source": "default"}, "uptrain": {"tokens": 32768}},
                                                 figs)[1][1]
    assert "data:image/png;base64," in report.to_html(doc, "default")
    assert report.measured({"recipe": {"source": "my/model"}}, figs) == []  # measured on SmolLM2 only
