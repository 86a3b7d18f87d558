"""PNG plots of a run's curves: people would rather look at loss curves than read them."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CURVES = (("train_loss", "train (clients)"), ("eval_loss", "eval (clients' test)"),
          ("central_loss", "eval (central held-out)"))


def plot_rounds(rounds: list[dict], path: Path) -> Path:
    """Loss and perplexity per round, one line per source that reported them."""
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in CURVES:
        pts = [(r["round"], r[key]) for r in rounds if key in r]
        if pts:
            ax_loss.plot(*zip(*pts), marker="o", label=label)
    for key, label in (("eval_perplexity", "clients' test"), ("central_perplexity", "central")):
        pts = [(r["round"], r[key]) for r in rounds if key in r]
        if pts:
            ax_ppl.plot(*zip(*pts), marker="o", label=label)
    ax_loss.set(title="Loss", xlabel="round", ylabel="cross-entropy (nats/token)")
    ax_ppl.set(title="Perplexity", xlabel="round", ylabel="perplexity")
    for ax in (ax_loss, ax_ppl):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write the PNG (creating its dir) and free the figure: every plot ends here."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
