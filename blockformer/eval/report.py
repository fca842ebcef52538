"""The side-by-side table and the bar chart of an evaluation."""
from __future__ import annotations

from pathlib import Path

PCT = {"acc", "acc_norm"}


def rows(results: dict) -> list[tuple]:
    """(task, metric, original, converted, delta, stderr) for every reported metric."""
    out = []
    for task, entry in results["tasks"].items():
        m = entry["metrics"]
        conv, orig = m.get("converted", {}), m.get("original", {})
        for name in metric_names(conv):
            o, c = orig.get(name), conv[name]
            se = conv.get(f"{name}_stderr")
            out.append((task, name, o, c, None if o is None else c - o, se))
    return out


def metric_names(metrics: dict) -> list[str]:
    """The reported metrics of one model on one task (not their stderr, not the timing)."""
    return [k for k in metrics if not k.endswith("_stderr") and k not in ("seconds", "items_per_s")]


def fmt(metric: str, v) -> str:
    if v is None:
        return "-"
    if metric in PCT:
        return f"{100 * v:.2f}"
    return f"{v:.3e}" if abs(v) >= 1e5 else f"{v:.3f}"  # an untrained model's perplexity can be astronomical


def table(results: dict) -> str:
    head = ("task", "metric", "original", "converted", "delta", "stderr")
    body = [(t, m, fmt(m, o), fmt(m, c), ("+" if d is not None and d >= 0 else "") + fmt(m, d), fmt(m, s))
            for t, m, o, c, d, s in rows(results)]
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    line = lambda r: "  ".join(str(x).ljust(w) if i < 2 else str(x).rjust(w)  # noqa: E731
                               for i, (x, w) in enumerate(zip(r, widths)))
    speed = ", ".join(f"{role} {task} {m['items_per_s']:.1f} items/s" for task, e in results["tasks"].items()
                      for role, m in e["metrics"].items())
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body),
                      f"(acc in %; stderr of the converted model; {speed}; {results['seconds']:.0f} s in all)"])


def bar_chart(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data = rows(results)
    acc = [r for r in data if r[1] in PCT]
    ppl = [r for r in data if r[1] not in PCT]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [max(len(acc), 1), max(len(ppl), 1)]})
    for ax, group, title, log in ((axes[0], acc, "accuracy (%)", False), (axes[1], ppl, "perplexity (lower is better)", True)):
        labels = [f"{t}\n{m}" for t, m, *_ in group]
        x = range(len(group))
        scale = 100 if not log else 1
        ax.bar([i - 0.2 for i in x], [(o or 0) * scale for _, _, o, *_ in group], 0.4, label="original")
        ax.bar([i + 0.2 for i in x], [c * scale for _, _, _, c, *_ in group], 0.4, label="converted",
               yerr=[(s or 0) * scale for *_, s in group])
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_title(title)
        if log and group:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
