"""Our harness vs EleutherAI lm-eval itself: same model, same local items; agreement per item and items/s.

    python bench/eval_agreement.py --model default --tasks piqa,arc_easy,lambada_openai,wikitext --limit 200
    python bench/eval_agreement.py --model default --tasks piqa --limit 20        # quick CPU variant

Needs `pip install lm-eval==0.4.13`. The original is saved once as a plain HF folder (lm-eval's HFLM loads it).
The last stdout line is one JSON object.
"""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blockformer.eval.harness import score_task  # noqa: E402
from blockformer.eval.lm_eval_tasks import export  # noqa: E402
from blockformer.eval.scoring import Scorer  # noqa: E402
from blockformer.eval.tasks import default_data_dir, get_task, load_docs  # noqa: E402
from blockformer import sources  # noqa: E402

METRIC_KEYS = {"acc": "acc,none", "acc_norm": "acc_norm,none", "perplexity": "perplexity,none",
               "word_perplexity": "word_perplexity,none", "byte_perplexity": "byte_perplexity,none",
               "bits_per_byte": "bits_per_byte,none"}


def run_lm_eval(model, tok, names, include, batch_size, max_length):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, max_length=max_length)
    out = {}
    manager = TaskManager(include_path=str(include))  # indexing lm-eval's task catalogue is not scoring time
    for name in names:  # one task at a time, to time each
        t0 = time.perf_counter()
        r = simple_evaluate(model=lm, tasks=[name], task_manager=manager, log_samples=True, bootstrap_iters=0)
        out[name] = (r["results"][name], r["samples"][name], time.perf_counter() - t0)
    return out


def lm_eval_predictions(samples, kind):
    samples = sorted(samples, key=lambda s: s["doc_id"])
    if kind == "mc":
        return [max(range(len(s["filtered_resps"])), key=lambda i: s["filtered_resps"][i][0]) for s in samples]
    if kind == "loglikelihood":
        return [s["filtered_resps"][0][0] for s in samples]
    return None


@click.command()
@click.option("--model", default="default", help="Original model (folder, hub id, .gguf, default).")
@click.option("--tasks", default="piqa,arc_easy,lambada_openai,wikitext", help="Tasks.")
@click.option("--limit", type=int, default=200, help="Items per task (fixed-seed subset).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Local task files.")
@click.option("--batch-size", default=16, help="lm-eval batch size.")
@click.option("--max-length", type=int, default=2048, help="Window for both (wikitext rolling windows).")
@click.option("--json-out", type=click.Path(path_type=Path), default=Path("runs/eval_agreement.json"))
def main(model, tasks, limit, data_dir, batch_size, max_length, json_out):
    data_dir = data_dir or default_data_dir()
    src = sources.resolve(model)
    m, tok = sources.load_model(src, torch.float32), sources.load_tokenizer(src)
    names = tasks.split(",")
    include = Path(tempfile.mkdtemp(prefix="bf-lmeval-"))
    export(names, data_dir, include, limit)
    theirs = run_lm_eval(m, tok, [f"{n}_local" for n in names], include, batch_size, max_length)
    scorer = Scorer(m, tok, max_length=max_length)
    rows, report = [], {}
    for name in names:
        task = get_task(name)
        docs, _ = load_docs(task, data_dir, limit)
        ours, samples, secs = score_task(scorer, task, docs, "ours")
        res, their_samples, their_secs = theirs[f"{name}_local"]
        preds = lm_eval_predictions(their_samples, task.kind)
        same = None
        if task.kind == "mc":
            same = sum(a["pred"]["acc"] == b for a, b in zip(samples, preds)) / len(docs)
        elif task.kind == "loglikelihood":
            same = max(abs(a["loglikelihood"] - b) for a, b in zip(samples, preds))
        entry = {"items": len(docs), "ours_s": secs, "lm_eval_s": their_secs, "speedup": their_secs / secs,
                 "agreement": same, "metrics": {}}
        for metric in task.metrics:
            a, b = ours[metric], res[METRIC_KEYS[metric]]
            entry["metrics"][metric] = {"ours": a, "lm_eval": b}
            diff = f"{100 * (a - b):+.2f} pt" if metric.startswith("acc") else f"{100 * (a / b - 1):+.4f} %"
            rows.append((name, metric, a, b, diff))
        report[name] = entry
    print(f"{'task':16}{'metric':18}{'ours':>12}{'lm-eval':>12}{'diff':>14}")
    for name, metric, a, b, d in rows:
        print(f"{name:16}{metric:18}{a:12.4f}{b:12.4f}{d:>14}")
    for name, e in report.items():
        agree = e["agreement"]
        what = (f"same choice on {100 * agree:.1f}% of items" if get_task(name).kind == "mc" else
                f"max |loglik diff| {agree:.2e}" if agree is not None else "rolling: aggregate only")
        print(f"{name}: {what}; ours {e['items'] / e['ours_s']:.1f} items/s vs lm-eval "
              f"{e['items'] / e['lm_eval_s']:.1f} items/s ({e['speedup']:.2f}x)")
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"model": model, "limit": limit, "tasks": report}))


if __name__ == "__main__":
    main()
