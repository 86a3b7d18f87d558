"""The end-of-run privacy audit and privacy report (``privacy.audit=true``).

Runs ``fedslm.audit.run.run_audit`` on the final global adapter, then writes the run's
privacy report to its output dir and MLflow: ``privacy_report.json`` and ``.md``
(epsilon at each level the run had, delta, unit of privacy, utility, the audit's
numbers) and ``privacy_utility.png``. ``fedslm.simulations.audit`` calls the same function for
a finished run. Reads the run's privacy figures from its ``rounds.csv``, so it works
the same in the ServerApp and afterwards.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedslm.audit.run import DEFAULT_DELTA, run_audit
from fedslm.config import ExperimentConfig
from fedslm.rundir import clients_dir_of_run
from fedslm.server.plots import plt, save_figure

REPORT_JSON, REPORT_MD, REPORT_PLOT = "privacy_report.json", "privacy_report.md", "privacy_utility.png"
UNITS = {
    "none": "none (no differential privacy)",
    "dp_sgd": "record = one packed block of training.seq_len tokens of a client's train texts",
    "dp_fedavg": "client = everything one client contributes, over all rounds",
    "dp_sgd+dp_fedavg": "both: record (a packed block; each client's DP-SGD ledger) and client "
                        "(everything it contributes; the server's DP-FedAvg ledger)",
}
# Mean exposure of a canary the model did not memorise (uniform rank over N): ~log2(e)
CHANCE_EXPOSURE = 1 / math.log(2)
EPSILON_COLUMNS = (("dp_epsilon_sample_max", "epsilon_sample_level"),
                   ("dp_epsilon_user", "epsilon_user_level"))


def privacy_unit(cfg: ExperimentConfig) -> str:
    """What one record is in this run (``privacy.unit=document``: a whole document)."""
    unit = UNITS[cfg.privacy.mode]
    if cfg.privacy.unit == "document":
        unit = unit.replace("one packed block of training.seq_len tokens of a client's train texts",
                            "one train document (truncated to training.seq_len tokens)")
        unit = unit.replace("record (a packed block;", "record (a document;")
    return unit


def read_rounds(path: Path) -> list[dict[str, float]]:
    """rounds.csv as numbers (empty cells dropped)."""
    with open(path, newline="") as fh:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)}
                for row in csv.DictReader(fh)]


def privacy_figures(rounds: list[dict[str, float]]) -> dict[str, float]:
    """The last reported epsilon at each level the run had, and its delta."""
    out: dict[str, float] = {}
    for column, name in EPSILON_COLUMNS:
        values = [r[column] for r in rounds if column in r]
        if values:
            out[name] = values[-1]
    deltas = [r["dp_delta"] for r in rounds if "dp_delta" in r]
    if deltas:
        out["delta"] = deltas[-1]
    return out


def utility(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Last reported quality, and the first perplexity (round 0: before training) beside it."""
    out = {}
    for key in ("eval_loss", "eval_perplexity", "central_loss", "central_perplexity"):
        values = [r[key] for r in rounds if key in r]
        if values:
            out[key] = values[-1]
            if key.endswith("perplexity") and len(values) > 1:
                out[f"{key}_initial"] = values[0]
    return out


def build_report(cfg: ExperimentConfig, rounds: list[dict[str, float]],
                 audit: Mapping[str, float], *, delta: float) -> dict[str, Any]:
    privacy = privacy_figures(rounds)
    return {
        "mode": cfg.privacy.mode,
        "unit": privacy_unit(cfg),
        "audit_unit": "text (a client document; canary = one template text repeated r times)",
        "noise_multiplier": cfg.privacy.noise_multiplier if cfg.privacy.mode != "none" else 0.0,
        **privacy,
        "delta": privacy.get("delta", delta),
        "rounds": int(rounds[-1]["round"]) if rounds else 0,
        "utility": utility(rounds),
        "audit": dict(audit),
    }


