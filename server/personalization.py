"""Personalized vs global quality over clients, per round: statistics, tables, plots.

Every evaluated client reports its global-model and personal-model metrics on its own
test split (``fedslm.client.personal.comparison_metrics``; with ``personalization=none`` only
the global ones). Here each client counts once: per round the mean, median, 10th and
90th percentile over clients of global and personal loss / perplexity / accuracy and of
the per-client gain (relative perplexity reduction, %), the share of clients the
personal model improves, one CSV of every client's numbers, and at the end two PNGs:
quality over rounds (global vs personal) and a histogram of the last round's gains.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedslm.server.plots import save_figure
from fedslm.server.tracking import NoTracker, Tracker

QUALITY = ("loss", "perplexity", "accuracy")
TABLE_COLUMNS = ("round", "partition-id", "node_id", "has_personal", "personal_round",
                 "loss", "personal_loss", "perplexity", "personal_perplexity", "accuracy",
                 "personal_accuracy", "personal_gain", "num-tokens")
ARTIFACT_DIR = "personalization"


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, median, 10th and 90th percentile (linear interpolation) of ``values``."""
    v = np.asarray(values, dtype=float)
    p10, median, p90 = np.percentile(v, [10, 50, 90])
    return {"mean": float(v.mean()), "median": float(median), "p10": float(p10), "p90": float(p90)}


def round_stats(rows: list[dict]) -> dict[str, float]:
    """MLflow metrics of one round from its evaluate rows (one row per client).

    ``global_*`` over every client; ``personal_*``, ``gain_*``, ``gain_sem`` (standard
    error of the mean gain) and ``clients_improved_pct`` over clients that have a
    personal adapter (``has_personal=1``); ``personal_clients`` counts those.
    """
    out: dict[str, float] = {}
    for q in QUALITY:
        values = [float(r[q]) for r in rows if q in r]
        if values:
            out.update({f"global_{q}_{k}": v for k, v in spread(values).items()})
    personal = [r for r in rows if int(r.get("has_personal", 0)) == 1]
    out["personal_clients"] = float(len(personal))
    if not personal:
        return out
    for q in QUALITY:
        out.update({f"personal_{q}_{k}": v
                    for k, v in spread([float(r[f"personal_{q}"]) for r in personal]).items()})
    gains = [float(r["personal_gain"]) for r in personal]
    out.update({f"gain_{k}": v for k, v in spread(gains).items()})
    out["gain_sem"] = float(np.std(gains, ddof=1) / math.sqrt(len(gains))) if len(gains) > 1 else 0.0
    out["clients_improved_pct"] = 100.0 * sum(g > 0 for g in gains) / len(gains)
    return out


def write_client_table(rows: list[dict], path: Path) -> Path:
    """One line per evaluated client, the columns of ``TABLE_COLUMNS`` that were reported."""
    columns = [c for c in TABLE_COLUMNS if any(c in r for r in rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: int(r.get("partition-id", -1))))
    return path


class PersonalizationReport:
    """Collects per-round statistics for MLflow and writes the tables and plots."""

    def __init__(self, output_dir: Path, tracker: Tracker | NoTracker) -> None:
        self.dir = Path(output_dir) / ARTIFACT_DIR
        self.tracker = tracker
        self.rounds: list[dict[str, float]] = []
        self.last_rows: list[dict] = []

    def round_metrics(self, server_round: int, rows: list[dict]) -> dict[str, float]:
        """``RoundPlan.round_metrics`` hook: stats to log, and the round's client table."""
        rows = [r for r in rows if r.get("phase", "evaluate") == "evaluate"]
        if not rows:
            return {}
        stats = round_stats(rows)
        table = write_client_table(rows, self.dir / f"clients_round_{server_round:03d}.csv")
        self.tracker.log_artifact(table, ARTIFACT_DIR)
        self.rounds.append({"round": server_round, **stats})
        self.last_rows = rows
        return stats

    def finish(self) -> list[Path]:
        """Plots of the whole run, logged to MLflow; returns their paths."""
        paths = []
        if self.rounds:
            paths.append(plot_quality(self.rounds, self.dir / "quality_over_rounds.png"))
        gains = [float(r["personal_gain"]) for r in self.last_rows
                 if int(r.get("has_personal", 0)) == 1]
        if gains:
            last = self.rounds[-1]["round"] if self.rounds else 0
            paths.append(plot_gain_histogram(gains, int(last), self.dir / "gain_histogram.png"))
        for path in paths:
            self.tracker.log_artifact(path, ARTIFACT_DIR)
        return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt



def plot_quality(rounds: list[dict[str, float]], path: Path) -> Path:
    """Perplexity and accuracy over rounds: mean over clients, band = 10th-90th percentile."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, q in zip(axes, ("perplexity", "accuracy")):
        for who, label in (("global", "global adapter"), ("personal", "personal")):
            pts = [(r["round"], r[f"{who}_{q}_mean"], r[f"{who}_{q}_p10"], r[f"{who}_{q}_p90"])
                   for r in rounds if f"{who}_{q}_mean" in r]
            if pts:
                x, mean, lo, hi = map(list, zip(*pts))
                ax.plot(x, mean, marker="o", label=f"{label} (mean)")
                ax.fill_between(x, lo, hi, alpha=0.2)
        ax.set(title=f"{q.capitalize()} on each client's own test split", xlabel="round", ylabel=q)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    return save_figure(fig, path)


def plot_gain_histogram(gains: Sequence[float], server_round: int, path: Path) -> Path:
    """Per-client gain of the personal over the global model (%, > 0 = personal better)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(gains, bins=min(20, max(5, len(gains))), edgecolor="black")
    ax.axvline(0.0, color="red", linestyle="--", linewidth=1)
    ax.set(title=f"Per-client perplexity reduction, round {server_round}",
           xlabel="gain = 100 * (1 - ppl_personal / ppl_global)  [%]", ylabel="clients")
    return save_figure(fig, path)
