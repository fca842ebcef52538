"""Evaluation: block-model scores follow generation's factorisation; agreement with lm-eval; the CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from blockformer.cli import main
from blockformer.errors import BlockformerError
from blockformer.eval import EvalConfig, Scorer, evaluate
from blockformer.eval.harness import score_task
from blockformer.eval.scoring import rolling_windows
from blockformer.eval.tasks import get_task, load_docs, wikitext_pages
from tiny import (convert_tiny, load_original, perturb_new_parts, save_with_other_tokenizer, tiny_tokenizer,
                  write_synthetic_tasks)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_tasks(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def block_dir(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("block") / "b"
    model = perturb_new_parts(convert_tiny(tiny_dirs["llama"], out, block_length=4))
    model.save_pretrained(out)
    return out


@torch.no_grad()
def test_block_loglikelihood_is_the_token_by_token_sum(block_dir):
    from tiny import load_block
    model, tok = load_block(block_dir), tiny_tokenizer()
    scorer = Scorer(model, tok, batch_tokens=64)
    pairs = [("w5 w6 w7", " w8 w9 w10 w11 w12 w13"), ("w9", " w20"), ("w4 w5 w6 w7 w8 w9 w10", " w30 w31")]
    got = scorer.loglikelihood(pairs)
    for (ctx, cont), (ll, _) in zip(pairs, got):
        c, x = scorer.encode(ctx), scorer.encode(cont)
        want = 0.0
        for k in range(len(x)):  # feed the continuation one token at a time, prompt anchored as in generation
            seq = torch.tensor([c + x[:k]])
            logp = model(seq, anchor=torch.tensor([len(c) - 1])).logits[0, -1].log_softmax(-1)
            want += logp[x[k]].item()
        assert math.isclose(ll, want, rel_tol=1e-5, abs_tol=1e-5)


def test_rolling_windows_predict_every_token_once():
    toks = list(range(100, 137))
    windows = list(rolling_windows(toks, 1, 10))
    assert [t for _, pred in windows for t in pred] == toks
    assert windows[0][0] == [1] and all(len(c) + len(p) - 1 <= 10 for c, p in windows)


def test_wikitext_pages_split_on_level_one_headings(data):
    pages = wikitext_pages(data / "wikitext2/wiki.test.raw")
    assert len(pages) == 3 and all(p["page"].startswith(" = ") for p in pages)


@pytest.mark.parametrize("task", ["piqa", "arc_easy", "lambada_openai", "wikitext"])
def test_agrees_with_lm_eval(tiny_dirs, data, tmp_path, task):
    """Same chosen answer on every item and the same aggregate metrics as lm-eval itself on the same files."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from blockformer.eval.lm_eval_tasks import export
    model, tok = load_original(tiny_dirs["llama"]), tiny_tokenizer()
    names = export([task], data, tmp_path)
    theirs = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=16),
                                     tasks=names, task_manager=TaskManager(include_path=str(tmp_path)),
                                     log_samples=True, bootstrap_iters=0)
    docs, _ = load_docs(get_task(task), data)
    ours, samples, _ = score_task(Scorer(model, tok, batch_tokens=48, max_length=16), get_task(task), docs, "t")
    res, their = theirs["results"][names[0]], sorted(theirs["samples"][names[0]], key=lambda s: s["doc_id"])
    for metric in get_task(task).metrics:
        assert math.isclose(ours[metric], res[f"{metric},none"], rel_tol=1e-4), metric
    if task in ("piqa", "arc_easy"):
        assert samples == [max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0]) for s in their]
    if task == "lambada_openai":
        assert all(math.isclose(a, s["filtered_resps"][0][0], abs_tol=1e-4) for a, s in zip(samples, their))


def test_lm_eval_runs_the_registered_blockformer_model(block_dir, data, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    import blockformer.eval.lm_eval_plugin  # noqa: F401 - what the .pth hook does for the lm_eval CLI
    from lm_eval.tasks import TaskManager
    from blockformer.eval.lm_eval_tasks import export
    names = export(["piqa"], data, tmp_path)
    r = lm_eval.simple_evaluate(model="blockformer", model_args=f"pretrained={block_dir}", tasks=names,
                                task_manager=TaskManager(include_path=str(tmp_path)), bootstrap_iters=0)
    ours = evaluate(EvalConfig(str(block_dir), tasks=("piqa",), data_dir=data))
    assert r["results"][names[0]]["acc,none"] == pytest.approx(ours["tasks"]["piqa"]["metrics"]["converted"]["acc"])


def test_cli_side_by_side(tiny_dirs, block_dir, data, tmp_path):
    out = tmp_path / "res"
    r = CliRunner().invoke(main, ["eval", str(block_dir), "--baseline", str(tiny_dirs["llama"]), "--tasks",
                                  "piqa,arc_easy,lambada_openai,hellaswag", "--data-dir", str(data), "--limit", "5",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "original" in r.output and "converted" in r.output and "delta" in r.output
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"]["piqa"]["source"]["items"] == 5 and len(res["tasks"]["piqa"]["source"]["sha256"]) == 64
    assert set(res["tasks"]["lambada_openai"]["metrics"]) == {"original", "converted"}
    assert (out / "results.png").stat().st_size > 1000


def test_limit_is_a_fixed_subset(data):
    a, _ = load_docs(get_task("piqa"), data, limit=5, seed=3)
    b, _ = load_docs(get_task("piqa"), data, limit=5, seed=3)
    assert [d.requests for d in a] == [d.requests for d in b]


@pytest.mark.parametrize("args,words", [
    (["--tasks", "nope"], ["unknown task 'nope'", "piqa"]),
    (["--limit", "0"], ["--limit"]),
    (["--tasks", "winogrande"], ["no data for 'winogrande'", "--data-dir"]),
])
def test_bad_input(block_dir, data, args, words):
    r = CliRunner().invoke(main, ["eval", str(block_dir), "--data-dir", str(data), *args])
    assert r.exit_code != 0 and "Traceback" not in r.output
    line = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and all(w in line[0] for w in words), r.output


def test_missing_model(data, tmp_path):
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "nope"), "--data-dir", str(data), "--tasks", "piqa"])
    assert r.exit_code != 0 and "not found" in r.output


def test_tokenizer_mismatch(block_dir, tiny_dirs, data, tmp_path):
    other = save_with_other_tokenizer(tiny_dirs["llama"], tmp_path / "other")
    with pytest.raises(BlockformerError, match="tokenizers .* differ"):
        evaluate(EvalConfig(str(block_dir), baseline=str(other), tasks=("piqa",), data_dir=data))


def test_malformed_row_names_file_and_line(tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa/valid.jsonl").write_text('{"goal": "a", "sol1": "b", "sol2": "c"}\n{"goal": \n')
    with pytest.raises(BlockformerError, match=r"valid.jsonl:2: malformed JSON"):
        load_docs(get_task("piqa"), tmp_path)
