"""Zero-shot evaluation of a model, alone or side by side with a baseline (its original) on the same items.

Results and samples are keyed by role: the model's `role` ("model" unless the caller names it, e.g. the pipeline's
original/converted/uptrained) and "baseline" for --baseline.

    blockformer eval out/smollm2-block --baseline default --tasks hellaswag,piqa,arc_easy,lambada_openai --limit 200
    blockformer eval out/tiny-block --tasks piqa --limit 20      # tiny CPU variant, bundled data
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import sources
from ..errors import BlockformerError
from ..io import atomic_folder, check_out
from ..machine import check_device
from .scoring import ANCHORS, Scorer
from .tasks import TASKS, Doc, Task, default_data_dir, get_task, load_docs

DEFAULT_TASKS = ("hellaswag", "piqa", "arc_easy", "lambada_openai")
BASELINE = "baseline"  # the role of --baseline in results and samples


@dataclass
class EvalConfig:
    model: str
    baseline: str | None = None
    tasks: tuple[str, ...] = DEFAULT_TASKS
    data_dir: Path | None = None
    limit: int | None = None
    seed: int = 1234
    batch_tokens: int | None = None  # None: 1024 on CPU, 16384 on a GPU
    max_length: int | None = None
    dtype: str = "float32"
    out: Path | None = None
    overwrite: bool = False
    extra: dict = field(default_factory=dict)
    device: str = "auto"            # auto: cuda when available
    anchor: str = "context"         # block models: the token closing a block is the last context token | the first
    role: str = "model"             # the model's label in results and samples


def check(cfg: EvalConfig) -> list[Task]:
    """Validate the options before any model is loaded; return the tasks."""
    if cfg.limit is not None and cfg.limit <= 0:
        raise BlockformerError(f"--limit must be a positive number of items, got {cfg.limit}")
    if not cfg.tasks:
        raise BlockformerError(f"no tasks given; known tasks: {', '.join(TASKS)}")
    twice = [t for i, t in enumerate(cfg.tasks) if t in cfg.tasks[:i]]
    if twice:
        raise BlockformerError(f"task '{twice[0]}' is given twice")
    if cfg.anchor not in ANCHORS:
        raise BlockformerError(f"anchor must be one of {', '.join(ANCHORS)}, got {cfg.anchor!r}")
    for name in ("batch_tokens", "max_length"):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 2):
            raise BlockformerError(f"{name} (--{name.replace('_', '-')}) must be a whole number of tokens, at least 2, "
                                   f"got {v!r}")
    if cfg.device != "auto":
        check_device(cfg.device)
    if not cfg.role or (cfg.baseline is not None and cfg.role == BASELINE):
        raise BlockformerError(f"role must be a name other than '{BASELINE}' (the baseline's), got {cfg.role!r}")
    return [get_task(t) for t in cfg.tasks]


def evaluate(cfg: EvalConfig) -> dict:
    """Score every task for the model (and the baseline); return results, write them when `cfg.out` is set."""
    t0 = time.perf_counter()
    tasks = check(cfg)
    if cfg.out:
        check_out(Path(cfg.out), cfg.overwrite, [cfg.model, cfg.baseline, cfg.data_dir])  # before the long work
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    data = {t.name: load_docs(t, data_dir, cfg.limit, cfg.seed) for t in tasks}
    models = {cfg.role: cfg.model} if cfg.baseline is None else {BASELINE: cfg.baseline, cfg.role: cfg.model}
    loaded = {role: load_for_eval(spec, cfg.dtype, cfg.device) for role, spec in models.items()}
    if cfg.baseline is not None:
        check_same_tokenizer(loaded[BASELINE][1], loaded[cfg.role][1], cfg.baseline, cfg.model)
    results = {"config": {**asdict(cfg), "data_dir": str(data_dir)}, "models": {}, "tasks": {}}
    for role, (model, tok, info) in loaded.items():
        scorer = Scorer(model, tok, cfg.batch_tokens, max_length=cfg.max_length, anchor=cfg.anchor)
        results["models"][role] = {**info, "max_length": scorer.max_length}
        if scorer.block:
            results["models"][role]["anchor"] = cfg.anchor
        for task in tasks:
            docs, source = data[task.name]
            entry = results["tasks"].setdefault(task.name, {"source": source, "metrics": {}, "samples": {}})
            metrics, samples, secs = score_task(scorer, task, docs, role)
            entry["metrics"][role] = {**metrics, "seconds": round(secs, 2), "items_per_s": round(len(docs) / secs, 2)}
            entry["samples"][role] = samples
    results["seconds"] = round(time.perf_counter() - t0, 1)
    if cfg.out:
        write_results(results, Path(cfg.out), cfg.overwrite)
    return results


def load_for_eval(spec: str, dtype: str, device: str = "auto"):
    src = sources.resolve(spec)
    model = sources.load_model(src, getattr(torch, dtype)).to(resolve_device(device))
    tok = sources.load_tokenizer(src)
    info = {"spec": spec, "kind": src.kind, "model_type": model.config.model_type,
            "parameters": sum(p.numel() for p in model.parameters()), "dtype": dtype}
    if model.config.model_type == "block_transformer":
        c = model.config
        info.update(block_length=c.block_length, block_layers=c.num_block_layers, token_layers=c.num_token_layers,
                    provenance=c.provenance)
    return model, tok, info


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def check_same_tokenizer(a, b, name_a: str, name_b: str) -> None:
    va, vb = a.get_vocab(), b.get_vocab()
    if va != vb:
        diff = len(set(va.items()) ^ set(vb.items()))
        raise BlockformerError(f"tokenizers of {name_a} and {name_b} differ ({len(va)} vs {len(vb)} entries, "
                               f"{diff} differing); compare models that share a tokenizer")


def score_task(scorer: Scorer, task: Task, docs: list[Doc], role: str):
    """(metrics, one sample per doc, seconds). A sample names its row of the task file (`doc`) and holds what
    lm-eval logs for it, so that a --limit subset can be compared with lm-eval item by item."""
    t0 = time.perf_counter()
    n_req = len(docs) if task.kind == "rolling" else sum(len(d.requests) for d in docs)
    with tqdm(total=n_req, desc=f"{role:>9} {task.name}", unit="req", leave=False) as bar:
        if task.kind == "rolling":
            lls = scorer.loglikelihood_rolling([d.requests[0][1] for d in docs], bar)
            samples = [{"doc": d.index, "loglikelihood": ll, "words": d.words, "bytes": d.bytes}
                       for d, ll in zip(docs, lls)]
            return rolling_metrics(lls, docs), samples, time.perf_counter() - t0
        if task.kind == "loglikelihood":
            flat = scorer.loglikelihood([d.requests[0] for d in docs], bar)
            samples = [{"doc": d.index, "loglikelihood": ll, "correct": greedy} for d, (ll, greedy) in zip(docs, flat)]
            return loglikelihood_metrics(flat), samples, time.perf_counter() - t0
        per_doc = scorer.loglikelihood_choices([d.requests for d in docs], bar)
    preds = [mc_predictions([ll for ll, _ in r], d, task.metrics) for r, d in zip(per_doc, docs)]
    samples = [{"doc": d.index, "gold": d.gold, "pred": p,
                "choices": [{"loglikelihood": ll, "is_greedy": greedy} for ll, greedy in r]}
               for d, r, p in zip(docs, per_doc, preds)]
    return mc_metrics(preds, docs), samples, time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------- metrics
def argmax(xs) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def mean_stderr(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mu = sum(xs) / n
    sd = math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1)) if n > 1 else 0.0
    return mu, sd / math.sqrt(n)


def mc_predictions(lls: list[float], doc: Doc, names) -> dict:
    """The choice each metric picks: acc the most likely, acc_norm the most likely per character (lm-eval's)."""
    pred = {"acc": argmax(lls)}
    if "acc_norm" in names:  # an empty choice: numpy's ll / 0 = -inf in lm-eval, never picked
        pred["acc_norm"] = argmax([ll / n if n else -math.inf for ll, n in zip(lls, doc.lengths)])
    return pred


def mc_metrics(preds: list[dict], docs: list[Doc]) -> dict:
    out = {}
    for name in preds[0]:
        out[name], out[f"{name}_stderr"] = mean_stderr([float(p[name] == d.gold) for p, d in zip(preds, docs)])
    return out


def loglikelihood_metrics(flat: list[tuple[float, bool]]) -> dict:
    nll, nll_se = mean_stderr([-ll for ll, _ in flat])
    acc, acc_se = mean_stderr([float(g) for _, g in flat])
    ppl = math.exp(nll)
    return {"perplexity": ppl, "perplexity_stderr": ppl * nll_se, "acc": acc, "acc_stderr": acc_se}  # delta method


def rolling_metrics(lls: list[float], docs: list[Doc]) -> dict:
    total, words, nbytes = sum(lls), sum(d.words for d in docs), sum(d.bytes for d in docs)
    return {"word_perplexity": math.exp(-total / words), "byte_perplexity": math.exp(-total / nbytes),
            "bits_per_byte": -total / nbytes / math.log(2)}


def write_results(results: dict, out: Path, overwrite: bool) -> None:
    from .report import bar_chart
    with atomic_folder(out, overwrite) as tmp:
        slim = {**results, "tasks": {k: {kk: vv for kk, vv in v.items() if kk != "samples"}
                                     for k, v in results["tasks"].items()}}
        (tmp / "results.json").write_text(json.dumps(slim, indent=2, default=str) + "\n")
        (tmp / "samples.json").write_text(json.dumps({k: v["samples"] for k, v in results["tasks"].items()}) + "\n")
        bar_chart(results, tmp / "results.png")
