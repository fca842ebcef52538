"""Our harness vs EleutherAI lm-eval itself: same model, same requests, same process; agreement and scoring speed.

lm-eval builds its requests once from the exported local tasks (not timed: task and dataset building are not
scoring). Then the same requests are scored by lm-eval's `HFLM` and by our `Scorer`, alternated `--repeats` times
(lm-eval, ours, lm-eval, ours, ...), each side timed from its request list to its scores, tokenisation included;
speeds are medians. Both sides use their defaults unless told: the window is the model's context for both (8,192
for SmolLM2: lm-eval's default, and ours), lm-eval's default batch size is 1; `--batch-size` adds lm-eval at that
batch size too. Agreement is per request (log-likelihood) and per item (the choice picked).

    python bench/eval_agreement.py --model default --tasks piqa,arc_easy,hellaswag,lambada_openai,wikitext --limit 200
    python bench/eval_agreement.py --model default --tasks piqa --limit 20 --repeats 1     # quick CPU variant
    python bench/eval_agreement.py --model out/smollm2-block --tasks hellaswag,arc_easy --limit 200

A Block Transformer has no `HFLM`: its lm-eval side is our registered `blockformer` model (lm-eval's `TemplateLM`,
which hands the scorer every choice as its own request), so the ratio is what running a shared context once buys.

Needs `pip install lm-eval==0.4.13`. Prints a table; the last stdout line is one JSON object.
"""
from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blockformer import sources  # noqa: E402
from blockformer.eval.lm_eval_tasks import export  # noqa: E402
from blockformer.eval.scoring import Scorer  # noqa: E402
from blockformer.eval.tasks import default_data_dir, get_task  # noqa: E402
from blockformer.machine import cpu_name  # noqa: E402


def lm_eval_requests(names: list[str], include: Path) -> dict:
    """task -> lm-eval's own Instances for it, built once (the part of simple_evaluate that is not scoring)."""
    from lm_eval.tasks import TaskManager, get_task_dict
    tasks = get_task_dict([f"{n}_local" for n in names], TaskManager(include_path=str(include)))
    out = {}
    for name in names:
        task = tasks[f"{name}_local"]
        task.build_all_requests()
        out[name] = sorted(task.instances, key=lambda r: (r.doc_id, r.idx))
    return out


def score_lm_eval(lm, kind: str, reqs) -> list[float]:
    if kind == "rolling":
        return list(lm.loglikelihood_rolling(reqs))
    return [ll for ll, _ in lm.loglikelihood(reqs)]


def score_ours(scorer: Scorer, kind: str, reqs) -> list[float]:
    """The same requests through our scorer: choices of one item together (their shared context runs once)."""
    if kind == "rolling":
        return scorer.loglikelihood_rolling([r.args[0] for r in reqs])
    if kind == "loglikelihood":
        return [ll for ll, _ in scorer.loglikelihood([r.args for r in reqs])]
    items = defaultdict(list)
    for r in reqs:
        items[r.doc_id].append(r.args)
    per_item = scorer.loglikelihood_choices(list(items.values()))
    return [ll for scores in per_item for ll, _ in scores]


def choices(reqs, lls) -> list[int]:
    """Per item (doc), the index of its most likely choice."""
    items = defaultdict(list)
    for r, ll in zip(reqs, lls):
        items[r.doc_id].append(ll)
    return [max(range(len(v)), key=v.__getitem__) for _, v in sorted(items.items())]


