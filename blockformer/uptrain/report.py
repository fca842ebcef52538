"""The loss curve of an uptraining run."""
from __future__ import annotations

from pathlib import Path


def loss_curve(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not history:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([h["tokens"] for h in history], [h["loss"] for h in history], label="train objective (CE, or CE + KD mix)", alpha=0.8)
    val = [h for h in history if "val_loss" in h]
    if val:
        ax.plot([h["tokens"] for h in val], [h["val_loss"] for h in val], "o-", label="validation cross-entropy")
    ax.set(xlabel="tokens", ylabel="loss (nats/token)", title="uptraining")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