def report_markdown(report: Mapping[str, Any]) -> str:
    def num(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["# Privacy report", "", "| | |", "|---|---|",
             f"| mode | {report['mode']} |", f"| unit of privacy | {report['unit']} |"]
    for key in ("epsilon_sample_level", "epsilon_user_level", "delta", "noise_multiplier", "rounds"):
        if key in report:
            lines.append(f"| {key} | {num(report[key])} |")
    lines += [f"| {k} | {num(v)} |" for k, v in report["utility"].items()]
    lines += ["", f"## Audit (unit: {report['audit_unit']})", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {num(v)} |" for k, v in report["audit"].items()]
    return "\n".join(lines) + "\n"


NO_DP_CURVE = "clients' test perplexity"
CURVE_LABELS = {"dp_epsilon_sample_max": "test perplexity vs sample-level epsilon (max over clients)",
                "dp_epsilon_user": "test perplexity vs user-level epsilon"}


def utility_curves(rounds: list[dict[str, float]]) -> dict[str, list[tuple[float, float]]]:
    """(epsilon, clients' test perplexity) per round, one curve per DP level the run logged
    (``dp_sgd+dp_fedavg``: both); without DP one curve against the round."""
    curves = {}
    for column, _ in EPSILON_COLUMNS:
        pts = [(r[column], r["eval_perplexity"]) for r in rounds if column in r and "eval_perplexity" in r]
        if pts:
            curves[CURVE_LABELS[column]] = pts
    if not curves and not any(c in r for c, _ in EPSILON_COLUMNS for r in rounds):
        pts = [(r["round"], r["eval_perplexity"]) for r in rounds if "eval_perplexity" in r]
        if pts:
            curves[NO_DP_CURVE] = pts
    return curves


def plot_privacy_utility(rounds: list[dict[str, float]], report: Mapping[str, Any],
                         path: Path) -> Path:
    """Left: utility per round against the cumulative epsilon spent at each level (or the
    round, without DP) with the audit's lower bound; right: canary exposure against
    repetitions."""
    fig, (ax_pu, ax_exp) = plt.subplots(1, 2, figsize=(10, 4))
    curves = utility_curves(rounds)
    for (label, pts), marker in zip(curves.items(), "o^"):
        ax_pu.plot(*zip(*pts), marker=marker, label=label)
    audit = report["audit"]
    with_dp = any(label != NO_DP_CURVE for label in curves)
    if with_dp and "audit_eps_lower_bound" in audit and math.isfinite(audit["audit_eps_lower_bound"]):
        ax_pu.axvline(audit["audit_eps_lower_bound"], color="C3", linestyle="--",
                      label="empirical epsilon lower bound (95%)")
    ax_pu.set(title=f"Privacy-utility ({report['mode']})",
              xlabel="cumulative epsilon (accountant)" if with_dp else "round (no DP: epsilon = inf)",
              ylabel="perplexity")
    reps = sorted(int(k[len("audit_exposure_rep"):]) for k in audit
                  if k.startswith("audit_exposure_rep") and not k.endswith("_max"))
    if reps:
        x = np.arange(len(reps))
        ax_exp.bar(x - 0.2, [audit[f"audit_exposure_rep{r}"] for r in reps], 0.4, label="mean")
        ax_exp.bar(x + 0.2, [audit[f"audit_exposure_rep{r}_max"] for r in reps], 0.4, label="max")
        ax_exp.axhline(audit["audit_exposure_ceiling"], color="k", linestyle=":", label="ceiling")
        ax_exp.axhline(CHANCE_EXPOSURE, color="grey", linestyle="--",
                       label=f"chance (mean) {CHANCE_EXPOSURE:.2f}")
        ax_exp.set_xticks(x, [str(r) for r in reps])
    auc = "/".join(f"{audit[f'audit_mia_{k}_auc']:.3f}" for k in ("loss", "calibrated")
                   if f"audit_mia_{k}_auc" in audit)
    ax_exp.set(title=f"Canary exposure (MIA AUC loss/calibrated {auc})",
               xlabel="repetitions in training", ylabel="exposure (bits)")
    for ax in (ax_pu, ax_exp):
        ax.grid(alpha=0.3)
        if ax.lines or ax.patches:
            ax.legend(fontsize=8)
    return save_figure(fig, path)


def audit_and_report(cfg: ExperimentConfig, output_dir: Path, arrays: Mapping[str, np.ndarray],
                     tracker: Any = None) -> dict[str, Any]:
    """Audit the final global adapter, write the report to ``output_dir`` and the tracker."""
    rounds = read_rounds(output_dir / "rounds.csv")
    delta = privacy_figures(rounds).get("delta") or cfg.privacy.delta or DEFAULT_DELTA
    audit = run_audit(cfg, arrays, delta=delta, clients_dir=clients_dir_of_run(cfg, output_dir))
    report = build_report(cfg, rounds, audit, delta=delta)
    (output_dir / REPORT_JSON).write_text(json.dumps(report, indent=2, default=float) + "\n")
    (output_dir / REPORT_MD).write_text(report_markdown(report))
    plot_privacy_utility(rounds, report, output_dir / REPORT_PLOT)
    if tracker is not None:
        tracker.log_metrics(audit, step=max(report["rounds"], 1))
        for name in (REPORT_JSON, REPORT_MD, REPORT_PLOT):
            tracker.log_artifact(output_dir / name, "privacy")
    return report