def timed(fn, *args) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def compare(name, reqs, sides: dict, repeats: int) -> dict:
    """Alternate the sides `repeats` times; medians of the seconds; agreement of each side with lm-eval's default."""
    kind = get_task(name).kind
    secs, scores = defaultdict(list), {}
    for _ in range(repeats):
        for side, fn in sides.items():
            scores[side], s = timed(fn, kind, reqs)
            secs[side].append(s)
    ref, ours = scores[next(iter(sides))], scores["ours"]  # the first side is lm-eval's default
    entry = {"kind": kind, "requests": len(reqs), "seconds": {k: statistics.median(v) for k, v in secs.items()},
             "max_abs_loglik_diff": max(abs(a - b) for a, b in zip(ref, ours))}
    if kind == "mc":
        a, b = choices(reqs, ref), choices(reqs, ours)
        entry["same_choice"] = sum(x == y for x, y in zip(a, b)) / len(a)
    entry["speedup"] = {k: entry["seconds"][k] / entry["seconds"]["ours"] for k in secs if k != "ours"}
    return entry


@click.command()
@click.option("--model", default="default", help="Original model (folder, hub id, .gguf, default).")
@click.option("--tasks", default="piqa,arc_easy,hellaswag,lambada_openai,wikitext", help="Tasks.")
@click.option("--limit", type=int, default=200, help="Items per task (fixed-seed subset, as `blockformer eval`).")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None, help="Local task files.")
@click.option("--batch-size", type=int, default=16, help="lm-eval is also timed at this batch size (0: only its "
              "default, 1).")
@click.option("--max-length", type=int, default=None, help="Window for both; default: each side's own (the "
              "model's context).")
@click.option("--repeats", default=3, help="Alternated timed runs per side (median).")
@click.option("--json-out", type=click.Path(path_type=Path), default=Path("runs/eval_agreement.json"), help="JSON file.")
def main(model, tasks, limit, data_dir, batch_size, max_length, repeats, json_out):
    from lm_eval.models.huggingface import HFLM
    torch.set_grad_enabled(False)
    src = sources.resolve(model)
    m, tok = sources.load_model(src, torch.float32), sources.load_tokenizer(src)
    names = tasks.split(",")
    include = Path(tempfile.mkdtemp(prefix="bf-lmeval-"))
    export(names, data_dir or default_data_dir(), include, limit)
    requests = lm_eval_requests(names, include)
    scorer = Scorer(m, tok, max_length=max_length)
    block = m.config.model_type == "block_transformer"
    if block:  # lm-eval through our registered model: flat requests
        from blockformer.eval.lm_eval_plugin import BlockformerLM
        lms = {"lm-eval (blockformer model)": BlockformerLM(pretrained=model, max_length=max_length)}
    else:
        lms = {"lm-eval (batch 1)": HFLM(pretrained=m, tokenizer=tok, max_length=max_length)}
    if batch_size > 1 and not block:
        lms[f"lm-eval (batch {batch_size})"] = HFLM(pretrained=m, tokenizer=tok, batch_size=batch_size,
                                                    max_length=max_length)
    sides = {k: (lambda kind, reqs, lm=lm: score_lm_eval(lm, kind, reqs)) for k, lm in lms.items()}
    sides["ours"] = lambda kind, reqs: score_ours(scorer, kind, reqs)
    report = {name: compare(name, requests[name], sides, repeats) for name in names}
    print(f"{'task':16}{'requests':>9}" + "".join(f"{k + ' s':>24}" for k in sides) + f"{'agreement':>30}")
    for name, e in report.items():
        agree = (f"{100 * e['same_choice']:.1f}% same choice" if "same_choice" in e
                 else f"max |dll| {e['max_abs_loglik_diff']:.1e}")
        print(f"{name:16}{e['requests']:>9}" + "".join(f"{e['seconds'][k]:>24.2f}" for k in sides) + f"{agree:>30}")
    for name, e in report.items():
        print(f"{name}: ours is " + ", ".join(f"{v:.2f}x {k}" for k, v in e["speedup"].items()))
    res = {"model": model, "cpu": cpu_name(), "limit": limit, "repeats": repeats, "threads": torch.get_num_threads(),
           "max_length": {"ours": scorer.max_length, "lm-eval": next(iter(lms.values())).max_length}, "tasks": report}
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
