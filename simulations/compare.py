"""Compare personalization methods recorded in one MLflow experiment: one table.

    python -m fedslm.simulations.compare --experiment NAME --tracking-uri sqlite:////abs/outputs/mlflow.db

One row per ``personalization.method`` and privacy setting (``privacy.mode`` and noise
multiplier; its most recent FINISHED run; ``--all`` lists every finished run). Quality
numbers are the last evaluated round's means over clients, each client counting once,
on the clients' own test splits: ``personal ppl`` (clients with a personal adapter),
``global ppl`` (every client, global model) and ``improved`` (share of clients whose
personal perplexity is lower), ``gain`` (mean over clients of
100 * (1 - ppl_personal / ppl_global), with its standard error). ``bytes sent`` is adapter
payload over the whole run, server->clients plus clients->server; ``wall`` is the MLflow
run's duration.

When a compared run used DP or was audited, a second table summarizes each run's privacy
report (docs/privacy.md): the unit of privacy, the last sample-level epsilon (max over
clients) and user-level epsilon with their deltas, and the audit's numbers: the
stronger attack's membership-inference AUC and TPR at 1% FPR against the global model
and against the personal adapters, the mean canary exposure at the largest repetition
count and the empirical epsilon lower bound (95%).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from fedslm.simulations.report import _fmt_bytes

METHOD_ORDER = ("none", "local_only", "finetune", "split", "dual")


class CompareError(RuntimeError):
    """The experiment cannot be compared; one-line message."""


@dataclass(frozen=True)
class PrivacySummary:
    """A run's privacy report, from its logged params and metrics (nan: not logged)."""

    mode: str = "none"
    unit: str = "block"
    noise_multiplier: float = math.nan
    user_noise_multiplier: float = math.nan
    epsilon_sample: float = math.nan
    epsilon_user: float = math.nan
    delta_sample: float = math.nan
    delta_user: float = math.nan
    mia_auc: float = math.nan  # the stronger of the two attacks, global model
    mia_tpr: float = math.nan  # TPR at 1% FPR, the stronger attack there
    mia_auc_personal: float = math.nan
    mia_tpr_personal: float = math.nan
    exposure: float = math.nan  # mean over canaries at the largest repetition count
    exposure_reps: int = 0
    eps_lower_bound: float = math.nan
    eps_lower_bound_personal: float = math.nan

    @property
    def label(self) -> str:
        """``none``, ``dp_sgd z=1.2``, ``dp_fedavg z=1``, ``dp_sgd+dp_fedavg z=1.2/1``."""
        if self.mode == "none":
            return "none"
        z = f"{self.noise_multiplier:g}"
        if self.mode == "dp_sgd+dp_fedavg":
            z += f"/{self.user_noise_multiplier:g}"
        return f"{self.mode} z={z}"

    @property
    def unit_label(self) -> str:
        """What one protected unit is: the DP-SGD record (block/document) and/or the client."""
        levels = []
        if self.mode in ("dp_sgd", "dp_sgd+dp_fedavg"):
            levels.append(self.unit)
        if self.mode in ("dp_fedavg", "dp_sgd+dp_fedavg"):
            levels.append("client")
        return "+".join(levels) or "-"

    @property
    def audited(self) -> bool:
        return not math.isnan(self.mia_auc)


def _strongest(metrics: dict[str, float], tag: str, figure: str) -> float:
    values = [metrics[k] for k in (f"audit_mia{tag}_loss_{figure}", f"audit_mia{tag}_calibrated_{figure}")
              if k in metrics]
    return max(values) if values else math.nan


def privacy_summary(params: dict[str, str], metrics: dict[str, float]) -> PrivacySummary:
    """The privacy report's figures of one MLflow run (last logged values)."""
    mode = params.get("privacy.mode", "none")
    sample = mode in ("dp_sgd", "dp_sgd+dp_fedavg")
    user = mode in ("dp_fedavg", "dp_sgd+dp_fedavg")
    nan = math.nan
    # dp_delta is the server's in both modes with a server ledger, the clients' under dp_sgd
    delta_sample = metrics.get("dp_delta_sample" if user else "dp_delta", nan) if sample else nan
    reps = [int(k[len("audit_exposure_rep"):]) for k in metrics
            if k.startswith("audit_exposure_rep") and k[len("audit_exposure_rep"):].isdigit()]
    return PrivacySummary(
        mode=mode,
        unit=params.get("privacy.unit", "block"),
        noise_multiplier=float(params.get("privacy.noise_multiplier", nan)) if mode != "none" else nan,
        user_noise_multiplier=float(params.get("privacy.user_noise_multiplier", nan))
        if mode == "dp_sgd+dp_fedavg" else nan,
        epsilon_sample=metrics.get("dp_epsilon_sample_max", nan) if sample else nan,
        epsilon_user=metrics.get("dp_epsilon_user", nan) if user else nan,
        delta_sample=delta_sample,
        delta_user=metrics.get("dp_delta", nan) if user else nan,
        mia_auc=_strongest(metrics, "", "auc"),
        mia_tpr=_strongest(metrics, "", "tpr_at_1pct_fpr"),
        mia_auc_personal=_strongest(metrics, "_personal", "auc"),
        mia_tpr_personal=_strongest(metrics, "_personal", "tpr_at_1pct_fpr"),
        exposure=metrics.get(f"audit_exposure_rep{max(reps)}", nan) if reps else nan,
        exposure_reps=max(reps) if reps else 0,
        eps_lower_bound=metrics.get("audit_eps_lower_bound", nan),
        eps_lower_bound_personal=metrics.get("audit_eps_lower_bound_personal", nan),
    )


