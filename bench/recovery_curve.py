"""The recovery curve (issue 11 §2): original vs converted vs uptrained checkpoints, on the same fixed items.

Each point is a model folder or an uptraining checkpoint (`RUN/checkpoints/step-N`, exported next to it as a model
folder); every point is scored on the same items: HellaSwag, PIQA, ARC-Easy (500-item fixed-seed subsets), LAMBADA
(`--lambada-limit`, all 5,153 items by default, accuracy and perplexity; for Block Transformers also with the paper's
anchoring, `--anchor first`, as a column beside ours) and WikiText-2 word perplexity (3 pages). A point's scores are
kept in `--out`: re-running scores only what a point is missing.
Per task and on average it reports the share of the original's above-chance accuracy each point keeps. Prints a
table, writes JSON (`--out`/curve.json), a markdown table and a plot; the last stdout line is one JSON object.

    python bench/recovery_curve.py --original default --point 0=runs/curve/ctx \
        --point 65536=runs/curve/up256k/checkpoints/step-64 --point 262144=runs/curve/up256k/model --out runs/curve
    python bench/recovery_curve.py --original default --point 0=runs/curve/ctx --point 16384/books=runs/a/model \
        --point 16384/teacher-text=runs/b/model --out runs/methods          # methods side by side: TOKENS/METHOD=PATH
    python bench/recovery_curve.py --original tiny/ --point 0=tiny-block/ --limit 20 --lambada-limit 20 \
        --tasks piqa,lambada_openai --out /tmp/curve                                    # tiny CPU variant
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from blockformer.eval.harness import EvalConfig, evaluate  # noqa: E402
from blockformer.machine import cpu_name  # noqa: E402

CHANCE = {"hellaswag": 25.0, "piqa": 50.0, "arc_easy": 25.0, "arc_challenge": 25.0, "lambada_openai": 0.0,
          "winogrande": 50.0, "sciq": 25.0}


def export_checkpoint(step_dir: Path, converted: Path) -> Path:
    """A plain model folder from an uptraining checkpoint: the converted folder's config + tokenizer, its weights."""
    import blockformer  # noqa: F401 - registers the block model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from blockformer.uptrain.checkpoints import read_checkpoint
    out = step_dir.parent.parent / f"model-{step_dir.name}"
    if (out / "config.json").exists():
        return out
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32)
    sd, _, _ = read_checkpoint(step_dir)
    model.load_state_dict(sd, strict=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(converted).save_pretrained(out)
    return out


def resolve_point(spec: str) -> tuple[int, str, str]:
    """'TOKENS=PATH' or 'TOKENS/METHOD=PATH' (points of several methods in one table and plot, a line each)."""
    head, _, path = spec.partition("=")
    tokens, _, method = head.partition("/")
    p = Path(path)
    if p.name.startswith("step-"):  # a checkpoint: export it beside the run's other outputs
        run = p.parent.parent
        conf = run / "uptrain_config.json"
        if not conf.exists():
            raise click.BadParameter(f"{conf} (the uptraining config naming the converted model) is missing")
        converted = json.loads(conf.read_text())["model"]
        path = str(export_checkpoint(p, Path(converted)))
    return int(tokens), path, method


FIRST = "@first"  # a task scored with the paper's anchoring (`--anchor first`): LAMBADA's column beside ours


def score(spec: str, role: str, tasks, limits, seed: int) -> dict:
    metrics = {}
    for task in tasks:
        name, _, anchor = task.partition("@")
        r = evaluate(EvalConfig(model=spec, tasks=(name,), limit=limits.get(name), seed=seed, role=role,
                                anchor=anchor or "context"))
        m = r["tasks"][name]["metrics"][role]
        metrics[task] = {k: v for k, v in m.items() if isinstance(v, (int, float))}
        print(f"  {role:>12} {task:<15} " + " ".join(f"{k}={v:.4g}" for k, v in metrics[task].items()
                                                       if k in ("acc", "acc_stderr", "perplexity", "word_perplexity",
                                                                "items_per_s")), flush=True)
    return metrics


def kept(model: dict, original: dict) -> dict:
    """Share of the original's above-chance accuracy, per task and mean over the accuracy tasks; `mean_stderr` is
    the mean's standard error from the model's per-task stderr (the original's margin taken as exact)."""
    out, var = {}, []
    for task, m in model.items():
        if "acc" in m and task in CHANCE:
            above = original[task]["acc"] * 100 - CHANCE[task]
            out[task] = round((m["acc"] * 100 - CHANCE[task]) / above, 3) if above > 0 else None
            if above > 0:
                var.append((m.get("acc_stderr", 0) * 100 / above) ** 2)
    vals = [v for v in out.values() if v is not None]
    out["mean"] = round(sum(vals) / len(vals), 3) if vals else None
    out["mean_stderr"] = round(sum(var) ** 0.5 / len(var), 3) if var else None
    return out


def table(curve: dict, tasks) -> str:
    cols = [t for t in tasks if t != "wikitext"]
    first = any("lambada_openai" + FIRST in p["metrics"] for p in curve.values())
    head = ("| model | tokens | " + " | ".join(f"{t} acc" for t in cols) + " | LAMBADA ppl |"
            + (" LAMBADA acc / ppl, anchor first |" if first else "") + " WikiText-2 word ppl | kept (mean) |")
    lines = [head, "|" + "---|" * (len(cols) + 5 + first)]
    for name, p in curve.items():
        m = p["metrics"]
        accs = [f"{m[t]['acc'] * 100:.1f} ± {m[t].get('acc_stderr', 0) * 100:.1f}" if t in m else "-" for t in cols]
        lam = f"{m['lambada_openai']['perplexity']:.4g}" if "lambada_openai" in m else "-"
        if first:  # the paper's anchoring; a vanilla model scores the same under both
            f = m.get("lambada_openai" + FIRST, m.get("lambada_openai") if name == "original" else None)
            lam += f" | {f['acc'] * 100:.1f} / {f['perplexity']:.4g}" if f else " | -"
        wiki = f"{m['wikitext']['word_perplexity']:.4g}" if "wikitext" in m else "-"
        k, se = p.get("kept", {}).get("mean"), p.get("kept", {}).get("mean_stderr") or 0
        se = 0 if name == "original" else se  # the reference itself: 100% by definition
        lines.append(f"| {name} | {p['tokens'] if p['tokens'] is not None else '-'} | " + " | ".join(accs)
                     + f" | {lam} | {wiki} | {'-' if k is None else f'{k * 100:.0f}%' + (f' ± {se * 100:.0f}' if se else '')} |")
    return "\n".join(lines)


def plot(curve: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    points = [p for n, p in curve.items() if n != "original"]
    # a method is a line of its trained points; the conversion alone is a line only when nothing was trained
    methods = dict.fromkeys(p.get("method", "") for p in points if p["tokens"]) or {"": None}
    for m in methods:  # the conversion (0 tokens) starts every method's line
        pts = sorted([(p["tokens"], p) for n, p in curve.items() if n != "original"
                      and (p.get("method", "") == m or p["tokens"] == 0)], key=lambda tp: tp[0])
        xs = [max(t, 1000) for t, _ in pts]
        ax[0].errorbar(xs, [p["kept"]["mean"] * 100 for _, p in pts], [(p["kept"]["mean_stderr"] or 0) * 100 for _, p in pts],
                       fmt="o-", capsize=3, label=f"{m or 'default method'}: mean kept (± stderr)")
        if all("wikitext" in p["metrics"] for _, p in pts):
            ax[1].plot(xs, [p["metrics"]["wikitext"]["word_perplexity"] for _, p in pts], "o-", label=m or "default method")
    ax[0].axhline(100, color="k", ls="--", label="original")
    ax[0].axhline(50, color="r", ls=":", label="goal (50%)")
    ax[0].set(xscale="log", xlabel="uptraining tokens (0 plotted at 1k)", ylabel="% of above-chance accuracy kept")
    ax[0].legend(fontsize=8)
    if any("wikitext" in p["metrics"] for p in curve.values()):
        ax[1].axhline(curve["original"]["metrics"]["wikitext"]["word_perplexity"], color="k", ls="--", label="original")
        ax[1].set(xscale="log", yscale="log", xlabel="uptraining tokens", ylabel="WikiText-2 word perplexity")
        ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


@click.command()
@click.option("--original", required=True, help="The original model (folder, hub id, .gguf, default).")
@click.option("--point", "points", multiple=True, required=True, help="TOKENS=FOLDER or TOKENS=RUN/checkpoints/step-N.")
@click.option("--tasks", default="hellaswag,piqa,arc_easy,lambada_openai,wikitext", help="Comma-separated tasks.")
@click.option("--limit", default=500, help="Items per multiple-choice task (fixed-seed subset).")
@click.option("--lambada-limit", type=int, default=None, help="LAMBADA items (default: all 5,153).")
@click.option("--wikitext-limit", default=3, help="WikiText-2 pages.")
@click.option("--seed", default=1234, help="Seed of the subsets.")
@click.option("--lambada-first/--no-lambada-first", default=True, show_default=True,
              help="Also score LAMBADA with the paper's anchoring (the first token closes block 0) for every point "
                   "but the original, which scores the same under both.")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Folder for curve.json/md/png.")
def main(original, points, tasks, limit, lambada_limit, wikitext_limit, seed, lambada_first, out):
    t0 = time.perf_counter()
    tasks = tuple(t for t in tasks.split(",") if t)
    limits = {t: limit for t in tasks} | {"lambada_openai": lambada_limit, "wikitext": wikitext_limit}
    out.mkdir(parents=True, exist_ok=True)
    done = json.loads((out / "curve.json").read_text())["points"] if (out / "curve.json").exists() else {}
    curve = {}
    todo = [("original", original, None, "")] + [(f"{t} tokens" + (f" ({m})" if m else ""), p, t, m)
                                                  for t, p, m in map(resolve_point, points)]
    for name, spec, tokens, method in todo:
        want = tasks + ((f"lambada_openai{FIRST}",) if lambada_first and name != "original"
                        and "lambada_openai" in tasks else ())
        prev = done.get(name) if done.get(name, {}).get("spec") == spec else None
        curve[name] = prev or {"spec": spec, "tokens": tokens, "method": method, "metrics": {}}
        # resumable: a point's scored tasks are kept, only the missing ones are scored
        missing = [t for t in want if t not in curve[name]["metrics"]]
        if missing:
            curve[name]["metrics"].update(score(spec, name, missing, limits, seed))
        curve[name]["kept"] = kept(curve[name]["metrics"], curve["original"]["metrics"])
        (out / "curve.json").write_text(json.dumps({"cpu": cpu_name(), "limits": limits, "points": curve}, indent=2))
    md = table(curve, tasks)
    (out / "curve.md").write_text(md + "\n")
    plot(curve, out / "curve.png")
    print(md)
    summary = {n: p["kept"]["mean"] for n, p in curve.items()}
    print(json.dumps({"cpu": cpu_name(), "kept_mean": summary, "seconds": round(time.perf_counter() - t0, 1),
                      "json": str(out / "curve.json")}))


if __name__ == "__main__":
    main()
