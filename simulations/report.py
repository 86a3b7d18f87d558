"""The end-of-run summary a person reads in the terminal."""

from __future__ import annotations

import functools


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _cell(row: dict, key: str, fmt: str) -> str:
    """``row[key]`` formatted, or "-" for a round that has no such value."""
    return format(row[key], fmt) if key in row else "-"


COLUMN_TITLES = {"perplexity": ("ppl", ".2f"), "accuracy": ("accuracy", ".3f"),
                 "macro_f1": ("macro-F1", ".3f"), "rouge_l": ("ROUGE-L", ".3f")}


def summary_table(rounds: list[dict], metrics: tuple[str, ...] = ("perplexity",)) -> str:
    """Per round: train loss, eval loss, the task's metrics on the clients' test splits
    (``Task.report_keys``), bytes up/down, seconds. With federated evaluation off
    (``strategy.fraction_evaluate=0``) the evaluation columns are the server's own
    (``central_*``), when it has them."""
    central = (not any("eval_loss" in r for r in rounds)) and any("central_loss" in r for r in rounds)
    source = "central" if central else "eval"
    titles = [COLUMN_TITLES.get(m, (m, ".3f")) for m in metrics]
    lw = max(9, len(f"{source} loss"))
    header = (f"{'round':>5} {'train loss':>10} {f'{source} loss':>{lw}} "
              + "".join(f"{t:>9} " for t, _ in titles)
              + f"{'up':>10} {'down':>10} {'seconds':>7}")
    lines = [header, "-" * len(header)]
    for r in rounds:
        num = functools.partial(_cell, r)
        cells = "".join(f"{num(f'{source}_{m}', '9' + fmt):>9} " for m, (_, fmt) in zip(metrics, titles))
        lines.append(
            f"{r['round']:>5} {num('train_loss', '10.4f'):>10} {num(f'{source}_loss', f'{lw}.4f'):>{lw}} "
            f"{cells}"
            f"{_fmt_bytes(r['bytes_up']) if 'bytes_up' in r else '-':>10} "
            f"{_fmt_bytes(r['bytes_down']) if 'bytes_down' in r else '-':>10} "
            f"{num('round_seconds', '7.1f'):>7}")
    return "\n".join(lines)


def where_to_look(summary: dict) -> str:
    uri = summary.get("mlflow_uri", "")
    lines = [f"Outputs:      {summary['output_dir']}",
             f"Adapter:      {summary['adapter_dir']}  (PeftModel.from_pretrained(base, path))"]
    privacy = summary.get("privacy")
    if privacy:
        lines.append(f"Privacy:      {privacy_line(privacy)}")
    if uri:
        lines += [f"MLflow run:   {summary['mlflow_run_id']} in {uri}",
                  mlflow_hint(uri, summary.get("mlflow_experiment_id"), summary["mlflow_run_id"])]
    return "\n".join(lines)


def mlflow_hint(uri: str, experiment_id: str | None, run_id: str) -> str:
    """How to open the run: a tracking server already serves its UI at its own address;
    a database or file store needs ``mlflow ui`` started on it."""
    if uri.startswith(("http://", "https://")):
        page = f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}" if experiment_id else uri
        return f"Open it at:   {page}"
    if uri.startswith("databricks"):
        return "Open it in:   your Databricks workspace's Experiments page"
    return f"Open it with: mlflow ui --backend-store-uri {uri}"


def privacy_line(privacy: dict) -> str:
    """The epsilon a user reads at the end of a run, with what it covers."""
    parts = []
    if "epsilon_sample_max" in privacy:  # with both levels its delta is delta_sample
        parts.append(f"sample-level epsilon {privacy['epsilon_sample_max']:.3g} at delta <= "
                     f"{privacy.get('delta_sample', privacy['delta']):.2g} (per record, max over clients)")
    if "epsilon_user" in privacy:
        parts.append(f"user-level epsilon {privacy['epsilon_user']:.3g} at delta {privacy['delta']:.2g} "
                     f"(whole client contribution, {privacy['releases']} releases)")
    text = "; ".join(parts) or f"{privacy.get('mode')}: nothing released"
    if privacy.get("stopped_early"):
        text += f"; stopped early: {privacy['stopped_early']}"
    return text


def personal_table(rounds: list[dict]) -> str:
    """Per round, means over clients on their own test splits: global vs personal
    perplexity, the mean per-client gain and the share of clients improved."""
    header = f"{'round':>5} {'global ppl':>10} {'personal ppl':>12} {'gain %':>7} {'improved':>8} {'clients':>7}"
    lines = [header, "-" * len(header)]
    for r in rounds:
        num = functools.partial(_cell, r)
        lines.append(
            f"{r['round']:>5} {num('global_perplexity_mean', '10.3f'):>10} "
            f"{num('personal_perplexity_mean', '12.3f'):>12} {num('gain_mean', '7.2f'):>7} "
            f"{num('clients_improved_pct', '7.0f') + '%' if 'clients_improved_pct' in r else '-':>8} "
            f"{num('personal_clients', '7.0f'):>7}")
    return "\n".join(lines)
