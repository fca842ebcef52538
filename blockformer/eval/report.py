"""The table and the bar chart of an evaluation: one column per role (the baseline first), delta with two."""
from __future__ import annotations

from pathlib import Path

PCT = {"acc", "acc_norm"}


def roles(results: dict) -> list[str]:
    """The models' labels in the order they were scored: the baseline (if any) first, the model last."""
    return list(results["models"])


def rows(results: dict) -> list[tuple]:
    """(task, metric, [value per role], delta of the last role vs the first or None, stderr of the last role)."""
    names, out = roles(results), []
    for task, entry in results["tasks"].items():
        m = entry["metrics"]
        last = m.get(names[-1], {})
        for name in metric_names(last):
            vals = [m.get(r, {}).get(name) for r in names]
            delta = vals[-1] - vals[0] if len(vals) > 1 and None not in vals else None
            out.append((task, name, vals, delta, last.get(f"{name}_stderr")))
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
    names = roles(results)
    two = len(names) > 1
    head = ("task", "metric", *names, *(["delta"] if two else []), "stderr")
    signed = lambda m, d: ("+" if d is not None and d >= 0 else "") + fmt(m, d)  # noqa: E731
    body = [(t, m, *(fmt(m, v) for v in vals), *([signed(m, d)] if two else []), fmt(m, s))
            for t, m, vals, d, s in rows(results)]
    widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
    line = lambda r: "  ".join(str(x).ljust(w) if i < 2 else str(x).rjust(w)  # noqa: E731
                               for i, (x, w) in enumerate(zip(r, widths)))
    speed = ", ".join(f"{role} {task} {m['items_per_s']:.1f} items/s" for task, e in results["tasks"].items()
                      for role, m in e["metrics"].items())
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body),
                      f"(acc in %; stderr of {names[-1]}; {speed}; {results['seconds']:.0f} s in all)"])


def bar_chart(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    data, names = rows(results), roles(results)
    acc = [r for r in data if r[1] in PCT]
    ppl = [r for r in data if r[1] not in PCT]
    w = 0.8 / len(names)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [max(len(acc), 1), max(len(ppl), 1)]})
    for ax, group, title, log in ((axes[0], acc, "accuracy (%)", False), (axes[1], ppl, "perplexity (lower is better)", True)):
        labels = [f"{t}\n{m}" for t, m, *_ in group]
        x = range(len(group))
        scale = 100 if not log else 1
        for j, role in enumerate(names):  # error bars on the last role's bars, the one the stderr is of
            last = j == len(names) - 1
            ax.bar([i + (j - (len(names) - 1) / 2) * w for i in x], [(r[2][j] or 0) * scale for r in group], w,
                   label=role, yerr=[(r[4] or 0) * scale for r in group] if last else None)
        ax.set_xticks(list(x), labels, fontsize=8)
        ax.set_title(title)
        if log and group:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
