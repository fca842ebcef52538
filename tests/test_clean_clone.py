"""A user's first run: a fresh clone in a folder of its own (no ../shared beside it, no $BLOCKFORMER_DATA_DIR),
the README's set-up script, then `blockformer run` on a tiny recipe that uses the default data names. Everything it
reads must come from committed files: the bundled task files and corpus."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tiny import build_original, tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["piqa", "arc_easy", "hellaswag", "lambada_openai"]


def tiny_recipe(path: Path, model: Path) -> Path:
    """The default recipe's data names (no data_dir, uptrain.data corpus/gutenberg), a tiny model and budget."""
    path.write_text(yaml.safe_dump({
        "source": str(model), "out": "runs/tiny",
        "convert": {"embedder_layers": 2},  # the recipe's 4 would leave the tiny 4-layer model's block decoder none
        "uptrain": {"data": "corpus/gutenberg", "max_docs": 1, "teacher": None, "seq_len": 32, "batch_size": 2,
                    "max_tokens": None, "max_steps": 2, "warmup_steps": 1, "eval_every": 2, "save_every": 2,
                    "val_rows": 2},
        "eval": {"tasks": TASKS, "limit": 4},
        "bench": {"scenarios": {"tiny": [12, 6]}, "batch_sizes": [2], "repeats": 1}}))
    return path


def numbers(tree) -> list[float]:
    if isinstance(tree, dict):
        return [x for v in tree.values() for x in numbers(v)]
    return [tree] if isinstance(tree, (int, float)) and not isinstance(tree, bool) else []


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("git") is None, reason="not a git checkout")
def test_fresh_clone_runs_the_default_job_on_bundled_data(tmp_path):
    clone = tmp_path / "blockformer"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    assert not (clone.parent / "shared").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("BLOCKFORMER_DATA_DIR", "PYTHONPATH", "VIRTUAL_ENV")}
    # the README's set-up script, reusing this interpreter's packages (a full install takes ~3 min here)
    setup = subprocess.run(["bash", "scripts/setup.sh"], cwd=clone, capture_output=True, text=True, timeout=300,
                           env={**env, "BLOCKFORMER_BASE_PYTHON": sys.executable})
    assert setup.returncode == 0, setup.stdout + setup.stderr
    model = tmp_path / "tiny-llama"
    build_original("llama").save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    recipe = tiny_recipe(tmp_path / "tiny.yaml", model)
    done = subprocess.run([str(clone / ".venv/bin/blockformer"), "run", str(recipe)], cwd=clone, capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = clone / "runs" / "tiny"
    results = json.loads((run / "results.json").read_text())
    bundled = str(clone / "blockformer" / "bundled")
    assert results["uptrain"]["data"] == str(Path(bundled) / "corpus" / "gutenberg")
    assert results["uptrain"]["steps"] == 2
    for role in ("original", "converted", "uptrained"):
        metrics = results["eval"][role]["metrics"]
        assert set(metrics) == set(TASKS)
        values = numbers(metrics)
        assert values and all(math.isfinite(v) for v in values), (role, metrics)
        saved = json.loads((run / "eval" / role / "results.json").read_text())
        assert all(t["source"]["path"].startswith(bundled) for t in saved["tasks"].values())
    md = (run / "report.md").read_text()
    assert f"{100 * results['eval']['uptrained']['metrics']['piqa']['acc']:.2f}" in md
    html = (run / "report.html").read_text()
    assert "piqa" in html and f"{100 * results['eval']['original']['metrics']['arc_easy']['acc']:.2f}" in html
