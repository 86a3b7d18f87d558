"""Empirical privacy audit: no DP vs DP-SGD at a few noise levels, on the synthetic data.

Each setting is a real run on Flower's simulation engine with ``privacy.audit=true``:
canaries planted in every client's train texts at 1, 4 and 16 repetitions, the final
global adapter audited on the server (``fedslm.server.audit``). One row per setting: utility
(clients' test perplexity), the accountant's epsilon (largest over clients, per packed
block), canary exposure per repetition count, membership-inference AUC and TPR at 1% FPR
(loss-threshold and reference-calibrated), and the epsilon lower bound the better attack
implies at the run's delta (95% Clopper-Pearson)::

    python -m fedslm.simulations.bench audit                       # none, z=1.2, 2, 5 (~6-8 min)
    python -m fedslm.simulations.bench audit --noise 1.5 --tiny    # smoke: 2 clients x 1 round
    python -m fedslm.simulations.bench audit --shakespeare ../shared/data/tinyshakespeare.txt --noise 2

``--personalization split,dual,local_only,finetune`` runs every setting once per method
and reports each method's personal gain (mean over clients of 100 * (1 - personal ppl /
global ppl) on their own test splits, with its standard error) beside the membership
inference against the personal adapters (``audit_mia_personal_*``)::

    python -m fedslm.simulations.bench audit --personalization split,dual,local_only,finetune \
        --noise 1.1 --canaries 0 --heterogeneity 1 --clients 4 --rounds 4 --steps 15

``--null`` adds, per run, the personal attacks on 14 twinned clients with 95% intervals
and p-values: own model, a twin's model that saw neither split (shift check), the base
model, and the twin as reference (``audit_null.py``). ``--mode dp_fedavg`` makes the
``--noise`` runs user-level DP-FedAvg (the row's epsilon is then the user-level one)::

    python -m fedslm.simulations.bench audit --personalization local_only,split --noise 1.3 \
        --canaries 0 --heterogeneity 1 --num-topics 7 --clients 14 --rounds 4 --steps 15 --null
    python -m fedslm.simulations.bench audit --mode dp_fedavg --noise 2,3.2,9 --no-baseline
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from fedslm.inference import read_adapter
from fedslm.server.audit import read_rounds
from fedslm.simulations.bench.audit_null import attack_rows, null_attacks
from fedslm.simulations.bench.common import experiment, machine, run_engine, table, write_json

COLUMNS = ["privacy", "epsilon", "ppl0", "ppl", "exp@1", "exp@4", "exp@16", "exp_max@16", "ceiling",
           "auc_loss", "auc_cal", "tpr1%_loss", "tpr1%_cal", "eps_lb"]
PERSONAL_COLUMNS = ["method", "privacy", "epsilon", "global_ppl", "personal_ppl", "gain", "gain_sem",
                    "auc_loss", "auc_cal", "p_auc_loss", "p_auc_cal", "p_tpr1%_loss", "p_tpr1%_cal",
                    "eps_lb", "p_eps_lb"]
NULL_COLUMNS = ["method", "privacy", "epsilon", "clients", "attack", "members", "non_members",
                "auc", "auc_low", "auc_high", "p", "tpr1%"]


def setting_overrides(args: argparse.Namespace, noise: float | None, method: str = "none") -> dict[str, Any]:
    overrides: dict[str, Any] = {
        "personalization.method": method,
        "federation.num_clients": args.clients, "federation.num_rounds": args.rounds,
        "training.local_steps": args.steps, "data.docs_per_client": args.docs,
        "data.test_fraction": args.test_fraction,
        "privacy.audit": True, "audit.canaries": args.canaries,
        "audit.canary_clients": list(range(args.clients)), "audit.candidates": args.candidates,
    }
    if args.shakespeare:  # one client per speaker; at most mia_records texts per client audited
        overrides.update({"data.source": "shakespeare", "data.path": args.shakespeare,
                          "audit.mia_records": args.mia_records})
    if args.heterogeneity is not None:
        overrides["data.heterogeneity"] = args.heterogeneity
    if args.num_topics is not None:
        overrides["data.num_topics"] = args.num_topics
    if noise is not None:
        overrides.update({"privacy.mode": args.mode, "privacy.noise_multiplier": noise})
    return overrides


def row_of(report: dict[str, Any], label: str) -> dict[str, Any]:
    a = report["audit"]
    epsilon = report.get("epsilon_sample_level", report.get("epsilon_user_level", float("inf")))
    return {
        "privacy": label, "epsilon": epsilon,
        "ppl0": report["utility"].get("eval_perplexity_initial"),
        "ppl": report["utility"].get("eval_perplexity"),
        "exp@1": a.get("audit_exposure_rep1"), "exp@4": a.get("audit_exposure_rep4"),
        "exp@16": a.get("audit_exposure_rep16"), "exp_max@16": a.get("audit_exposure_rep16_max"),
        "ceiling": a.get("audit_exposure_ceiling"),
        "auc_loss": a["audit_mia_loss_auc"], "auc_cal": a["audit_mia_calibrated_auc"],
        "tpr1%_loss": a["audit_mia_loss_tpr_at_1pct_fpr"],
        "tpr1%_cal": a["audit_mia_calibrated_tpr_at_1pct_fpr"],
        "eps_lb": a["audit_eps_lower_bound"], "delta": report["delta"],
    }


def personal_row_of(report: dict[str, Any], last_round: dict[str, float], label: str, method: str) -> dict[str, Any]:
    """The personal figures of a run: its last round's gain and both models' perplexity
    (rounds.csv), and the attack on the personal adapters (the privacy report)."""
    a = report["audit"]
    return {
        "method": method, **row_of(report, label),
        "global_ppl": last_round.get("global_perplexity_mean"),
        "personal_ppl": last_round.get("personal_perplexity_mean"),
        "gain": last_round.get("gain_mean"), "gain_sem": last_round.get("gain_sem"),
        "p_auc_loss": a.get("audit_mia_personal_loss_auc"), "p_auc_cal": a.get("audit_mia_personal_calibrated_auc"),
        "p_tpr1%_loss": a.get("audit_mia_personal_loss_tpr_at_1pct_fpr"),
        "p_tpr1%_cal": a.get("audit_mia_personal_calibrated_tpr_at_1pct_fpr"),
        "p_eps_lb": a.get("audit_eps_lower_bound_personal"),
        "p_clients": a.get("audit_mia_personal_clients"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedslm.simulations.bench audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="local steps per round")
    parser.add_argument("--docs", type=int, default=40, help="documents per client")
    parser.add_argument("--test-fraction", type=float, default=0.5,
                        help="held-out share per client: the non-members (0.5: as many as members)")
    parser.add_argument("--canaries", type=int, default=1, help="per client and repetition count")
    parser.add_argument("--candidates", type=int, default=999)
    parser.add_argument("--noise", default="1.2,2,5",
                        help="DP-SGD noise multipliers, comma-separated ('' = no DP run only)")
    parser.add_argument("--shakespeare", default="", metavar="PATH",
                        help="tinyshakespeare.txt: clients are speakers instead of synthetic")
    parser.add_argument("--mia-records", type=int, default=100,
                        help="with --shakespeare: members and non-members per client")
    parser.add_argument("--personalization", default="", metavar="METHODS",
                        help="comma-separated personalization methods: every setting once per method")
    parser.add_argument("--heterogeneity", type=float, default=None, help="data.heterogeneity (synthetic)")
    parser.add_argument("--num-topics", type=int, default=None, help="data.num_topics (synthetic)")
    parser.add_argument("--mode", default="dp_sgd", choices=["dp_sgd", "dp_fedavg"],
                        help="privacy.mode of the --noise runs (dp_fedavg: user-level, z per client update)")
    parser.add_argument("--null", action="store_true",
                        help="with --personalization: also attack each client's texts with its twin's "
                             "personal model, with 95%% intervals (simulations/bench/audit_null.py)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run without DP")
    parser.add_argument("--tiny", action="store_true", help="2 clients x 1 round x 2 steps")
    parser.add_argument("--echo", action="store_true", help="show the engine's log")
    parser.add_argument("--out", help="JSON path (default outputs/bench/audit.json)")
    args = parser.parse_args(argv)
    try:
        noises = [float(z) for z in args.noise.split(",") if z.strip()]
    except ValueError:
        parser.error(f"--noise: expected comma-separated numbers, got {args.noise!r}")
    if args.tiny:
        args.clients, args.rounds, args.steps, args.docs, args.candidates = 2, 1, 2, 8, 63
    settings = ([] if args.no_baseline else [None]) + noises
    methods = [m.strip() for m in args.personalization.split(",") if m.strip()]
    runs = [(m, z) for m in methods or ["none"] for z in settings]
    if args.null and not methods:
        parser.error("--null needs --personalization")
    rows: list[dict[str, Any]] = []
    null_rows: list[dict[str, Any]] = []
    for i, (method, noise) in enumerate(runs):
        label = "none" if noise is None else f"{args.mode} z={noise:g}"
        cfg = experiment(setting_overrides(args, noise, method), run_name=f"audit-{i}")
        print(f"[audit] run {i + 1}/{len(runs)}: {method} {label}", flush=True)
        run = run_engine(cfg, echo=args.echo)
        if run.summary.get("status") != "ok":
            print(f"error: {method} {label}: the run did not finish ({run.summary})")
            return 1
        out = Path(cfg.output_dir)
        report = json.loads((out / "privacy_report.json").read_text())
        row = row_of(report, label) if not methods else personal_row_of(
            report, read_rounds(out / "rounds.csv")[-1], label, method)
        rows.append({**row, "output_dir": cfg.output_dir, "seconds": round(run.wall, 1)})
        if args.null:
            final = read_adapter(out / "adapter")[0]
            attacks, is_member, clients = null_attacks(cfg, final, out / "clients")
            null_rows += [{"method": method, "privacy": label, "epsilon": row["epsilon"], "clients": clients, **r}
                          for r in attack_rows(attacks, is_member)]
    print(table(rows, PERSONAL_COLUMNS if methods else COLUMNS))
    if null_rows:
        print(table(null_rows, NULL_COLUMNS))
    path = write_json("audit", {"machine": machine(), "setting": {
        k: getattr(args, k) for k in ("clients", "rounds", "steps", "docs", "test_fraction", "canaries",
                                      "candidates", "shakespeare", "personalization", "heterogeneity",
                                      "num_topics", "mode")},
        "rows": rows, "null_rows": null_rows}, args.out)
    print(f"JSON: {path}")
    return 0
