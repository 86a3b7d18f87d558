"""PNG plots of a run's curves: people would rather look at loss curves than read them."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES = (("train_loss", "train (clients)"), ("eval_loss", "eval (clients' test)"),
          ("central_loss", "eval (central held-out)"))


def plot_rounds(rounds: list[dict], path: Path, *, metrics: tuple[str, ...] = ("perplexity",)) -> Path:
    """Loss and the task's metrics (``Task.report_keys``) per round, one line per source."""
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in CURVES:
        pts = [(r["round"], r[key]) for r in rounds if key in r]
        if pts:
            ax_loss.plot(*zip(*pts), marker="o", label=label)
    for metric in metrics:
        for key, label in ((f"eval_{metric}", f"{metric}: clients' test"),
                           (f"central_{metric}", f"{metric}: central")):
            pts = [(r["round"], r[key]) for r in rounds if key in r]
            if pts:
                ax_ppl.plot(*zip(*pts), marker="o", label=label)
    ax_loss.set(title="Loss", xlabel="round", ylabel="cross-entropy (nats)")
    title = ", ".join(metrics)
    ax_ppl.set(title=title[0].upper() + title[1:], xlabel="round", ylabel=title)
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    return save_figure(fig, path)


def plot_confusion(client_rows: list[dict], names: list[str], path: Path) -> Path | None:
    """The confusion matrix summed over the clients of the last evaluated round."""
    import numpy as np

    rows = [r for r in client_rows if r.get("phase") == "evaluate" and "confusion" in r]
    if not rows:
        return None
    last = max(r["round"] for r in rows)
    cm = np.sum([np.asarray(r["confusion"]) for r in rows if r["round"] == last], axis=0)
    k = int(round(len(cm) ** 0.5))
    cm = cm.reshape(k, k)
    names = names if len(names) == k else [str(i) for i in range(k)]
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * k, 1 + 0.6 * k))
    ax.imshow(cm, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=8)
    ax.set(xticks=range(k), yticks=range(k), xlabel="predicted", ylabel="true",
           title=f"Confusion (clients' test, round {last})")
    ax.set_xticklabels(names, rotation=45, ha="right")
    ax.set_yticklabels(names)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write the PNG (creating its dir) and free the figure: every plot ends here."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
