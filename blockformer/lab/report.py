"""The lab's outputs: lab.json (every number), methods.md (method x budget table), fig5a.png (validation loss
against tokens, the paper's Fig. 5a in miniature) and a short summary on stdout."""
from __future__ import annotations

import json
import math
from dataclasses import asdict

from ..io import atomic_write_text
from .methods import METHODS, budget_key


def table(cfg, runs: list[dict]) -> dict:
    """{method: {budget key: val loss of the main seed}} and {method: [losses of every seed at the low budget]}."""
    main, seeds, low = {}, {}, min(cfg.budgets)
    for r in runs:
        if r["seed"] == cfg.seed:
            main.setdefault(r["method"], {})[budget_key(r["budget"])] = r["val_loss"]
        if r["budget"] == low:
            seeds.setdefault(r["method"], []).append(r["val_loss"])
    return {"main": main, "seeds": seeds}


def goals(cfg, tab: dict, scratch: float) -> dict:
    """The issue's two goals: reach the from-scratch block model's final loss within 3% of N; beat CE everywhere."""
    keys = [budget_key(b) for b in sorted(cfg.budgets)]
    reach = {m: next((k for k in keys if row.get(k, math.inf) <= scratch), None) for m, row in tab["main"].items()}
    ce = tab["main"].get("ce", {})
    beats = [m for m, row in tab["main"].items() if m != "ce" and ce and all(row.get(k, math.inf) < ce.get(k, -1)
                                                                              for k in keys)]
    best = {k: min(tab["main"], key=lambda m: tab["main"][m].get(k, math.inf)) for k in keys}
    within3 = [m for m, k in reach.items() if k is not None and float(k[1:]) <= 3]
    return {"reaches_scratch_at_budget": reach, "reach_scratch_within_3pct": within3, "beat_ce_every_budget": beats,
            "best_per_budget": best}


def methods_md(cfg, res: dict, tab: dict, goal: dict) -> str:
    keys = [budget_key(b) for b in sorted(cfg.budgets)]
    low = budget_key(min(cfg.budgets))
    head = "| method | " + " | ".join(f"{k[1:]}% of N ({cfg.budget_tokens(float(k[1:]) / 100):,} tok)"
                                        for k in keys) + f" | seeds at {low[1:]}% (spread) |"
    lines = [f"# Recovery lab: final validation loss (mean NLL per token, {res['data']['val_rows']} held-out rows "
             f"of {cfg.seq_len} tokens)", "",
             f"N = {cfg.pretrain_steps * cfg.step_tokens:,} tokens. Vanilla model: **{res['vanilla']['val_loss']:.4f}**."
             f" Block Transformer from scratch (N tokens): **{res['scratch']['val_loss']:.4f}**. Converted, before "
             f"uptraining: " + ", ".join(f"{k} {v['val_loss']:.4f}" for k, v in res["converted"].items()) + ".", "",
             head, "|---" * (len(keys) + 2) + "|"]
    for m, row in tab["main"].items():
        s = tab["seeds"].get(m, [])
        spread = f"{', '.join(f'{x:.4f}' for x in s)} ({max(s) - min(s):.4f})" if len(s) > 1 else "-"
        cells = [f"**{row[k]:.4f}**" if goal["best_per_budget"][k] == m else f"{row[k]:.4f}" if k in row else "-"
                 for k in keys]
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {spread} |")
    lines += ["", "Bold: best at that budget. Methods:", ""] + [f"- `{m}`: {METHODS[m].about}" for m in tab["main"]]
    lines += ["", f"Reaches the from-scratch loss at: {goal['reaches_scratch_at_budget']}.",
              f"Beats CE at every budget: {', '.join(goal['beat_ce_every_budget']) or 'none'}.", ""]
    return "\n".join(lines)


def figure(cfg, res: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(res["vanilla"]["val_loss"], color="black", ls="--", label="vanilla (N tokens)")
    sc = res["scratch"]["curve"]
    ax.plot([p["tokens"] for p in sc], [p["val_loss"] for p in sc], "o-", color="gray", label="block, from scratch")
    ce = [r for r in res["runs"] if r["method"] == "ce" and r["seed"] == cfg.seed]
    for r in sorted(ce, key=lambda r: r["budget"]):
        pts = [p for p in r["curve"] if p["tokens"] > 0]
        ax.plot([p["tokens"] for p in pts], [p["val_loss"] for p in pts], ".-",
                label=f"uptrained (CE), {r['budget'] * 100:g}% of N")
    best = _best_other(cfg, res["runs"])
    if best:
        rs = sorted((r for r in res["runs"] if r["method"] == best and r["seed"] == cfg.seed),
                    key=lambda r: r["budget"])
        ax.plot([r["tokens"] for r in rs], [r["val_loss"] for r in rs], "*", ms=12, label=f"best method: {best}")
    start = res["converted"]["paper-partition"]["val_loss"]
    ax.axhline(start, color="red", ls=":", lw=1, label="converted (paper init), no uptraining")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Recovery lab (cf. Ho et al. 2024, Fig. 5a)")
    lo = min([res["vanilla"]["val_loss"]] + [p["val_loss"] for p in sc])
    ax.set_ylim(lo - 0.2, max(start, sc[0]["val_loss"]) + 0.2)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _best_other(cfg, runs) -> str | None:
    """The method other than CE with the lowest mean loss over the budgets (main seed)."""
    means = {}
    for m in {r["method"] for r in runs} - {"ce"}:
        losses = [r["val_loss"] for r in runs if r["method"] == m and r["seed"] == cfg.seed]
        means[m] = sum(losses) / len(losses)
    return min(means, key=means.get) if means else None


def write_report(cfg, res: dict, status: dict, seconds: float) -> dict:
    tab = table(cfg, res["runs"])
    goal = goals(cfg, tab, res["scratch"]["val_loss"])
    report = {"config": {**asdict(cfg), "out": str(cfg.out)}, "stages": status, "wall_seconds": round(seconds, 1),
              "N": cfg.pretrain_steps * cfg.step_tokens, "data": res["data"], "vanilla": res["vanilla"],
              "scratch": res["scratch"], "converted": res["converted"], "table": tab, "goals": goal,
              "runs": res["runs"]}
    atomic_write_text(cfg.out / "lab.json", json.dumps(report, indent=2) + "\n")
    md = methods_md(cfg, res, tab, goal)
    atomic_write_text(cfg.out / "methods.md", md)
    figure(cfg, res, cfg.out / "fig5a.png")
    ran = sum(v == "ran" for v in status.values())
    print(f"\n{md}\n[lab] {ran} stage(s) run, {len(status) - ran} skipped, {seconds:.0f} s; wrote {cfg.out / 'lab.json'}"
          f", {cfg.out / 'methods.md'}, {cfg.out / 'fig5a.png'}")
    return report
