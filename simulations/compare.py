"""Compare personalization methods recorded in one MLflow experiment: one table.

    python -m fedslm.simulations.compare --experiment NAME --tracking-uri sqlite:////abs/outputs/mlflow.db

One row per ``personalization.method`` (its most recent FINISHED run; ``--all`` lists
every finished run). Quality numbers are the last evaluated round's means over clients,
each client counting once, on the clients' own test splits: ``personal ppl`` (clients
with a personal adapter), ``global ppl`` (every client, global model) and ``improved``
(share of clients whose personal perplexity is lower), ``gain`` (mean over clients of
100 * (1 - ppl_personal / ppl_global), with its standard error). ``bytes sent`` is adapter
payload over the whole run, server->clients plus clients->server; ``wall`` is the MLflow
run's duration.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from fedslm.simulations.report import _fmt_bytes

METHOD_ORDER = ("none", "local_only", "finetune", "split", "dual")


class CompareError(RuntimeError):
    """The experiment cannot be compared; one-line message."""


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


def _sum_history(client, run_id: str, key: str) -> float:
    return float(sum(m.value for m in client.get_metric_history(run_id, key)))


def collect(tracking_uri: str, experiment: str, *, every_run: bool = False) -> list[MethodRow]:
    """Rows for the experiment's finished runs (latest per method unless ``every_run``)."""
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
        if method in seen and not every_run:
            continue
        seen.add(method)
        metrics = run.data.metrics  # the value at the last step, i.e. the last round
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
        ))
    order = {m: i for i, m in enumerate(METHOD_ORDER)}
    return sorted(rows, key=lambda r: order.get(r.method, len(order)))  # stable: newest first


def format_table(rows: list[MethodRow], *, with_run: bool = False) -> str:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    head = ["method"] + (["run"] if with_run else []) + [
        "personal ppl", "global ppl", "improved %", "gain % ±sem", "bytes sent", "wall s"]
    body = [[r.method] + ([r.run_name] if with_run else []) + [
        num(r.personal_ppl, ".3f"), num(r.global_ppl, ".3f"), num(r.improved_pct, ".0f"),
        "-" if r.gain_mean is None else f"{r.gain_mean:+.2f} ±{r.gain_sem or 0.0:.2f}",
        _fmt_bytes(r.bytes_sent), num(r.wall_seconds, ".1f")] for r in rows]
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [head, *body]]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


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
    return 0


if __name__ == "__main__":
    sys.exit(main())
