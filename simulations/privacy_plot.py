"""Privacy-utility plot: epsilon against final perplexity for the runs of an MLflow experiment.

    python -m fedslm.simulations.run -m privacy=dp_sgd privacy.noise_multiplier=0.5,1.0,2.0 tracking.experiment=dp
    python -m fedslm.simulations.run tracking.experiment=dp            # the non-DP baseline
    python -m fedslm.simulations.privacy_plot --experiment dp --tracking-uri sqlite:////abs/outputs/mlflow.db

Each finished run contributes its last logged epsilon (sample-level: the max over
clients; user-level: the server's; a ``dp_sgd+dp_fedavg`` run one point at each level,
drawn as two curves) and its last perplexity (central held-out if logged,
else the clients' test splits). Runs without DP are the baseline (a dashed line). The
PNG and a CSV of the points are saved and logged to a new run of the same experiment,
tagged ``fedslm.kind=privacy-plot`` (such runs are skipped when plotting). Runs made
with ``privacy.audit=true`` also bring their audit figures to the table and CSV: the
stronger attack's membership-inference AUC, the mean canary exposure at the largest
repetition count, and the empirical epsilon lower bound (docs/privacy.md).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402

from fedslm.server.plots import save_figure  # noqa: E402

PLOT_TAG = "fedslm.kind"
PLOT_KIND = "privacy-plot"
SAMPLE = ("sample", "dp_epsilon_sample_max", "privacy.noise_multiplier")
USER = ("user", "dp_epsilon_user", "privacy.noise_multiplier")
# (level, epsilon metric, noise param) per mode: both levels give a run two points
LEVELS = {"dp_sgd": (SAMPLE,), "dp_fedavg": (USER,),
          "dp_sgd+dp_fedavg": (SAMPLE, ("user", "dp_epsilon_user", "privacy.user_noise_multiplier"))}
CURVES = {("dp_sgd", "sample"): ("sample-level (DP-SGD)", "o"),
          ("dp_fedavg", "user"): ("user-level (DP-FedAvg)", "s"),
          ("dp_sgd+dp_fedavg", "sample"): ("both levels: sample-level ε (DP-SGD)", "^"),
          ("dp_sgd+dp_fedavg", "user"): ("both levels: user-level ε (DP-FedAvg)", "v")}
PERPLEXITY_KEYS = ("central_perplexity", "eval_perplexity")


@dataclass
class Point:
    run_id: str
    run_name: str
    mode: str
    noise_multiplier: float  # of this point's level (dp_sgd+dp_fedavg: the server's for "user")
    epsilon: float  # inf for runs without DP
    delta: float
    perplexity: float
    perplexity_metric: str
    initial_perplexity: float  # before any training (round 0)
    audit_mia_auc: float = math.nan  # max over the two attacks; nan: the run was not audited
    audit_exposure: float = math.nan  # mean exposure at the largest repetition count
    audit_exposure_reps: int = 0
    audit_eps_lower_bound: float = math.nan
    level: str = ""  # "sample" or "user" ("" without DP); dp_sgd+dp_fedavg runs have one point each


def audit_fields(metrics: dict[str, float]) -> dict[str, float | int]:
    """A run's audit figures for its ``Point`` (none if it logged no audit)."""
    out: dict[str, float | int] = {}
    aucs = [metrics[k] for k in ("audit_mia_loss_auc", "audit_mia_calibrated_auc") if k in metrics]
    if aucs:
        out["audit_mia_auc"] = max(aucs)
    reps = [int(k[len("audit_exposure_rep"):]) for k in metrics
            if k.startswith("audit_exposure_rep") and k[len("audit_exposure_rep"):].isdigit()]
    if reps:
        out["audit_exposure_reps"] = max(reps)
        out["audit_exposure"] = metrics[f"audit_exposure_rep{max(reps)}"]
    if "audit_eps_lower_bound" in metrics:
        out["audit_eps_lower_bound"] = metrics["audit_eps_lower_bound"]
    return out


def collect_points(client, experiment_id: str) -> list[Point]:
    """One point per finished run and DP level that logged a perplexity (plot runs
    excluded): a ``dp_sgd+dp_fedavg`` run gives a sample-level and a user-level point."""
    points = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=10_000):
        if run.data.tags.get(PLOT_TAG) == PLOT_KIND:
            continue
        metrics, params = run.data.metrics, run.data.params
        ppl_key = next((k for k in PERPLEXITY_KEYS if k in metrics), None)
        if ppl_key is None:
            continue
        mode = params.get("privacy.mode", "none")
        levels = [(level, key, noise) for level, key, noise in LEVELS.get(mode, ()) if key in metrics]
        if mode != "none" and not levels:
            continue  # a DP run that released nothing has no epsilon to show
        common = dict(run_id=run.info.run_id, run_name=run.info.run_name or run.info.run_id[:8], mode=mode,
                      perplexity=float(metrics[ppl_key]), perplexity_metric=ppl_key,
                      initial_perplexity=_first_value(client, run.info.run_id, ppl_key), **audit_fields(metrics))
        if mode == "none":
            points.append(Point(noise_multiplier=0.0, epsilon=math.inf, delta=0.0, **common))
        for level, key, noise in levels:
            delta = metrics.get("dp_delta_sample" if mode == "dp_sgd+dp_fedavg" and level == "sample"
                                else "dp_delta", 0.0)
            points.append(Point(noise_multiplier=float(params.get(noise, "nan")), epsilon=float(metrics[key]),
                                delta=float(delta), level=level, **common))
    return sorted(points, key=lambda p: (p.mode, p.level, p.epsilon))