@dataclass(frozen=True)
class MethodRow:
    method: str
    run_name: str
    personal_ppl: float | None
    global_ppl: float | None
    improved_pct: float | None
    gain_mean: float | None
    gain_sem: float | None
    bytes_sent: float
    wall_seconds: float | None
    privacy: PrivacySummary = PrivacySummary()


def _sum_history(client, run_id: str, key: str) -> float:
    return float(sum(m.value for m in client.get_metric_history(run_id, key)))


def collect(tracking_uri: str, experiment: str, *, every_run: bool = False) -> list[MethodRow]:
    """Rows for the experiment's finished runs (latest per method and privacy setting
    unless ``every_run``)."""
    import mlflow

    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        if not db.is_file():  # MLflow would silently create an empty store
            raise CompareError(f"--tracking-uri: no MLflow database at {db}")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise CompareError(f"--experiment: no MLflow experiment named {experiment!r} at {tracking_uri}")
    runs = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=10_000)
    if not runs:
        raise CompareError(f"--experiment: {experiment!r} has no finished runs")
    rows, seen = [], set()
    for run in runs:
        method = run.data.params.get("personalization.method", "none")
        metrics = run.data.metrics  # the value at the last step, i.e. the last round
        privacy = privacy_summary(run.data.params, metrics)
        if (method, privacy.label) in seen and not every_run:
            continue
        seen.add((method, privacy.label))
        end, start = run.info.end_time, run.info.start_time
        rows.append(MethodRow(
            method=method,
            run_name=run.info.run_name or run.info.run_id,
            personal_ppl=metrics.get("personal_perplexity_mean"),
            global_ppl=metrics.get("global_perplexity_mean"),
            improved_pct=metrics.get("clients_improved_pct"),
            gain_mean=metrics.get("gain_mean"),
            gain_sem=metrics.get("gain_sem"),
            bytes_sent=_sum_history(client, run.info.run_id, "bytes_up")
            + _sum_history(client, run.info.run_id, "bytes_down"),
            wall_seconds=(end - start) / 1000.0 if end and start else None,
            privacy=privacy,
        ))
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(rows, key=lambda r: order.get(r.method, len(order)))  # stable: newest first


def format_table(rows: list[MethodRow], *, with_run: bool = False) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    with_privacy = any(r.privacy.mode != "none" for r in rows)
    head = ["method"] + (["privacy"] if with_privacy else []) + (["run"] if with_run else []) + [
        "personal ppl", "global ppl", "improved %", "gain % ±sem", "bytes sent", "wall s"]
    body = [[r.method] + ([r.privacy.label] if with_privacy else []) + ([r.run_name] if with_run else []) + [
        num(r.personal_ppl, ".3f"), num(r.global_ppl, ".3f"), num(r.improved_pct, ".0f"),
        "-" if r.gain_mean is None else f"{r.gain_mean:+.2f} ±{r.gain_sem or 0.0:.2f}",
        _fmt_bytes(r.bytes_sent), num(r.wall_seconds, ".1f")] for r in rows]
    return _layout(head, body, left=2 if with_privacy else 1)


def _layout(head: list[str], body: list[list[str]], *, left: int = 1) -> str:
    """Aligned text table: the first ``left`` columns left-aligned, the rest right."""
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [head, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def format_privacy_table(rows: list[MethodRow]) -> str:
    """The privacy report of each compared run; "" when none used DP or was audited."""
    if not any(r.privacy.mode != "none" or r.privacy.audited for r in rows):
        return ""

    def num(value: float, fmt: str = ".3g") -> str:
        return "-" if math.isnan(value) else format(value, fmt)

    head = ["method", "privacy", "unit", "eps sample", "eps user", "delta sample", "delta user",
            "MIA AUC", "TPR@1%", "personal AUC", "personal TPR@1%", "exposure", "eps lb", "eps lb personal"]
    body = []
    for r in rows:
        p = r.privacy
        body.append([r.method, p.label, p.unit_label, num(p.epsilon_sample, ".3f"), num(p.epsilon_user, ".3f"),
                     num(p.delta_sample, ".2g"), num(p.delta_user, ".2g"), num(p.mia_auc, ".3f"),
                     num(p.mia_tpr, ".3f"), num(p.mia_auc_personal, ".3f"), num(p.mia_tpr_personal, ".3f"),
                     f"{p.exposure:.2f}@{p.exposure_reps}" if p.exposure_reps else "-",
                     num(p.eps_lower_bound, ".2f"), num(p.eps_lower_bound_personal, ".2f")])
    return _layout(head, body, left=3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="MLflow experiment name")
    parser.add_argument("--tracking-uri", required=True, help="e.g. sqlite:////abs/path/mlflow.db")
    parser.add_argument("--all", action="store_true", help="every finished run, not the latest per method")
    args = parser.parse_args(argv)
    try:
        rows = collect(args.tracking_uri, args.experiment, every_run=args.all)
    except CompareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(rows, with_run=args.all))
    privacy = format_privacy_table(rows)
    if privacy:
        print(f"\nPrivacy report (docs/privacy.md)\n{privacy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
