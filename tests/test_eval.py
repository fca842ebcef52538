"""Evaluation: block-model scores follow generation's factorisation; agreement with lm-eval; the CLI."""
from __future__ import annotations

import json
import math
import random
import re

import pytest
import torch
from click.testing import CliRunner

from blockformer.cli import main
from blockformer.errors import BlockformerError
from blockformer.eval import EvalConfig, Scorer, evaluate
from blockformer.eval.harness import score_task
from blockformer.eval.scoring import rolling_windows
from blockformer.eval.tasks import TASKS, get_task, load_docs, wikitext_pages
from tiny import (convert_tiny, load_block, load_original, perturb_new_parts, save_with_other_tokenizer,
                  tiny_tokenizer, write_synthetic_tasks)


def write_more_tasks(root, n=12, seed=5):
    """winogrande (with its labels file), sciq and arc_challenge in their original formats."""
    rng = random.Random(seed)
    words = lambda k: " ".join(f"w{rng.randrange(4, 90)}" for _ in range(k))  # noqa: E731
    for sub in ("winogrande", "sciq", "arc_challenge"):
        (root / sub).mkdir(exist_ok=True)
    (root / "winogrande/dev.jsonl").write_text("".join(
        json.dumps({"sentence": f"{words(rng.randint(1, 4))} _ {words(rng.randint(1, 4))}",
                    "option1": words(1), "option2": words(rng.randint(1, 2))}) + "\n" for _ in range(n)))
    (root / "winogrande/dev-labels.lst").write_text("".join(f"{rng.randint(1, 2)}\n" for _ in range(n)))
    (root / "sciq/test.json").write_text(json.dumps([
        {"support": words(rng.randint(0, 4)), "question": words(3), "distractor1": words(1), "distractor2": words(2),
         "distractor3": words(1), "correct_answer": words(rng.randint(1, 2))} for _ in range(n)]))
    (root / "arc_challenge/ARC-Challenge-Test.jsonl").write_text((root / "arc_easy/ARC-Easy-Test.jsonl").read_text())
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_more_tasks(write_synthetic_tasks(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="module")
def block_dir(tiny_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("block") / "b"
    model = perturb_new_parts(convert_tiny(tiny_dirs["llama"], out, block_length=4))
    model.save_pretrained(out)
    return out


PAIRS = [("w5 w6 w7", " w8 w9 w10 w11 w12 w13"), ("w9", " w20"), ("w4 w5 w6 w7 w8 w9 w10", " w30 w31")]


@torch.no_grad()
def test_block_loglikelihood_is_the_token_by_token_sum(block_dir):
    model, tok = load_block(block_dir), tiny_tokenizer()
    scorer = Scorer(model, tok, batch_tokens=64)
    got = scorer.loglikelihood(PAIRS)
    for (ctx, cont), (ll, _) in zip(PAIRS, got):
        c, x = scorer.encode(ctx), scorer.encode(cont)
        want = 0.0
        for k in range(len(x)):  # feed the continuation one token at a time, prompt anchored as in generation
            seq = torch.tensor([c + x[:k]])
            logp = model(seq, anchor=torch.tensor([len(c) - 1])).logits[0, -1].log_softmax(-1)
            want += logp[x[k]].item()
        assert math.isclose(ll, want, rel_tol=1e-5, abs_tol=1e-5)


def choice_items(rng, n_items=9):
    """Items whose choices share a context: contexts of 9-40 tokens, 2 or 4 choices of 1-9 tokens."""
    words = lambda k: " ".join(f"w{rng.randrange(4, 90)}" for _ in range(k))  # noqa: E731
    return [[(ctx, " " + words(rng.randint(1, 9))) for _ in range(n)]
            for ctx, n in ((words(rng.randint(9, 40)), rng.choice([2, 2, 4])) for _ in range(n_items))]


@pytest.mark.parametrize("kind", ["block", "vanilla"])
def test_shared_context_scores_equal_the_plain_path(kind, block_dir, tiny_dirs, monkeypatch):
    """Choices of one item run their context once (block models too), and score what one forward per choice does."""
    model = load_block(block_dir) if kind == "block" else load_original(tiny_dirs["llama"])
    items = choice_items(random.Random(3))
    scorer = Scorer(model, tiny_tokenizer(), batch_tokens=400)
    calls = []
    shared = scorer._score_shared
    monkeypatch.setattr(scorer, "_score_shared", lambda its: calls.append(len(its)) or shared(its))
    got = scorer.loglikelihood_choices(items)
    assert sum(calls) >= len(items) - 2 and max(calls) > 1  # the shared path ran, batched
    want = Scorer(model, tiny_tokenizer(), batch_tokens=96).loglikelihood([p for it in items for p in it])
    flat = [r for item in got for r in item]
    torch.testing.assert_close(torch.tensor([r[0] for r in flat]), torch.tensor([r[0] for r in want]),
                               rtol=1e-5, atol=1e-4)
    assert [r[1] for r in flat] == [r[1] for r in want]


@torch.no_grad()
def test_first_anchor_scores_the_papers_alignment(block_dir, tiny_dirs):
    """--anchor first: the first token closes block 0 (the model's default alignment in one full forward)."""
    model, tok = load_block(block_dir), tiny_tokenizer()
    first = Scorer(model, tok, batch_tokens=64, anchor="first").loglikelihood(PAIRS)
    context = Scorer(model, tok, batch_tokens=64).loglikelihood(PAIRS)
    for (ctx, cont), (ll, greedy) in zip(PAIRS, first):
        c, x = tok.encode(ctx), tok.encode(cont)
        logp = model(torch.tensor([c + x])).logits[0].log_softmax(-1)   # default alignment: first real token
        want = [logp[len(c) - 1 + k] for k in range(len(x))]
        assert math.isclose(ll, sum(p[t].item() for p, t in zip(want, x)), rel_tol=1e-5, abs_tol=1e-5)
        assert greedy == all(int(p.argmax()) == t for p, t in zip(want, x))
    # with L_B = 4 the two conventions put block boundaries in different places, so the scores differ
    assert any(abs(a[0] - b[0]) > 1e-3 for a, b in zip(first, context))
    vanilla = load_original(tiny_dirs["llama"])  # a vanilla model has no blocks: the anchor changes nothing
    a = Scorer(vanilla, tok, anchor="first").loglikelihood(PAIRS)
    b = Scorer(vanilla, tok).loglikelihood(PAIRS)
    assert all(math.isclose(x[0], y[0], abs_tol=1e-5) for x, y in zip(a, b))
    with pytest.raises(BlockformerError, match="anchor"):
        Scorer(model, tok, anchor="middle")


def test_rolling_windows_predict_every_token_once():
    toks = list(range(100, 137))
    windows = list(rolling_windows(toks, 1, 10))
    assert [t for _, pred in windows for t in pred] == toks
    assert windows[0][0] == [1] and all(len(c) + len(p) - 1 <= 10 for c, p in windows)


def test_wikitext_pages_split_on_level_one_headings(data):
    pages = wikitext_pages(data / "wikitext2/wiki.test.raw")
    assert len(pages) == 3 and all(p["page"].startswith(" = ") for p in pages)


def test_every_task_exports_to_lm_eval_and_agrees(tiny_dirs, data, tmp_path):
    """Each exported config runs in lm-eval; per item, the same choice log-likelihoods, predictions and docs."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from blockformer.eval.lm_eval_tasks import export
    model, tok = load_original(tiny_dirs["llama"]), tiny_tokenizer()
    tasks = list(TASKS)
    names = export(tasks, data, tmp_path, limit=8, seed=7)
    assert names == [f"{t}_local" for t in tasks]
    theirs = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4, max_length=16),
                                     tasks=names, task_manager=TaskManager(include_path=str(tmp_path)),
                                     log_samples=True, bootstrap_iters=0)
    scorer = Scorer(model, tok, batch_tokens=48, max_length=16)
    for task, name in zip(tasks, names):
        docs, _ = load_docs(get_task(task), data, limit=8, seed=7)
        ours, samples, _ = score_task(scorer, get_task(task), docs, "t")
        res, their = theirs["results"][name], sorted(theirs["samples"][name], key=lambda s: s["doc_id"])
        assert len(their) == len(samples) == len(docs), task
        for metric in get_task(task).metrics:
            assert math.isclose(ours[metric], res[f"{metric},none"], rel_tol=1e-4), (task, metric)
        for s, t in zip(samples, their):
            assert s["doc"] == t["doc"]["blockformer_index"], task   # the same item of the full file
            resp = t["filtered_resps"]
            if get_task(task).kind == "mc":
                gold = int(t["doc"]["answer"]) - 1 if task == "winogrande" else t["target"]  # its target: the text
                assert s["gold"] == gold, task
                assert all(math.isclose(c["loglikelihood"], r[0], abs_tol=1e-4) and c["is_greedy"] == r[1]
                           for c, r in zip(s["choices"], resp)), task
                assert s["pred"]["acc"] == max(range(len(resp)), key=lambda i: resp[i][0]), task
            elif task == "lambada_openai":
                assert math.isclose(s["loglikelihood"], resp[0][0], abs_tol=1e-4) and s["correct"] == resp[0][1]
            else:
                assert math.isclose(s["loglikelihood"], resp[0], abs_tol=1e-4), task


@pytest.mark.parametrize("anchor", ["context", "first"])
def test_lm_eval_runs_the_registered_blockformer_model(block_dir, data, tmp_path, anchor):
    """`lm_eval --model blockformer` scores every request as our Scorer does: per choice log-likelihood and
    greediness, under both anchorings (they differ: test_first_anchor_scores_the_papers_alignment)."""
    lm_eval = pytest.importorskip("lm_eval")
    import blockformer.eval.lm_eval_plugin  # noqa: F401 - what the .pth hook does for the lm_eval CLI
    from lm_eval.tasks import TaskManager
    from blockformer.eval.lm_eval_tasks import export
    tasks = ["piqa", "lambada_openai"]
    names = export(tasks, data, tmp_path, limit=8, seed=7)
    r = lm_eval.simple_evaluate(model="blockformer", model_args=f"pretrained={block_dir},anchor={anchor}",
                                tasks=names, task_manager=TaskManager(include_path=str(tmp_path)),
                                log_samples=True, bootstrap_iters=0)
    scorer = Scorer(load_block(block_dir), tiny_tokenizer(), anchor=anchor)
    for task, name in zip(tasks, names):
        docs, _ = load_docs(get_task(task), data, limit=8, seed=7)
        _, samples, _ = score_task(scorer, get_task(task), docs, "t")
        their = sorted(r["samples"][name], key=lambda s: s["doc_id"])
        ours = [[(c["loglikelihood"], c["is_greedy"]) for c in s["choices"]] if "choices" in s
                else [(s["loglikelihood"], s["correct"])] for s in samples]
        assert len(ours) == len(their) == 8, task
        for o, t in zip(ours, their):
            assert [g for _, g in o] == [x[1] for x in t["filtered_resps"]], task
            torch.testing.assert_close(torch.tensor([x for x, _ in o]),
                                       torch.tensor([x[0] for x in t["filtered_resps"]]), atol=1e-4, rtol=0)


def test_cli_side_by_side(tiny_dirs, block_dir, data, tmp_path):
    out = tmp_path / "res"
    r = CliRunner().invoke(main, ["eval", str(block_dir), "--baseline", str(tiny_dirs["llama"]), "--tasks",
                                  "piqa,arc_easy,lambada_openai,hellaswag", "--data-dir", str(data), "--limit", "5",
                                  "--out", str(out)])
    assert r.exit_code == 0, r.output
    head = re.search(r"task +metric.*", r.output).group().split()  # stderr's progress bars share the line
    assert head == ["task", "metric", "baseline", "model", "delta", "stderr"], r.output
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"]["piqa"]["source"]["items"] == 5 and len(res["tasks"]["piqa"]["source"]["sha256"]) == 64
    assert set(res["tasks"]["lambada_openai"]["metrics"]) == {"baseline", "model"}
    assert res["models"]["baseline"]["model_type"] == "llama"
    assert res["models"]["model"]["model_type"] == "block_transformer"
    samples = json.loads((out / "samples.json").read_text())
    assert set(samples["piqa"]) == {"baseline", "model"}
    assert (out / "results.png").stat().st_size > 1000


def test_a_model_alone_is_labelled_by_its_role(block_dir, data, tmp_path):
    r = CliRunner().invoke(main, ["eval", str(block_dir), "--tasks", "piqa", "--data-dir", str(data), "--limit", "3",
                                  "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    head = re.search(r"task +metric.*", r.output).group().split()  # stderr's progress bars share the line
    assert head == ["task", "metric", "model", "stderr"], r.output
    res = json.loads((tmp_path / "a/results.json").read_text())
    assert set(res["models"]) == set(res["tasks"]["piqa"]["metrics"]) == {"model"}
    assert set(json.loads((tmp_path / "a/samples.json").read_text())["piqa"]) == {"model"}
    res = evaluate(EvalConfig(str(block_dir), tasks=("piqa",), data_dir=data, limit=3, role="uptrained"))
    assert set(res["models"]) == set(res["tasks"]["piqa"]["samples"]) == {"uptrained"}
    with pytest.raises(BlockformerError, match="role"):
        evaluate(EvalConfig(str(block_dir), baseline=str(block_dir), tasks=("piqa",), data_dir=data, role="baseline"))


def test_samples_hold_every_choice_and_prediction(block_dir, data, tmp_path):
    out = tmp_path / "s"
    r = CliRunner().invoke(main, ["eval", str(block_dir), "--tasks", "piqa,winogrande,lambada_openai,wikitext",
                                  "--data-dir", str(data), "--limit", "4", "--seed", "9", "--out", str(out)])
    assert r.exit_code == 0, r.output
    samples = {t: v["model"] for t, v in json.loads((out / "samples.json").read_text()).items()}
    metrics = json.loads((out / "results.json").read_text())["tasks"]
    piqa = [json.loads(x) for x in (data / "piqa/valid.jsonl").read_text().splitlines()]
    assert [s["doc"] for s in samples["piqa"]] == sorted(random.Random(9).sample(range(len(piqa)), 4))
    for task in ("piqa", "winogrande"):
        for s in samples[task]:
            lls = [c["loglikelihood"] for c in s["choices"]]
            assert len(lls) == 2 and all(isinstance(c["is_greedy"], bool) for c in s["choices"])
            assert s["pred"]["acc"] == max(range(2), key=lls.__getitem__)
        acc = sum(s["pred"]["acc"] == s["gold"] for s in samples[task]) / 4
        assert acc == pytest.approx(metrics[task]["metrics"]["model"]["acc"])
    for s in samples["piqa"]:  # acc_norm: per-character log-likelihood of the choice (lm-eval's)
        sols = [piqa[s["doc"]]["sol1"], piqa[s["doc"]]["sol2"]]
        norm = [c["loglikelihood"] / len(x) for c, x in zip(s["choices"], sols)]
        assert s["pred"]["acc_norm"] == max(range(2), key=norm.__getitem__)
    lam = samples["lambada_openai"]
    assert all(set(s) == {"doc", "loglikelihood", "correct"} for s in lam)
    assert sum(s["correct"] for s in lam) / 4 == pytest.approx(metrics["lambada_openai"]["metrics"]["model"]["acc"])
    wiki = samples["wikitext"]
    assert [s["doc"] for s in wiki] == [0, 1, 2] and all(s["words"] > 0 and s["bytes"] > 0 for s in wiki)
    want = math.exp(-sum(s["loglikelihood"] for s in wiki) / sum(s["words"] for s in wiki))
    assert want == pytest.approx(metrics["wikitext"]["metrics"]["model"]["word_perplexity"])


def test_cli_anchor_first_is_recorded_and_changes_block_scores(block_dir, data, tmp_path):
    res = {}
    for anchor in ("context", "first"):
        r = CliRunner().invoke(main, ["eval", str(block_dir), "--tasks", "lambada_openai", "--data-dir", str(data),
                                      "--limit", "6", "--anchor", anchor, "--out", str(tmp_path / anchor)])
        assert r.exit_code == 0, r.output
        res[anchor] = json.loads((tmp_path / anchor / "results.json").read_text())
        assert res[anchor]["config"]["anchor"] == anchor
    ppl = [res[a]["tasks"]["lambada_openai"]["metrics"]["model"]["perplexity"] for a in ("context", "first")]
    assert not math.isclose(*ppl, rel_tol=1e-4)
    with pytest.raises(BlockformerError, match="anchor"):
        evaluate(EvalConfig(str(block_dir), tasks=("piqa",), data_dir=data, anchor="middle"))


def test_limit_is_the_seeded_sample_of_the_file(data):
    """The subset is sorted(Random(seed).sample(range(n), limit)) of the file's rows, built here by hand."""
    rows = [json.loads(x) for x in (data / "piqa/valid.jsonl").read_text().splitlines()]
    labels = (data / "piqa/valid-labels.lst").read_text().split()
    docs, src = load_docs(get_task("piqa"), data, limit=5, seed=3)
    index = sorted(random.Random(3).sample(range(len(rows)), 5))
    assert [d.index for d in docs] == index and src["items"] == 5 and src["items_total"] == len(rows)
    for d, i in zip(docs, index):
        ctx = f"Question: {rows[i]['goal']}\nAnswer:"
        assert d.requests == [(ctx, " " + rows[i]["sol1"]), (ctx, " " + rows[i]["sol2"])]
        assert d.gold == int(labels[i])
    assert [d.index for d in load_docs(get_task("piqa"), data, limit=5, seed=4)[0]] != index
    assert [d.index for d in load_docs(get_task("piqa"), data, limit=100)[0]] == list(range(len(rows)))


@pytest.mark.parametrize("args,words", [
    (["--tasks", "nope"], ["unknown task 'nope'", "piqa"]),
    (["--tasks", ","], ["no tasks", "piqa"]),
    (["--tasks", "piqa,piqa"], ["'piqa'", "twice"]),
    (["--limit", "0"], ["--limit"]),
    (["--tasks", "boolq"], ["unknown task 'boolq'"]),
])
def test_bad_input(block_dir, data, args, words):
    r = CliRunner().invoke(main, ["eval", str(block_dir), "--data-dir", str(data), *args])
    assert r.exit_code != 0 and "Traceback" not in r.output
    line = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and all(w in line[0] for w in words), r.output


def test_missing_task_data(block_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    r = CliRunner().invoke(main, ["eval", str(block_dir), "--data-dir", str(tmp_path), "--tasks", "winogrande"])
    line = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert r.exit_code != 0 and len(line) == 1 and "no data for 'winogrande'" in line[0], r.output


def test_binary_task_file_is_one_line_naming_it(block_dir, tmp_path):
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa/valid.jsonl").write_bytes(b'{"goal": "a"}\n\xff\xfe\x00\x81binary\n')
    r = CliRunner().invoke(main, ["eval", str(block_dir), "--data-dir", str(tmp_path), "--tasks", "piqa"])
    assert r.exit_code != 0 and "Traceback" not in r.output, r.output
    line = [x for x in r.output.splitlines() if x.startswith("error:")]
    assert len(line) == 1 and "valid.jsonl" in line[0] and "UTF-8" in line[0], r.output


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