def _first_value(client, run_id: str, key: str) -> float:
    history = client.get_metric_history(run_id, key)
    return float(min(history, key=lambda m: (m.step, m.timestamp)).value) if history else math.nan


def curves(points: list[Point]) -> dict[str, tuple[str, list[Point]]]:
    """Label -> (marker, points) of each curve with at least one point: one per DP level
    and mode (a ``dp_sgd+dp_fedavg`` run is on two curves), in epsilon order."""
    out = {}
    for (mode, level), (label, marker) in CURVES.items():
        pts = sorted((p for p in points if (p.mode, p.level) == (mode, level) and math.isfinite(p.epsilon)),
                     key=lambda p: p.epsilon)
        if pts:
            out[label] = (marker, pts)
    return out


def draw(points: list[Point], path: Path, *, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, (marker, pts) in curves(points).items():
        if pts:
            ax.plot([p.epsilon for p in pts], [p.perplexity for p in pts], marker=marker, label=label)
            for p in pts:
                ax.annotate(f"σ={p.noise_multiplier:g}", (p.epsilon, p.perplexity),
                            textcoords="offset points", xytext=(4, 4), fontsize=8)
    for i, p in enumerate(p for p in points if p.mode == "none"):
        ax.axhline(p.perplexity, linestyle="--", color="gray", label="no DP" if i == 0 else None)
    start = next((p.initial_perplexity for p in points if math.isfinite(p.initial_perplexity)), None)
    if start is not None:
        ax.axhline(start, linestyle=":", color="black", label="before training")
    if any(math.isfinite(p.epsilon) and p.epsilon > 0 for p in points):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set(title=title, xlabel="ε (cumulative, at the run's δ)", ylabel="final perplexity (lower is better)")
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend()
    return save_figure(fig, path)


def write_csv(points: list[Point], path: Path) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(Point.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(p) for p in points)
    return path


def table(points: list[Point]) -> str:
    lines = [f"{'mode':<16} {'level':<6} {'noise':>6} {'epsilon':>10} {'delta':>9} {'start ppl':>9} {'final ppl':>9} "
             f"{'MIA AUC':>7} {'exposure':>11} {'eps lb':>6}  run"]
    for p in points:
        exposure = f"{p.audit_exposure:.2f}@{p.audit_exposure_reps}" if p.audit_exposure_reps else "-"
        lines.append(f"{p.mode:<16} {p.level or '-':<6} {p.noise_multiplier:>6g} {p.epsilon:>10.3f} {p.delta:>9.2g} "
                     f"{p.initial_perplexity:>9.3f} {p.perplexity:>9.3f} {_num(p.audit_mia_auc):>7} "
                     f"{exposure:>11} {_num(p.audit_eps_lower_bound):>6}  {p.run_id[:8]}")
    return "\n".join(lines)


def _num(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.3f}"


def plot_experiment(experiment: str, tracking_uri: str, out: Path) -> tuple[list[Point], str]:
    """Draw, save and log the plot; returns the points and the MLflow run id it was logged to."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: no MLflow experiment named {experiment!r} in {tracking_uri}")
    points = collect_points(client, exp.experiment_id)
    if not points:
        raise SystemExit(f"error: experiment {experiment!r} has no finished runs with a perplexity")
    png = draw(points, out, title=f"Privacy vs utility: {experiment}")
    data = write_csv(points, out.with_suffix(".csv"))
    run = client.create_run(exp.experiment_id, run_name="privacy-utility", tags={PLOT_TAG: PLOT_KIND})
    client.log_artifact(run.info.run_id, str(png))
    client.log_artifact(run.info.run_id, str(data))
    client.set_terminated(run.info.run_id, "FINISHED")
    return points, run.info.run_id


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--tracking-uri", required=True, help="e.g. sqlite:////abs/path/outputs/mlflow.db")
    parser.add_argument("--out", type=Path, default=Path("privacy_utility.png"), help="PNG path")
    args = parser.parse_args(argv)
    points, run_id = plot_experiment(args.experiment, args.tracking_uri, args.out.resolve())
    print(table(points))
    print(f"\nPlot: {args.out.resolve()} (logged to MLflow run {run_id})")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
